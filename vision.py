"""The vision side of the Jasper student (arXiv 2412.19048, sec. 2.1; trained in stage 4, sec. 3.1).

The SigLIP so400m-patch14-384 vision tower written in torch (module names = checkpoint keys), the parameter-free
pooler that turns its 27 x 27 patch grid into 300 text-width tokens, the splice of those tokens at the
`<|jasper_img_token|>` positions of the text, and image decoding / preprocessing (the SiglipImageProcessor recipe
in Pillow + numpy). model.JasperModel holds the tower and calls the pooler and the splice. Design notes:
docs/vision.md.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from checkpoints import (CheckpointError, checkpoint_keys, load_state_strict, read_config, read_safetensors,
                         resolve_checkpoint)

# ---------------------------------------------------------------------------------------------------------------------
# Vision side of the student (paper sec. 2.1; stage 4 in sec. 3.1): the SigLIP so400m-patch14-384 vision tower, the
# parameter-free pooler that turns its 27x27 patch grid into 300 text-width tokens, the splice of those tokens at the
# `<|jasper_img_token|>` positions of the text, and image loading / preprocessing (Pillow + numpy).
# Design notes and the checkpoint layouts: docs/vision.md.
# ---------------------------------------------------------------------------------------------------------------------
_vlog = logging.getLogger("jasper.vision")

# The three image special tokens of the released Jasper (config.json img_start/img_token/img_end_token_id) and the
# number of pooled image vectors spliced between start and end (config.json num_img_tokens).
IMG_START_ID, IMG_TOKEN_ID, IMG_END_ID = 151646, 151647, 151648
NUM_IMAGE_TOKENS = 300
IMAGE_SIZE = 384                       # SigLIP so400m-patch14-384 input side; 384 // 14 = 27 -> 27 x 27 = 729 patches
IMAGE_MEAN = IMAGE_STD = 0.5           # SiglipImageProcessor normalisation: x = (x / 255 - 0.5) / 0.5, in [-1, 1]
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # refuse images above 100 megapixels before decoding them (decompression bombs)

_GELU_APPROX = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class SiglipVisionConfig:
    """The vision half of a SigLIP config (transformers' SiglipVisionConfig fields; defaults are transformers')."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"   # SigLIP uses the tanh approximation of GELU

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in _GELU_APPROX:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (one of {sorted(_GELU_APPROX)})")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # a 'valid' strided conv drops the remainder (384 = 27 * 14 + 6)

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    _FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "layer_norm_eps", "hidden_act")

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike, **overrides) -> "SiglipVisionConfig":
        """From a config.json (dict, file or directory): a full SigLIP checkpoint (model_type 'siglip', its
        `vision_config` is used), a released-Jasper / exported student (model_type 'jasper_vl' / ours, its
        `vision_config`), or a bare vision config (model_type 'siglip_vision_model'). Missing fields take
        transformers' defaults, exactly as transformers would read the same file."""
        where, cfg = read_config(cfg)
        if cfg.get("model_type") != "siglip_vision_model" and "vision_config" in cfg:
            if not isinstance(cfg["vision_config"], dict):
                raise CheckpointError(f"{where}: vision_config is {cfg['vision_config']!r}, not a SigLIP vision config")
            where, cfg = where + " [vision_config]", cfg["vision_config"]
        mt = cfg.get("model_type", "siglip_vision_model")
        if mt != "siglip_vision_model":
            raise CheckpointError(f"{where}: model_type {mt!r} is not a SigLIP vision tower "
                                  "(expected 'siglip_vision_model', or a 'siglip'/'jasper_vl' config with "
                                  "vision_config)")
        kw = {k: cfg[k] for k in cls._FIELDS if k in cfg}
        kw.update(overrides)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from e

    def to_hf(self) -> dict:
        """A config dict transformers' SiglipVisionModel accepts (no attention-pooling head: vision_use_head False)."""
        d = {k: getattr(self, k) for k in self._FIELDS}
        d.update(model_type="siglip_vision_model", vision_use_head=False)
        return d


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        # non-overlapping patches: a conv with kernel = stride = patch ('valid' padding) == a linear map per patch
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)  # learned, one per patch

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values)              # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)                    # (B, g*g, D), patches in row-major order
        return x + self.position_embedding.weight           # (B, N, D)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        k = self.k_proj(x).view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        v = self.v_proj(x).view(B, N, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)          # full (unmasked) attention, scale hd^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = _GELU_APPROX[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionEncoder(nn.Module):
    """transformers' SiglipVisionModel without the attention-pooling head: pixels (B, 3, S, S) -> (B, N, D) patch
    features after post_layernorm (N = (S // patch)^2; 729 x 1152 for so400m-patch14-384).

    Module names equal the checkpoint keys (embeddings.patch_embedding, embeddings.position_embedding,
    encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm), so
    a checkpoint loads with a prefix only. Build on the meta device and load with `from_pretrained` /
    `load_checkpoint`; a module built off meta gets transformers' SigLIP initialisation.
    """

    # keys that a SigLIP vision tower checkpoint may hold and that we drop on purpose (never silently anything else):
    # the attention-pooling head (Jasper uses the patch features, not the pooled vector) and, in old exports, the
    # constant position_ids buffer.
    IGNORED_KEYS = ("head.", "embeddings.position_ids")
    ANCHOR_KEY = "embeddings.patch_embedding.weight"

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not self.post_layernorm.weight.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """transformers' SiglipPreTrainedModel init (lecun-normal patches, N(0, 1/D) positions, xavier linears)."""
        D = self.config.hidden_size
        nn.init.normal_(self.embeddings.position_embedding.weight, std=D ** -0.5)
        w = self.embeddings.patch_embedding.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / (w[0].numel())) / 0.87962566103423978)  # lecun normal
        nn.init.zeros_(self.embeddings.patch_embedding.bias)
        for m in self.modules():
            if isinstance(m, SiglipAttention):
                for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)
            elif isinstance(m, SiglipMLP):
                for lin in (m.fc1, m.fc2):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        cfg = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, cfg.image_size,
                                                                         cfg.image_size):
            raise ValueError(f"pixel_values must be (B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}), got "
                             f"{tuple(pixel_values.shape)} (preprocess with preprocess_images(size={cfg.image_size}))")
        x = self.embeddings(pixel_values.to(self.post_layernorm.weight.dtype))  # (B, N, D)
        for layer in self.encoder.layers:  # train.py wraps each layer for activation checkpointing when asked
            x = layer(x)
        return self.post_layernorm(x)                                            # (B, N, D)

    # -- loading ------------------------------------------------------------------------------------------------------
    @classmethod
    def detect_prefix(cls, keys: Iterable[str], where: str = "") -> str:
        """The key prefix of the (single) SigLIP vision tower among `keys`: 'vision_model.' in a full SigLIP
        checkpoint, '' in a bare SiglipVisionModel export, 'vision_model.' + the inner prefix in a Jasper checkpoint
        ('vision_model.vision_model.' when the released code wraps transformers' SiglipVisionModel)."""
        found = sorted(k[: -len(cls.ANCHOR_KEY)] for k in keys if k.endswith(cls.ANCHOR_KEY))
        if not found:
            raise CheckpointError(f"{where}: no SigLIP vision tower (no key ending in {cls.ANCHOR_KEY!r})")
        if len(found) > 1:
            raise CheckpointError(f"{where}: several vision towers {found}; pass prefix= explicitly")
        return found[0]

    @classmethod
    def vision_state(cls, ckpt_dir: str | os.PathLike, prefix: str | None = None) -> tuple[dict[str, Tensor], str]:
        """(state, prefix): the vision tower's tensors of a checkpoint directory, keys still carrying `prefix`.

        Only keys under the prefix are read from disk (the text tower of a full SigLIP / Jasper checkpoint is never
        loaded); the pooling head and position_ids buffer under it are dropped on purpose (IGNORED_KEYS); all the
        rest must match the module exactly (load_state_strict)."""
        ckpt_dir = Path(ckpt_dir)
        if prefix is None:
            prefix = cls.detect_prefix(checkpoint_keys(ckpt_dir), str(ckpt_dir))
        state = read_safetensors(ckpt_dir, prefix_filter=prefix or None)
        dropped = [k for k in state if k.startswith(prefix) and k[len(prefix):].startswith(cls.IGNORED_KEYS)]
        for k in dropped:
            del state[k]
        if dropped:
            _vlog.info("%s: ignoring %d vision key(s) not used by Jasper (pooling head / position_ids), e.g. %s",
                       ckpt_dir, len(dropped), dropped[0])
        return state, prefix

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, prefix: str | None = None) -> str:
        """Load this (possibly meta) module from a checkpoint directory; returns the prefix used."""
        state, prefix = self.vision_state(ckpt_dir, prefix)
        load_state_strict(self, state, prefix=prefix, what=f"SigLIP vision tower from {ckpt_dir}")
        return prefix

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, prefix: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "SiglipVisionEncoder":
        """From a full SigLIP checkpoint (google/siglip-so400m-patch14-384 layout), a released-Jasper checkpoint,
        our exported student, or a bare SiglipVisionModel; `prefix` None = auto-detect (see detect_prefix)."""
        path = resolve_checkpoint(src)
        cfg = SiglipVisionConfig.from_hf(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.load_checkpoint(path, prefix)
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def jasper_vision_state(state: dict[str, Tensor], where: str = "", attr: str = "vision_model.") -> dict[str, Tensor]:
    """Re-key the vision tower inside a whole-Jasper state dict to `attr` + our module names (JasperModel's
    `vision_model`). The released checkpoint nests the tower one level deeper ('vision_model.vision_model.': the
    authors wrap transformers 4.46's SiglipVisionModel, which has its own `vision_model` attribute, and keep its
    unused pooling head); our export has it at 'vision_model.'. Only the prefix changes; the pooling head /
    position_ids are dropped on purpose; every other key is left alone, so strict loading still reports strays."""
    vkeys = [k for k in state if k.startswith(attr)]
    if not vkeys:
        return state  # no tower in the file: strict loading names the missing keys
    prefix = SiglipVisionEncoder.detect_prefix(vkeys, where)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.startswith(prefix):
            rest = k[len(prefix):]
            if not rest.startswith(SiglipVisionEncoder.IGNORED_KEYS):
                out[attr + rest] = v
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Pooler and splice (paper sec. 2.1: image features become 300 'text' tokens of width 1536).
# ---------------------------------------------------------------------------------------------------------------------
def pool_image_features(feats: Tensor, out_tokens: int = NUM_IMAGE_TOKENS, out_dim: int = 1536) -> Tensor:
    """(B, N, D) patch features -> (B, out_tokens, out_dim): the released code's parameter-free
    `nn.AdaptiveAvgPool2d((300, 1536))` applied to the (B, 729, 1152) tensor, i.e. the (N, D) matrix of each image is
    treated as a 2-D map and average-pooled along BOTH axes: output token i averages patches
    [floor(i N / 300), ceil((i + 1) N / 300)) (3 or 4 consecutive patches in row-major order), and output channel j
    averages channels [floor(j D / 1536), ceil((j + 1) D / 1536)) (1 or 2 neighbouring channels: 1152 -> 1536 is an
    upsampling by averaging, which mixes unrelated SigLIP channels, as the authors' code does)."""
    if feats.dim() != 3:
        raise ValueError(f"expected (B, N, D) patch features, got shape {tuple(feats.shape)}")
    return F.adaptive_avg_pool2d(feats, (out_tokens, out_dim))  # 3-D input: (C=B, H=N, W=D)


def splice_image_features(inputs_embeds: Tensor, input_ids: Tensor, image_feats: Tensor,
                          image_token_id: int = IMG_TOKEN_ID) -> Tensor:
    """Replace the embeddings at the image-token positions by the pooled image vectors, out of place (gradients
    flow into `image_feats`): (B, T, H), (B, T), (n_images, K, H) -> (B, T, H).

    Images are consumed in reading order (row by row, left to right), K tokens each, exactly like the released
    code's `inputs_embeds[input_ids == img_token_id] = vit_embeds.reshape(-1, C)`."""
    n_img, K, H = image_feats.shape
    if inputs_embeds.shape[:2] != input_ids.shape or inputs_embeds.shape[-1] != H:
        raise ValueError(f"shape mismatch: inputs_embeds {tuple(inputs_embeds.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}, image_feats {tuple(image_feats.shape)}")
    is_img = input_ids == image_token_id                                   # (B, T)
    per_row = is_img.sum(dim=1)                                            # (B,)
    if int(per_row.sum()) != n_img * K or bool((per_row % K).any()):
        raise ValueError(f"the batch has {per_row.tolist()} image tokens per row (id {image_token_id}) but "
                         f"{n_img} image(s) x {K} pooled vectors were given: every image needs exactly {K} tokens")
    return inputs_embeds.masked_scatter(is_img.unsqueeze(-1), image_feats.to(inputs_embeds.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Image loading and preprocessing: transformers' SiglipImageProcessor recipe (docs/vision.md) in Pillow + numpy.
# ---------------------------------------------------------------------------------------------------------------------
class ImageError(ValueError):
    """An input that cannot be used as an image; the message starts with the file name (or the input's position)."""


def _image_name(src: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of any Pillow mode. Transparency (RGBA, LA, PA, P/L/RGB with a transparency key) is composited onto
    white, as transformers' convert_to_rgb does; 16/32-bit integer and float grayscale are scaled to 8 bits first
    (Pillow's own I;16 -> RGB conversion clips at 255 and turns most 16-bit images white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)                              # (H, W)
        finite = a[np.isfinite(a)]
        top = finite.max() if finite.size else 0.0
        if img.mode == "F" and top <= 1.0:
            a = a * 255.0                                                   # float images in [0, 1]
        elif img.mode.startswith("I;16") or top > 255:
            a = a / 257.0                                                   # 16-bit range 0..65535 -> 0..255
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # always a new image (convert to the same mode copies)


def load_image(src: Any, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a binary file object, a PIL image or a uint8 numpy array
    ((H, W) or (H, W, 3|4)). Anything unusable raises ImageError naming the file (or `name`): missing file, not an
    image, zero-size, more than `max_pixels` pixels (checked from the header, before decoding), truncated or corrupt
    data (Pillow refuses truncated files unless ImageFile.LOAD_TRUNCATED_IMAGES was switched on globally)."""
    name = _image_name(src, name)

    def checked_rgb(img: Image.Image) -> Image.Image:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: zero-size image ({w}x{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                             f"(max_pixels; a decompression bomb or an absurdly large image)")
        img.load()  # decode now: truncated / corrupt data fails here, not later inside a batch
        return _to_rgb(img)

    try:
        if isinstance(src, Image.Image):
            return checked_rgb(src)
        if isinstance(src, np.ndarray):
            if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
                raise ImageError(f"{name}: arrays must be uint8 (H, W) or (H, W, 1|3|4), got {src.dtype} "
                                 f"{src.shape}")
            return checked_rgb(Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src))
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        elif isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
            raise ImageError(f"{name}: no such file")
        with warnings.catch_warnings():  # we enforce our own pixel limit (checked_rgb)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as img:  # closes the file (multi-frame formats keep it open otherwise)
                return checked_rgb(img)   # a new RGB image, independent of the file
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image file") from None
    except Image.DecompressionBombError as e:  # raised by Image.open itself above 2 x Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{name}: exceeds the limit of Pillow's decompression-bomb guard ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e}); truncated or corrupt file?") from None


def image_to_pixels(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB PIL image -> (3, size, size) float32: bicubic resize (Pillow, as SiglipImageProcessor), rescale 1/255
    (in float64, cast to float32, as transformers' rescale), normalise (x - 0.5) / 0.5 in float32."""
    r = img.resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    x = (np.asarray(r, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
    x = (x - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return x.transpose(2, 0, 1)                                                            # (3, S, S)


def preprocess_images(images: Sequence[Any], size: int = IMAGE_SIZE, on_error: str = "raise",
                      max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                      names: Sequence[str] | None = None) -> tuple[Tensor, list[int], int]:
    """Decode and preprocess a batch: -> (pixel_values (N, 3, size, size) float32, kept, n_skipped).

    `kept` lists the input positions that made it into pixel_values (in order). on_error="raise" raises the first
    ImageError (naming the file); on_error="skip" logs it as a warning, skips the image and counts it."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        images = [images]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    kept: list[int] = []
    for i, src in enumerate(images):
        try:
            img = load_image(src, name=None if names is None else names[i], max_pixels=max_pixels)
        except ImageError as e:
            if on_error == "raise":
                raise
            _vlog.warning("skipping image %d: %s", i, e)
            continue
        out[len(kept)] = image_to_pixels(img, size)
        kept.append(i)
    return torch.from_numpy(out[: len(kept)]), kept, len(images) - len(kept)
