"""Checkpoint loading errors: each broken checkpoint gives a CheckpointError naming the problem (key, shape, file,
field). The checkpoints are real safetensors files written by safetensors itself, then damaged on purpose."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from checkpoints import CheckpointError, resolve_checkpoint

CFG = dict(model_type="qwen2", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0,
           max_position_embeddings=64, hidden_act="silu")


def write_ckpt(d, state, cfg=CFG):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    return d


@pytest.fixture
def good(tmp_path):
    torch.manual_seed(0)
    enc = M.Qwen2Encoder(M.Qwen2Config.from_hf(CFG))
    return write_ckpt(tmp_path / "good", enc.state_dict()), enc


def test_good_checkpoint_loads_exactly(good):
    d, enc = good
    back = M.Qwen2Encoder.from_pretrained(d)
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(back(ids), enc(ids), rtol=0, atol=0)


def test_missing_key(good, tmp_path):
    d, _ = good
    state = load_file(str(d / "model.safetensors"))
    del state["layers.1.mlp.up_proj.weight"]
    bad = write_ckpt(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): layers\.1\.mlp\.up_proj\.weight \(24, 16\)"):
        M.Qwen2Encoder.from_pretrained(bad)


def test_extra_key(good, tmp_path):
    d, _ = good
    state = load_file(str(d / "model.safetensors"))
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    bad = write_ckpt(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): layers\.0\.self_attn\.rotary_emb\.inv_freq \(4\)"):
        M.Qwen2Encoder.from_pretrained(bad)


def test_wrong_shape(good, tmp_path):
    d, _ = good
    state = load_file(str(d / "model.safetensors"))
    state["layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 16)
    bad = write_ckpt(tmp_path / "bad", state)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight checkpoint \(16, 16\) vs "
                                                r"model \(8, 16\)"):
        M.Qwen2Encoder.from_pretrained(bad)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_safetensors(good, tmp_path, keep):
    """Cut inside the data, just before the end, and inside the header: the error names the file."""
    d, _ = good
    raw = (d / "model.safetensors").read_bytes()
    bad = write_ckpt(tmp_path / "bad", {})
    n = keep if isinstance(keep, int) else int(len(raw) * keep)
    (bad / "model.safetensors").write_bytes(raw[:n])
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors.*truncated or corrupt"):
        M.Qwen2Encoder.from_pretrained(bad)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_config_missing_field(good, field):
    d, _ = good
    cfg = dict(CFG)
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: missing required field\(s\) \['{field}'\]"):
        M.Qwen2Encoder.from_pretrained(d)


def test_config_wrong_model_type_and_activation(good):
    d, _ = good
    (d / "config.json").write_text(json.dumps({**CFG, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported"):
        M.Qwen2Encoder.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**CFG, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        M.Qwen2Encoder.from_pretrained(d)


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        M.Qwen2Encoder.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty/config.json: file not found"):
        M.Qwen2Encoder.from_pretrained(empty)


def test_sharded_checkpoint_and_missing_shard(good, tmp_path):
    d, enc = good
    state = load_file(str(d / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    sh = tmp_path / "sharded"
    sh.mkdir()
    (sh / "config.json").write_text(json.dumps(CFG))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: state[k] for k in keys[:half]}, str(sh / names[0]))
    save_file({k: state[k] for k in keys[half:]}, str(sh / names[1]))
    wm = {k: names[0] for k in keys[:half]} | {k: names[1] for k in keys[half:]}
    (sh / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    back = M.Qwen2Encoder.from_pretrained(sh)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())
    (sh / names[1]).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: safetensors file not found"):
        M.Qwen2Encoder.from_pretrained(sh)


def test_prefix_detection_and_explicit_prefix(good, tmp_path):
    d, enc = good
    state = load_file(str(d / "model.safetensors"))
    wrapped = write_ckpt(tmp_path / "wrapped", {"model." + k: v for k, v in state.items()} |
                         {"lm_head.weight": torch.zeros(50, 16)})
    back = M.Qwen2Encoder.from_pretrained(wrapped)  # auto-detects "model.", ignores lm_head outside the prefix
    assert torch.equal(back.norm.weight, enc.norm.weight)
    with pytest.raises(CheckpointError, match="missing key"):
        M.Qwen2Encoder.from_pretrained(wrapped, prefix="")  # the explicit bare prefix sees no body keys
    junk = write_ckpt(tmp_path / "junk", {"foo.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="no 'embed_tokens.weight' or 'model.embed_tokens.weight' key"):
        M.Qwen2Encoder.from_pretrained(junk)


def test_unreachable_hub_id_names_the_source():
    with pytest.raises(CheckpointError, match="'no-such-owner/no-such-model' is not a local directory"):
        resolve_checkpoint("no-such-owner/no-such-model")


def test_jasper_checkpoint_errors_name_keys(tmp_path):
    text = M.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    m = M.JasperModel(M.JasperConfig(text=text, head_dims=(16, 8)))
    m.save_pretrained(tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    state["vector_linear_8.weight"] = torch.zeros(8, 12)
    save_file(state, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vector_linear_8\.weight checkpoint \(8, 12\) vs model \(8, 16\)"):
        M.JasperModel.from_pretrained(tmp_path / "ok")


def test_jasper_from_pretrained_on_a_stella_layout_points_to_from_stella(good):
    d, _ = good
    with pytest.raises(CheckpointError, match="use JasperModel.from_stella"):
        M.JasperModel.from_pretrained(d)


def test_sliding_window_configs():
    with pytest.raises(CheckpointError, match="sliding-window attention layers are not supported"):
        M.Qwen2Config.from_hf({**CFG, "use_sliding_window": True, "sliding_window": 8})
    mis = M.Qwen2Config.from_hf({**CFG, "model_type": "mistral", "sliding_window": 8, "causal": True})
    assert mis.attention_bias is False and mis.sliding_window == 8
    assert M.Qwen2Config.from_hf(mis.to_hf()) == mis
    enc = M.Qwen2Encoder(mis)
    enc(torch.zeros(1, 8, dtype=torch.long))  # within the window: fine
    with pytest.raises(ValueError, match="exceeds sliding_window 8"):
        enc(torch.zeros(1, 9, dtype=torch.long))
    enc.config.causal = False  # bidirectional ignores the window (as NV-Embed)
    enc(torch.zeros(1, 9, dtype=torch.long))
