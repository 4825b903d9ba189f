"""data.py: readers, the sec. 3.2 recipe, the sentence splitter, TrainLoader (random draws, rank shares, micro-batch
chunks, exact resume across worker counts), bad-input handling. Real text from ../shared/data/text."""
import gzip
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import recipe
from data import DataError, TrainLoader, text_hash
from tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tokenizer():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (the demo student's vocabulary) through tokenizer.TextTokenizer."""
    import teachers
    return TextTokenizer.from_pretrained(teachers.minilm_path() / "tokenizer.json", max_length=512)


@pytest.fixture(scope="module", autouse=True)
def _index_cache(tmp_path_factory):
    """TrainLoader index caches go to a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JASPER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def texts_dir(data_dir, tmp_path_factory):
    """A real texts.jsonl (3,000 rows) built by the CLI from the shared data."""
    out = tmp_path_factory.mktemp("built")
    assert data.main(["build", "--out", str(out), "--n-texts", "3000", "--seed", "7",
                      "--data-dir", str(data_dir)]) == 0
    return out


def _passages(data_dir):
    return [json.loads(l) for l in open(data_dir / "text" / "passages.jsonl", encoding="utf-8")]


def _sigma_ok(k, n, p, z=4.5):
    """|k/n - p| within z binomial standard errors."""
    return abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)


# ==================================================================================================================
# sentence splitter on real text
# ==================================================================================================================

def _doc_with(docs, fragment):
    for d in docs:
        if fragment in d["text"]:
            return d["text"]
    pytest.fail(f"fragment not in shared passages: {fragment!r}")


@pytest.mark.parametrize("fragment", [
    "engineer James Eads of St. Louis , Missouri",              # abbreviation (St.) before a capital
    "Mr. Arjona is no saccharine lover boy",                     # title inside a quote
    "English author A. S. Byatt said",                           # initials
    "behind R. A. Dickey , receiving",                            # initials
    "The first use of ironclads in action came in the U.S. Civil War .",  # dotted abbreviation
    "eye pattern ( T4.0 @-@ T4.5 )",                              # decimals
    "causing P4.7 billion ( 2003 PHP , $ 86 million 2003 USD ) in damage .",
])
def test_splitter_keeps_abbreviations_initials_decimals(data_dir, fragment):
    doc = _doc_with(_passages(data_dir), fragment)
    sents = recipe.split_sentences(doc)
    assert len(sents) > 1, "the document has several sentences"
    assert any(fragment in s for s in sents), f"{fragment!r} was cut: {[s for s in sents if fragment[:12] in s]}"


@pytest.mark.parametrize("end, nxt", [
    ('to pay more for a product."', "Those two US retailers have not yet been named."),   # ." then a capital
    ("The first use of ironclads in action came in the U.S. Civil War .", "The"),         # tokenised " . "
])
def test_splitter_cuts_after_closing_quote_and_spaced_period(data_dir, end, nxt):
    doc = _doc_with(_passages(data_dir), end)
    sents = recipe.split_sentences(doc)
    i = next(i for i, s in enumerate(sents) if s.endswith(end))
    assert sents[i + 1].startswith(nxt)


def test_splitter_does_not_cut_before_lowercase_after_quote(data_dir):
    doc = _doc_with(_passages(data_dir), "that's a big croc!\" he said.")
    assert any(s.endswith("that's a big croc!\" he said.") for s in recipe.split_sentences(doc))


def test_splitter_rules_on_constructed_cases():
    assert recipe.split_sentences("Mr. Howard met Dr. Smith at 3.30 p.m. on Jan. 5. They talked.") == [
        "Mr. Howard met Dr. Smith at 3.30 p.m. on Jan. 5.", "They talked."]
    assert recipe.split_sentences('"Why?" he asked. She shrugged. Wait... What? No!') == [
        '"Why?" he asked.', "She shrugged.", "Wait...", "What?", "No!"]
    assert recipe.split_sentences("See Fig. 3 and pp. 12-14. Smith et al. Nature printed it.\n\nnew paragraph") == [
        "See Fig. 3 and pp. 12-14.", "Smith et al. Nature printed it.", "new paragraph"]
    assert recipe.split_sentences("Acme Ltd. The firm grew.") == ["Acme Ltd.", "The firm grew."]


def test_splitter_agrees_with_pysbd_on_real_text(data_dir):
    """Boundary agreement with an independent rule-based splitter (pysbd, Golden Rules) on quote-free passages
    of edited prose (pysbd keeps quoted sentences together and misreads the chat transcripts of nltk-webtext, so
    those are left out of the comparison; the cases above cover quotes)."""
    pysbd = pytest.importorskip("pysbd")  # test-only reference, in requirements-test.txt
    seg = pysbd.Segmenter(language="en", clean=False)
    docs = [d["text"] for d in _passages(data_dir) if d["source"] != "nltk-webtext" and len(d["text"]) < 700
            and not any(q in d["text"] for q in "\"\u201c\u201d")]
    docs = random.Random(0).sample(docs, 200)

    def ends(sents, text):
        out, pos = set(), 0
        for s in (s.strip() for s in sents):
            if s:
                pos = text.index(s, pos) + len(s)
                out.add(pos)
        return out

    tp = fp = fn = 0
    for t in docs:
        a, b = ends(recipe.split_sentences(t), t), ends(seg.segment(t), t)
        tp, fp, fn = tp + len(a & b), fp + len(a - b), fn + len(b - a)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert tp > 500
    assert precision > 0.98 and recall > 0.98, (precision, recall)


def test_split_into_pieces_sizes_and_coverage(data_dir):
    rng = random.Random(0)
    sizes = Counter()
    n_docs = 0
    for d in _passages(data_dir):
        t = d["text"]
        sents = recipe.split_sentences(t)
        if len(sents) < 10:
            continue
        pieces = recipe.split_into_pieces(t, rng, 1, 10)
        # pieces are consecutive runs of whole sentences, in order, covering the document
        assert [s for p in pieces for s in recipe.split_sentences(p)] == sents
        sizes[len(recipe.split_sentences(pieces[0]))] += 1  # the first piece's size is the draw (>= 10 sentences)
        n_docs += 1
        if n_docs == 1000:
            break
    assert n_docs == 1000 and set(sizes) == set(range(1, 11)), sizes  # every size 1..10 occurs, none outside
    assert all(_sigma_ok(sizes[k], n_docs, 0.1) for k in range(1, 11)), sizes  # k ~ U{1..10}


# ==================================================================================================================
# the recipe
# ==================================================================================================================

def _sources(data_dir, weight=0.8):
    return [recipe.SourceSpec("passages", str(data_dir / "text" / "passages.jsonl"), weight, "passage", True),
            recipe.SourceSpec("short", str(data_dir / "text" / "short.jsonl"), 1 - weight, "short", False)]


def test_recipe_rates_match_parameters(data_dir):
    n = 12_000
    stats = recipe.RecipeStats()
    out = list(data.recipe_stream(_sources(data_dir), seed=3, n_texts=n, stats=stats))
    assert len(out) == n and stats.exhausted is None
    n_passage_texts = sum(1 for e in out if not e.kind.startswith("short"))
    assert _sigma_ok(n_passage_texts, n, 0.8), n_passage_texts / n                     # 80/20 mix (texts)
    assert _sigma_ok(stats.docs_split["passages"], stats.docs["passages"], 0.3)        # 30% of documents split
    assert _sigma_ok(stats.shuffled, n, 0.0008)                                          # 0.08% word-shuffled
    assert {e.kind.split("+")[0] for e in out} == {"passage", "split", "short"}
    # other ratios are honoured too (each ratio is a parameter)
    stats2 = recipe.RecipeStats()
    out2 = list(data.recipe_stream(_sources(data_dir, 0.5), seed=3, n_texts=4000, split_ratio=0.6,
                                   shuffle_ratio=0.1, stats=stats2))
    assert _sigma_ok(sum(1 for e in out2 if not e.kind.startswith("short")), 4000, 0.5)
    assert _sigma_ok(stats2.docs_split["passages"], stats2.docs["passages"], 0.6)
    assert _sigma_ok(stats2.shuffled, 4000, 0.1)


def test_shuffled_texts_are_word_permutations(data_dir):
    plain = list(data.recipe_stream(_sources(data_dir), seed=5, n_texts=1500, shuffle_ratio=0.0))
    shuf = list(data.recipe_stream(_sources(data_dir), seed=5, n_texts=1500, shuffle_ratio=0.3))
    changed = 0
    for a, b in zip(plain, shuf):  # mix and split streams are independent of the shuffle stream
        assert sorted(a.text.split()) == sorted(b.text.split())
        if b.kind.endswith("+shuffled"):
            changed += a.text != b.text
        else:
            assert a.text == b.text
    assert changed > 300


def test_recipe_same_seed_same_stream(data_dir):
    a = [(e.text, e.kind) for e in data.recipe_stream(_sources(data_dir), seed=11, n_texts=2000,
                                                       shuffle_ratio=0.05)]
    b = [(e.text, e.kind) for e in data.recipe_stream(_sources(data_dir), seed=11, n_texts=2000,
                                                       shuffle_ratio=0.05)]
    c = [(e.text, e.kind) for e in data.recipe_stream(_sources(data_dir), seed=12, n_texts=2000,
                                                       shuffle_ratio=0.05)]
    assert a == b
    assert a != c


def test_build_writes_rows_atomically(texts_dir):
    rows = [json.loads(l) for l in open(texts_dir / "texts.jsonl", encoding="utf-8")]
    assert len(rows) == 3000
    assert [r["id"] for r in rows] == list(range(3000))
    assert all(set(r) == {"id", "text", "hash", "source", "kind"} for r in rows)
    assert all(r["hash"] == text_hash(r["text"]) for r in rows)
    assert not [p for p in os.listdir(texts_dir) if ".tmp" in p]
    meta = json.loads((texts_dir / "build.json").read_text())
    assert meta["n_texts"] == 3000 and meta["params"]["split_ratio"] == 0.3


def test_build_cli_default_data_dir_env_and_missing_input(data_dir, tmp_path):
    env = dict(os.environ, JASPER_DATA_DIR=str(data_dir))
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "build", "--out", str(tmp_path / "a"),
                        "--n-texts", "200"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "texts/s" in r.stderr  # progress line with a rate
    assert sum(1 for _ in open(tmp_path / "a" / "texts.jsonl")) == 200
    env["JASPER_DATA_DIR"] = str(tmp_path / "nowhere")
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "build", "--out", str(tmp_path / "b")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--passages" in r.stderr and "passages.jsonl" in r.stderr
    assert not (tmp_path / "b" / "texts.jsonl").exists()


# ==================================================================================================================
# readers
# ==================================================================================================================

def test_readers_jsonl_parquet_txt_folder_glob(data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    real = [d["text"] for d in _passages(data_dir)[:50]]
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "a.jsonl", "w") as f:
        for t in real[:20]:
            f.write(json.dumps({"body": t}) + "\n")
    pq.write_table(pa.table({"body": real[20:40]}), tmp_path / "d" / "b.parquet", row_group_size=7)
    (tmp_path / "d" / "c.txt").write_text("\n".join(real[40:50]) + "\n\n")
    with gzip.open(tmp_path / "d" / "e.jsonl.gz", "wt") as f:
        f.write(json.dumps(["q one", "p one"]) + "\n")
    assert list(data.read_texts(tmp_path / "d" / "a.jsonl", field="body")) == real[:20]
    assert list(data.read_texts(tmp_path / "d" / "b.parquet", field="body")) == real[20:40]
    assert list(data.read_texts(tmp_path / "d" / "c.txt")) == real[40:50]
    assert list(data.read_texts(tmp_path / "d" / "e.jsonl.gz", field="*")) == ["q one", "p one"]
    assert list(data.read_texts(str(tmp_path / "d" / "[ab].*"), field="body")) == real[:40]
    skips = Counter()
    got = list(data.read_texts(tmp_path / "d", field="body", skips=skips))  # folder: a, b, c, e in name order
    assert got == real[:50] and skips == Counter({"missing_field": 1})  # e.jsonl.gz rows are lists, no "body"


def test_reader_streams(tmp_path):
    """A reader holds no corpus: lines appended after the first text was taken are still read (a reader that had
    loaded the file would not see them)."""
    p = tmp_path / "grow.jsonl"
    p.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(10)))
    it = data.read_texts(p)
    assert next(it) == "text 0"
    with open(p, "a") as f:
        f.write("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(10, 15)))
    assert list(it) == [f"text {i}" for i in range(1, 15)]


def test_hub_dataset_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("hf://HuggingFaceFW/fineweb-edu", "sentence-transformers/embedding-training-data"):
        with pytest.raises(DataError, match=r"(?s)hub dataset .*(fineweb-edu|embedding-training-data).*offline"):
            next(data.read_texts(spec))


# ==================================================================================================================
# bad input
# ==================================================================================================================

BAD_LINES = {
    "malformed_json": b'{"text": "unterminated\n',
    "missing_field": b'{"body": "no text field here"}\n',
    "empty_text": b'{"text": "   \\n\\t "}\n',
    "invalid_utf8": b'{"text": "caf\xe9 latin-1 bytes"}\n',
    "too_long": json.dumps({"text": "word " * 500}).encode() + b"\n",
}


def _planted(tmp_path, good, kind):
    """good rows with one bad line planted at line 4 (1-based)."""
    p = tmp_path / f"planted_{kind}.jsonl"
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in good]
    lines.insert(3, BAD_LINES[kind])
    p.write_bytes(b"".join(lines))
    return p


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_reader_bad_line_skip_and_raise(data_dir, tmp_path, kind):
    good = [d["text"][:900] for d in _passages(data_dir)[:8]]
    p = _planted(tmp_path, good, kind)
    skips = Counter()
    assert list(data.read_texts(p, skips=skips, max_chars=1000)) == good
    assert skips == Counter({kind: 1})
    with pytest.raises(DataError, match=rf"{p.name}:4: {kind.replace('_', ' ')}"):
        list(data.read_texts(p, on_error="raise", max_chars=1000))


def test_reader_huge_line_is_never_read_whole(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n")
        f.write('{"text": "' + "x" * 3_000_000 + '"}\n')
        f.write(json.dumps({"text": "after"}) + "\n")
    skips = Counter()
    assert list(data.read_texts(p, skips=skips, max_chars=10_000)) == ["ok", "after"]
    assert skips == Counter({"too_long": 1})


@pytest.mark.parametrize("kind", sorted(BAD_LINES) + ["hash_mismatch"])
def test_trainloader_bad_rows_skip_and_raise(texts_dir, tok, tmp_path, kind):
    rows = [json.loads(l) for l in open(texts_dir / "texts.jsonl", encoding="utf-8")][:40]
    rows = [dict(r, text=r["text"][:900], hash=text_hash(r["text"][:900])) for r in rows]
    lines = [json.dumps(r).encode() + b"\n" for r in rows]
    bad = (json.dumps(dict(rows[0], id=99, hash="0" * 16)).encode() + b"\n" if kind == "hash_mismatch"
           else BAD_LINES[kind])
    lines.insert(3, bad)
    p = tmp_path / "texts.jsonl"
    p.write_bytes(b"".join(lines))
    L = TrainLoader(p, tok, global_batch=8, max_length=64, seed=0, max_chars=1000)
    assert L.skips == {kind: 1} and L.n_valid == 40
    seen = torch.cat([L.batch_at(0, s).rows for s in range(L.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(40))  # every good row once, the planted one never
    with pytest.raises(DataError, match=rf"texts.jsonl:4: {kind.replace('_', ' ')}"):
        TrainLoader(p, tok, global_batch=8, max_length=64, seed=0, max_chars=1000, on_error="raise")


# ==================================================================================================================
# TrainLoader
# ==================================================================================================================

def test_batches_identity_truncation_and_chunks(texts_dir, tok):
    rows = [json.loads(l) for l in open(texts_dir / "texts.jsonl", encoding="utf-8")]
    L = TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=32, max_length=48, seed=1, micro_batch=5,
                    packing=False)  # the padded chunks (packed batches: tests/test_packing.py)
    b = next(iter(L))
    assert b.input_ids.shape[0] == 32 and b.rows.shape == (32,)
    assert b.hashes == [rows[r]["hash"] for r in b.rows.tolist()]
    ids = tok.encode_ids([rows[r]["text"] for r in b.rows.tolist()], max_length=48)
    lens = [len(x) for x in ids]
    assert max(lens) == 48 and lens == sorted(lens, reverse=True)  # truncated; longest first inside the share
    assert b.n_tokens == sum(lens) == int(b.attention_mask.sum())
    assert [c[0].shape[0] for c in b.chunks] == [5] * 4 + [4] * 3  # 7 forwards of <= 5, sizes near equal
    flat = [row for ci, cm in b.chunks for row, m in zip(ci.tolist(), cm.tolist())]
    for c_ids, c_mask in b.chunks:
        assert c_mask[:, -1].any() and c_mask[0].all()  # padded to its own longest (= its first row)
    got = [[t for t, m in zip(row, mrow) if m] for (ci, cm) in b.chunks for row, mrow in zip(ci.tolist(),
                                                                                             cm.tolist())]
    assert got == ids and len(flat) == 32
    assert b.n_processed < 32 * 48


def test_epoch_is_a_permutation_and_batches_are_random(texts_dir, tok):
    L = TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=64, max_length=16, seed=2)
    e0 = np.concatenate([L.global_lines(0, s) for s in range(L.steps_per_epoch)])
    assert len(e0) == len(set(e0.tolist())) == L.steps_per_epoch * 64  # without replacement within an epoch
    e1 = np.concatenate([L.global_lines(1, s) for s in range(L.steps_per_epoch)])
    assert not np.array_equal(e0, e1)
    # a global batch is not ordered by length or by file position: mean |corr| of position vs draw is ~0
    corr = np.corrcoef(np.arange(len(e0)), e0)[0, 1]
    assert abs(corr) < 0.1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_shares_are_disjoint_and_union_to_global_batch(texts_dir, tok, world):
    """One plan of the global batch for all ranks (packing.plan_step): disjoint shares, their union the global
    batch, the same number of forwards on every rank (tests/test_distributed.py has the skewed cases)."""
    G = 32
    loaders = [TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=G, max_length=32, seed=4, rank=r,
                           world_size=world, micro_batch=3) for r in range(world)]
    for step in (0, 5):
        shares = [L.batch_at(0, step) for L in loaders]
        sets = [set(s.rows.tolist()) for s in shares]
        assert sum(len(s) for s in sets) == len(set().union(*sets)) == G  # disjoint
        assert set().union(*sets) == set(loaders[0].global_lines(0, step).tolist())  # = the global batch
        assert len({s.n_forwards for s in shares}) == 1 and all(s.rank_sizes == [len(x) for x in sets]
                                                                for s in shares)


@pytest.mark.slow
@pytest.mark.parametrize("workers_after", [0, 2])
def test_resume_is_exact_across_worker_counts(texts_dir, tok, workers_after):
    def make(workers):
        return TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=256, max_length=64, seed=9, rank=1,
                           world_size=2, micro_batch=16, num_workers=workers)

    ref = make(2)
    it = iter(ref)
    taken = [next(it) for _ in range(9)]  # crosses the epoch boundary (11 steps per epoch) when resumed below
    state = ref.state_dict()
    assert state["step"] == 9
    expected = [next(it) for _ in range(5)]  # steps 9, 10, then epoch 1 steps 0..2
    del it
    resumed = make(workers_after)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    it2 = iter(resumed)
    got = [next(it2) for _ in range(5)]
    assert [(b.epoch, b.step) for b in got] == [(0, 9), (0, 10), (1, 0), (1, 1), (1, 2)]
    for a, b in zip(expected, got):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.rows, b.rows) and a.hashes == b.hashes
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a.chunks, b.chunks))
        assert len(a.packed) == len(b.packed) and all(torch.equal(x.input_ids, y.input_ids) and torch.equal(
            x.seq_ids, y.seq_ids) for x, y in zip(a.packed, b.packed))  # packed micro-batches (the default)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["step"] == 3
    assert not any(torch.equal(taken[0].rows, g.rows) for g in got)


def test_load_state_refuses_other_data_or_seed(texts_dir, tok):
    L = TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=32, max_length=16, seed=0)
    st = L.state_dict()
    other = TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=32, max_length=16, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(st)
    with pytest.raises(ValueError, match="at least world_size"):
        TrainLoader(texts_dir / "texts.jsonl", tok, global_batch=3, max_length=16, seed=0, world_size=4)


def test_index_cache_is_reused_and_invalidated(texts_dir, tok, tmp_path, data_dir):
    p = tmp_path / "texts.jsonl"
    p.write_bytes((texts_dir / "texts.jsonl").read_bytes())
    L = TrainLoader(p, tok, global_batch=16, max_length=16, seed=0)
    cached = list((Path(os.environ["JASPER_CACHE_DIR"]) / "data-index").glob("texts.jsonl.*.index.npz"))
    assert cached and L.skips == {}
    with open(p, "ab") as f:  # the file changes: the cached index must not be trusted
        f.write(b'{"text": broken\n')
    L2 = TrainLoader(p, tok, global_batch=16, max_length=16, seed=0)
    assert L2.skips == {"malformed_json": 1} and L2.n_valid == L.n_valid
    # a loader straight over the shared (read-only) passages.jsonl: rows are line numbers, nothing written there
    before = sorted(os.listdir(data_dir / "text"))
    S = TrainLoader(data_dir / "text" / "passages.jsonl", tok, global_batch=8, max_length=32, seed=0)
    b = S.batch_at(0, 0)
    lines = open(data_dir / "text" / "passages.jsonl", encoding="utf-8").read().splitlines()
    assert [text_hash(json.loads(lines[r])["text"]) for r in b.rows.tolist()] == b.hashes
    assert sorted(os.listdir(data_dir / "text")) == before


def test_hub_presets_stream_through_hf_filesystem(data_dir, tmp_path, monkeypatch):
    """The hub path (listing, per-file streaming, preset globs and fields) against a local stand-in for
    huggingface_hub.HfFileSystem laid out like the two datasets (the machine has no hub access)."""
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq
    real = [d["text"] for d in _passages(data_dir)[:30]]
    fw = tmp_path / "datasets" / "HuggingFaceFW" / "fineweb-edu" / "sample" / "10BT"
    fw.mkdir(parents=True)
    pq.write_table(pa.table({"text": real[:10], "id": list(range(10))}), fw / "000_00000.parquet")
    pq.write_table(pa.table({"text": real[10:20], "id": list(range(10))}), fw / "001_00000.parquet")
    st = tmp_path / "datasets" / "sentence-transformers" / "embedding-training-data"
    st.mkdir(parents=True)
    with gzip.open(st / "gooaq_pairs.jsonl.gz", "wt") as f:
        f.write(json.dumps(["what is a q?", "an answer."]) + "\n")
        f.write(json.dumps({"query": "q2", "pos": ["p2a", "p2b"], "neg": []}) + "\n")

    class LocalHub:
        def glob(self, pattern):
            return [str(p.relative_to(tmp_path)) for p in sorted(tmp_path.glob(pattern))]

        def open(self, path, mode="rb"):
            return open(tmp_path / path, mode)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", LocalHub)
    assert list(data.read_texts("hf://HuggingFaceFW/fineweb-edu")) == real[:20]
    assert list(data.read_texts("hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/001_*.parquet")) == real[10:20]
    assert list(data.read_texts("sentence-transformers/embedding-training-data")) == [
        "what is a q?", "an answer.", "q2", "p2a", "p2b"]
    with pytest.raises(DataError, match="no file matches"):
        list(data.read_texts("hf://HuggingFaceFW/fineweb-edu/nothing/*.parquet"))


def test_build_counts_bad_input_or_fails_cleanly(data_dir, tmp_path):
    good = [json.dumps({"text": d["text"][:900], "source": d["source"]}).encode() + b"\n"
            for d in _passages(data_dir)[:60]]
    lines = good[:]
    for i, kind in enumerate(sorted(BAD_LINES)):
        lines.insert(5 + 7 * i, BAD_LINES[kind])
    p = tmp_path / "planted.jsonl"
    p.write_bytes(b"".join(lines))
    short = str(data_dir / "text" / "short.jsonl")
    meta = data.build(tmp_path / "ok", passages=str(p), short=short, max_chars=1000, progress=False)
    assert meta["stats"]["skips"] == {k: 1 for k in BAD_LINES}
    assert meta["stats"]["exhausted"] == "passages" and meta["stats"]["docs"]["passages"] == 60
    assert json.loads((tmp_path / "ok" / "build.json").read_text())["stats"]["skips"] == meta["stats"]["skips"]
    with pytest.raises(DataError, match=r"planted.jsonl:\d+: "):
        data.build(tmp_path / "strict", passages=str(p), short=short, max_chars=1000, on_error="raise",
                   progress=False)
    assert os.listdir(tmp_path / "strict") == []  # no partial texts.jsonl, no temp file left
