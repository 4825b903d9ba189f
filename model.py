"""The Jasper text student (arXiv 2412.19048, sec. 2.1): a Qwen2 body used as a bidirectional encoder, masked mean
pooling and four Matryoshka heads FC1..FC4 (12288/1024/512/256); the tokenizer that feeds it is tokenizer.py's.

Read top to bottom: Qwen2Config and the Qwen2 body (attention with RoPE and GQA, SwiGLU MLP, RMSNorm), mean_pool,
then JasperConfig / JasperModel (the student: body -> mean -> heads -> L2 normalise; its SigLIP
tower, pooler and image splice live in vision.py). Written directly in torch; modules are named after the
checkpoint keys, so real safetensors checkpoints load key for key (checkpoints.py) with at most a prefix, never a
key map. The export folder's files are written by checkpoints.save_export; converting folders and the command line
`python export.py export|set-head|check` are export.py's. Design notes: docs/model.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from bert import BertConfig, BertModel, load_bert_body
from checkpoints import (CheckpointError, body_config, check_config_values, load_state_strict, read_config,
                         read_dense_folder, read_json, read_safetensors, read_st_layout, resolve_checkpoint,
                         save_export, standard_prompts, stella_dense_folders)
from packing import Packed, length_sorted_encode
from tokenizer import TextTokenizer  # the student's tokenizer.json (tokenizer.py)
from vision import (IMG_END_ID, IMG_START_ID, IMG_TOKEN_ID, NUM_IMAGE_TOKENS, SiglipVisionConfig, SiglipVisionEncoder,
                    jasper_vision_state, pool_image_features, preprocess_images, splice_image_features)

# ---------------------------------------------------------------------------------------------------------------------
# Qwen2 (and Qwen3, Mistral) decoder body used as a (by default bidirectional) text encoder (sec. 2.1;
# docs/model.md). The three differ only in switches of one config: Qwen2 has q/k/v biases; Mistral has none; Qwen3
# has none and adds a per-head RMSNorm on queries and keys (`q_norm`, `k_norm`, over head_dim, before RoPE) and
# states head_dim explicitly.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None           # None -> hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool = True           # q/k/v bias: True for Qwen2, False for Mistral and Qwen3
    causal: bool = False                  # False = bidirectional (Jasper / stella / NV-Embed default)
    model_type: str = "qwen2"             # "qwen2" | "qwen3" | "mistral"
    qk_norm: bool = False                 # Qwen3: RMSNorm(head_dim) on every query and key head before RoPE
    sliding_window: int | None = None     # Mistral's window: only matters for causal inputs longer than it

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    _REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    # types and ranges of the config.json values read (checkpoints.check_config_values)
    _LIMITS = {**{k: dict(lo=1) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim",
                                          "max_position_embeddings", "sliding_window")},
               **{k: dict(kind="float", lo=0, lo_open=True) for k in ("rope_theta", "rms_norm_eps")},
               **{k: dict(kind="bool") for k in ("attention_bias", "causal", "is_causal")}}

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike, **overrides) -> "Qwen2Config":
        """From a Hugging Face config.json (a dict, the file, or its directory); model_type qwen2, qwen3 or mistral.

        `causal` comes from our own `causal` key or transformers' `is_causal`; when neither is present the body is
        bidirectional (the student's and stella's convention). Callers that must mirror transformers exactly (a
        sentence-transformers teacher) pass `causal=` themselves: transformers runs a decoder config without
        `is_causal` causally.
        """
        where, cfg = read_config(cfg)
        check_config_values(where, cfg, cls._LIMITS)
        mt = cfg.get("model_type")
        if mt not in ("qwen2", "qwen3", "mistral"):
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (expected 'qwen2', 'qwen3' or "
                                  f"'mistral')")
        missing = [k for k in cls._REQUIRED if k not in cfg]
        if missing:
            raise CheckpointError(f"{where}: missing required field(s) {missing}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise CheckpointError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} not supported")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))  # transformers' default for both types
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
            raise CheckpointError(f"{where}: sliding-window attention layers are not supported")
        kw = dict(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            # transformers' Qwen3Config defaults head_dim to 128 (not hidden / heads) when config.json omits it
            head_dim=cfg.get("head_dim") or (128 if mt == "qwen3" else None), rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            attention_bias=cfg.get("attention_bias", mt == "qwen2"),
            causal=cfg.get("causal", cfg.get("is_causal", False)), model_type=mt, qk_norm=mt == "qwen3",
            sliding_window=cfg.get("sliding_window") if mt == "mistral" else None)
        kw.update(overrides)
        try:
            return cls(**kw)
        except ValueError as e:  # __post_init__'s shape rules (heads, head_dim)
            raise CheckpointError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A config.json dict that transformers' Qwen2Model / Qwen3Model / MistralModel accepts (plus our `causal`)."""
        arch = {"qwen2": "Qwen2Model", "qwen3": "Qwen3Model", "mistral": "MistralModel"}[self.model_type]
        d = {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "tie_word_embeddings": False, "causal": self.causal,
        }
        if self.model_type in ("mistral", "qwen3"):
            d["attention_bias"] = self.attention_bias  # qwen2 configs have no such field (bias always on)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d


class Qwen2RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight multiply (as Qwen2's reference code)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        # Qwen2 / Mistral never put a bias on o_proj; Qwen3 ties it to attention_bias (False in every release)
        o_bias = cfg.attention_bias and cfg.model_type == "qwen3"
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:  # Qwen3: keys `self_attn.q_norm.weight`, `self_attn.k_norm.weight`, each (head_dim,)
            self.q_norm = Qwen2RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = Qwen2RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)    # (B, T, nkv, hd)
        if self.qk_norm:  # Qwen3: normalise each head's vector over hd, before RoPE (RoPE keeps its norm anyway)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                               # (B, nh|nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        q = q * cos + rotate_half(q) * sin  # RoPE; cos/sin (T, hd) broadcast over batch and heads
        k = k * cos + rotate_half(k) * sin
        # grouped-query attention without materialising repeated K/V (enable_gqa)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Encoder(nn.Module):
    """Qwen2Model (or Qwen3Model with qk_norm, MistralModel with attention_bias=False) as an encoder:
    (input_ids, mask) -> (B, T, H).

    Module names equal the checkpoint keys of transformers' Qwen2Model / Qwen3Model, so a checkpoint loads with at
    most a prefix.
    Build it on the meta device (`with torch.device("meta"): Qwen2Encoder(cfg)`) and load with `load_state_strict`
    to avoid allocating a random init; the RoPE table is a non-persistent buffer rebuilt after loading.
    """

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    # -- parameters / buffers ---------------------------------------------------------------------------------------
    def _inv_freq(self, device) -> Tensor:
        hd = self.config.head_dim
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))

    def reset_nonpersistent_buffers(self) -> None:
        """(Re)build the RoPE frequencies in fp32 on the device of the weights (after meta loading or a cast)."""
        self.inv_freq = self._inv_freq(self.embed_tokens.weight.device)

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh init as transformers' Qwen2PreTrainedModel: N(0, std) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, Qwen2RMSNorm):
                nn.init.ones_(m.weight)
        self.reset_nonpersistent_buffers()

    # -- forward ------------------------------------------------------------------------------------------------------
    def rope(self, T: int, device, dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (T, hd) computed in fp32 then cast to the activation dtype (as transformers does)."""
        if self.inv_freq.dtype != torch.float32 or self.inv_freq.device != device:
            self.inv_freq = self._inv_freq(device)  # a .to(bf16) or device move of the module touched the buffer
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.inv_freq)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                                  # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention_mask_for_sdpa(self, attention_mask: Tensor | None, T: int) -> tuple[Tensor | None, bool]:
        """Build the SDPA mask ONCE per forward: (bool mask or None, is_causal).

        Right padding: keys at padded positions are masked for every query, so real tokens never see padding (and
        their outputs do not depend on how much padding there is). A row with no real token at all (empty text)
        attends to everything instead of nothing, so it yields finite garbage rather than NaN; pooling ignores it.
        """
        causal = self.config.causal
        if attention_mask is None or bool(attention_mask.all()):
            return None, causal  # no padding: the fast paths (no mask / is_causal)
        keep = attention_mask.bool()                                          # (B, T)
        if causal and bool((keep[:, 1:] <= keep[:, :-1]).all()):
            # causal + RIGHT padding: a real query only sees earlier positions, all real, so the plain causal kernel
            # is exact for real tokens (padding queries see real + padding keys: finite values nobody reads).
            return None, True
        keep = keep | ~keep.any(dim=1, keepdim=True)
        mask = keep[:, None, None, :]                                         # (B, 1, 1, T) key padding
        if causal:
            tri = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
            # causal + LEFT padding: a padding query before the first real token would see no key at all; some SDPA
            # kernels return NaN for such a row, and NaN values leak through masked keys (0 * NaN) into real tokens
            # of the next layer. Letting every query see itself keeps them finite and changes no real token.
            eye = torch.eye(T, dtype=torch.bool, device=keep.device)
            mask = (mask & tri) | eye                                         # (B, 1, T, T)
        return mask, False

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, packed: Packed | None = None) -> Tensor:
        """(B, T) ids + (B, T) mask (right padding) -> (B, T, H); or `packed` texts (packing.py) -> (R, L, H)."""
        if packed is not None:  # texts laid end to end in rows: per-text positions and a block-diagonal mask
            x = self.embed_tokens(packed.input_ids)                                       # (R, L, H)
            cos, sin = self.rope(x.shape[1], x.device, x.dtype)                           # (L, hd) table
            cos, sin = cos[packed.position_ids][:, None], sin[packed.position_ids][:, None]  # (R, 1, L, hd)
            T = int(packed.lengths.max()) if packed.n_texts else 0                        # longest text
            mask, is_causal = packed.attention_mask(self.config.causal), False            # (R, 1, L, L)
        else:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids or inputs_embeds")
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
            T = x.shape[1]
            cos, sin = self.rope(T, x.device, x.dtype)
            mask, is_causal = self.attention_mask_for_sdpa(attention_mask, T)
        if self.config.causal and self.config.sliding_window and T > self.config.sliding_window:
            raise ValueError(f"causal input of {T} tokens exceeds sliding_window {self.config.sliding_window}: "
                             f"sliding-window attention is not supported by this encoder (refused, not approximated)")
        for layer in self.layers:  # train.py wraps each layer for activation checkpointing when asked
            x = layer(x, cos, sin, mask, is_causal)
        return self.norm(x)  # (B, T, H)

    # -- loading ------------------------------------------------------------------------------------------------------
    @staticmethod
    def detect_prefix(state: dict[str, Tensor], where: str = "") -> str:
        """'' for a bare Qwen2Model checkpoint (stella), 'model.' for a wrapper (Qwen2ForCausalLM, Jasper)."""
        for p in ("", "model."):
            if p + "embed_tokens.weight" in state:
                return p
        raise CheckpointError(f"{where}: no 'embed_tokens.weight' or 'model.embed_tokens.weight' key; "
                              f"first keys: {sorted(state)[:8]}")

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, prefix: str | None = None, dtype: torch.dtype = torch.float32,
                        config_overrides: dict | None = None, device: str | torch.device = "cpu") -> "Qwen2Encoder":
        path = resolve_checkpoint(src)
        cfg = Qwen2Config.from_hf(path / "config.json", **(config_overrides or {}))
        state = read_safetensors(path, prefix_filter=prefix)
        if prefix is None:
            prefix = cls.detect_prefix(state, str(path))
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        load_state_strict(model, state, prefix=prefix, what=f"Qwen2Encoder from {path}")
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Masked mean over real tokens: (B, T, H), (B, T) -> (B, H) in fp32 (an all-padding row gives zeros)."""
    if attention_mask is None:
        return hidden.float().mean(dim=1)
    m = attention_mask.to(torch.float32).unsqueeze(-1)                 # (B, T, 1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The student (sec. 2.1): Qwen2 body -> masked mean -> Matryoshka heads FC1..FC4, each L2-normalised. Weights as the
# released Jasper: `model.*` (body), `vision_model.*` (SigLIP), `vector_linear_{D}.*` (heads). Our config.json is the
# body's own qwen2 config plus a `jasper` block, so the export is also a standard model folder (docs/checkpoints.md).
# ---------------------------------------------------------------------------------------------------------------------
JASPER_HEAD_DIMS = (12288, 1024, 512, 256)  # FC1..FC4


def default_head_dims(fc1: int, hidden: int) -> tuple[int, ...]:
    """FC1 (the teacher's width, eq. 1) and three Matryoshka heads FC2-4: the three largest powers of two below
    both FC1 and the body's width, halving as the paper's 1024 -> 512 -> 256 (which this rule gives for
    Jasper: FC1 12288, hidden 1536); (384, 256, 128, 64) for the demo's 384-d teacher and a MiniLM body."""
    top = 1 << (min(fc1, hidden) - 1).bit_length() - 1  # the largest power of two below min(fc1, hidden)
    return (int(fc1), *(d for d in (top, top // 2, top // 4) if d >= 1))


@dataclass
class JasperConfig:
    text: Qwen2Config | BertConfig              # the body: a decoder (Qwen2/Qwen3/Mistral) or a BERT-family encoder
    vision: SiglipVisionConfig | None = None    # None: a text-only student
    head_dims: tuple[int, ...] = JASPER_HEAD_DIMS
    img_start_token_id: int = IMG_START_ID
    img_token_id: int = IMG_TOKEN_ID
    img_end_token_id: int = IMG_END_ID
    num_image_tokens: int = NUM_IMAGE_TOKENS
    max_length: int = 512
    pooling: str = "mean"                       # "mean" (sec. 2.1) | "cls" (a BERT student whose folder pools [CLS])

    def __post_init__(self):
        self.head_dims = tuple(int(d) for d in self.head_dims)
        if not self.head_dims or len(set(self.head_dims)) != len(self.head_dims):
            raise ValueError(f"head_dims must be non-empty and distinct, got {self.head_dims}")
        if self.pooling not in ("mean", "cls") or (self.pooling == "cls" and not self.is_bert):
            raise ValueError(f"pooling {self.pooling!r}: 'mean', or 'cls' for a BERT-family body (a decoder has no "
                             f"[CLS] token)")
        if self.is_bert and self.vision is not None:
            raise ValueError("a BERT-family student has no image tokens: the vision tower (stage 4) needs a decoder "
                             "body (Qwen2/Qwen3/Mistral)")

    @property
    def is_bert(self) -> bool:
        return self.text.model_type == "bert"

    @property
    def image_token_ids(self) -> tuple[int, int, int]:
        return self.img_start_token_id, self.img_token_id, self.img_end_token_id

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike) -> "JasperConfig":
        """From our exported config.json (the body's qwen2 config + a `jasper` block; before issue 14: model_type
        jasper with text_config) or the released Jasper's (text_config / vision_config sub-dicts).

        A plain qwen2 config.json (no text_config) is accepted as a text-only student with the default heads.
        """
        where, cfg = read_config(cfg)
        if isinstance(cfg.get("jasper"), dict):  # the body config with our fields in one block (to_hf)
            cfg = {**{k: v for k, v in cfg.items() if k != "jasper"}, **cfg["jasper"]}
        text_cfg = cfg.get("text_config", cfg)
        if "model_type" not in text_cfg:
            text_cfg = {"model_type": "qwen2", **text_cfg}
        try:
            text = (BertConfig.from_hf(text_cfg, CheckpointError) if text_cfg["model_type"] == "bert"
                    else Qwen2Config.from_hf(text_cfg))
        except CheckpointError as e:
            raise CheckpointError(f"{where}: text_config: {str(e).removeprefix('config dict: ')}") from e
        if cfg.get("pooling", "mean") not in ("mean", "cls") or (cfg.get("pooling") == "cls" and text.model_type
                                                                   != "bert"):
            raise CheckpointError(f"{where}: pooling {cfg.get('pooling')!r}: 'mean', or 'cls' for a bert body")
        check_config_values(where, cfg, {**{k: dict(lo=0) for k in ("img_start_token_id", "image_start_token_id",
                                                                     "img_token_id", "image_token_id",
                                                                     "img_end_token_id", "image_end_token_id")},
                                         **{k: dict(lo=1) for k in ("num_image_tokens", "num_img_tokens",
                                                                    "max_length")},
                                         **{k: dict(kind="list[int]", lo=1) for k in ("head_dims", "vector_dims")}})
        vision = None
        vcfg = cfg.get("vision_config")
        if vcfg:
            vision = SiglipVisionConfig.from_hf(vcfg)
        kw = {}
        for ours, aliases in {"img_start_token_id": ("img_start_token_id", "image_start_token_id"),
                              "img_token_id": ("img_token_id", "image_token_id"),
                              "img_end_token_id": ("img_end_token_id", "image_end_token_id"),
                              "num_image_tokens": ("num_image_tokens", "num_img_tokens"),
                              "head_dims": ("head_dims", "vector_dims"),
                              "max_length": ("max_length",), "pooling": ("pooling",)}.items():
            for a in aliases:
                if a in cfg:
                    kw[ours] = cfg[a]
                    break
        return cls(text=text, vision=vision, **kw)

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict:
        """config.json: what transformers' AutoModel needs for the body (model_type qwen2, "is_causal": false, the
        weights' dtype; or model_type bert) + our fields in a `jasper` block that transformers keeps and ignores."""
        vision = self.vision.to_hf() if self.vision is not None else None
        ours = {"head_dims": list(self.head_dims), "max_length": self.max_length, "pooling": self.pooling}
        if not self.is_bert:  # the image tokens belong to the decoder student only
            ours.update(img_start_token_id=self.img_start_token_id, img_token_id=self.img_token_id,
                        img_end_token_id=self.img_end_token_id, num_image_tokens=self.num_image_tokens,
                        vision_config=vision)
        return body_config(self.text.to_hf(), ours, dtype)


class JasperModel(nn.Module):
    """The Jasper student: `model` (Qwen2Encoder, or bert.BertModel for a BERT-family student), `vision_model`
    (SigLIP or None), heads `vector_linear_{D}`."""

    def __init__(self, config: JasperConfig):
        super().__init__()
        self.config = config
        self.model = BertModel(config.text) if config.is_bert else Qwen2Encoder(config.text)
        self.vision_model = None
        if config.vision is not None:
            self.vision_model = SiglipVisionEncoder(config.vision)
        H = config.text.hidden_size
        for D in config.head_dims:
            setattr(self, f"vector_linear_{D}", nn.Linear(H, D, bias=True))
        self.tokenizer: TextTokenizer | None = None
        # sentence-transformers prompts {name: prefix} written with every export; None = the standard instruction
        # prompts (standard_prompts), {} = none (a student trained and evaluated without instructions)
        self.prompts: dict[str, str] | None = None

    # -- structure ----------------------------------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[int, ...]:
        return self.config.head_dims

    def head(self, D: int) -> nn.Linear:
        if D not in self.config.head_dims:
            raise ValueError(f"no head of dim {D}; this model has {self.config.head_dims}")
        return getattr(self, f"vector_linear_{D}")

    @property
    def heads(self) -> dict[int, nn.Linear]:
        return {D: self.head(D) for D in self.config.head_dims}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def keep_layers(self, keep: Sequence[int]) -> None:
        """Keep only the body's blocks `keep` (strictly increasing indices), renumbered 0..len-1: a student cut from
        a deeper model (export.py init-student; the choice of layers: docs/model.md)."""
        n = self.config.text.num_hidden_layers
        keep = [int(i) for i in keep]
        if not keep or any(b <= a for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= n:
            raise ValueError(f"layers {keep}: expected strictly increasing indices in 0..{n - 1} (the body has "
                             f"{n} layers)")
        kept = nn.ModuleList(self.model.layers[i] for i in keep)
        if self.config.is_bert:
            self.model.encoder.layer = kept   # BertModel.layers is a view of encoder.layer
        else:
            self.model.layers = kept
        self.config.text = dataclasses.replace(self.config.text, num_hidden_layers=len(keep))
        self.model.config = self.config.text

    # -- forward ------------------------------------------------------------------------------------------------------
    def _embed_with_images(self, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        """inputs_embeds (B, T, H) with the image-token positions replaced by pooled vision features (sec. 2.1), as
        the released code: SigLIP patch features (N, 729, 1152) -> AdaptiveAvgPool2d((300, H)) -> spliced at the
        `<|jasper_img_token|>` positions in reading order (image i fills the i-th run of 300 tokens). Rows without
        image tokens (text-only rows of a mixed batch) keep their plain token embeddings."""
        c = self.config
        feats = self.vision_model(pixel_values)                                      # (N, 729, 1152)
        pooled = pool_image_features(feats, c.num_image_tokens, c.text.hidden_size)  # (N, 300, H)
        embeds = self.model.embed_tokens(input_ids)                                  # (B, T, H)
        return splice_image_features(embeds, input_ids, pooled, c.img_token_id)      # (B, T, H)

    def pool(self, input_ids: Tensor | None, attention_mask: Tensor | None, pixel_values: Tensor | None = None,
             packed: Packed | None = None) -> Tensor:
        """Masked mean of the last hidden state: (B, H) in fp32 (sec. 2.1); with `packed` texts, (N, H) per text.
        A BERT student whose folder pools [CLS] (config.pooling 'cls') takes each text's first token instead."""
        if packed is not None:
            if pixel_values is not None:
                raise ValueError("packed inputs are text only: pass images through the padded path (input_ids, "
                                 "attention_mask, pixel_values)")
            return packed.pool(self.model(packed=packed), self.config.pooling)      # (N, H) fp32
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError("pixel_values given but this JasperModel has no vision_model")
            hidden = self.model(inputs_embeds=self._embed_with_images(input_ids, pixel_values),
                                attention_mask=attention_mask)
        else:
            hidden = self.model(input_ids, attention_mask)                            # (B, T, H)
        if self.config.pooling == "cls":  # right padding: position 0 is every text's [CLS]
            return hidden[:, 0].float()                                              # (B, H) fp32
        return mean_pool(hidden, attention_mask)                                     # (B, H) fp32

    def project(self, pooled: Tensor, dims: Iterable[int] | None = None) -> dict[int, Tensor]:
        """Heads on the pooled vector: {D: L2-normalised (B, D) fp32}."""
        out = {}
        for D in (self.config.head_dims if dims is None else dims):
            lin = self.head(D)
            y = lin(pooled.to(lin.weight.dtype)).float()                             # (B, D)
            out[D] = F.normalize(y, p=2, dim=-1)
        return out

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, dims: Iterable[int] | None = None,
                packed: Packed | None = None) -> dict[int, Tensor]:
        """{D: L2-normalised (B, D) fp32} for every head (or only `dims`, e.g. FC1 alone in stages 1-2). Texts come
        padded (input_ids, attention_mask) or `packed` (packing.py; one vector per text, in the texts' order)."""
        return self.project(self.pool(input_ids, attention_mask, pixel_values, packed), dims)

    # -- inference ----------------------------------------------------------------------------------------------------
    def image_prompt_ids(self) -> list[int]:
        c = self.config
        return [c.img_start_token_id] + [c.img_token_id] * c.num_image_tokens + [c.img_end_token_id]

    encodes_many_dims = True  # encode(dim=[...]) runs the body once for several heads (eval.EmbeddingCache uses it)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | None = None, dim: int | Sequence[int] | None = None,
               instruction: str | None = None, batch_size: int = 32, images: Sequence | None = None,
               show_progress: bool | None = None, max_length: int | None = None) -> Tensor | dict[int, Tensor]:
        """L2-normalised embeddings (N, dim) fp32 on the CPU; `dim` = one head (default FC1, the largest). With a
        list of dims the body runs once and every head projects the same pooled vector: {D: (N, D)}.

        Texts are tokenised once, sorted by length (longest first, so a memory problem shows at once) and batched, so
        padding stays small; results come back in input order. `images` alone encodes images through the vision
        side; `images` with `texts` encodes image+text pairs (image block first, then texts[i]; see _encode_images).
        Progress with rate/ETA on stderr when show_progress (default: for more than 1000 inputs).
        """
        many = dim is not None and not isinstance(dim, int)
        dims = list(dim) if many else [max(self.config.head_dims) if dim is None else dim]
        for D in dims:
            self.head(D)  # validates
        was_training = self.training
        self.eval()
        device = self.device
        try:
            if images is not None:  # image-only, or image+text pairs (texts[i] goes with images[i])
                out = self._encode_images(images, dims, batch_size, show_progress, texts=texts,
                                          instruction=instruction, max_length=max_length)
                return out if many else out[dims[0]]
            if isinstance(texts, str):
                texts = [texts]
            if self.tokenizer is None:
                raise RuntimeError("no tokenizer attached: set model.tokenizer = TextTokenizer.from_pretrained(...)")
            ids = self.tokenizer.encode_ids(list(texts), instruction, max_length or self.config.max_length)

            def batch(idx: list[int]) -> dict[int, Tensor]:
                input_ids, mask = self.tokenizer.pad([ids[i] for i in idx])              # (b, T) right-padded
                return self(input_ids.to(device), mask.to(device), dims=dims)             # {D: (b, D)}
            out = length_sorted_encode([len(x) for x in ids], dims, batch_size, batch, desc="encode", unit="texts",
                                       enabled=len(ids) > 1000 if show_progress is None else show_progress)
            return out if many else out[dims[0]]
        finally:
            self.train(was_training)

    def _encode_images(self, images: Sequence, dims: list[int], batch_size: int, show_progress: bool | None,
                       texts: Sequence[str] | None = None, instruction: str | None = None,
                       max_length: int | None = None) -> dict[int, Tensor]:
        """Image (or image+text) embeddings {D: (N, D)}. Each input is "<img_start> <img_token>x300 <img_end>", followed
        by the tokens of texts[i] when texts are given (formatted with `instruction` like a text query); the image
        tokens are replaced by the pooled vision features. The image block counts against max_length: a paired
        text keeps at most max_length - 302 tokens. Images are decoded and preprocessed per batch (a bad image
        raises ImageError naming it)."""
        if self.vision_model is None:
            raise ValueError("images given but this JasperModel has no vision_model")
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
            images = [images]
        if isinstance(texts, str):
            texts = [texts]
        head = self.image_prompt_ids()                                               # 302 ids
        if texts is None:
            text_ids: list[list[int]] = [[] for _ in images]
        else:
            if len(texts) != len(images):
                raise ValueError(f"{len(texts)} texts for {len(images)} images: pass one text per image")
            if self.tokenizer is None:
                raise RuntimeError("no tokenizer attached: set model.tokenizer = TextTokenizer.from_pretrained(...)")
            budget = (max_length or self.config.max_length) - len(head)
            if budget < 1:
                raise ValueError(f"max_length {max_length or self.config.max_length} leaves no room for text after "
                                 f"the {len(head)} image tokens")
            text_ids = self.tokenizer.encode_ids(list(texts), instruction, budget)
        device = self.device

        def batch(idx: list[int]) -> dict[int, Tensor]:
            pixel_values, _, _ = preprocess_images([images[i] for i in idx], size=self.vision_model.config.image_size,
                                                   names=[f"images[{i}]" if not isinstance(images[i], (
                                                       str, os.PathLike)) else str(images[i]) for i in idx])
            seqs = [head + text_ids[i] for i in idx]
            if self.tokenizer is not None:
                input_ids, mask = self.tokenizer.pad(seqs)
            else:                                                                    # image-only: equal lengths
                input_ids = torch.tensor(seqs, dtype=torch.long)
                mask = torch.ones_like(input_ids)
            return self(input_ids.to(device), mask.to(device), pixel_values=pixel_values.to(device), dims=dims)
        # sorted by text length: pairs with texts of similar length share a batch (little padding)
        return length_sorted_encode([len(x) for x in text_ids], dims, batch_size, batch, "encode images", "images",
                                     enabled=len(images) > 200 if show_progress is None else show_progress)

    # -- loading / saving ---------------------------------------------------------------------------------------------
    @classmethod
    def _build_meta(cls, config: JasperConfig, dtype: torch.dtype) -> "JasperModel":
        with torch.device("meta"):
            return cls(config).to(dtype)

    @classmethod
    def from_pretrained(cls, src: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", vision: bool = True,
                        max_length: int | None = None) -> "JasperModel":
        """Load a released-Jasper-layout or exported checkpoint (strict). `vision=False` skips the vision tower."""
        path = resolve_checkpoint(src)
        config = JasperConfig.from_hf(path / "config.json")
        if config.is_bert:
            return cls._from_bert_export(path, config, dtype, device, max_length)
        prefixes: tuple[str, ...] = ("model.", "vector_linear_")
        if config.vision is not None and vision:
            prefixes += ("vision_model.",)
        else:
            config.vision = None
        state = read_safetensors(path, prefix_filter=prefixes)
        if config.vision is not None:  # released layout nests the tower: 'vision_model.vision_model.'
            state = jasper_vision_state(state, str(path))
        raw = read_json(path / "config.json")
        ours = raw.get("jasper") if isinstance(raw.get("jasper"), dict) else {}
        if not any(k.startswith("model.") for k in state) and "text_config" not in raw and not ours:
            raise CheckpointError(f"{path}: no 'model.*' keys and no text_config: this looks like a bare Qwen2 "
                                  f"(stella-layout) checkpoint; use JasperModel.from_stella({str(src)!r})")
        heads_in_ckpt = sorted({int(k.split(".")[0].rsplit("_", 1)[1]) for k in state
                                if k.startswith("vector_linear_")}, reverse=True)
        if "head_dims" not in raw and "head_dims" not in ours and heads_in_ckpt:
            config.head_dims = tuple(heads_in_ckpt)  # released config may not list them: take them from the keys
        if max_length:
            config.max_length = max_length
        model = cls._build_meta(config, dtype)
        load_state_strict(model, state, prefix="", what=f"JasperModel from {path}")
        model = model.to(device)
        model._attach_files(path)
        return model

    def _attach_files(self, path: Path) -> None:
        """The tokenizer and the prompts that travel with an export (checked against the embedding)."""
        if (path / "tokenizer.json").is_file():
            self.tokenizer = TextTokenizer.from_pretrained(path, max_length=self.config.max_length)
            self._check_tokenizer(str(path))
        if (path / "config_sentence_transformers.json").is_file():  # the prompts travel with the model
            self.prompts = read_json(path / "config_sentence_transformers.json").get("prompts")

    @classmethod
    def _from_bert_export(cls, path: Path, config: JasperConfig, dtype: torch.dtype, device,
                          max_length: int | None) -> "JasperModel":
        """Our export of a BERT student: body keys as transformers' BertModel names them (bare, or under `bert.`),
        heads `vector_linear_{D}.*`; the pooler, if any, is not part of a sentence embedder."""
        state = read_safetensors(path)
        bp = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
        body = {"model." + k[len(bp):]: v for k, v in state.items() if k.startswith((bp + "embeddings.",
                                                                                      bp + "encoder."))
                and k != bp + "embeddings.position_ids"}
        heads = {k: v for k, v in state.items() if k.startswith("vector_linear_")}
        if max_length:
            config.max_length = max_length
        model = cls._build_meta(config, dtype)
        load_state_strict(model, {**body, **heads}, what=f"BERT-family JasperModel from {path}")
        model = model.to(device)
        model._attach_files(path)
        return model

    @classmethod
    def from_bert(cls, src: str | os.PathLike, head_dims: Sequence[int] | None = None,
                  layers: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", max_length: int | None = None, seed: int = 0) -> "JasperModel":
        """A BERT-family student from a sentence-transformers folder (or a plain Hugging Face BERT folder: mean
        pooling, as sentence-transformers reads one): its body (optionally only `layers`), WordPiece tokenizer,
        pooling (1_Pooling: mean or cls) and prompts; heads `head_dims` (default: FC1 = the folder's own vector
        width, then default_head_dims) initialised by _init_heads. Design: docs/model.md "A BERT-family student"."""
        path = resolve_checkpoint(src)
        lay = read_st_layout(path)
        pool_file = path / "1_Pooling" / "config.json"
        if len(lay.pooling) != 1 or lay.pooling[0] not in ("mean", "cls"):
            raise CheckpointError(f"{pool_file}: pooling {'+'.join(lay.pooling)}: a student pools 'mean' or 'cls'")
        if not lay.include_prompt:
            raise CheckpointError(f"{pool_file}: include_prompt false is not supported for a student (it pools every "
                                  f"token, a prompt's included)")
        if lay.do_lower_case:
            raise CheckpointError(f"{lay.body_dir / 'sentence_bert_config.json'}: do_lower_case true is not supported "
                                  f"for a student (put the Lowercase normaliser into tokenizer.json instead)")
        body = load_bert_body(lay.body_dir, dtype, error=CheckpointError)
        denses = [s[1] for s in lay.steps if s[0] == "dense"]
        H = body.config.hidden_size
        width = int(read_json(denses[-1] / "config.json")["out_features"]) if denses else H  # the folder's vector
        head_dims = tuple(head_dims) if head_dims else default_head_dims(width, H)
        max_length = min(max_length or lay.max_seq_length or 512, body.config.max_position_embeddings)
        model = cls._build_meta(JasperConfig(text=body.config, head_dims=head_dims, max_length=max_length,
                                             pooling=lay.pooling[0]), dtype)
        load_state_strict(model.model, body.state_dict(), what=f"BERT body from {lay.body_dir}")
        if layers is not None:
            model.keep_layers(layers)
        # with no Dense after pooling, the folder's own vector is the pooled state: identity-row heads start the
        # student at (the first D coordinates of) what the folder itself returns
        model.init_report = model._init_heads({}, seed, identity=not denses)
        model = model.to(device)
        model.tokenizer = TextTokenizer.from_pretrained(lay.body_dir, max_length=max_length, add_image_tokens=False)
        model._check_tokenizer(str(lay.body_dir))
        model.prompts = dict(lay.prompts)  # the folder's own convention: no prompts when it has none (MiniLM)
        return model

    def _check_tokenizer(self, where: str) -> None:
        tok = self.tokenizer
        if tok.vocab_size > self.config.text.vocab_size:
            raise CheckpointError(f"{where}: tokenizer has {tok.vocab_size} tokens but the embedding only "
                                  f"{self.config.text.vocab_size} rows")
        if tok.image_token_ids is not None and tok.image_token_ids != self.config.image_token_ids:
            raise CheckpointError(f"{where}: tokenizer image token ids {tok.image_token_ids} differ from config "
                                  f"{self.config.image_token_ids}")

    @classmethod
    def from_stella(cls, src: str | os.PathLike, head_dims: Sequence[int] = JASPER_HEAD_DIMS,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", vision_config: Any = None,
                    max_length: int = 512, seed: int = 0,
                    vision_src: str | os.PathLike | None = None) -> "JasperModel":
        """Student initialisation from a stella_en_1.5B_v5-layout checkpoint (any bare Qwen2 checkpoint works).

        Body: the stella Qwen2 weights (bidirectional). Vocabulary: grown to the tokenizer's size (the 3 image
        tokens) with new rows set to the mean embedding. Heads, per D in head_dims (see docs/model.md):
          - stella has `2_Dense_{D}`: copied exactly (FC2 1024, FC4 256);
          - else a larger `2_Dense_{D'}` exists: its first D rows (FC3 512 from 2_Dense_768);
          - else fresh nn.Linear init (FC1 12288: no stella head is that wide).
        `model.init_report` records what each head got.
        Vision tower: `vision_src` = a SigLIP checkpoint (google/siglip-so400m-patch14-384 layout, or any layout
        SiglipVisionEncoder.from_pretrained reads) -> its config and weights (sec. 2.1); else `vision_config` alone
        gives a freshly initialised tower; neither = text-only student.
        """
        path = resolve_checkpoint(src)
        if vision_src is not None:  #
            vision_src = resolve_checkpoint(vision_src)
            vision_config = vision_config or SiglipVisionConfig.from_hf(vision_src / "config.json")
        text = Qwen2Config.from_hf(path / "config.json", causal=False)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            tokenizer = TextTokenizer.from_pretrained(path, max_length=max_length)
        state = read_safetensors(path)
        prefix = Qwen2Encoder.detect_prefix(state, str(path))
        ckpt_vocab = text.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > ckpt_vocab:
            text = dataclasses.replace(text, vocab_size=tokenizer.vocab_size)
        img_ids = ((tokenizer.image_token_ids if tokenizer is not None else None)
                   or (IMG_START_ID, IMG_TOKEN_ID, IMG_END_ID))
        config = JasperConfig(text=text, vision=vision_config, head_dims=tuple(head_dims),
                              img_start_token_id=img_ids[0], img_token_id=img_ids[1], img_end_token_id=img_ids[2],
                              max_length=max_length)
        model = cls._build_meta(config, dtype)
        # body: load into an encoder of the checkpoint's vocab size, then grow the embedding
        with torch.device("meta"):
            body = Qwen2Encoder(dataclasses.replace(text, vocab_size=ckpt_vocab)).to(dtype)
        load_state_strict(body, state, prefix=prefix, what=f"stella body from {path}")
        del state
        emb = body.embed_tokens.weight.data
        if text.vocab_size > ckpt_vocab:
            extra = emb.float().mean(0, keepdim=True).to(emb.dtype).expand(text.vocab_size - ckpt_vocab, -1)
            emb = torch.cat([emb, extra], dim=0)
        body_state = body.state_dict()
        body_state["embed_tokens.weight"] = emb
        load_state_strict(model.model, body_state, what=f"stella body from {path}")
        model.init_report = model._init_heads(stella_dense_folders(path), seed)
        if model.vision_model is not None and vision_src is not None:
            model.vision_model.load_checkpoint(vision_src)  # strict, under the detected prefix
            model.init_report["vision"] = str(vision_src)
        elif model.vision_model is not None and any(p.is_meta for p in model.vision_model.parameters()):
            model.vision_model.to_empty(device="cpu")
            model.vision_model.init_weights()
        model = model.to(device)
        model.tokenizer = tokenizer
        if (path / "config_sentence_transformers.json").is_file():  # stella's own prompt names stay usable
            own = read_json(path / "config_sentence_transformers.json").get("prompts") or {}
            model.prompts = {**standard_prompts(), **own} if own else None
        return model

    def _init_heads(self, dense: dict[int, Path], seed: int, identity: bool = False) -> dict:
        """Each head vector_linear_{D} from stella's `2_Dense_{D}` (`dense`), else the first D rows of a larger one,
        else, with `identity` and D <= hidden, the first D rows of the identity (zero bias: the head returns the
        pooled vector's first D coordinates), else a fresh init (docs/model.md). Returns {D: what the head got}
        (JasperModel.init_report)."""
        g = torch.Generator().manual_seed(seed)
        report = {}
        H = self.config.text.hidden_size
        for D in self.config.head_dims:
            src_d = D if D in dense else min((d for d in dense if d > D), default=None)
            if src_d is not None:
                w, b = read_dense_folder(dense[src_d])
                if w.shape[1] != H:
                    raise CheckpointError(f"{dense[src_d]}: in_features {w.shape[1]} != hidden {H}")
                w, b = w[:D].clone(), (b[:D].clone() if b is not None else torch.zeros(D))
                how = dense[src_d].name if src_d == D else f"first {D} rows of {dense[src_d].name}"
            elif identity and D <= H:
                w, b, how = torch.eye(H)[:D].clone(), torch.zeros(D), f"identity rows 0..{D - 1}"
            else:
                lin = nn.Linear(H, D)  # fresh, torch's default init (kaiming-uniform weight, uniform bias)
                with torch.no_grad():
                    bound = 1 / math.sqrt(H)
                    lin.weight.uniform_(-bound, bound, generator=g)
                    lin.bias.uniform_(-bound, bound, generator=g)
                w, b, how = lin.weight.data, lin.bias.data, "fresh init"
            load_state_strict(self.head(D), {"weight": w, "bias": b}, what=f"head vector_linear_{D}")
            report[D] = how
        return report

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer: TextTokenizer | None = None,
                        state_dict: dict[str, Tensor] | None = None, max_shard_bytes: int = 5 * 1024**3,
                        default_head: int | None = None, prompts: dict[str, str] | None = None) -> Path:
        """The export folder (docs/checkpoints.md): our files (config.json, model.safetensors or shards + index,
        tokenizer.json) that are at the same time a standard transformers / sentence-transformers model (the
        sentence-transformers modules beside them), written atomically into a temporary sibling directory that is
        renamed over `out_dir` only when complete. `out_dir` must be absent, empty or a previous export.

        default_head: the head sentence-transformers returns (default: the largest, FC1, as encode()); every head
        is in the folder and `python export.py set-head` switches. prompts: default `self.prompts`. `state_dict` lets
        a distributed trainer pass the gathered full state dict (the heads are taken from it too)."""
        c = self.config
        state = state_dict if state_dict is not None else self.state_dict()
        tokenizer = tokenizer or self.tokenizer
        prompts = prompts if prompts is not None else self.prompts
        if prompts is None and tokenizer is not None:  # the prompts are written only with the tokenizer's modules
            prompts = standard_prompts()
        if c.is_bert:  # the body's keys as transformers' BertModel names them (AutoModel loads them as they are)
            state = {k.removeprefix("model."): v for k, v in state.items()}
        dtype = next(v for k, v in state.items() if not k.startswith("vector_linear_")).dtype  # the body's own
        # the files themselves are checkpoint I/O (checkpoints.save_export); the config's dtype is the weights' own
        return save_export(out_dir, c.to_hf(dtype), state, tokenizer, c.head_dims, c.text.hidden_size, c.max_length,
                           prompts, default_head, max_shard_bytes, pooling=c.pooling)


if __name__ == "__main__":
    # no commands here: export.py (which imports this file) owns the export folder's, once run as `python model.py`
    print("model.py: error: the export folder commands are export.py's: python export.py " + " ".join(sys.argv[1:]),
          file=sys.stderr)
    sys.exit(2)
