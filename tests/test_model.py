"""Qwen2Encoder parity with transformers (the independent reference), loading and pooling.

Every checkpoint here is a real safetensors file in the hub layout (config.json + model.safetensors), written by
transformers' own save_pretrained, then loaded by both implementations.
"""
import json

import pytest
import torch

import model as M
from common import bidirectional_mask

transformers = pytest.importorskip("transformers")

RTOL = 1e-5  # fp32 relative error on the hidden states of real tokens


def tiny_qwen2_config(**kw):
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False)
    base.update(kw)
    return transformers.Qwen2Config(**base)


def save_reference(tmp_path, hf_cfg, cls=None, seed=0):
    """Random-init a transformers model, perturb norms/biases so they matter, save it in the hub layout."""
    torch.manual_seed(seed)
    cls = cls or transformers.Qwen2Model
    ref = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "ckpt"
    ref.save_pretrained(out, safe_serialization=True)
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    return ref, out


def padded_batch(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad id; must not matter
    return ids, mask




def rel_err_real(ours, ref, mask):
    m = mask.bool()
    return ((ours[m] - ref[m]).abs().max() / ref[m].abs().max()).item()


def reference_hidden(ref, ids, mask, causal):
    with torch.no_grad():
        if causal:
            return ref(input_ids=ids, attention_mask=mask).last_hidden_state
        return ref(input_ids=ids, attention_mask=bidirectional_mask(mask)).last_hidden_state


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_qwen2_parity_with_transformers(tmp_path, causal):
    hf_cfg = tiny_qwen2_config()
    hf_cfg._attn_implementation = "eager"
    ref, ckpt = save_reference(tmp_path, hf_cfg)
    ours = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": causal}).eval()
    assert ours.config.attention_bias and ours.config.num_key_value_heads == 2 and ours.config.causal == causal
    ids, mask = padded_batch(hf_cfg.vocab_size, [17, 9, 3, 17])  # right padding present
    with torch.no_grad():
        h = ours(ids, mask)
    assert h.shape == (4, 17, 64) and h.dtype == torch.float32
    err = rel_err_real(h, reference_hidden(ref, ids, mask, causal), mask)
    assert err <= RTOL, err


def test_causal_and_bidirectional_really_differ(tmp_path):
    """Guards the switch itself: the two modes must give different hidden states for the first tokens."""
    hf_cfg = tiny_qwen2_config()
    _, ckpt = save_reference(tmp_path, hf_cfg)
    a = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": True})
    b = M.Qwen2Encoder.from_pretrained(ckpt)
    assert b.config.causal is False  # bidirectional is the default
    ids, mask = padded_batch(hf_cfg.vocab_size, [12, 12])
    with torch.no_grad():
        assert (a(ids, mask)[:, 0] - b(ids, mask)[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_other_shapes_and_wrapper_prefix(tmp_path, causal):
    """Explicit head_dim != hidden/heads, MHA (no GQA), a Qwen2ForCausalLM checkpoint (keys under `model.`)."""
    hf_cfg = tiny_qwen2_config(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=32,
                               intermediate_size=80, num_hidden_layers=2, rope_theta=1e6)
    hf_cfg._attn_implementation = "eager"
    ref_lm, ckpt = save_reference(tmp_path, hf_cfg, cls=transformers.Qwen2ForCausalLM)
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    ours = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": causal}).eval()
    assert ours.config.head_dim == 32
    ids, mask = padded_batch(hf_cfg.vocab_size, [5, 11, 8])
    err = rel_err_real(ours(ids, mask).detach(), reference_hidden(ref_lm.model, ids, mask, causal), mask)
    assert err <= RTOL, err


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mistral_parity_no_attention_bias(tmp_path, causal):
    hf_cfg = transformers.MistralConfig(vocab_size=173, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                        rope_theta=10000.0, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    ref, ckpt = save_reference(tmp_path, hf_cfg, cls=transformers.MistralModel)
    ours = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": causal}).eval()
    assert ours.config.attention_bias is False and ours.layers[0].self_attn.q_proj.bias is None
    ids, mask = padded_batch(hf_cfg.vocab_size, [10, 4])
    err = rel_err_real(ours(ids, mask).detach(), reference_hidden(ref, ids, mask, causal), mask)
    assert err <= RTOL, err


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_never_changes_real_tokens(causal):
    torch.manual_seed(0)
    cfg = M.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, causal=causal)
    enc = M.Qwen2Encoder(cfg).eval()
    ids = torch.randint(1, 97, (1, 7))
    with torch.no_grad():
        alone = enc(ids, torch.ones_like(ids))
        padded_ids = torch.cat([ids, torch.randint(1, 97, (1, 9))], dim=1)  # garbage ids in the padding
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 9)], dim=1).long()
        padded = enc(padded_ids, mask)
        no_mask = enc(ids)
    torch.testing.assert_close(padded[:, :7], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(no_mask, alone, rtol=1e-5, atol=1e-6)
    # and the padding really would change them without the mask (bidirectional)
    if not causal:
        assert (enc(padded_ids)[:, :7] - alone).abs().max() > 1e-4


def test_empty_row_gives_finite_output_and_zero_pool():
    cfg = M.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    enc = M.Qwen2Encoder(cfg).eval()
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    h = enc(ids, mask)
    assert torch.isfinite(h).all()
    pooled = M.mean_pool(h, mask)
    assert torch.isfinite(pooled).all() and pooled[1].abs().max() == 0


def test_mean_pool_matches_manual():
    h = torch.randn(3, 6, 8, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    p = M.mean_pool(h, mask)
    assert p.dtype == torch.float32
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(p[i], h[i, :n].float().mean(0))


def test_gradients_flow_and_match_reference(tmp_path):
    """Backward parity on the loaded tiny checkpoint (training uses this path)."""
    hf_cfg = tiny_qwen2_config(num_hidden_layers=2)
    hf_cfg._attn_implementation = "eager"
    ref, ckpt = save_reference(tmp_path, hf_cfg)
    ours = M.Qwen2Encoder.from_pretrained(ckpt)
    ids, mask = padded_batch(hf_cfg.vocab_size, [9, 5])
    w = torch.randn(2, 9, 64)
    (M.mean_pool(ours(ids, mask), mask) * w[:, 0]).sum().backward()
    out = ref(input_ids=ids, attention_mask=bidirectional_mask(mask)).last_hidden_state
    (M.mean_pool(out, mask) * w[:, 0]).sum().backward()
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) == {n for n, _ in ours.named_parameters()}
    for n1, p1 in ours.named_parameters():
        p2 = ref_params[n1]
        scale = p2.grad.abs().max().clamp(min=1e-12)
        assert ((p1.grad - p2.grad).abs().max() / scale) <= 1e-4, n1


def test_bf16_cast_keeps_rope_in_fp32(tmp_path):
    hf_cfg = tiny_qwen2_config(num_hidden_layers=1)
    _, ckpt = save_reference(tmp_path, hf_cfg)
    enc32 = M.Qwen2Encoder.from_pretrained(ckpt)
    enc16 = M.Qwen2Encoder.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert enc16.embed_tokens.weight.dtype == torch.bfloat16 and enc16.inv_freq.dtype == torch.float32
    enc32.to(torch.bfloat16)  # a module cast touches the buffer: must be rebuilt in fp32 at the next forward
    ids, mask = padded_batch(hf_cfg.vocab_size, [30, 20])
    a, b = enc32(ids, mask), enc16(ids, mask)
    assert enc32.inv_freq.dtype == torch.float32
    torch.testing.assert_close(a, b)


def test_config_roundtrip_through_hf_dict(tmp_path):
    hf_cfg = tiny_qwen2_config(head_dim=24)
    cfg = M.Qwen2Config.from_hf(json.loads(hf_cfg.to_json_string()))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (211, 64, 2, 24)
    assert cfg.rope_theta == 10000.0 and cfg.attention_bias is True and cfg.causal is False
    assert M.Qwen2Config.from_hf(cfg.to_hf()) == cfg
    # and transformers accepts our to_hf() output
    back = transformers.Qwen2Config(**cfg.to_hf())
    assert back.num_key_value_heads == 2 and back.head_dim == 24


def test_causal_left_padding_uses_the_full_mask(tmp_path):
    """The causal fast path (no mask) is only valid for right padding; left padding must fall back to the mask."""
    hf_cfg = tiny_qwen2_config(num_hidden_layers=2)
    hf_cfg._attn_implementation = "eager"
    ref, ckpt = save_reference(tmp_path, hf_cfg)
    ours = M.Qwen2Encoder.from_pretrained(ckpt, config_overrides={"causal": True})
    ids, mask = padded_batch(hf_cfg.vocab_size, [11, 6])
    mask, ids = mask.flip(1), ids.flip(1)  # left padding
    assert ours.attention_mask_for_sdpa(mask, 11)[0] is not None
    with torch.no_grad():
        err = rel_err_real(ours(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert err <= RTOL, err
