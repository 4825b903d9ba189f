"""BERT-family teacher vs sentence-transformers on real weights and real sentences; teacher cache behaviour."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import teacher_cache as TC
import teachers as T
from tokenizer import pad_ids
from data import text_hash

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path, n, field="text"):
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line)[field])
            if len(out) == n:
                break
    return out


def _real_sentences(data_dir, n=500):
    """80% short texts (STS / Banking77 train), 20% passages (many longer than MiniLM's 256-token limit, so
    truncation is exercised), every 7th with padding whitespace (sentence-transformers strips it)."""
    short = _jsonl(data_dir / "text" / "short.jsonl", 4000)[::8][: n - n // 5]
    long_ = _jsonl(data_dir / "text" / "passages.jsonl", 2000)[::4][: n - len(short)]
    texts = short + long_
    return [("  " + t + " \n") if i % 7 == 0 else t for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def minilm():
    return T.load_teacher("all-MiniLM-L6-v2")


def test_minilm_path_and_detection():
    p = T.minilm_path()
    assert (p / "model.safetensors").is_file() and (p / "1_Pooling" / "config.json").is_file()
    assert T.detect_family(p) == "bert"


@pytest.mark.slow
def test_bert_teacher_matches_sentence_transformers(minilm, data_dir):
    from sentence_transformers import SentenceTransformer

    texts = _real_sentences(data_dir, 500)
    assert len(texts) == 500
    lens = [len(x) for x in minilm.tokenizer.encode_ids(texts)]
    assert max(lens) == 256 and min(lens) < 20  # both truncated and short texts are in the set
    ours = minilm.encode(texts, batch_size=32)
    st = SentenceTransformer(str(T.minilm_path()), device="cpu")
    ref = torch.from_numpy(st.encode(texts, batch_size=32, convert_to_numpy=True))
    assert ours.shape == ref.shape == (500, 384)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(500), atol=1e-5)
    cos = F.cosine_similarity(ours, ref, dim=-1)
    worst = int(cos.argmin())
    assert cos.min() >= 0.99999, f"text {worst} cos {cos[worst]:.7f}: {texts[worst][:80]!r}"
    # result independent of batching / order (length sorting must put rows back in place)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    sub = minilm.encode([texts[i] for i in perm], batch_size=7)
    assert torch.allclose(sub, ours[perm], atol=2e-6)


def test_bert_pooling_options(tmp_path, minilm):
    """cls pooling and normalize=False follow the sentence-transformers config files."""
    src = T.minilm_path()
    d = tmp_path / "cls_model"
    shutil.copytree(src, d)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    mods = json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps([m for m in mods if not m["type"].endswith("Normalize")]))
    t = T.load_teacher(str(d))
    assert t.pooling == "cls" and t.normalize is False
    texts = ["a cat sat on the mat", "quantum chromodynamics is hard"]
    ids, mask = pad_ids(t.tokenizer.encode_ids(texts), t.pad_id)
    h = t.module(ids, mask)
    assert torch.allclose(t.encode(texts), h[:, 0], atol=1e-6)
    assert not torch.allclose(t.encode(texts).norm(dim=-1), torch.ones(2), atol=1e-3)
    # mean pooling of the stock model equals a hand-written masked mean of the same hidden states
    ids, mask = pad_ids(minilm.tokenizer.encode_ids(texts), minilm.pad_id)
    h = minilm.module(ids, mask)
    m = mask.unsqueeze(-1).float()
    assert torch.allclose(minilm.encode(texts), F.normalize((h * m).sum(1) / m.sum(1), dim=-1), atol=1e-6)
    # outputs are ordinary tensors (not inference-mode tensors): usable as constant targets under autograd
    v = minilm.encode(texts + [""])
    assert not v.is_inference() and torch.isfinite(v).all()
    w = torch.randn(3, 384, requires_grad=True)
    (w * v).sum().backward()


def test_bert_strict_loading_refuses_bad_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(T.minilm_path(), d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["encoder.layer.3.output.dense.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(Exception, match="encoder.layer.3.output.dense.weight"):
        T.load_teacher(str(d))
    # a `bert.` prefixed checkpoint (BertForX wrapper) loads
    sd = load_file(str(T.minilm_path() / "model.safetensors"))
    save_file({"bert." + k: v for k, v in sd.items()}, str(d / "model.safetensors"))
    t = T.load_teacher(str(d))
    ref = T.load_teacher("all-MiniLM-L6-v2")
    assert torch.equal(t.encode(["hello world"]), ref.encode(["hello world"]))


def test_unknown_architecture_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(T.TeacherError, match="model_type='t5'"):
        T.load_teacher(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------------------------
def _write_texts(path, texts):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t, "hash": text_hash(t), "source": "test", "kind": "short"}) + "\n")


@pytest.fixture(scope="module")
def cache_texts(data_dir):
    return _jsonl(data_dir / "text" / "short.jsonl", 3000)[::60][:45] + _jsonl(
        data_dir / "text" / "passages.jsonl", 200)[::20][:5]


@pytest.fixture(scope="module")
def two_teachers(minilm):
    # a second, different teacher from the same weights: e5-style prompt and no normalisation in the model
    return [minilm, T.load_teacher("all-MiniLM-L6-v2@prompt=query: ,normalize=false", name="minilm-q")]


def _build(tmp, texts, teachers, **kw):
    inp = tmp / "texts.jsonl"
    if not inp.exists():
        _write_texts(inp, texts)
    return TC.build_cache(teachers, inp, tmp / "cache", batch_size=8, shard_size=16, show_progress=False,
                          load=T.load_teacher, **kw)


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, cache_texts, two_teachers):
    tmp = tmp_path_factory.mktemp("built")
    _build(tmp, cache_texts, two_teachers)
    return tmp


def test_cache_round_trip(built_cache, cache_texts, two_teachers):
    man = built_cache / "cache" / "manifest.json"
    c = TC.TeacherCache(man.parent)
    assert c.n_rows == 50 and c.dim == 768 and c.teachers == ["all-MiniLM-L6-v2", "minilm-q"]
    c.check(teachers=["all-MiniLM-L6-v2", "minilm-q"], n_rows=50, dim=768)
    m = json.loads(man.read_text())
    assert [s["rows"] for s in m["teachers"][0]["shards"]] == [[0, 16], [16, 32], [32, 48], [48, 50]]
    assert m["teachers"][1]["offset"] == 384 and m["teachers"][1]["spec"]["prompt"] == "query: "
    assert m["teachers"][0]["spec"]["revision"].startswith("content-")
    rows = torch.tensor([49, 3, 17, 3, 0])
    got = c.targets(rows, hashes=[text_hash(cache_texts[i]) for i in rows])
    ref = T.MultiTeacher(two_teachers).encode([cache_texts[i] for i in rows], batch_size=8)
    assert got.shape == (5, 768)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5), atol=1e-6)
    # each half is the normalised teacher vector scaled by 1/sqrt(2)
    assert torch.allclose(got[:, :384] * 2 ** 0.5, two_teachers[0].encode([cache_texts[i] for i in rows]), atol=1e-6)
    c.verify_texts(built_cache / "texts.jsonl")


def test_cache_resume_after_kill_equals_uninterrupted(tmp_path, cache_texts, minilm, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    _build(full, cache_texts, [minilm])

    part = tmp_path / "part"
    part.mkdir()
    real_write = TC.atomic_write
    calls = {"n": 0}

    def dying_write(path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # 1 = row_hashes, 2/3 = shard 0 data/sidecar, 4/5 = shard 1 data/sidecar
            # killed while writing the sidecar of shard 1: a half-written tmp file is all that reaches the disk
            tmp = path.with_name(path.name + ".tmp99999")
            tmp.write_bytes((data.encode() if isinstance(data, str) else bytes(data))[: len(data) // 2])
            raise KeyboardInterrupt("simulated kill")
        real_write(path, data)

    monkeypatch.setattr(TC, "atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _build(part, cache_texts, [minilm])
    monkeypatch.setattr(TC, "atomic_write", real_write)
    cdir = part / "cache"
    assert not (cdir / "manifest.json").exists()
    with pytest.raises(TC.CacheError, match="no manifest"):
        TC.TeacherCache(cdir)
    tdir = next(p for p in cdir.iterdir() if p.is_dir())
    assert (tdir / "shard_00001.f32").is_file() and not (tdir / "shard_00001.json").exists()
    # also a truncated data file for shard 2 without sidecar (as a non-atomic writer would leave): must be redone
    (tdir / "shard_00002.f32").write_bytes(b"\0" * 100)
    mtime0 = (tdir / "shard_00000.f32").stat().st_mtime_ns

    encoded = []
    orig_encode = type(minilm).encode

    def counting_encode(self, texts, *a, **k):
        encoded.append(len(texts))
        return orig_encode(self, texts, *a, **k)

    monkeypatch.setattr(type(minilm), "encode", counting_encode)
    _build(part, cache_texts, [minilm])
    assert encoded == [16, 16, 2]  # shard 0 was kept and skipped; 1, 2, 3 encoded
    assert (tdir / "shard_00000.f32").stat().st_mtime_ns == mtime0
    a, b = _files(full / "cache"), {k: v for k, v in _files(cdir).items() if ".tmp" not in k}
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    ma, mb = (json.loads((d / "cache" / "manifest.json").read_text()) for d in (full, part))
    for m in (ma, mb):
        m.pop("created_utc"), m["input"].pop("path")
    assert ma == mb
    assert torch.equal(TC.TeacherCache(cdir).targets(np.arange(50)), TC.TeacherCache(full / "cache").targets(
        np.arange(50)))


def _copy(built, tmp):
    shutil.copytree(built, tmp / "c")
    return tmp / "c"


def test_cache_refuses_changed_text(built_cache, tmp_path, cache_texts):
    d = _copy(built_cache, tmp_path)
    texts = list(cache_texts)
    texts[7] = texts[7] + " (edited)"
    _write_texts(d / "texts.jsonl", texts)
    c = TC.TeacherCache(d / "cache")
    with pytest.raises(TC.CacheError, match=r"row 7\b.*row_hashes|row_hashes.*row 7\b"):
        c.verify_texts(d / "texts.jsonl")
    with pytest.raises(TC.CacheError, match=r"row 7\b"):
        c.targets([1, 7], hashes=[text_hash(texts[1]), text_hash(texts[7])])
    # a texts.jsonl whose stored hash no longer matches its text is refused at read time
    lines = (d / "texts.jsonl").read_text().splitlines()
    obj = json.loads(lines[3])
    obj["text"] += "!"
    lines[3] = json.dumps(obj)
    (d / "texts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TC.CacheError, match=r"texts.jsonl:4: row 3"):
        TC.read_cache_input(d / "texts.jsonl")
    # building into the same folder from changed texts is refused too
    with pytest.raises(TC.CacheError, match="different texts"):
        TC.build_cache(["all-MiniLM-L6-v2"], _w(d, texts), d / "cache",
                       show_progress=False, shard_size=16, load=T.load_teacher)


def _w(d, texts):
    p = d / "texts_new.jsonl"
    _write_texts(p, texts)
    return p


def test_cache_refuses_reordered_rows(built_cache, tmp_path, cache_texts):
    d = _copy(built_cache, tmp_path)
    texts = list(cache_texts)
    texts[10], texts[11] = texts[11], texts[10]
    _write_texts(d / "texts.jsonl", texts)  # ids rewritten 0..N-1, hashes consistent: only the order changed
    c = TC.TeacherCache(d / "cache")
    with pytest.raises(TC.CacheError, match=r"row 10\b"):
        c.verify_texts(d / "texts.jsonl")
    with pytest.raises(TC.CacheError, match=r"row 11\b"):
        c.targets(torch.tensor([11]), hashes=[text_hash(texts[11])])
    # ids out of order in the file itself
    lines = (built_cache / "texts.jsonl").read_text().splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    (d / "swapped.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TC.CacheError, match=r"swapped.jsonl:5: id 5 but this is row 4"):
        c.verify_texts(d / "swapped.jsonl")


def test_cache_refuses_wrong_dim_missing_teacher_row_count(built_cache):
    c = TC.TeacherCache(built_cache / "cache")
    with pytest.raises(TC.CacheError, match="dim 768.*expects 12288"):
        c.check(dim=12288)
    with pytest.raises(TC.CacheError, match=r"\['stella'\] missing"):
        c.check(teachers=["all-MiniLM-L6-v2", "stella"])
    with pytest.raises(TC.CacheError, match="in this order"):
        c.check(teachers=["minilm-q", "all-MiniLM-L6-v2"])
    with pytest.raises(TC.CacheError, match="50 rows but the training texts have 51"):
        c.check(n_rows=51)
    with pytest.raises(TC.CacheError, match="row 50 out of range"):
        c.targets([0, 50])
    with pytest.raises(TC.CacheError, match="51 rows|50 rows"):
        p = built_cache / "more.jsonl"
        _write_texts(p, [json.loads(x)["text"] for x in (built_cache / "texts.jsonl").read_text().splitlines()]
                     + ["one more"])
        c.verify_texts(p)


def test_cache_refuses_truncated_or_tampered_files(built_cache, tmp_path):
    d = _copy(built_cache, tmp_path)
    shard = sorted((d / "cache").glob("t1_*/shard_00002.f32"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    with pytest.raises(TC.CacheError, match=rf"{shard.name}: teacher minilm-q rows \[32, 48\).*truncated"):
        TC.TeacherCache(d / "cache")
    shard.write_bytes(data)
    TC.TeacherCache(d / "cache")
    hf = d / "cache" / "row_hashes.bin"
    h = bytearray(hf.read_bytes())
    h[8 * 20] ^= 1
    hf.write_bytes(bytes(h))
    with pytest.raises(TC.CacheError, match="row_hashes.bin: content does not match"):
        TC.TeacherCache(d / "cache")
    hf.write_bytes(bytes(h[:-8]))
    with pytest.raises(TC.CacheError, match="row_hashes.bin: expected 400 bytes"):
        TC.TeacherCache(d / "cache")


@pytest.mark.slow
def test_cache_cli_and_torchrun(built_cache, tmp_path):
    """`python teachers.py encode` under torchrun with 2 ranks (gloo): each rank encodes its shards, rank 0 writes the
    manifest; the vectors equal the single-process cache's up to fp32 rounding (the workers run 1 thread, the
    in-process cache whatever pytest runs with, and a matmul's summation order depends on the thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "teachers.py"), "encode", "--teacher", "all-MiniLM-L6-v2", "--teacher",
           "all-MiniLM-L6-v2@prompt=query: ,normalize=false", "--input", str(built_cache / "texts.jsonl"),
           "--out", str(out), "--batch-size", "8", "--shard-size", "16"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1/2" in r.stderr and "wrote" in r.stderr
    a = TC.TeacherCache(out)
    b = TC.TeacherCache(built_cache / "cache")
    assert a.teachers[0] == b.teachers[0] and a.dim == b.dim
    torch.testing.assert_close(a.targets(np.arange(50)), b.targets(np.arange(50)), rtol=1e-5, atol=1e-6)
    r = subprocess.run([sys.executable, str(ROOT / "teachers.py"), "verify", "--cache", str(out), "--input",
                        str(built_cache / "texts.jsonl")], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok: 50 rows" in r.stdout, r.stderr[-2000:]
