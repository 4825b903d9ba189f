"""The multimodal student: SigLIP tower inside JasperModel, pooled image tokens spliced into the text, encode(images=).

The reference pipeline is rebuilt from independent pieces, as the released modeling_jasper_vl.py does it:
transformers' SiglipModel vision tower -> nn.AdaptiveAvgPool2d((300, H)) -> `inputs_embeds[ids == img_token] =
vit_embeds.reshape(-1, H)` -> transformers' Qwen2Model (bidirectional mask) -> masked mean ->
sentence-transformers Dense heads -> L2 normalise.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import model as M
import vision as V
from common import bidirectional_mask, qwen_tokenizer_dir as qwen_tok_dir

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=7)
TEXT_H = 32






@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """A stella-layout text checkpoint (transformers Qwen2Model + sentence-transformers Dense heads + a Qwen
    tokenizer with the 3 chat specials, so the image tokens get 151646-151648) and a full SigLIP checkpoint."""
    from sentence_transformers.models import Dense

    d = tmp_path_factory.mktemp("stella")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=151646, hidden_size=TEXT_H, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_theta=1e6)
    cfg._attn_implementation = "eager"
    qwen = transformers.Qwen2Model(cfg).eval()
    qwen.save_pretrained(d, safe_serialization=True)
    dense = {}
    for D in (32, 64):
        m = Dense(TEXT_H, D, bias=True, activation_function=torch.nn.Identity())
        (d / f"2_Dense_{D}").mkdir()
        m.save(str(d / f"2_Dense_{D}"))
        dense[D] = m
    js = json.loads((qwen_tok_dir() / "tokenizer.json").read_text())
    js["added_tokens"] = [t for t in js["added_tokens"] if t["id"] <= 151645]
    (d / "tokenizer.json").write_text(json.dumps(js))

    s = tmp_path_factory.mktemp("siglip")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    siglip = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=VISION)).eval()
    with torch.no_grad():
        for n, p in siglip.vision_model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))  # LayerNorm weights/biases too
    siglip.save_pretrained(s)
    return d, qwen, dense, s, siglip.vision_model


@pytest.fixture(scope="module")
def student(refs):
    d, _, _, s, _ = refs
    return M.JasperModel.from_stella(d, head_dims=(64, 32), vision_src=s).eval()


@pytest.fixture(scope="module")
def photos():
    import skimage.data as skd
    return [Image.fromarray(skd.astronaut()), Image.fromarray(skd.camera()), Image.fromarray(skd.coffee())]



def _image_prompt() -> list[int]:
    """One image in a text, released layout: <|jasper_img_start|> <|jasper_img_token|> x 300 <|jasper_img_end|>."""
    return [V.IMG_START_ID] + [V.IMG_TOKEN_ID] * V.NUM_IMAGE_TOKENS + [V.IMG_END_ID]

def reference_vectors(refs, student, ids, mask, pixel_values):
    """The released forward, rebuilt from transformers / sentence-transformers pieces."""
    _, qwen, dense, _, hf_vision = refs
    with torch.no_grad():
        embeds = student.model.embed_tokens.weight[ids].clone()         # stella rows + the 3 new image-token rows
        B, N, C = embeds.shape
        embeds = embeds.reshape(B * N, C)
        vit = hf_vision(pixel_values=pixel_values).last_hidden_state     # (n_img, 16, 64)
        vit = torch.nn.AdaptiveAvgPool2d((300, C))(vit)                  # (n_img, 300, 32)
        embeds[ids.reshape(-1) == 151647] = vit.reshape(-1, C)
        h = qwen(inputs_embeds=embeds.reshape(B, N, C), attention_mask=bidirectional_mask(mask)).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {D: F.normalize(dense[D]({"sentence_embedding": pooled})["sentence_embedding"], dim=-1)
                for D in (32, 64)}


def test_from_stella_loads_the_siglip_tower(refs, student):
    hf = refs[4].state_dict()
    ours = student.vision_model.state_dict()
    assert set(ours) == {k for k in hf if not k.startswith("head.")}
    assert all(torch.equal(ours[k], hf[k]) for k in ours)
    assert student.init_report["vision"] == str(refs[3])
    assert student.config.vision == V.SiglipVisionConfig(**VISION)


def test_image_forward_matches_reference_pipeline(refs, student, photos):
    """Mixed batch: a text-only row, an image-only row, and text + image + text (image in the middle)."""
    tok = student.tokenizer
    img = _image_prompt()
    a, b = tok.encode_ids(["A man is playing a guitar.", "a photo of"])
    rows = [a, img, b + img + a]
    ids, mask = tok.pad(rows)
    pixel_values, kept, _ = V.preprocess_images(photos[:2], size=VISION["image_size"])
    want = reference_vectors(refs, student, ids, mask, pixel_values)
    with torch.no_grad():
        got = student(ids, mask, pixel_values=pixel_values)
    for D in (32, 64):
        torch.testing.assert_close(got[D], want[D], rtol=1e-5, atol=1e-6)
    # the images matter, and each lands in its own row
    with torch.no_grad():
        swapped = student(ids, mask, pixel_values=pixel_values.flip(0))
    assert torch.equal(swapped[64][0], got[64][0])
    assert not torch.allclose(swapped[64][1], got[64][1], atol=1e-4)
    with pytest.raises(ValueError, match="image tokens per row"):
        student(ids, mask, pixel_values=pixel_values[:1])


def test_text_only_bit_identical_and_never_touches_vision(refs, student):
    d = refs[0]
    text_only = M.JasperModel.from_stella(d, head_dims=(64, 32)).eval()
    assert text_only.vision_model is None
    texts = ["A man is playing a guitar.", "Stella and Jasper are embedding models.", "short"]
    ids, mask = student.tokenizer(texts)
    orig = student.vision_model.forward

    def boom(*a, **k):
        raise AssertionError("the vision tower ran on a text-only batch")

    student.vision_model.forward = boom
    try:
        with torch.no_grad():
            got, want = student(ids, mask), text_only(ids, mask)
        for D in (32, 64):
            assert torch.equal(got[D], want[D])
        assert torch.equal(student.encode(texts, dim=32), text_only.encode(texts, dim=32))
    finally:
        student.vision_model.forward = orig


def test_encode_images_and_image_text_pairs(student, photos, tmp_path):
    photos[2].save(tmp_path / "coffee.png")
    inputs = [photos[0], photos[1], tmp_path / "coffee.png"]
    for D in (64, 32):
        vecs = student.encode(images=inputs, dim=D, batch_size=2)
        assert vecs.shape == (3, D) and vecs.dtype == torch.float32
        torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(3))
    # = forward on the image block, in input order (batches of 2 over 3 images)
    ids = torch.tensor([_image_prompt()] * 3)
    px, _, _ = V.preprocess_images(inputs, size=VISION["image_size"])
    with torch.no_grad():
        want = student(ids, torch.ones_like(ids), pixel_values=px)[32]
    torch.testing.assert_close(student.encode(images=inputs, dim=32, batch_size=2), want, rtol=1e-5, atol=1e-6)
    # image + text pairs: image block first, then the text (with the query prompt when an instruction is given)
    texts = ["an astronaut", "a cameraman with a tripod on a lawn", "a cup of coffee"]
    inst = "Retrieve semantically similar text."
    pairs = student.encode(texts, dim=32, images=inputs, instruction=inst, batch_size=2)
    seqs = [_image_prompt() + t for t in student.tokenizer.encode_ids(texts, inst)]
    ids2, mask2 = student.tokenizer.pad(seqs)
    with torch.no_grad():
        want2 = student(ids2, mask2, pixel_values=px)[32]
    torch.testing.assert_close(pairs, want2, rtol=1e-5, atol=1e-6)
    assert (pairs * want).sum(-1).max() < 0.9999                      # the text changes the vector
    with pytest.raises(ValueError, match="one text per image"):
        student.encode(texts[:2], images=inputs)
    with pytest.raises(V.ImageError, match="nothing.png"):
        student.encode(images=[photos[0], tmp_path / "nothing.png"])


def test_released_layout_and_export_roundtrip(refs, student, photos, tmp_path):
    """The released checkpoint (`model.*`, `vision_model.vision_model.*` incl. the unused pooling head,
    `vector_linear_*`, config model_type jasper_vl) and our export both load into the same model."""
    hf_vision = refs[4]
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("vision_model.")}
    state |= {f"vision_model.vision_model.{k}": v.contiguous() for k, v in hf_vision.state_dict().items()}
    assert any(".head." in k for k in state)
    released = tmp_path / "released"
    released.mkdir()
    save_file(state, str(released / "model.safetensors"))
    text_cfg = student.config.text.to_hf()
    cfg = {"architectures": ["JasperVL"], "model_type": "jasper_vl", "is_text_encoder": True, "vector_dim": 32,
           "num_img_tokens": 300, "img_start_token_id": 151646, "img_token_id": 151647, "img_end_token_id": 151648,
           "text_config": {k: text_cfg[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "rope_theta")},
           "vision_config": dict(VISION, model_type="siglip_vision_model")}
    (released / "config.json").write_text(json.dumps(cfg))
    (released / "tokenizer.json").write_text((refs[0] / "tokenizer.json").read_text())
    loaded = M.JasperModel.from_pretrained(released).eval()
    exported = M.JasperModel.from_pretrained(student.save_pretrained(tmp_path / "export")).eval()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["jasper"]["vision_config"]["vision_use_head"] is False
    ids = torch.tensor([_image_prompt()] * 2)
    px, _, _ = V.preprocess_images(photos[:2], size=VISION["image_size"])
    with torch.no_grad():
        want = student(ids, torch.ones_like(ids), pixel_values=px)
        for m in (loaded, exported):
            got = m(ids, torch.ones_like(ids), pixel_values=px)
            assert set(got) == {64, 32}
            for D in got:
                assert torch.equal(got[D], want[D])
    text_only = M.JasperModel.from_pretrained(released, vision=False)
    assert text_only.vision_model is None


def test_full_size_student_parameter_count_on_meta():
    """Released Jasper shapes: Qwen2 1.5B body (vocab 151,649) + 4 heads + so400m tower without its pooling head:
    1,977,901,680 parameters (~2.0B; the paper's '~1.9B' rounds down); the tower alone 412,987,248 (~400M)."""
    text = M.Qwen2Config(vocab_size=151649, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2)
    vision = V.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, image_size=384, patch_size=14)
    with torch.device("meta"):
        m = M.JasperModel(M.JasperConfig(text=text, vision=vision))
    n_vision = sum(p.numel() for p in m.vision_model.parameters())
    n_heads = sum(p.numel() for D in m.dims for p in m.head(D).parameters())
    n_total = sum(p.numel() for p in m.parameters())
    assert n_vision == 412_987_248 and n_heads == 21_640_960
    assert n_total == 1_977_901_680
    assert 1.9e9 <= n_total < 2.0e9
