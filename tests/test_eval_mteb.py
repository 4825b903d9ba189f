"""eval.py through mteb.evaluate (eval_mteb.py): agreement with the built-in path on real local tasks, the exact
instruction strings of mteb's own Jasper wrapper, the paper's instruction table, ModelMeta and mteb's results folder.

A tiny random Jasper student (tests/train_fixtures.py: real Qwen tokenizer, hidden 32) keeps these fast while
exercising the instruction-following path; the real-weights reproduction of published scores is in test_eval.py.
"""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import eval_mteb as EM
import model as M
from common import minilm_dir
from train_fixtures import make_tiny_jasper


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_jasper(tmp_path_factory.mktemp("tiny") / "final", layers=2, vision=False)


@pytest.fixture(scope="module")
def paper(data_dir):
    return json.loads((data_dir / "paper" / "jasper_instructions.json").read_text())


def _sts(root: Path, task: str, n=24):
    d = root / "sts" / task
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "test.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"sentence1": f"{task} first {i}", "sentence2": f"{task} second {i % 5}",
                                "score": float(i % 6)}) + "\n")


def _beir(root: Path, task_dir: str, split="test", n_docs=30, n_q=8):
    d = root / "retrieval" / task_dir
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    with open(d / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "t" if i % 2 else "", "text": f"{task_dir} doc {i}"}) + "\n")
    with open(d / "queries.jsonl", "w") as f:
        for i in range(n_q):
            f.write(json.dumps({"_id": f"q{i}", "text": f"{task_dir} query {i}"}) + "\n")
    with open(d / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_q):
            f.write(f"q{i}\td{(3 * i) % n_docs}\t1\n")


# ---------------------------------------------------------------- mteb.evaluate vs the built-in path
@pytest.mark.slow
def test_mteb_evaluate_matches_builtin_on_real_tasks(tiny_dir, data_dir):
    """BIOSSES and SciFact (real local data), two heads, the paper's instructions: mteb.evaluate == built-in."""
    cache = ev.EmbeddingCache(ev.load_encoder(tiny_dir), batch_size=64, show_progress=False)
    kw = dict(data_dir=data_dir, dims=[384, 16])
    m = ev.evaluate(cache, ["BIOSSES", "SciFact"], **kw)
    n = cache.n_encoded
    b = ev.evaluate(cache, ["BIOSSES", "SciFact"], engine="builtin", **kw)
    assert cache.n_encoded == n  # same embeddings: the paths differ only in scoring
    assert m["revision"] == EM.weights_hash(cache.encoder) and len(m["revision"]) == 40
    for task in ("BIOSSES", "SciFact"):
        for d in ("384", "16"):
            mr, br = m["results"][task][d], b["results"][task][d]
            assert abs(mr["main_score"] - br["main_score"]) <= 1e-4, (task, d, mr["main_score"], br["main_score"])
            for k, v in br["scores"].items():
                assert abs(v - mr["scores"]["default"][k]) <= 1e-4, (task, d, k)
    assert m["results"]["BIOSSES"]["384"]["main_score"] != m["results"]["BIOSSES"]["16"]["main_score"]


# ---------------------------------------------------------------- instruction strings, exactly as mteb's Jasper wrapper
def _mteb_jasper_strings(task, split, instructions: dict):
    """What mteb's own wrapper for the released Jasper hands to its SentenceTransformer, with the paper's table as
    its prompts_dict. The real SentenceTransformer (MiniLM stands in for the weights) prepends the prompt itself;
    the strings are recorded where its input module hands them to the tokenizer."""
    from mteb.models.model_implementations import jasper_models as J
    from sentence_transformers import SentenceTransformer
    w = object.__new__(J.JasperModel)  # skip __init__: it would download the released weights
    w.model = SentenceTransformer(str(minilm_dir()), device="cpu")
    w.instruction_template = J.jasper_en_v1.loader_kwargs["instruction_template"]
    w.prompts_dict = instructions
    seen = []
    st_module = w.model[0]  # the Transformer input module: it prepends the prompt, then calls the tokenizer
    orig = st_module._call_processor

    def call_processor(modality, inputs, *a, **k):
        seen.extend(inputs["text"])
        return orig(modality, inputs, *a, **k)
    st_module._call_processor = call_processor
    task.evaluate(w, split, encode_kwargs={"batch_size": 16})
    # minus the prompt alone, which it tokenises to find the prompt's length (no test text is empty)
    return {s for s in seen if not s.endswith("\nQuery: ")}


@pytest.mark.parametrize("kind", ["original", "synonym"])
def test_instruction_strings_match_mteb_jasper_wrapper(tiny_dir, tmp_path, monkeypatch, paper, kind):
    """STS12 / SciFact (in the paper's table) and STSBenchmark.v2 / NanoSciFactRetrieval (not in it: mteb's prompt
    for the task, and the run says so): every string our encoder tokenises equals what mteb's Jasper wrapper would
    tokenise, "Instruct: {instruction}\\nQuery: {text}" for queries / symmetric texts, the bare text for documents."""
    root = tmp_path / "data"
    _sts(root, "STS12")
    _sts(root, "STSBenchmark")  # STSBenchmark.v2 reads the STSBenchmark folder
    _beir(root, "SciFact")
    nano = EM.default_split(EM.get_mteb_task("NanoSciFactRetrieval"))
    _beir(root, "NanoSciFact", split=nano)
    tasks = ["STS12", "SciFact", "STSBenchmark.v2", "NanoSciFactRetrieval"]
    ours = set()
    real_format = M.TextTokenizer.format

    def spy(text, instruction=None):
        s = real_format(text, instruction)
        ours.add(s)
        return s
    monkeypatch.setattr(M.TextTokenizer, "format", staticmethod(spy))
    rep = ev.evaluate(ev.load_encoder(tiny_dir), tasks, data_dir=root, instructions=kind)
    monkeypatch.undo()
    table = {t: e[kind] for t, e in paper["instructions"].items()}
    assert set(rep["instruction_fallbacks"]) == {"STSBenchmark.v2", "NanoSciFactRetrieval"}
    theirs = set()
    for t in tasks:
        task = EM.get_mteb_task(t)
        sp = EM.default_split(task)
        EM.inject_local_data(task, root, sp)
        theirs |= _mteb_jasper_strings(task, sp, table)
    assert ours == theirs
    assert f"Instruct: {table['STS12']}\nQuery: STS12 first 3" in ours  # symmetric: both sides instructed
    assert f"Instruct: {table['SciFact']}\nQuery: SciFact query 2" in ours
    assert "SciFact doc 2" in ours and "t SciFact doc 1" in ours  # documents: bare (title + text)
    nano_prompt = EM.get_mteb_task("NanoSciFactRetrieval").metadata.prompt["query"]
    assert f"Instruct: {nano_prompt}\nQuery: NanoSciFact query 0" in ours  # not in the table: mteb's prompt


def test_instruction_table_is_the_paper_and_defaults_are_mteb(paper, data_dir, tmp_path):
    """The paper's sets are used verbatim; a missing table is an error for `synonym`, and `original` then falls
    back to mteb's prompts for every task (documented); the built-in defaults equal mteb's metadata."""
    orig = ev.Instructions("original", data_dir=data_dir)
    syn = ev.Instructions("synonym", data_dir=data_dir)
    assert len(orig.table) == len(syn.table) == 53
    assert ev.task_instruction("SciFact", "Retrieval", "query", syn) == paper["instructions"]["SciFact"]["synonym"]
    assert ev.task_instruction("SciFact", "Retrieval", "document", syn) is None
    assert ev.task_instruction("Banking77Classification", "Classification", None, orig) == \
        paper["instructions"]["Banking77Classification"]["original"]
    with pytest.raises(ev.EvalError, match="not found"):
        ev.Instructions("synonym", path=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instructions": {"STS12": {"original": "x"}}}))
    with pytest.raises(ev.EvalError, match="bad.json"):
        ev.Instructions("synonym", path=bad)


# ---------------------------------------------------------------- ModelMeta, results folder, compare table
def test_cli_writes_mteb_results_folder_with_full_model_meta(tiny_dir, data_dir, tmp_path, capsys):
    import mteb
    out = tmp_path / "res" / "tiny.json"
    assert ev.main(["--model", str(tiny_dir), "--tasks", "BIOSSES", "--dims", "384,16", "--data-dir",
                    str(data_dir), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("| task | metric | dim 384 | dim 16 |")
    assert out.with_suffix(".png").exists()
    enc = ev.load_encoder(tiny_dir)
    rev = EM.weights_hash(enc)
    assert rep["revision"] == rev and rep["model"] == "local/tiny0-final"  # runs/<x>/final -> local/<x>-final
    cache = mteb.ResultCache(tmp_path / "res" / "mteb")
    for d in (384, 16):
        folder = tmp_path / "res" / "mteb" / "results" / "local__tiny0-final" / rev / "experiments" / f"dim_{d}"
        meta = json.loads((folder / "model_meta.json").read_text())
        assert meta["embed_dim"] == d and meta["revision"] == rev and meta["use_instructions"] is True
        assert meta["n_parameters"] == sum(p.numel() for p in enc.parameters())
        assert meta["similarity_fn_name"] == "cosine" and meta["loader"] == "mteb_loader"
        assert meta["loader_kwargs"]["model"] == str(tiny_dir)
        m = EM.model_meta(enc, "local/tiny0-final", d, "original", str(tiny_dir), rev)
        res = cache.load_task_result("BIOSSES", m)  # mteb reads its own folder back
        assert abs(res.get_score() - rep["results"]["BIOSSES"][str(d)]["main_score"]) <= 1e-6
    # meta.load_model() rebuilds the evaluated head; mteb.evaluate on it gives the same score
    rebuilt = m.load_model()
    assert rebuilt.dim == 16
    task = EM.get_mteb_task("BIOSSES")
    EM.inject_local_data(task, data_dir, "test")
    again = mteb.evaluate(rebuilt, task, cache=None, co2_tracker=False, show_progress_bar=False)
    assert abs(again.task_results[0].get_score() - rep["results"]["BIOSSES"]["16"]["main_score"]) <= 1e-6


def test_mteb_get_model_after_register(tiny_dir, data_dir, tmp_path):
    """mteb.get_model finds no loader for a local folder on its own (it looks names up on the hub); after
    eval_mteb.register it rebuilds the export, every head on offer through mteb's embed_dim=, and mteb.evaluate on
    it gives eval.py's score at that head (STS12, a task no other test here uses)."""
    import mteb
    with pytest.raises(Exception):  # what a user meets without register (offline here: no hub page either)
        mteb.get_model(str(tiny_dir))
    name = EM.register(str(tiny_dir))
    assert name == "local/tiny0-final"
    rev = EM.weights_hash(ev.load_encoder(tiny_dir))
    out = tmp_path / "r.json"
    assert ev.main(["--model", str(tiny_dir), "--tasks", "STS12", "--dims", "384,32", "--data-dir", str(data_dir),
                    "--out", str(out)]) == 0
    ours = json.loads(out.read_text())["results"]["STS12"]
    for d in (32, 384):
        m = mteb.get_model(name, embed_dim=d)
        assert m.dim == d and m.mteb_model_meta.revision == rev and m.mteb_model_meta.embed_dim == d
        task = EM.get_mteb_task("STS12")
        EM.inject_local_data(task, data_dir, "test")
        res = mteb.evaluate(m, task, cache=None, co2_tracker=False, show_progress_bar=False)
        assert abs(res.task_results[0].get_score() - ours[str(d)]["main_score"]) <= 1e-6, d
    with pytest.raises(ValueError, match="embedding dimension"):
        mteb.get_model(name, embed_dim=100)  # not a head of this student: mteb refuses it against the list


def test_any_sentence_transformers_folder_matches_mteb_on_sentence_transformers(tmp_path, data_dir):
    """--model on a sentence-transformers folder (a tiny Qwen3 body with mean pooling and Normalize, built and saved
    by sentence-transformers): eval.py's score equals mteb.evaluate on the library's own SentenceTransformer of the
    same folder (mteb's wrapper; no prompts, no instructions on either side)."""
    import mteb
    from sentence_transformers import SentenceTransformer
    from test_st_teacher import build_st
    folder = build_st(tmp_path, "qwen3", "mean")
    out = tmp_path / "res" / "st.json"
    assert ev.main(["--model", str(folder), "--tasks", "BIOSSES", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    assert ours["instructions"] == "none" and ours["model"] == "local/st"
    task = EM.get_mteb_task("BIOSSES")
    EM.inject_local_data(task, data_dir, "test")
    ref = mteb.evaluate(SentenceTransformer(str(folder), device="cpu"), task, cache=None, co2_tracker=False,
                        show_progress_bar=False)
    assert abs(ours["results"]["BIOSSES"]["native"]["main_score"] - ref.task_results[0].get_score()) <= 1e-4
    meta = json.loads(next((tmp_path / "res" / "mteb" / "results").rglob("model_meta.json")).read_text())
    assert meta["n_parameters"] == sum(p.numel() for p in ev.load_encoder(folder).module.parameters())


def test_weights_hash_tracks_content(tiny_dir):
    a, b = ev.load_encoder(tiny_dir), ev.load_encoder(tiny_dir)
    assert EM.weights_hash(a) == EM.weights_hash(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert EM.weights_hash(a) != EM.weights_hash(b)


def test_cli_compare_table(tiny_dir, tmp_path, capsys, paper):
    root = tmp_path / "data"
    _sts(root, "BIOSSES")
    _sts(root, "STSBenchmark")
    out = tmp_path / "cmp.json"
    assert ev.main(["--model", str(tiny_dir), "--tasks", "BIOSSES,STSBenchmark.v2", "--data-dir", str(root),
                    "--instructions", "compare", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| task | dim | original | synonym | diff | paper original | paper synonym | paper diff |" in text
    p = next(r for r in paper["table3"] if r["task"] == "BIOSSES")
    rep = json.loads(out.read_text())
    row = next(r for r in rep["compare"] if r["task"] == "BIOSSES")
    assert (row["paper_original"], row["paper_synonym"]) == (p["original"], p["synonym"])
    assert row["original"] != row["synonym"]  # different instruction texts, different embeddings
    assert abs(row["diff"] - (row["synonym"] - row["original"])) < 1e-12
    assert f"| {p['original']:.4f} | {p['synonym']:.4f} | {p['synonym'] - p['original']:+.4f} |" in text
    assert "| STSBenchmark.v2 | native |" in text and text.count(" - |") >= 2  # not in Table 3: '-'
    assert "0.686" in text and "0.687" in text
    assert json.loads(out.read_text())["runs"]["synonym"]["instructions"] == "synonym"


def test_compare_refuses_encoders_without_instructions(tmp_path):
    class Bert:
        uses_instructions = False
        dims = (4,)

        def encode(self, texts, **kw):
            return torch.ones(len(texts), 4)
    with pytest.raises(ev.EvalError, match="instruction-following"):
        ev.compare_instructions(Bert(), ["STS12"], data_dir=tmp_path)
