"""Vision side of the student (model.py "vision side"): SigLIP tower, pooler, splice, image loading/preprocessing.

References are independent: transformers' SiglipVisionModel / SiglipModel (saved as real safetensors checkpoints),
transformers' SiglipImageProcessor (its Pillow backend, the one transformers falls back to without torchvision) on
scikit-image's sample photographs, and plain numpy re-derivations of the pooler bins.
"""
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from checkpoints import CheckpointError, checkpoint_keys
from vision import (IMG_END_ID, IMG_START_ID, IMG_TOKEN_ID, NUM_IMAGE_TOKENS, ImageError, SiglipVisionConfig,
                    SiglipVisionEncoder, load_image, pool_image_features, preprocess_images, splice_image_features)

transformers = pytest.importorskip("transformers")
from transformers import SiglipConfig, SiglipModel, SiglipVisionModel  # noqa: E402
from transformers import SiglipVisionConfig as HFSiglipVisionConfig  # noqa: E402

# (hidden, intermediate, layers, heads, image, patch): patch 7 on 30 px drops a 2-px remainder like 14 on 384 does
SHAPES = {
    "h64-p7": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                   patch_size=7),
    "h48-p4": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, image_size=16,
                   patch_size=4, layer_norm_eps=1e-5),
}
TINY_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LayerNorm weights/biases included) so that no parameter can be ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints in the three layouts: full SigLIP, bare SiglipVisionModel, Jasper (text model + heads + vision tower)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(SHAPES))
def full_siglip(request, tmp_path_factory):
    """A full SiglipModel (text + vision towers, pooling head, logit scale/bias) saved by transformers."""
    torch.manual_seed(0)
    ref = SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=SHAPES[request.param])).eval()
    _randomise_(ref, seed=1)
    d = tmp_path_factory.mktemp(f"siglip-{request.param}")
    ref.save_pretrained(d)
    return d, ref.vision_model, request.param


def _hf_out(vision_model, x):
    with torch.no_grad():
        return vision_model(pixel_values=x).last_hidden_state


def test_full_siglip_checkpoint_parity(full_siglip):
    d, ref, shape = full_siglip
    keys = checkpoint_keys(d)
    assert any(k.startswith("text_model.") for k in keys) and any(k.startswith("vision_model.head.") for k in keys)
    enc = SiglipVisionEncoder.from_pretrained(d).eval()
    assert enc.config == SiglipVisionConfig(**SHAPES[shape])
    x = torch.randn(3, 3, enc.config.image_size, enc.config.image_size, generator=torch.Generator().manual_seed(2))
    want = _hf_out(ref, x)
    got = enc(x)
    assert got.shape == want.shape == (3, enc.config.num_patches, enc.config.hidden_size)
    assert rel_err(got, want) <= 1e-5


def test_bare_vision_checkpoint_parity(tmp_path):
    torch.manual_seed(0)
    ref = SiglipVisionModel(HFSiglipVisionConfig(**SHAPES["h48-p4"])).eval()
    _randomise_(ref, seed=3)
    ref.save_pretrained(tmp_path)
    enc = SiglipVisionEncoder.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert rel_err(enc(x), _hf_out(ref, x)) <= 1e-5


@pytest.mark.parametrize("vision_prefix", ["vision_model.vision_model.", "vision_model."])
def test_jasper_layout_checkpoint_parity(tmp_path, vision_prefix):
    """Released Jasper: `self.model` (Qwen2) + `self.vision_model` + vector_linear_* heads in one file, config
    model_type jasper_vl with a vision_config. The released code wraps transformers 4.46's SiglipVisionModel, whose
    own `vision_model` attribute nests the keys ('vision_model.vision_model.'); our export has 'vision_model.'."""
    torch.manual_seed(0)
    ref = SiglipVisionModel(HFSiglipVisionConfig(**SHAPES["h64-p7"])).eval()
    _randomise_(ref, seed=5)
    state = {vision_prefix + k: v.contiguous() for k, v in ref.state_dict().items()}  # head.* included
    state.update({"model.embed_tokens.weight": torch.randn(10, 8), "model.norm.weight": torch.ones(8),
                  "vector_linear_256.weight": torch.randn(256, 8), "vector_linear_256.bias": torch.zeros(256)})
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = {"model_type": "jasper_vl", "num_img_tokens": 300, "text_config": {"model_type": "qwen2"},
           "vision_config": {k: v for k, v in SHAPES["h64-p7"].items()} | {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert SiglipVisionEncoder.detect_prefix(checkpoint_keys(tmp_path)) == vision_prefix
    enc = SiglipVisionEncoder.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(6))
    assert rel_err(enc(x), _hf_out(ref, x)) <= 1e-5


def test_sharded_checkpoint_and_bf16(tmp_path):
    torch.manual_seed(0)
    ref = SiglipVisionModel(HFSiglipVisionConfig(**SHAPES["h64-p7"])).eval()
    _randomise_(ref, seed=7)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(8))
    want = _hf_out(ref, x)
    assert rel_err(SiglipVisionEncoder.from_pretrained(tmp_path).eval()(x), want) <= 1e-5
    enc16 = SiglipVisionEncoder.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert enc16.post_layernorm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got16 = enc16(x)
    assert got16.dtype == torch.bfloat16 and rel_err(got16.float(), want) < 3e-2  # bf16: ~8 mantissa bits


def _save_vision(tmp_path, state, shape="h64-p7"):
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(HFSiglipVisionConfig(**SHAPES[shape]).to_dict()))


def test_loading_is_strict(tmp_path):
    ref = SiglipVisionModel(HFSiglipVisionConfig(**SHAPES["h64-p7"]))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    # a missing key is named, with its shape
    d1 = tmp_path / "missing"
    d1.mkdir()
    _save_vision(d1, {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"})
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layers\.1\.mlp\.fc2\.bias \(64\)"):
        SiglipVisionEncoder.from_pretrained(d1)
    # an unexpected key under the vision prefix is refused (only head.* / position_ids are dropped on purpose)
    d2 = tmp_path / "unexpected"
    d2.mkdir()
    _save_vision(d2, sd | {"encoder.layers.2.layer_norm1.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.layers\.2\.layer_norm1\.weight"):
        SiglipVisionEncoder.from_pretrained(d2)
    # a shape mismatch (checkpoint of another config) is named with both shapes
    d3 = tmp_path / "shape"
    d3.mkdir()
    _save_vision(d3, sd | {"embeddings.position_embedding.weight": torch.zeros(25, 64)})
    with pytest.raises(CheckpointError, match=r"position_embedding\.weight checkpoint \(25, 64\) vs model \(16, 64\)"):
        SiglipVisionEncoder.from_pretrained(d3)
    # no vision tower at all
    d4 = tmp_path / "none"
    d4.mkdir()
    _save_vision(d4, {"model.embed_tokens.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="no SigLIP vision tower"):
        SiglipVisionEncoder.from_pretrained(d4)
    # corrupt file -> names the file
    d5 = tmp_path / "corrupt"
    d5.mkdir()
    _save_vision(d5, sd)
    data = (d5 / "model.safetensors").read_bytes()
    (d5 / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SiglipVisionEncoder.from_pretrained(d5)


def test_pixel_values_shape_checked():
    enc = SiglipVisionEncoder(SiglipVisionConfig(**SHAPES["h64-p7"]))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 30, 30\)"):
        enc(torch.zeros(1, 3, 28, 28))


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------
SO400M = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}  # as in Jasper's config.json


def test_config_from_hf_layouts(tmp_path):
    want = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=384, patch_size=14)
    assert want.grid == 27 and want.num_patches == 729 and want.head_dim == 72
    assert SiglipVisionConfig.from_hf(SO400M) == want                                      # bare vision config
    assert SiglipVisionConfig.from_hf({"model_type": "siglip", "vision_config": SO400M, "text_config": {}}) == want
    assert SiglipVisionConfig.from_hf({"model_type": "jasper_vl", "vision_config": SO400M}) == want
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": SO400M}))
    assert SiglipVisionConfig.from_hf(tmp_path) == want                                    # a directory
    # missing fields take transformers' defaults, exactly like transformers reads the same dict
    hf = HFSiglipVisionConfig(**SO400M)
    assert (want.layer_norm_eps, want.hidden_act, want.num_channels) == (hf.layer_norm_eps, hf.hidden_act,
                                                                         hf.num_channels)
    assert SiglipVisionConfig.from_hf(want.to_hf()) == want
    assert HFSiglipVisionConfig(**want.to_hf()).vision_use_head is False
    with pytest.raises(CheckpointError, match="clip_vision_model"):
        SiglipVisionConfig.from_hf({"model_type": "clip_vision_model", "hidden_size": 8})
    with pytest.raises(CheckpointError, match="hidden_act"):
        SiglipVisionConfig.from_hf(SO400M | {"hidden_act": "quick_gelu"})


def test_full_size_parameter_count_on_meta():
    """~400M for the so400m vision tower (paper: 'SigLIP so400m'), identical to transformers' model minus its head."""
    cfg = SiglipVisionConfig.from_hf(SO400M)
    with torch.device("meta"):
        ours = SiglipVisionEncoder(cfg)
        hf = SiglipVisionModel(HFSiglipVisionConfig(**SO400M))
    n = ours.num_parameters()
    n_hf = sum(p.numel() for k, p in hf.named_parameters() if not k.startswith("head."))
    assert n == n_hf == 412_987_248
    assert {k for k, _ in ours.named_parameters()} == {k for k, _ in hf.named_parameters() if not k.startswith("head.")}


# ---------------------------------------------------------------------------------------------------------------------
# Pooler and splice
# ---------------------------------------------------------------------------------------------------------------------
def _avg_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of adaptive average pooling, from its definition: output i averages inputs
    [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def test_pool_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 729, 1152, generator=g)
    out = pool_image_features(feats)                      # defaults: 300 tokens x 1536
    assert out.shape == (2, 300, 1536) and out.dtype == torch.float32
    tok, dim = _avg_matrix(729, 300), _avg_matrix(1152, 1536)
    assert sorted({int((r > 0).sum()) for r in tok}) == [3, 4] and sorted({int((r > 0).sum()) for r in dim}) == [1, 2]
    want = tok @ feats.double().numpy() @ dim.T           # separable: a rectangle mean = row mean of column means
    assert np.abs(out.double().numpy() - want).max() < 1e-5
    # spot checks by hand: token 0 averages patches 0..2; channel 1 averages channels 0 and 1 (1152 -> 1536)
    assert torch.allclose(out[:, 0, 0], feats[:, 0:3, 0].mean(1), atol=1e-6)
    assert torch.allclose(out[:, 0, 1], feats[:, 0:3, 0:2].mean((1, 2)), atol=1e-6)
    # the same layer the released code instantiates
    assert torch.equal(out, torch.nn.AdaptiveAvgPool2d((300, 1536))(feats))
    # other sizes (used by tiny test models)
    small = torch.randn(3, 16, 64, generator=g)
    want_small = _avg_matrix(16, 5) @ small.double().numpy() @ _avg_matrix(64, 24).T
    assert np.abs(pool_image_features(small, 5, 24).double().numpy() - want_small).max() < 1e-6


def image_placeholder_ids(num_image_tokens: int = NUM_IMAGE_TOKENS, start_id: int = IMG_START_ID,
                          token_id: int = IMG_TOKEN_ID, end_id: int = IMG_END_ID) -> list[int]:
    """The ids that stand for one image in a text: <|jasper_img_start|> <|jasper_img_token|> x K <|jasper_img_end|>
    (what JasperModel.image_prompt_ids returns for the released layout)."""
    return [start_id] + [token_id] * num_image_tokens + [end_id]


def test_splice_positions_and_gradient():
    K, H, tok = 4, 6, 7                                   # 4 image tokens per image in this toy layout
    ph = image_placeholder_ids(K, start_id=5, token_id=tok, end_id=8)
    assert ph == [5, 7, 7, 7, 7, 8]
    assert image_placeholder_ids()[:2] == [151646, 151647] and len(image_placeholder_ids()) == 302
    rows = [[1, 2, 3, 0, 0, 0, 0, 0, 0],                  # text only (padded)
            ph + [1, 2, 3],                               # image then text
            [1] + ph + [2, 0]]                            # text, image, text, pad
    ids = torch.tensor(rows)
    emb = torch.randn(3, 9, H)
    feats = torch.randn(2, K, H, requires_grad=True)
    out = splice_image_features(emb, ids, feats, image_token_id=tok)
    assert torch.equal(out[0], emb[0])                                     # text-only row untouched
    assert torch.equal(out[1, 1:5], feats[0].detach()) and torch.equal(out[2, 2:6], feats[1].detach())
    keep = ids != tok
    assert torch.equal(out[keep], emb[keep])                              # start/end/text/pad embeddings untouched
    out.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))                 # every pooled vector used exactly once
    with pytest.raises(ValueError, match="image tokens per row"):
        splice_image_features(emb, ids, feats[:1], image_token_id=tok)    # 2 image blocks, 1 image
    with pytest.raises(ValueError, match="image tokens per row"):
        splice_image_features(emb, torch.tensor([ph[:-2] + [1, 1, 1, 1, 1]] * 3), torch.randn(3, K, H),
                              image_token_id=tok)                        # truncated image block (3 tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing parity with transformers' SiglipImageProcessor on real photographs and odd inputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    return SiglipImageProcessorPil(size={"height": 384, "width": 384})


def _hf_pixels(proc, img):
    return torch.from_numpy(np.asarray(proc(images=[img], return_tensors="np")["pixel_values"]))


def _photos():
    import skimage.data as skd
    return {n: Image.fromarray(getattr(skd, n)()) for n in ("astronaut", "coffee", "chelsea", "camera", "logo",
                                                             "rocket", "hubble_deep_field")}


def _odd_images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (37, 53, 1), dtype=np.uint8)], axis=2)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3                                    # palette index 3 is transparent
    return {
        "gray-L": Image.fromarray(rgb[..., 0]),
        "gray-LA": Image.fromarray(rgba[..., [0, 3]], mode="LA"),
        "RGBA": Image.fromarray(rgba, mode="RGBA"),
        "palette-P": pal,
        "palette-P-transparency": pal_t,
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "1x1": Image.fromarray(rgb[:1, :1]),
        "3x2": Image.fromarray(rgb[:2, :3]),
        "wide-1000x10": Image.fromarray(rng.integers(0, 256, (10, 1000, 3), dtype=np.uint8)),
        "tall-7x600": Image.fromarray(rng.integers(0, 256, (600, 7, 3), dtype=np.uint8)),
        "bilevel-1": Image.fromarray(rgb[..., 0] > 127),
        "exact-384": Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)),
    }


def test_preprocess_parity_real_photographs(hf_processor):
    photos = _photos()
    assert {im.mode for im in photos.values()} >= {"RGB", "L", "RGBA"}
    px, kept, n_skipped = preprocess_images(list(photos.values()))
    assert px.shape == (len(photos), 3, 384, 384) and px.dtype == torch.float32
    assert kept == list(range(len(photos))) and n_skipped == 0
    for i, (name, img) in enumerate(photos.items()):
        diff = (px[i] - _hf_pixels(hf_processor, img)[0]).abs().max().item()
        assert diff == 0.0, f"{name}: max abs pixel difference {diff}"     # bit-identical (same Pillow ops)
    assert -1.0 <= px.min().item() and px.max().item() <= 1.0


def test_preprocess_parity_odd_inputs(hf_processor):
    for name, img in _odd_images().items():
        ours = preprocess_images([img])[0][0]
        diff = (ours - _hf_pixels(hf_processor, img)[0]).abs().max().item()
        assert diff == 0.0, f"{name} ({img.mode} {img.size}): max abs pixel difference {diff}"
    # transparency goes onto white: a fully transparent black image becomes all +1.0
    clear = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    assert torch.all(preprocess_images([clear])[0] == 1.0)


def test_16bit_grayscale_scaled_not_clipped():
    """I;16 (16-bit PNG) is scaled to 8 bits (v / 257); Pillow's own conversion would clip to white."""
    a16 = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # spans 0..64,491
    img = Image.fromarray(a16)
    assert img.mode.startswith("I;16")
    a8 = np.clip(np.rint(a16 / 257.0), 0, 255).astype(np.uint8)
    want = preprocess_images([Image.fromarray(a8).convert("RGB")])[0]
    got = preprocess_images([img])[0]
    assert torch.equal(got, want)
    assert got.std() > 0.3                                                # not saturated


def test_paths_bytes_and_arrays_agree(tmp_path):
    photo = _photos()["chelsea"]
    photo.save(tmp_path / "cat.png")
    photo.save(tmp_path / "cat.jpg", quality=90)
    from_pil = preprocess_images([photo])[0]
    png_path, png_bytes, arr = preprocess_images([tmp_path / "cat.png", (tmp_path / "cat.png").read_bytes(),
                                                  np.asarray(photo)])[0]
    assert torch.equal(png_path, from_pil[0]) and torch.equal(png_bytes, from_pil[0]) and torch.equal(arr, from_pil[0])
    jpg = preprocess_images([str(tmp_path / "cat.jpg")])[0]
    assert 0 < (jpg - from_pil).abs().mean().item() < 0.05              # lossy, but the same picture
    with open(tmp_path / "cat.png", "rb") as f:
        assert torch.equal(preprocess_images([f])[0], from_pil)           # a binary file object
        assert not f.closed                                               # ... left open for its owner
    assert load_image(tmp_path / "cat.png").mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------------
# Bad images: clear errors naming the file, or skipped and counted
# ---------------------------------------------------------------------------------------------------------------------
def _png_with_header_size(w: int, h: int) -> bytes:
    """A 1x1 PNG whose IHDR claims w x h (valid CRC): a decompression bomb as far as the header goes."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture()
def bad_files(tmp_path):
    photo = _photos()["coffee"]
    good = tmp_path / "good.jpg"
    photo.save(good, quality=90)
    jpeg = good.read_bytes()
    png = io.BytesIO()
    photo.save(png, format="PNG")
    files = {
        "text.jpg": b"this is not an image at all\n",
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "bomb.png": _png_with_header_size(200_000, 200_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, good


@pytest.mark.parametrize("name, why", [("text.jpg", "not a recognised image"), ("empty.png", "not a recognised image"),
                                       ("truncated.jpg", "truncated"), ("truncated.png", "truncated"),
                                       ("bomb.png", "exceeds the limit"), ("missing.png", "no such file")])
def test_bad_image_raises_naming_file(bad_files, name, why):
    d, _ = bad_files
    with pytest.raises(ImageError, match=why) as e:
        preprocess_images([d / "good.jpg", d / name])
    assert str(e.value).startswith(str(d / name))


def test_bad_inputs_in_memory():
    with pytest.raises(ImageError, match="zero-size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match=r"^<4 bytes>: not a recognised image"):
        load_image(b"\x00\x01\x02\x03")
    with pytest.raises(ImageError, match="my-row-7"):
        load_image(b"junk", name="my-row-7")
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        load_image(Image.new("RGB", (20, 10)), max_pixels=100)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="on_error"):
        preprocess_images([Image.new("RGB", (4, 4))], on_error="ignore")


def test_skip_and_count(bad_files, caplog):
    d, good = bad_files
    batch = [good, d / "text.jpg", d / "truncated.jpg", good, d / "bomb.png", d / "missing.png", d / "empty.png"]
    px, kept, n_skipped = preprocess_images(batch, on_error="skip")
    assert kept == [0, 3] and n_skipped == 5 and px.shape == (2, 3, 384, 384)
    assert torch.equal(px[0], px[1]) and torch.equal(px[:1], preprocess_images([good])[0])
    logged = caplog.text
    assert all(str(d / n) in logged for n in ("text.jpg", "truncated.jpg", "bomb.png", "missing.png", "empty.png"))
    px0, kept0, n0 = preprocess_images([d / "text.jpg"], on_error="skip")
    assert px0.shape == (0, 3, 384, 384) and kept0 == [] and n0 == 1
