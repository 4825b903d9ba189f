"""The Jasper student (arXiv 2412.19048, sec. 2.1): a Qwen2 text encoder, a SigLIP vision tower, a parameter-free
pooler that turns image patches into text-width tokens, and four Matryoshka heads (FC1..FC4 = 12288/1024/512/256).

Written directly in torch; loads real safetensors checkpoints key-for-key (modules are named after the checkpoint
keys, so loading needs at most a prefix, never a key map).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint loading: real safetensors files, strict key/shape checks, meta-device construction + assign.
# ---------------------------------------------------------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint that cannot be loaded as asked: the message names the file, key(s) and shapes involved."""


def resolve_checkpoint(src: str | os.PathLike) -> Path:
    """`src` is a local directory (used as is) or a hub id (downloaded with huggingface_hub when online)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src}: expected a checkpoint directory, found a file")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src)))
    except Exception as e:  # offline, unknown repo, no permission, ...
        raise CheckpointError(
            f"{src!r} is not a local directory and could not be fetched from the hugging face hub "
            f"({type(e).__name__}: {e})") from e


def _safetensors_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: safetensors file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_safetensors(ckpt_dir: str | os.PathLike, prefix_filter: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    `prefix_filter` (a prefix or several) keeps only matching keys; the others are never read from disk.
    A missing, truncated or corrupt file raises CheckpointError naming the file.
    """
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except Exception as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
    elif single.is_file():
        by_file = {single.name: _safetensors_keys(single)}
    else:
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
    prefixes = (prefix_filter,) if isinstance(prefix_filter, str) else tuple(prefix_filter or ())
    state: dict[str, Tensor] = {}
    for fname, keys in by_file.items():
        file = ckpt_dir / fname
        present = set(_safetensors_keys(file))
        absent = [k for k in keys if k not in present]
        if absent:
            raise CheckpointError(f"{file}: keys listed in {index.name} but missing from the file: {absent[:10]}")
        wanted = [k for k in keys if not prefixes or k.startswith(prefixes)]
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in wanted:
                    state[k] = f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: failed reading tensor data (truncated or corrupt?): {e}") from e
    return state


def _fmt_shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_state_strict(module: nn.Module, state: dict[str, Tensor], prefix: str = "", what: str = "") -> None:
    """Load the keys of `state` under `prefix` (stripped) into `module`, requiring exactly the module's keys.

    Missing keys, unexpected keys and shape mismatches raise CheckpointError listing them (with shapes). Tensors are
    cast to the dtype of the module's own parameter/buffer (build the module in the dtype you want, e.g. on meta) and
    loaded with assign=True, so a meta-device module gets real storage without a random init first. Non-persistent
    buffers (the RoPE frequencies) are rebuilt afterwards on the parameters' device.
    """
    what = what or type(module).__name__
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    bad_shape = [k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        lines = [f"cannot load {what} (key prefix {prefix!r}):"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(
                f"{prefix}{k} {_fmt_shape(own[k])}" for k in missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(
                f"{prefix}{k} {_fmt_shape(sub[k])}" for k in unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if bad_shape:
            lines.append("  shape mismatch: " + ", ".join(
                f"{prefix}{k} checkpoint {_fmt_shape(sub[k])} vs model {_fmt_shape(own[k])}" for k in bad_shape[:20]))
        raise CheckpointError("\n".join(lines))
    casted = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sub.items()}
    module.load_state_dict(casted, strict=True, assign=True)
    for m in module.modules():
        if hasattr(m, "reset_nonpersistent_buffers"):
            m.reset_nonpersistent_buffers()
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"cannot load {what}: tensors left without data after loading: {still_meta[:10]}")


def _read_json(path: Path, what: str = "", error: type[Exception] = CheckpointError) -> dict:
    """A JSON file (config.json, ...); a missing or malformed file raises `error` naming the file (and `what`)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found{f' ({what})' if what else ''}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------------------------------
# Two small utilities every file of the project uses (model.py is the one module all the others import).
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes | memoryview | str | Callable[[Path], None]) -> None:
    """Write `path` so that a kill at any moment leaves the old file or the complete new one, never a short one.

    The bytes (or text, utf-8; or whatever `data(tmp_path)` writes) go to a hidden sibling `.NAME.tmp<pid>`, are
    fsync'ed, then `os.replace`d over `path` (atomic on POSIX). A killed writer leaves at most a *.tmp* file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Progress:
    """A progress line on stderr: `what: n/total (pct) rate unit/s, elapsed, ETA`.

    Printed at most every `every` seconds, and once more when `n` reaches `total` (or on `close()` when the total
    is unknown). `update(k)` counts k more items done.
    """

    def __init__(self, what: str, total: int | None = None, unit: str = "texts", enabled: bool = True,
                 every: float = 5.0):
        self.what, self.total, self.unit, self.enabled, self.every = what, total, unit, enabled, every
        self.n, self.t0, self.last, self.closed = 0, time.perf_counter(), time.perf_counter(), False

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.total is not None and self.n >= self.total:
            self.close()
        elif self.enabled and now - self.last >= self.every:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if self.enabled and not self.closed:
            self.closed = True
            self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        el = max(now - self.t0, 1e-9)
        rate = self.n / el
        msg = f"{self.what}: {self.n:,}" + (f"/{self.total:,} ({100 * self.n / max(self.total, 1):.1f}%)"
                                             if self.total is not None else "")
        msg += f" {rate:,.1f} {self.unit}/s, elapsed {fmt_duration(el)}"
        if self.total is not None and self.n < self.total:
            msg += f", ETA {fmt_duration((self.total - self.n) / rate) if rate > 0 else '?'}"
        print(msg, file=sys.stderr, flush=True)


def fmt_duration(s: float) -> str:
    """12s, 3m05s, 1h02m."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


# ---------------------------------------------------------------------------------------------------------------------
# Qwen2 (and Mistral) decoder body used as a (by default bidirectional) text encoder. REFERENCE.md "Student".
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
    attention_bias: bool = True           # q/k/v bias: True for Qwen2, False for Mistral
    causal: bool = False                  # False = bidirectional (Jasper / stella / NV-Embed default)
    model_type: str = "qwen2"
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

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike, **overrides) -> "Qwen2Config":
        """From a Hugging Face config.json (a dict, the file, or its directory); model_type qwen2 or mistral."""
        where = "config dict"
        if not isinstance(cfg, dict):
            p = Path(cfg)
            p = p / "config.json" if p.is_dir() else p
            where, cfg = str(p), _read_json(p)
        mt = cfg.get("model_type")
        if mt not in ("qwen2", "mistral"):
            raise CheckpointError(f"{where}: model_type {mt!r} is not supported (expected 'qwen2' or 'mistral')")
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
            head_dim=cfg.get("head_dim"), rope_theta=float(theta), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            attention_bias=cfg.get("attention_bias", mt == "qwen2"),
            causal=cfg.get("causal", cfg.get("is_causal", False)), model_type=mt,
            sliding_window=cfg.get("sliding_window") if mt == "mistral" else None)
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """A config.json dict that transformers' Qwen2Model / MistralModel accepts (plus our `causal` flag)."""
        arch = "Qwen2Model" if self.model_type == "qwen2" else "MistralModel"
        d = {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu", "tie_word_embeddings": False, "causal": self.causal,
        }
        if self.model_type == "mistral":
            d["attention_bias"] = self.attention_bias  # qwen2 configs have no such field (bias always on)
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
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
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
    """Qwen2Model (or MistralModel with attention_bias=False) as an encoder: (input_ids, mask) -> (B, T, H).

    Module names equal the checkpoint keys of transformers' Qwen2Model, so a checkpoint loads with at most a prefix.
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
        self.gradient_checkpointing = False
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
            mask = mask & tri                                                 # (B, 1, T, T)
        return mask, False

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        T = x.shape[1]
        cos, sin = self.rope(T, x.device, x.dtype)
        if self.config.causal and self.config.sliding_window and T > self.config.sliding_window:
            raise ValueError(f"causal input of {T} tokens exceeds sliding_window {self.config.sliding_window}: "
                             f"sliding-window attention is not supported by this encoder (refused, not approximated)")
        mask, is_causal = self.attention_mask_for_sdpa(attention_mask, T)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, is_causal, use_reentrant=False)
            else:
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
# Tokenisation: any tokenizer.json (Qwen2 byte-level BPE, BERT WordPiece) through the `tokenizers` library.
# ---------------------------------------------------------------------------------------------------------------------
JASPER_IMAGE_TOKENS = ("<|jasper_img_start|>", "<|jasper_img_token|>", "<|jasper_img_end|>")  # sec. 2.1


class TextTokenizer:
    """Wraps `tokenizers.Tokenizer`: instruction prompts, truncation (special tokens kept), right padding.

    Queries get "Instruct: {instruction}\\nQuery: " in front (REFERENCE "Prompts"); documents get nothing. For a Qwen
    vocabulary the three Jasper image tokens are added when missing: with the Qwen2/stella tokenizer (3 special
    tokens) they get the released ids 151646-151648; with a larger Qwen2.5 vocabulary they get the next free ids, and
    `image_token_ids` says which (JasperModel takes its ids from there).
    """

    def __init__(self, tok, max_length: int = 512, add_image_tokens: bool | None = None, source: str = ""):
        from tokenizers import AddedToken

        self.tok = tok
        self.max_length = max_length
        self.source = source
        # padding / truncation settings stored in some tokenizer.json files (MiniLM's pads everything to 128!) are
        # switched off: we truncate per call and pad per batch ourselves.
        pad_cfg = tok.padding
        tok.no_padding()
        tok.no_truncation()
        self._trunc = None
        vocab = tok.get_vocab(with_added_tokens=True)
        self.is_qwen = "<|endoftext|>" in vocab
        if add_image_tokens is None:
            add_image_tokens = self.is_qwen
        if add_image_tokens:
            missing = [t for t in JASPER_IMAGE_TOKENS if t not in vocab]
            if missing:
                tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        if pad_cfg is not None:
            self.pad_id = int(pad_cfg["pad_id"])
        else:
            self.pad_id = next((vocab[t] for t in ("<|endoftext|>", "[PAD]", "<pad>", "<|pad|>") if t in vocab), 0)

    @classmethod
    def from_pretrained(cls, dir_or_file: str | os.PathLike, max_length: int = 512, **kw) -> "TextTokenizer":
        from tokenizers import Tokenizer

        p = Path(dir_or_file)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise CheckpointError(f"{f}: tokenizer.json not found")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: not a valid tokenizer.json ({e})") from e
        return cls(tok, max_length=max_length, source=str(f), **kw)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def image_token_ids(self) -> tuple[int, int, int] | None:
        ids = tuple(self.tok.token_to_id(t) for t in JASPER_IMAGE_TOKENS)
        return None if None in ids else ids  # (start, token, end)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @staticmethod
    def format(text: str, instruction: str | None = None) -> str:
        return f"Instruct: {instruction}\nQuery: {text}" if instruction else text

    def encode_ids(self, texts: str | Sequence[str], instruction: str | None = None,
                   max_length: int | None = None) -> list[list[int]]:
        """Token ids per text (with the tokenizer's own special tokens, e.g. BERT's [CLS]/[SEP]), unpadded,
        truncated to max_length tokens in total (the special tokens are kept)."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = max_length or self.max_length
        if self._trunc != max_length:
            self.tok.enable_truncation(max_length)
            self._trunc = max_length
        texts = [self.format(t, instruction) for t in texts]
        enc = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)(texts)
        return [e.ids for e in enc]

    def pad(self, ids: Sequence[Sequence[int]], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-pad to the longest (or `pad_to`): input_ids (B, T), attention_mask (B, T), both int64."""
        T = max([len(x) for x in ids] + [pad_to or 0, 1])
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids, mask

    def __call__(self, texts: str | Sequence[str], instruction: str | None = None,
                 max_length: int | None = None) -> tuple[Tensor, Tensor]:
        return self.pad(self.encode_ids(texts, instruction, max_length))

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir) / "tokenizer.json"
        self.tok.no_truncation()  # the file carries no per-call truncation state
        self._trunc = None
        self.tok.save(str(out))
        return out

# ---------------------------------------------------------------------------------------------------------------------
# Vision side of the student (paper sec. 2.1; stage 4 in sec. 3.1): the SigLIP so400m-patch14-384 vision tower, the
# parameter-free pooler that turns its 27x27 patch grid into 300 text-width tokens, the splice of those tokens at the
# `<|jasper_img_token|>` positions of the text, and image loading / preprocessing (Pillow + numpy).
# Facts: REFERENCE.md "Vision encoder", "Pooler", "Image preprocessing". Design notes: docs/vision.md.
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
        where = "config dict"
        if not isinstance(cfg, dict):
            p = Path(cfg)
            p = p / "config.json" if p.is_dir() else p
            where, cfg = str(p), _read_json(p)
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
        self.gradient_checkpointing = False
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
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
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
            prefix = cls.detect_prefix(_checkpoint_keys(ckpt_dir), str(ckpt_dir))
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


def _checkpoint_keys(ckpt_dir: Path) -> list[str]:
    """Tensor names of a checkpoint directory without reading any tensor data."""
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text())["weight_map"])
        except Exception as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    single = ckpt_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")
    return _safetensors_keys(single)


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


def image_placeholder_ids(num_image_tokens: int = NUM_IMAGE_TOKENS, start_id: int = IMG_START_ID,
                          token_id: int = IMG_TOKEN_ID, end_id: int = IMG_END_ID) -> list[int]:
    """Token ids that stand for one image in the text: <|jasper_img_start|> <|jasper_img_token|> x 300
    <|jasper_img_end|>. The start/end tokens keep their own (learned) text embeddings; the 300 image tokens are
    replaced by the pooled image vectors (splice_image_features)."""
    return [start_id] + [token_id] * num_image_tokens + [end_id]


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
# Image loading and preprocessing: the SiglipImageProcessor recipe (REFERENCE.md "Image preprocessing") in Pillow+numpy.
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


# ---------------------------------------------------------------------------------------------------------------------
# The student (sec. 2.1): Qwen2 body -> masked mean pool -> four Matryoshka heads FC1..FC4 (Linear, bias), each output
# L2-normalised. Checkpoint layout equals the released Jasper: `model.*` (Qwen2 body), `vision_model.*` (SigLIP),
# `vector_linear_{D}.*` (heads); config.json holds `text_config` / `vision_config` / head dims / image token ids.
# ---------------------------------------------------------------------------------------------------------------------
JASPER_HEAD_DIMS = (12288, 1024, 512, 256)  # FC1..FC4


@dataclass
class JasperConfig:
    text: Qwen2Config
    vision: Any = None                          # SiglipVisionConfig | None (text-only student)
    head_dims: tuple[int, ...] = JASPER_HEAD_DIMS
    img_start_token_id: int = 151646
    img_token_id: int = 151647
    img_end_token_id: int = 151648
    num_image_tokens: int = 300
    max_length: int = 512

    def __post_init__(self):
        self.head_dims = tuple(int(d) for d in self.head_dims)
        if not self.head_dims or len(set(self.head_dims)) != len(self.head_dims):
            raise ValueError(f"head_dims must be non-empty and distinct, got {self.head_dims}")

    @property
    def image_token_ids(self) -> tuple[int, int, int]:
        return self.img_start_token_id, self.img_token_id, self.img_end_token_id

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike) -> "JasperConfig":
        """From our exported config.json or the released Jasper's (text_config / vision_config sub-dicts).

        A plain qwen2 config.json (no text_config) is accepted as a text-only student with the default heads.
        """
        where = "config dict"
        if not isinstance(cfg, dict):
            p = Path(cfg)
            p = p / "config.json" if p.is_dir() else p
            where, cfg = str(p), _read_json(p)
        text_cfg = cfg.get("text_config", cfg)
        if "model_type" not in text_cfg:
            text_cfg = {"model_type": "qwen2", **text_cfg}
        try:
            text = Qwen2Config.from_hf(text_cfg)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: text_config: {e}") from e
        vision = None
        vcfg = cfg.get("vision_config")
        if vcfg:
            vc = globals().get("SiglipVisionConfig")
            if vc is None:
                raise CheckpointError(f"{where}: has a vision_config but model.py has no SiglipVisionConfig yet")
            vision = vc.from_hf(vcfg) if hasattr(vc, "from_hf") else vc(**{
                k: v for k, v in vcfg.items() if k in {f.name for f in dataclasses.fields(vc)}})
        kw = {}
        for ours, aliases in {"img_start_token_id": ("img_start_token_id", "image_start_token_id"),
                              "img_token_id": ("img_token_id", "image_token_id"),
                              "img_end_token_id": ("img_end_token_id", "image_end_token_id"),
                              "num_image_tokens": ("num_image_tokens", "num_img_tokens"),
                              "head_dims": ("head_dims", "vector_dims"),
                              "max_length": ("max_length",)}.items():
            for a in aliases:
                if a in cfg:
                    kw[ours] = cfg[a]
                    break
        return cls(text=text, vision=vision, **kw)

    def to_hf(self) -> dict:
        vision = None
        if self.vision is not None:
            vision = self.vision.to_hf() if hasattr(self.vision, "to_hf") else dataclasses.asdict(self.vision)
        return {
            "architectures": ["JasperModel"], "model_type": "jasper", "text_config": self.text.to_hf(),
            "vision_config": vision, "head_dims": list(self.head_dims),
            "img_start_token_id": self.img_start_token_id, "img_token_id": self.img_token_id,
            "img_end_token_id": self.img_end_token_id, "num_image_tokens": self.num_image_tokens,
            "max_length": self.max_length,
        }


def _read_dense_folder(folder: Path) -> tuple[Tensor, Tensor | None]:
    """A sentence-transformers Dense module folder (`2_Dense_{D}`): config.json + model.safetensors (or .bin)."""
    cfg = _read_json(folder / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if not act.endswith("Identity"):
        raise CheckpointError(f"{folder}/config.json: activation {act!r} is not supported (Identity only)")
    if (folder / "model.safetensors").is_file():
        state = read_safetensors(folder)
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    if "linear.weight" not in state:
        raise CheckpointError(f"{folder}: no 'linear.weight' key (found {sorted(state)[:6]})")
    w, b = state["linear.weight"], state.get("linear.bias")
    if tuple(w.shape) != (cfg["out_features"], cfg["in_features"]):
        raise CheckpointError(f"{folder}: linear.weight {_fmt_shape(w)} does not match config "
                              f"({cfg['out_features']}, {cfg['in_features']})")
    return w, b


def stella_dense_folders(path: Path) -> dict[int, Path]:
    """{D: folder} for the `2_Dense_{D}` folders of a stella checkpoint (`2_Dense` alone is D = 1024 in stella)."""
    found: dict[int, Path] = {}
    for f in sorted(Path(path).glob("2_Dense*")):
        if not f.is_dir() or not (f / "config.json").is_file():
            continue
        found.setdefault(int(_read_json(f / "config.json")["out_features"]), f)
    return found


class JasperModel(nn.Module):
    """The Jasper student: `model` (Qwen2Encoder), `vision_model` (SigLIP or None), heads `vector_linear_{D}`."""

    def __init__(self, config: JasperConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Encoder(config.text)
        self.vision_model = None
        if config.vision is not None:
            enc = globals().get("SiglipVisionEncoder")
            if enc is None:
                raise RuntimeError("JasperConfig has a vision config but model.py has no SiglipVisionEncoder yet")
            self.vision_model = enc(config.vision)
        H = config.text.hidden_size
        for D in config.head_dims:
            setattr(self, f"vector_linear_{D}", nn.Linear(H, D, bias=True))
        self.tokenizer: TextTokenizer | None = None

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

    def pool(self, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None = None) -> Tensor:
        """Masked mean of the last hidden state: (B, H) in fp32 (sec. 2.1)."""
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError("pixel_values given but this JasperModel has no vision_model")
            hidden = self.model(inputs_embeds=self._embed_with_images(input_ids, pixel_values),
                                attention_mask=attention_mask)
        else:
            hidden = self.model(input_ids, attention_mask)                            # (B, T, H)
        return mean_pool(hidden, attention_mask)                                     # (B, H) fp32

    def project(self, pooled: Tensor, dims: Iterable[int] | None = None) -> dict[int, Tensor]:
        """Heads on the pooled vector: {D: L2-normalised (B, D) fp32}."""
        out = {}
        for D in (self.config.head_dims if dims is None else dims):
            lin = self.head(D)
            y = lin(pooled.to(lin.weight.dtype)).float()                             # (B, D)
            out[D] = F.normalize(y, p=2, dim=-1)
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                dims: Iterable[int] | None = None) -> dict[int, Tensor]:
        """{D: L2-normalised (B, D) fp32} for every head (or only `dims`, e.g. FC1 alone in stages 1-2)."""
        return self.project(self.pool(input_ids, attention_mask, pixel_values), dims)

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
        device = self.model.embed_tokens.weight.device
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
            order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
            out = {D: torch.empty(len(ids), D, dtype=torch.float32) for D in dims}
            prog = Progress("encode", len(ids), enabled=len(ids) > 1000 if show_progress is None else show_progress)
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                input_ids, mask = self.tokenizer.pad([ids[i] for i in idx])
                vec = self(input_ids.to(device), mask.to(device), dims=dims)  # {D: (b, D)}
                for D in dims:
                    out[D][torch.tensor(idx)] = vec[D].float().cpu()
                prog.update(len(idx))
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
        device = self.model.embed_tokens.weight.device
        order = sorted(range(len(images)), key=lambda i: -len(text_ids[i]))         # little padding per batch
        out = {D: torch.empty(len(images), D, dtype=torch.float32) for D in dims}
        prog = Progress("encode images", len(images), "images",
                        enabled=len(images) > 200 if show_progress is None else show_progress)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            pixel_values, _, _ = preprocess_images([images[i] for i in idx], size=self.vision_model.config.image_size,
                                                   names=[f"images[{i}]" if not isinstance(images[i], (
                                                       str, os.PathLike)) else str(images[i]) for i in idx])
            seqs = [head + text_ids[i] for i in idx]
            if self.tokenizer is not None:
                input_ids, mask = self.tokenizer.pad(seqs)
            else:                                                                    # image-only: equal lengths
                input_ids = torch.tensor(seqs, dtype=torch.long)
                mask = torch.ones_like(input_ids)
            vec = self(input_ids.to(device), mask.to(device), pixel_values=pixel_values.to(device), dims=dims)
            for D in dims:
                out[D][torch.tensor(idx)] = vec[D].float().cpu()
            prog.update(len(idx))
        return out

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
        prefixes: tuple[str, ...] = ("model.", "vector_linear_")
        if config.vision is not None and vision:
            prefixes += ("vision_model.",)
        else:
            config.vision = None
        state = read_safetensors(path, prefix_filter=prefixes)
        if config.vision is not None:  # released layout nests the tower: 'vision_model.vision_model.'
            state = jasper_vision_state(state, str(path))
        if not any(k.startswith("model.") for k in state) and "text_config" not in _read_json(path / "config.json"):
            raise CheckpointError(f"{path}: no 'model.*' keys and no text_config: this looks like a bare Qwen2 "
                                  f"(stella-layout) checkpoint; use JasperModel.from_stella({str(src)!r})")
        heads_in_ckpt = sorted({int(k.split(".")[0].rsplit("_", 1)[1]) for k in state
                                if k.startswith("vector_linear_")}, reverse=True)
        if "head_dims" not in _read_json(path / "config.json") and heads_in_ckpt:
            config.head_dims = tuple(heads_in_ckpt)  # released config may not list them: take them from the keys
        if max_length:
            config.max_length = max_length
        model = cls._build_meta(config, dtype)
        load_state_strict(model, state, prefix="", what=f"JasperModel from {path}")
        model = model.to(device)
        if (path / "tokenizer.json").is_file():
            model.tokenizer = TextTokenizer.from_pretrained(path, max_length=config.max_length)
            model._check_tokenizer(str(path))
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
        img_ids = (tokenizer.image_token_ids if tokenizer is not None else None) or (151646, 151647, 151648)
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
        # heads
        g = torch.Generator().manual_seed(seed)
        dense = stella_dense_folders(path)
        model.init_report = {}
        H = text.hidden_size
        for D in config.head_dims:
            src_d = D if D in dense else min((d for d in dense if d > D), default=None)
            if src_d is not None:
                w, b = _read_dense_folder(dense[src_d])
                if w.shape[1] != H:
                    raise CheckpointError(f"{dense[src_d]}: in_features {w.shape[1]} != hidden {H}")
                w, b = w[:D].clone(), (b[:D].clone() if b is not None else torch.zeros(D))
                how = dense[src_d].name if src_d == D else f"first {D} rows of {dense[src_d].name}"
            else:
                lin = nn.Linear(H, D)  # fresh, torch's default init (kaiming-uniform weight, uniform bias)
                with torch.no_grad():
                    bound = 1 / math.sqrt(H)
                    lin.weight.uniform_(-bound, bound, generator=g)
                    lin.bias.uniform_(-bound, bound, generator=g)
                w, b, how = lin.weight.data, lin.bias.data, "fresh init"
            load_state_strict(model.head(D), {"weight": w, "bias": b}, what=f"head vector_linear_{D}")
            model.init_report[D] = how
        if model.vision_model is not None and vision_src is not None:
            model.vision_model.load_checkpoint(vision_src)  # strict, under the detected prefix
            model.init_report["vision"] = str(vision_src)
        elif model.vision_model is not None and any(p.is_meta for p in model.vision_model.parameters()):
            model.vision_model.to_empty(device="cpu")
            if hasattr(model.vision_model, "init_weights"):
                model.vision_model.init_weights()
        model = model.to(device)
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer: TextTokenizer | None = None,
                        state_dict: dict[str, Tensor] | None = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
        """HF layout (config.json, model.safetensors or shards + index, tokenizer.json), written atomically: into a
        temporary sibling directory that is renamed over `out_dir` only when complete. `state_dict` lets a
        distributed trainer pass the gathered full state dict."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        tokenizer = tokenizer or self.tokenizer
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2))
            shards: list[dict[str, Tensor]] = [{}]
            size = 0
            for k, v in state.items():
                nbytes = v.numel() * v.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][k] = v
                size += nbytes
            if len(shards) == 1:
                save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, sh in enumerate(shards):
                    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(sh, str(tmp / name), metadata={"format": "pt"})
                    weight_map.update({k: name for k in sh})
                total = sum(v.numel() * v.element_size() for v in state.values())
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            if tokenizer is not None:
                tokenizer.save(tmp)
            old = None
            if out_dir.exists():
                old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out_dir
