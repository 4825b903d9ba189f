"""A Jasper student started from a Qwen3 checkpoint (a plain Qwen3 LM, or the Qwen3-Embedding layout) with fresh
heads, trained through train.py's stages 1-3 against a multi-teacher cache of a tiny Qwen3-Embedding-layout teacher
and a tiny stella-layout teacher. Tiny shapes throughout (hidden 32, 2 layers): it checks plumbing, not quality."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import model as M
import teachers as T
import train as TR
from common import qwen_tokenizer_dir
from test_st_teacher import build_st
from test_teachers_qwen import stella_dir  # noqa: F401  (fixture)
from train_fixtures import make_texts, read_metrics

transformers = pytest.importorskip("transformers")


def tiny_qwen3_lm(d, tied=True):
    """A plain Qwen3 LM in the hub layout (Qwen3ForCausalLM: `model.*` keys, tied lm_head) + the Qwen tokenizer."""
    cfg = transformers.Qwen3Config(vocab_size=151680, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(cfg)
    lm.save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir() / f, d / f)
    return lm


def test_student_from_plain_qwen3_lm_has_the_lm_body_and_fresh_heads(tmp_path):
    lm = tiny_qwen3_lm(tmp_path / "lm")
    s = M.JasperModel.from_stella(tmp_path / "lm", head_dims=(80, 16))
    assert s.config.text.model_type == "qwen3" and s.config.text.qk_norm and s.config.text.causal is False
    assert s.init_report == {80: "fresh init", 16: "fresh init"}
    ref = lm.model.state_dict()
    for k, v in s.model.state_dict().items():
        if k != "embed_tokens.weight":
            assert torch.equal(v, ref[k]), k
    n = ref["embed_tokens.weight"].shape[0]
    assert torch.equal(s.model.embed_tokens.weight[:n], ref["embed_tokens.weight"])
    # the export round-trips through from_pretrained with the Qwen3 body (q_norm / k_norm keys present)
    s.save_pretrained(tmp_path / "exp")
    assert "model.layers.0.self_attn.q_norm.weight" in load_file(str(tmp_path / "exp" / "model.safetensors"))
    back = M.JasperModel.from_pretrained(tmp_path / "exp")
    assert back.config.text.model_type == "qwen3"
    v1, v2 = s.encode(["a cat", "the river bank"], dim=16), back.encode(["a cat", "the river bank"], dim=16)
    assert torch.allclose(v1, v2, atol=1e-6)


def test_from_stella_refuses_a_dense_head_without_activation_key(tmp_path):
    """A Dense config without `activation_function` is Tanh to sentence-transformers: not copyable into a linear
    head, so the init refuses it instead of copying it as if it were Identity."""
    tiny_qwen3_lm(tmp_path / "lm")
    hd = tmp_path / "lm" / "2_Dense_16"
    hd.mkdir()
    from safetensors.torch import save_file
    save_file({"linear.weight": torch.zeros(16, 32), "linear.bias": torch.zeros(16)}, str(hd / "model.safetensors"))
    (hd / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 16, "bias": True}))
    with pytest.raises(M.CheckpointError, match=r"2_Dense_16/config\.json: activation .*Tanh"):
        M.JasperModel.from_stella(tmp_path / "lm", head_dims=(16,))


def test_train_auto_init_tells_bodies_from_exports(tmp_path, stella_dir):  # noqa: F811
    """--init-format auto: a checkpoint with vector_linear_* heads is a Jasper export, anything else a body to start
    from (a plain Qwen3 LM has neither modules.json nor 2_Dense_*, and used to be misread as an export)."""
    tiny_qwen3_lm(tmp_path / "lm")
    assert TR.init_format_of(tmp_path / "lm") == "stella"
    assert TR.init_format_of(stella_dir[0]) == "stella"
    M.JasperModel.from_stella(tmp_path / "lm", head_dims=(16,)).save_pretrained(tmp_path / "exp")
    assert TR.init_format_of(tmp_path / "exp") == "jasper"


def test_qwen3_student_stages_1_to_3_end_to_end(tmp_path, stella_dir):  # noqa: F811
    # teachers: a tiny Qwen3-Embedding-layout teacher (32 dims) + a tiny stella (48) -> 80-dim targets
    qwen3_teacher = build_st(tmp_path / "t", "qwen3", pooling="lasttoken", padding_side="left", eos=True,
                             prompts={"query": "Instruct: q\nQuery:"})
    texts = make_texts(tmp_path / "data", n=16)
    T.build_cache([str(qwen3_teacher), f"{stella_dir[0]}@dim=48"], texts, tmp_path / "cache", batch_size=8,
                  show_progress=False, load=T.load_teacher)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["dim"] == 80
    # student: a plain Qwen3 LM through train.py's --init (auto: a body checkpoint), heads (80, 64, 32, 16)
    tiny_qwen3_lm(tmp_path / "lm", tied=False)
    init = tmp_path / "init"
    M.JasperModel.from_stella(tmp_path / "lm", head_dims=(80, 64, 32, 16), max_length=48).save_pretrained(init)
    prev, losses = init, {}
    for stage, lr in ((1, 1e-2), (2, 5e-4), (3, 3e-4)):
        out = tmp_path / f"s{stage}"
        summary = TR.main(["--stage", str(stage), "--init", str(prev), "--out", str(out), "--steps", "6",
                           "--lr", str(lr), "--batch", "16", "--micro-batch", "8", "--max-length", "48",
                           "--log-every", "2", "--ckpt-every", "0", "--texts", str(texts), "--teacher-cache",
                           str(tmp_path / "cache"), "--dtype", "fp32"])
        m = read_metrics(out)
        losses[stage] = (m[0]["loss"], m[-1]["loss"])
        prev = summary["export"]
    final = M.JasperModel.from_pretrained(prev)
    assert final.config.text.model_type == "qwen3" and final.config.head_dims == (80, 64, 32, 16)
    assert torch.isfinite(final.encode(["a cat sat on the mat"], dim=80)).all()
    assert losses[1][1] < losses[1][0], losses
