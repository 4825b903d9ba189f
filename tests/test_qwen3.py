"""Qwen3 body (model.Qwen2Encoder with the Qwen3 switches) against transformers' Qwen3Model, the independent
reference: fp32 hidden states of real tokens <= 1e-5 relative, causal and bidirectional, right and left padding,
plus strict key-for-key loading of the hub layouts (bare Qwen3Model as in Qwen3-Embedding, Qwen3ForCausalLM).

Every checkpoint is written by transformers' own save_pretrained (random init, norms perturbed so they matter).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def tiny_qwen3_config(**kw):
    # head_dim 24 != hidden / heads (= 16), as in the real models (0.6B: 1024 hidden, 16 heads x 128)
    base = dict(vocab_size=199, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False)
    base.update(kw)
    cfg = transformers.Qwen3Config(**base)
    cfg._attn_implementation = "eager"
    return cfg


def save_reference(tmp_path, hf_cfg, cls=None, seed=0, name="ckpt"):
    torch.manual_seed(seed)
    ref = (cls or transformers.Qwen3Model)(hf_cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / name
    ref.save_pretrained(out)
    return ref, out


def batch(vocab, lengths, left=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if left else slice(0, n)
        mask[i, sl] = 1
    ids[mask == 0] = 0
    return ids, mask


def rel_err_real(ours, ref, mask):
    m = mask.bool()
    return ((ours[m] - ref[m]).abs().max() / ref[m].abs().max()).item()


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_qwen3_parity_with_transformers(tmp_path, causal, left):
    # transformers runs the body bidirectionally when config.json says is_causal: false; we read the same key
    hf_cfg = tiny_qwen3_config(is_causal=causal)
    ref, ckpt = save_reference(tmp_path, hf_cfg)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen3"
    ours = M.Qwen2Encoder.from_pretrained(ckpt).eval()
    c = ours.config
    assert (c.model_type, c.qk_norm, c.attention_bias, c.head_dim, c.causal) == ("qwen3", True, False, 24, causal)
    att = ours.layers[0].self_attn
    assert att.q_proj.bias is None and att.o_proj.bias is None and att.q_norm.weight.shape == (24,)
    ids, mask = batch(hf_cfg.vocab_size, [13, 7, 1, 13], left=left)
    with torch.no_grad():
        h = ours(ids, mask)
        r = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert h.shape == (4, 13, 64)
    assert torch.isfinite(h).all()
    err = rel_err_real(h, r, mask)
    assert err <= RTOL, err


def test_qwen3_modes_and_qk_norm_really_matter(tmp_path):
    """Guards the switches: causal vs bidirectional differ, and so does a model with q_norm/k_norm weights changed."""
    hf_cfg = tiny_qwen3_config()
    _, ckpt = save_reference(tmp_path, hf_cfg)
    a = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": True}).eval()
    b = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": False}).eval()
    ids, mask = batch(hf_cfg.vocab_size, [9, 9])
    with torch.no_grad():
        ha, hb = a(ids, mask), b(ids, mask)
        assert (ha[:, 0] - hb[:, 0]).abs().max() > 1e-3
        a.layers[1].self_attn.k_norm.weight.mul_(3.0)
        assert (a(ids, mask) - ha).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_causal_lm_checkpoint_loads_body(tmp_path, tied):
    """A plain Qwen3 LM (Qwen3ForCausalLM: keys under `model.`, lm_head beside them or tied and absent)."""
    hf_cfg = tiny_qwen3_config(num_hidden_layers=2, tie_word_embeddings=tied, is_causal=True)
    ref, ckpt = save_reference(tmp_path, hf_cfg, cls=transformers.Qwen3ForCausalLM)
    keys = load_file(str(ckpt / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.q_norm.weight" in keys and ("lm_head.weight" in keys) != tied
    ours = M.Qwen2Encoder.from_pretrained(ckpt).eval()
    ids, mask = batch(hf_cfg.vocab_size, [6, 11, 3], left=True)
    with torch.no_grad():
        err = rel_err_real(ours(ids, mask), ref.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert err <= RTOL, err


def test_qwen3_gradients_match_transformers(tmp_path):
    """fwd+bwd: the gradient of a loss on the real tokens w.r.t. every parameter, ours vs transformers."""
    hf_cfg = tiny_qwen3_config(num_hidden_layers=2, is_causal=False)
    ref, ckpt = save_reference(tmp_path, hf_cfg)
    ours = M.Qwen2Encoder.from_pretrained(ckpt)
    ids, mask = batch(hf_cfg.vocab_size, [10, 4, 7])
    w = torch.randn(64, generator=torch.Generator().manual_seed(3))
    m = mask.bool()
    (ours(ids, mask)[m] @ w).sum().backward()
    (ref(input_ids=ids, attention_mask=mask).last_hidden_state[m] @ w).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        g_ref = ref_grads[n].grad
        err = ((p.grad - g_ref).abs().max() / g_ref.abs().max().clamp(min=1e-12)).item()
        assert err <= 1e-4, (n, err)  # gradients sum over many terms: 1e-4 relative to their largest entry


def _tamper(tmp_path, ckpt, name, edit_state=None, edit_cfg=None):
    out = tmp_path / name
    out.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    state = load_file(str(ckpt / "model.safetensors"))
    if edit_state:
        edit_state(state)
    if edit_cfg:
        edit_cfg(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(out / "model.safetensors"))
    return out


def test_qwen3_strict_loading(tmp_path):
    hf_cfg = tiny_qwen3_config(num_hidden_layers=2)
    _, ckpt = save_reference(tmp_path, hf_cfg)
    no_knorm = _tamper(tmp_path, ckpt, "a", edit_state=lambda s: s.pop("layers.1.self_attn.k_norm.weight"))
    with pytest.raises(M.CheckpointError, match=r"missing key\(s\): layers\.1\.self_attn\.k_norm\.weight \(24\)"):
        M.Qwen2Encoder.from_pretrained(no_knorm)
    # a Qwen3 checkpoint mislabelled qwen2 (its attention_bias false kept): the norms are unexpected keys
    as_qwen2 = _tamper(tmp_path, ckpt, "b", edit_cfg=lambda c: c.update(model_type="qwen2"))
    with pytest.raises(M.CheckpointError, match=r"4 unexpected key\(s\): layers\.0\.self_attn\.k_norm\.weight"):
        M.Qwen2Encoder.from_pretrained(as_qwen2)
    wrong_hd = _tamper(tmp_path, ckpt, "c", edit_cfg=lambda c: c.update(head_dim=16))
    with pytest.raises(M.CheckpointError, match=r"q_proj\.weight checkpoint \(96, 64\) vs model \(64, 64\)"):
        M.Qwen2Encoder.from_pretrained(wrong_hd)


def test_qwen3_config_round_trip_and_defaults():
    hf_cfg = tiny_qwen3_config()
    cfg = M.Qwen2Config.from_hf(json.loads(hf_cfg.to_json_string()))
    assert (cfg.head_dim, cfg.rope_theta, cfg.attention_bias, cfg.qk_norm) == (24, 1e6, False, True)
    assert M.Qwen2Config.from_hf(cfg.to_hf()) == cfg
    back = transformers.Qwen3Config(**cfg.to_hf())  # transformers accepts what we write
    assert back.head_dim == 24 and back.attention_bias is False
    d = json.loads(hf_cfg.to_json_string())
    del d["head_dim"]  # transformers' Qwen3Config default is 128, not hidden / heads
    assert M.Qwen2Config.from_hf(d).head_dim == transformers.Qwen3Config(**d).head_dim == 128
    d.update(use_sliding_window=True, sliding_window=8)
    with pytest.raises(M.CheckpointError, match="sliding-window"):
        M.Qwen2Config.from_hf(d)
