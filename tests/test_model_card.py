"""The model card every export writes (issue 28, item 2): the hub front matter parses, the card says what the run
knows, its usage snippets run and give JasperModel.encode's vectors, sentence-transformers still loads the folder,
and `eval.py --update-card` puts eval.py's own numbers into the model-index (through mteb's conversion)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

import checkpoints as C
import eval as ev
import model as M
import model_card as MC
from common import minilm_dir
from test_export import _tiny
from train_fixtures import make_tiny_jasper

st = pytest.importorskip("sentence_transformers")


def front_matter(readme: Path) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", readme.read_text(encoding="utf-8"), flags=re.S)
    assert m, f"{readme}: no front matter"
    return yaml.safe_load(m.group(1)), m.group(2)


def code_blocks(body: str, heading: str, path: Path) -> str:
    """The python block under `### heading`, with PATH replaced by the folder."""
    sec = body.split(f"### {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", sec, flags=re.S).group(1).replace("PATH", str(path))


@pytest.fixture(scope="module")
def run_export(tmp_path_factory):
    """A stage-3 export at run3/final whose run folder chains back to a stage-2 run and a base folder with a card."""
    root = tmp_path_factory.mktemp("card")
    base = root / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n- de\n---\nbase model\n")
    s2 = make_tiny_jasper(root / "run2" / "final", layers=2, vision=False)
    (root / "run2" / "config.json").write_text(json.dumps(
        {"stage": 2, "init": str(base), "steps": 7, "batch": 8, "lr": 8e-5, "teacher": ["minilm@max_length=64"]}))
    (root / "run3").mkdir()
    (root / "run3" / "config.json").write_text(json.dumps(
        {"stage": 3, "init": str(s2), "steps": 5, "batch": 8, "lr": 7e-5, "teacher": ["minilm@max_length=64"],
         "texts": "/data/texts.jsonl", "loss_weights": [10.0, 200.0, 20.0]}))
    model = M.JasperModel.from_pretrained(s2)
    return model.save_pretrained(root / "run3" / "final"), model


def test_card_front_matter_and_facts(run_export):
    out, model = run_export
    meta, body = front_matter(out / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "matryoshka"} <= set(meta["tags"])
    assert meta["license"] == "mit" and meta["language"] == ["en", "de"]  # from the base folder's card
    assert "base_model" not in meta and "model-index" not in meta  # a local base is no hub id; not scored yet
    assert "stage 2: 7 steps" in body and "stage 3: 5 steps" in body and "minilm@max_length=64" in body
    heads = ", ".join(f"{D}{' (default)' if D == max(model.dims) else ''}" for D in model.dims)
    assert heads in body and "/data/texts.jsonl" in body
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in body


def test_exported_copy_keeps_the_runs_story(run_export, tmp_path):
    """`python export.py export OUT/final ELSEWHERE`: the copy's card still tells the run it came from."""
    import export as X
    out, _ = run_export
    assert X.main(["export", str(out), str(tmp_path / "upload")]) == 0
    body = front_matter(tmp_path / "upload" / "README.md")[1]
    assert "stage 2: 7 steps" in body and "stage 3: 5 steps" in body


@pytest.mark.parametrize("which", ["qwen prompts", "wordpiece no prompts"])
def test_card_snippets_run_and_match_encode(which, run_export, tmp_path):
    """The sentence-transformers and transformers snippets, run as printed, return JasperModel.encode's vectors;
    SentenceTransformer still loads the folder with the card in it. A WordPiece student stored without prompts
    (the demo's) gets snippets without an instruction and with transformers' tokenizer_type."""
    out, model = run_export
    if which.startswith("wordpiece"):
        model = _tiny(minilm_dir(), head_dims=(64, 24))
        model.prompts = {}
        out = model.save_pretrained(tmp_path / "final")
    _, body = front_matter(out / "README.md")
    prompted = which.startswith("qwen")
    ns: dict = {}
    exec(code_blocks(body, "sentence-transformers", out), ns)  # ends with model[2] = the smallest head
    small = min(model.dims)
    assert ("prompt_name" in code_blocks(body, "sentence-transformers", out)) == prompted
    got = ns["model"].encode(["A man is playing a guitar."], convert_to_tensor=True)
    assert got.shape == (1, small)
    assert (got - model.encode(["A man is playing a guitar."], dim=small)).abs().max() <= 1e-5
    ns = {}
    exec(code_blocks(body, "transformers", out), ns)
    want = model.encode(["what is distillation?"], dim=max(model.dims), instruction=(
        "Given a web search query, retrieve relevant passages that answer the query" if prompted else None))
    assert (ns["emb"] - want).abs().max() <= 1e-5
    assert "eval_mteb.register" in code_blocks(body, "mteb", out)


def test_set_head_rewrites_the_card(run_export, tmp_path):
    out, model = run_export
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    C.set_default_head(folder, min(model.dims))
    assert f"{min(model.dims)} (default)" in front_matter(folder / "README.md")[1]


@pytest.mark.parametrize("engine", ["mteb", "builtin"])
def test_update_card_model_index_is_eval_py_numbers(engine, run_export, data_dir, tmp_path):
    out, model = run_export
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    dims = f"{max(model.dims)},{min(model.dims)}"
    res = tmp_path / "r.json"
    for _ in range(2):  # a second run replaces the results section, it does not add one
        assert ev.main(["--model", str(folder), "--tasks", "BIOSSES,STS12", "--dims", dims, "--data-dir",
                        str(data_dir), "--engine", engine, "--out", str(res), "--update-card"]) == 0
    rep = json.loads(res.read_text())
    meta, body = front_matter(folder / "README.md")
    (entry,) = meta["model-index"]
    assert entry["name"] == rep["model"]
    got = {r["dataset"]["name"].split(" (")[0]: r["metrics"][0] for r in entry["results"]}
    assert set(got) == {"BIOSSES", "STS12"}
    for task, metric in got.items():  # the default (largest) head's score, exactly eval.py's
        assert metric["value"] == rep["results"][task][str(max(model.dims))]["main_score"]
        assert metric["type"] == "cosine_spearman"
    assert body.count(MC.RESULTS_HEADING) == 1 and ev.markdown_table(rep) in body
    assert "stage 3: 5 steps" not in body  # this copy is no run's final/: the card says only what it knows
    s = st.SentenceTransformer(str(folder), device="cpu")
    assert s.encode(["x"]).shape == (1, max(model.dims))


def test_update_card_write_is_atomic(run_export, tmp_path, monkeypatch):
    """A failure while the card is written (here: the fsync) leaves the old card byte for byte, and no temp file."""
    out, model = run_export
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    before = (folder / "README.md").read_bytes()
    rep = {"model": "local/x", "engine": "builtin", "instructions": "original", "dims": [max(model.dims)],
           "results": {"STS12": {str(max(model.dims)): {"main_metric": "cosine_spearman", "main_score": 0.5,
                                                        "scores": {"cosine_spearman": 0.5}, "split": "test",
                                                        "time_s": 1.0}}}}

    def boom(fd):
        raise OSError("simulated I/O error")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        MC.update_card(folder, rep, ev.markdown_table(rep))
    assert (folder / "README.md").read_bytes() == before
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_update_card_refuses_a_non_export(tmp_path, capsys):
    assert ev.cli(["--model", str(tmp_path), "--tasks", "STS12", "--data-dir", str(tmp_path), "--update-card"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--update-card" in err[0] and str(tmp_path) in err[0]
