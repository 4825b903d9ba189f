"""The Jasper student: heads, pooling, stella initialisation, save/load round trip, encode, full-size parameter count."""
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import model as M
from common import bidirectional_mask, minilm_dir, qwen_tokenizer_dir as qwen_tok_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def stella_like(tmp_path_factory):
    """A stella_en_1.5B_v5-layout checkpoint in miniature, written by the reference libraries themselves: a bare
    Qwen2Model (transformers) + sentence-transformers Dense folders 2_Dense_{32,48,64} + a Qwen2 tokenizer.json whose
    vocabulary has only the 3 chat specials (like stella's), so the 3 image tokens get ids 151646-151648."""
    from sentence_transformers.models import Dense

    d = tmp_path_factory.mktemp("stella")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=151646, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_theta=1e6)
    cfg._attn_implementation = "eager"
    ref = transformers.Qwen2Model(cfg).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(d, safe_serialization=True)
    dense = {}
    for D in (32, 48, 64):
        m = Dense(32, D, bias=True, activation_function=torch.nn.Identity())
        (d / f"2_Dense_{D}").mkdir()
        m.save(str(d / f"2_Dense_{D}"))
        dense[D] = m
    js = json.loads((qwen_tok_dir() / "tokenizer.json").read_text())
    js["added_tokens"] = [t for t in js["added_tokens"] if t["id"] <= 151645]
    (d / "tokenizer.json").write_text(json.dumps(js))
    return d, ref, dense


def test_from_stella_heads_and_reference_pipeline(stella_like):
    """Student heads vs the stella pipeline computed by the reference libraries (transformers Qwen2Model,
    bidirectional mask, masked mean, sentence-transformers Dense, L2 normalise)."""
    d, ref, dense = stella_like
    student = M.JasperModel.from_stella(d, head_dims=(96, 64, 40, 32))
    assert student.init_report == {96: "fresh init", 64: "2_Dense_64", 40: "first 40 rows of 2_Dense_48",
                                   32: "2_Dense_32"}
    # vocabulary grown by the 3 image tokens, new rows = mean embedding, old rows untouched
    emb = student.model.embed_tokens.weight
    assert emb.shape == (151649, 32) and student.config.image_token_ids == (151646, 151647, 151648)
    torch.testing.assert_close(emb[:151646], ref.embed_tokens.weight)
    torch.testing.assert_close(emb[151646:], ref.embed_tokens.weight.mean(0, keepdim=True).expand(3, -1))
    texts = ["A man is playing a guitar.", "Stella and Jasper are embedding models.", "short"]
    ids, mask = student.tokenizer(texts)
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=bidirectional_mask(mask)).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        want = {D: F.normalize(dense[D]({"sentence_embedding": pooled})["sentence_embedding"], dim=-1)
                for D in (32, 48, 64)}
        got = student(ids, mask)
    torch.testing.assert_close(got[64], want[64], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[32], want[32], rtol=1e-5, atol=1e-6)
    # FC "40" = the first 40 coordinates of stella's 48-d projection, renormalised
    torch.testing.assert_close(got[40], F.normalize(
        dense[48]({"sentence_embedding": pooled})["sentence_embedding"][:, :40], dim=-1), rtol=1e-5, atol=1e-6)
    assert got[96].shape == (3, 96) and torch.allclose(got[96].norm(dim=-1), torch.ones(3))
    # encode() (length-sorted batches) gives the same vectors in input order
    enc = student.encode(texts, dim=64, batch_size=2)
    torch.testing.assert_close(enc, want[64], rtol=1e-5, atol=1e-6)
    # several heads in one pass (eval.EmbeddingCache): the same vectors as one head at a time
    many = student.encode(texts, dim=[64, 40, 32], batch_size=2)
    assert list(many) == [64, 40, 32]
    for D in (64, 40, 32):
        torch.testing.assert_close(many[D], student.encode(texts, dim=D, batch_size=2), rtol=0, atol=0)
    torch.testing.assert_close(many[32], want[32], rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip_and_atomic(stella_like, tmp_path, monkeypatch):
    d, _, _ = stella_like
    student = M.JasperModel.from_stella(d, head_dims=(64, 48, 32))
    out = tmp_path / "export"
    student.save_pretrained(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())  # the body's qwen2 config + our block (docs/checkpoints.md)
    assert cfg["jasper"]["head_dims"] == [64, 48, 32] and cfg["vocab_size"] == 151649 and cfg["is_causal"] is False
    back = M.JasperModel.from_pretrained(out)
    texts = ["one sentence here", "and another, longer, sentence with more words in it"]
    for D in (64, 48, 32):
        torch.testing.assert_close(back.encode(texts, dim=D), student.encode(texts, dim=D), rtol=0, atol=0)
    assert back.tokenizer.image_token_ids == (151646, 151647, 151648)
    # a failure in the middle of writing leaves the previous export intact and no temp dirs behind
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoints, "save_file", boom)  # checkpoints.save_hf_checkpoint writes the safetensors
    with pytest.raises(OSError, match="disk full"):
        student.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert M.JasperModel.from_pretrained(out).dims == (64, 48, 32)


def test_sharded_export_loads(stella_like, tmp_path):
    d, _, _ = stella_like
    student = M.JasperModel.from_stella(d, head_dims=(64, 32))
    student.save_pretrained(tmp_path / "sh", max_shard_bytes=2_000_000)
    names = sorted(p.name for p in (tmp_path / "sh").iterdir())
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-0") for n in names) >= 2
    back = M.JasperModel.from_pretrained(tmp_path / "sh")
    torch.testing.assert_close(back.encode(["x y z"], dim=32), student.encode(["x y z"], dim=32), rtol=0, atol=0)


def test_released_layout_without_head_dims_in_config(tmp_path):
    """Released-Jasper-like config.json (text_config, no head list): heads are read from the checkpoint keys."""
    from safetensors.torch import save_file

    text = M.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    m = M.JasperModel(M.JasperConfig(text=text, head_dims=(12288, 1024, 512, 256)))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.layers.0.self_attn.q_proj") for k in m.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jasper_vl", "text_config": text.to_hf(),
                                                      "num_img_tokens": 300}))
    back = M.JasperModel.from_pretrained(tmp_path)
    assert back.dims == (12288, 1024, 512, 256) and back.tokenizer is None
    ids = torch.randint(0, 64, (2, 5))
    out, ref = back(ids, torch.ones_like(ids)), m(ids, torch.ones_like(ids))
    for D in back.dims:
        torch.testing.assert_close(out[D], ref[D])


def test_demo_student_minilm_vocab_small_heads():
    """The offline demo's student: MiniLM WordPiece vocabulary, heads matching a 384-d teacher."""
    tok = M.TextTokenizer.from_pretrained(minilm_dir(), max_length=128)
    text = M.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = M.JasperModel(M.JasperConfig(text=text, head_dims=(384, 256, 128, 64), max_length=128))
    m.tokenizer = tok
    ids, mask = tok(["a photo of a cat", "banking: how do I reset my card pin?"])
    out = m(ids, mask)
    assert {D: v.shape for D, v in out.items()} == {384: (2, 384), 256: (2, 256), 128: (2, 128), 64: (2, 64)}
    for v in out.values():
        assert v.dtype == torch.float32 and torch.allclose(v.norm(dim=-1), torch.ones(2))
    # FC1 only (stages 1-2), pooled vector, gradients into body and heads
    only = m(ids, mask, dims=[384])
    assert list(only) == [384]
    torch.testing.assert_close(only[384], out[384])
    (1 - (only[384] * torch.randn(2, 384)).sum()).backward()
    assert m.vector_linear_384.weight.grad is not None and m.model.layers[0].mlp.up_proj.weight.grad is not None
    assert m.pool(ids, mask).shape == (2, 64)
    # encode: default dim = FC1, order preserved, instruction changes the query vector
    e = m.encode(["a photo of a cat", "banking: how do I reset my card pin?"])
    torch.testing.assert_close(e, out[384].detach())
    q = m.encode(["a photo of a cat"], instruction="Retrieve semantically similar text.", dim=64)
    assert (q - out[64][:1].detach()).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no head of dim 100"):
        m.encode(["x"], dim=100)


def test_pixel_values_without_vision_model_is_a_clear_error():
    text = M.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    m = M.JasperModel(M.JasperConfig(text=text, head_dims=(8,)))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no vision_model"):
        m(ids, torch.ones_like(ids), pixel_values=torch.zeros(1, 3, 14, 14))


def test_full_size_parameter_count_on_meta():
    """Paper's text side: Qwen2 body 1543M (stella vocab 151,646) and four heads of about 22M; no allocation."""
    text = M.Qwen2Config(vocab_size=151646, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6)
    with torch.device("meta"):
        m = M.JasperModel(M.JasperConfig(text=text))
    assert all(p.is_meta for p in m.parameters())
    body = m.model.num_parameters()
    heads = sum(p.numel() for D in m.dims for p in m.head(D).parameters())
    assert round(body / 1e6) == 1543, body
    assert heads == 1536 * (12288 + 1024 + 512 + 256) + (12288 + 1024 + 512 + 256)  # 21.64M
    assert round(heads / 1e6) == 22
    # and the body equals transformers' Qwen2Model of the same config (counted on meta as well)
    with torch.device("meta"):
        ref = transformers.Qwen2Model(transformers.Qwen2Config(**text.to_hf()))
    assert body == sum(p.numel() for p in ref.parameters())
