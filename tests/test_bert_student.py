"""A BERT-family student (issue 27): forward and gradients vs transformers' BertModel (padded and packed), the
export in sentence-transformers and transformers, `export.py init-student`, stages 1-3 through train.py (packing,
activation checkpointing, resume), 2 processes == 1, and stage 4 refused.

Tiny random BERT bodies are built and saved by transformers / sentence-transformers themselves (test-only); the real
all-MiniLM-L6-v2 (teachers.minilm_path()) is the folder students are cut from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import export as EX
import model as M
import train as TR
import teachers
from checkpoints import check_standard_folder, set_default_head
from packing import Packed
from test_st_teacher import build_st
from train_fixtures import make_cache, make_texts, make_tiny_jasper, read_metrics, run_train

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "a cat", "What is the capital of France?",
         "money flows to the river bank " * 5, "ok", "naïve café — unicode"]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """{pooling: a tiny random sentence-transformers BERT folder (4 layers, hidden 32, MiniLM's vocabulary)}."""
    d = tmp_path_factory.mktemp("tiny_bert")
    return {p: build_st(d / p, "bert", pooling=p, num_hidden_layers=4, max_seq_length=64) for p in ("mean", "cls")}


# ---------------------------------------------------------------------------------------------------------------------
# forward and gradients vs transformers' BertModel
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_and_gradients_match_transformers(tiny_bert, pooling, packed):
    """The student's pooled vector (mean or [CLS], as 1_Pooling says) and the gradients of every body parameter
    equal transformers' BertModel on the same weights, <= 1e-5 relative, padded and packed."""
    folder = tiny_bert[pooling]
    ours = M.JasperModel.from_bert(folder).train()  # no dropout in our body; transformers' in eval mode below
    ref = transformers.BertModel.from_pretrained(folder / "0_Transformer" if (folder / "0_Transformer").is_dir()
                                                 else folder, add_pooling_layer=False).eval()
    ids = ours.tokenizer.encode_ids(TEXTS)
    input_ids, mask = ours.tokenizer.pad(ids)
    h = ref(input_ids=input_ids, attention_mask=mask).last_hidden_state                 # (B, T, H)
    want = h[:, 0] if pooling == "cls" else (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    got = ours.pool(None, None, packed=Packed.from_ids(ids, budget=24)) if packed else ours.pool(input_ids, mask)
    assert rel(got, want) <= 1e-5
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    (got * w).sum().backward()
    (want * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    # attention's key bias has an exact-zero gradient (softmax is shift-invariant): both sides are rounding noise
    # there, so each tensor's error is measured against at least 1e-3 of the largest gradient anywhere
    floor = 1e-3 * max(p.grad.abs().max().item() for p in ref.parameters())
    n = 0
    for name, p in ours.model.named_parameters():
        g = ref_params[name].grad
        assert (p.grad - g).abs().max().item() <= 1e-5 * max(g.abs().max().item(), floor), name
        n += 1
    assert n == len(ref_params) and n > 30


# ---------------------------------------------------------------------------------------------------------------------
# the export: a standard sentence-transformers folder, every head at parity
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["minilm-cut", "tiny-cls"])
def test_export_loads_in_sentence_transformers_and_transformers(tiny_bert, tmp_path, case):
    src = teachers.minilm_path() if case == "minilm-cut" else tiny_bert["cls"]
    m = M.JasperModel.from_bert(src, layers=[0, 2, 4] if case == "minilm-cut" else None,
                                head_dims=(384, 256, 128, 64) if case == "minilm-cut" else (40, 16, 8))
    torch.manual_seed(1)
    with torch.no_grad():  # heads that are neither identity nor fresh-init symmetric: the parity must see them
        for D, lin in m.heads.items():
            lin.weight.normal_(std=0.1)
            lin.bias.normal_(std=0.1)
    out = m.save_pretrained(tmp_path / "export")
    assert check_standard_folder(out, weights=True) == max(m.dims)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "is_causal" not in cfg
    pool = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_cls_token"] == (case == "tiny-cls")
    # transformers: BertModel from the folder as it is, body keys without a prefix; same last hidden state
    hf = transformers.AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == "BertModel"
    ids, mask = m.tokenizer(TEXTS)
    with torch.no_grad():
        assert rel(m.model(ids, mask) * mask[..., None], hf(input_ids=ids, attention_mask=mask).last_hidden_state
                   * mask[..., None]) <= 1e-5
    again = M.JasperModel.from_pretrained(out)
    assert again.config.is_bert and again.config.pooling == m.config.pooling
    for D in m.dims:  # every head: sentence-transformers == JasperModel.encode <= 1e-6
        set_default_head(out, D)
        got = torch.from_numpy(st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, batch_size=4))
        assert (got - m.encode(TEXTS, dim=D)).abs().max().item() <= 1e-6, D
        assert (again.encode(TEXTS, dim=D) - m.encode(TEXTS, dim=D)).abs().max().item() <= 1e-6, D


# ---------------------------------------------------------------------------------------------------------------------
# export.py init-student
# ---------------------------------------------------------------------------------------------------------------------
def test_init_student_from_real_minilm_keeps_the_chosen_layers(tmp_path, capsys):
    src = teachers.minilm_path()
    out = tmp_path / "s"
    assert EX.main(["init-student", "--from", str(src), "--layers", "0,2,5", "--out", str(out)]) == 0
    assert "3 layers [0, 2, 5]" in capsys.readouterr().out
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    pre = "bert." if any(k.startswith("bert.") for k in a) else ""
    for new, old in enumerate((0, 2, 5)):
        for k in [k for k in b if k.startswith(f"encoder.layer.{new}.")]:
            assert torch.equal(b[k], a[pre + k.replace(f"layer.{new}.", f"layer.{old}.", 1)]), k
    assert not any(k.startswith("encoder.layer.3.") for k in b)
    assert torch.equal(b["embeddings.word_embeddings.weight"], a[pre + "embeddings.word_embeddings.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["jasper"]["head_dims"] == [384, 256, 128, 64]
    # FC1 starts as the identity: the cut student returns its pooled state, as the teacher (no Dense) does
    assert torch.equal(b["vector_linear_384.weight"], torch.eye(384))
    # bad layers: one line, exit 2
    assert EX.main(["init-student", "--from", str(src), "--layers", "0,6", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0..5" in err


def test_init_student_from_tiny_bert_and_from_a_qwen_export(tiny_bert, tmp_path):
    m = EX.init_student(tiny_bert["mean"], [1, 3], tmp_path / "b", heads=[384, 16])
    assert m.config.head_dims == (384, 16) and m.config.text.num_hidden_layers == 2
    assert m.init_report[384] == "fresh init" and m.init_report[16] == "identity rows 0..15"  # 384 > hidden 32
    again = M.JasperModel.from_pretrained(tmp_path / "b")
    assert (again.encode(TEXTS) - m.encode(TEXTS)).abs().max() <= 1e-6
    q = make_tiny_jasper(tmp_path / "q", layers=4, vision=False)
    mq = EX.init_student(q, [0, 3], tmp_path / "qcut")
    a, b = load_file(q / "model.safetensors"), load_file(tmp_path / "qcut" / "model.safetensors")
    assert mq.config.text.num_hidden_layers == 2
    assert all(torch.equal(b[k], a[k.replace("layers.1.", "layers.3.")]) for k in b if "layers.1." in k)
    assert not torch.equal(b["vector_linear_384.weight"], a["vector_linear_384.weight"])  # fresh heads


# ---------------------------------------------------------------------------------------------------------------------
# training through train.py
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_train")
    texts = make_texts(d / "data", n=128)
    return dict(texts=texts, cache=make_cache(texts, d / "cache"))


def args(a, init, out, stage, steps, *extra):
    return ["--stage", str(stage), "--init", str(init), "--texts", str(a["texts"]), "--teacher-cache",
            str(a["cache"]), "--out", str(out), "--batch", "16", "--micro-batch", "4", "--steps", str(steps),
            "--max-length", "48", "--dtype", "fp32", "--log-every", "1", "--ckpt-every", "0", "--lr", "1e-3",
            *extra]


def changed_keys(a: Path, b: Path) -> set[str]:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return {k for k in x if not torch.equal(x[k], y[k])}


@pytest.mark.slow
def test_stages_1_to_3_on_a_tiny_bert_student(tiny_bert, text_assets, tmp_path):
    """Stage 1 from the BERT folder itself (heads: FC1 = the teacher's 384, FC2-4 by default_head_dims), then 2 and 3
    from the previous export; packed batches (the default), activation checkpointing in stage 2. Each stage trains
    exactly its set: 1 = FC1; 2 = FC1 + the last 3 of 4 encoder layers; 3 = everything."""
    s1 = TR.main(args(text_assets, tiny_bert["mean"], tmp_path / "s1", 1, 2))
    f1 = Path(s1["export"])
    assert json.loads((f1 / "config.json").read_text())["jasper"]["head_dims"] == [384, 16, 8, 4]
    s2 = TR.main(args(text_assets, f1, tmp_path / "s2", 2, 2, "--activation-checkpointing"))
    f2 = Path(s2["export"])
    assert changed_keys(f1, f2) == {k for k in load_file(f1 / "model.safetensors")
                                    if k.startswith(("vector_linear_384.", "encoder.layer.1.", "encoder.layer.2.",
                                                     "encoder.layer.3."))}
    s3 = TR.main(args(text_assets, f2, tmp_path / "s3", 3, 2))
    f3 = Path(s3["export"])
    assert {k.split(".")[0] for k in changed_keys(f2, f3)} == {"embeddings", "encoder", "vector_linear_384",
                                                               "vector_linear_16", "vector_linear_8", "vector_linear_4"}
    m3 = read_metrics(tmp_path / "s3")
    assert "fc4.resim" in m3[0] and m3[-1]["loss"] != m3[0]["loss"]
    assert check_standard_folder(f3, weights=True) == 384
    got = torch.from_numpy(st.SentenceTransformer(str(f3), device="cpu").encode(TEXTS))
    assert (got - M.JasperModel.from_pretrained(f3).encode(TEXTS)).abs().max() <= 1e-6
    # stage 4 refused for a BERT student, with the reason, before anything loads
    with pytest.raises(TR.ConfigError, match="BERT-family student.*decoder"):
        TR.main(["--stage", "4", "--init", str(f3), "--images", str(text_assets["texts"]), "--out",
                 str(tmp_path / "s4")])


@pytest.mark.slow
def test_resume_is_exact_for_a_bert_student(tiny_bert, text_assets, tmp_path):
    TR.main(args(text_assets, tiny_bert["cls"], tmp_path / "a", 2, 4, "--ckpt-every", "2"))
    TR.main(args(text_assets, tiny_bert["cls"], tmp_path / "b", 2, 4, "--ckpt-every", "2", "--stop-at", "3"))
    TR.main(args(text_assets, tiny_bert["cls"], tmp_path / "b", 2, 4, "--ckpt-every", "2", "--resume"))
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [(r["step"], r["loss"]) for r in ra] == [(r["step"], r["loss"]) for r in rb]
    a, b = load_file(tmp_path / "a" / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" /
                                                                                 "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_process_bert_student(tiny_bert, text_assets, tmp_path):
    """Stage 3 of a BERT student (per-layer fully_shard of the encoder layers, the root: embeddings + heads) under
    torchrun (gloo, 2 ranks) == 1 process on the same global batch: losses rel 1e-5, parameters atol 1e-5."""
    init = tmp_path / "init"
    EX.init_student(tiny_bert["mean"], [0, 1, 2, 3], init, heads=[384, 16, 8])
    run_train(args(text_assets, init, tmp_path / "p1", 3, 3))
    run_train(args(text_assets, init, tmp_path / "p2", 3, 3), nproc=2)
    m1, m2 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
    for r1, r2 in zip(m1, m2):
        for k in [k for k in r1 if "." in k or k == "loss"]:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), (r1["step"], k)
    assert m1[-1]["loss"] != m1[0]["loss"]
    a = load_file(tmp_path / "p1" / "final" / "model.safetensors")
    b = load_file(tmp_path / "p2" / "final" / "model.safetensors")
    init_w = load_file(init / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert max((a[k] - init_w[k]).abs().max().item() for k in a) > 1e-3
