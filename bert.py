"""The BERT encoder body, written directly in torch: the Transformer module of the BERT-family sentence-transformers
teachers (all-MiniLM-L6-v2, the demo's teacher; bge-*-en-v1.5, e5; arXiv 2412.19048 sec. 2.2 uses larger teachers,
the demo a small one). One concern: config, modules and strict loading of a Hugging Face BERT folder.

It sits in its own flat file, as vision.py holds SigLIP, because it is a model body rather than a teacher: teachers.py
wires it into the sentence-transformers pipeline (Pooling, Dense, Normalize) beside the Qwen2 / Qwen3 / Mistral body
of model.py, and stays a file about teachers. Module attribute names equal the Hugging Face checkpoint keys
(`embeddings.*`, `encoder.layer.N.attention.self.query.weight`, ...), so weights load key for key with a strict check
(checkpoints.load_state_strict); parity with transformers' BertModel: tests/test_teachers.py, tests/test_packing.py.
Design notes: docs/teachers.md.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoints import load_state_strict, read_json, read_weights
from errors import TeacherError
from packing import Packed


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT config.json that change the computation; the others are ignored."""
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512  # rows of the absolute position table: the longest text it can encode
    type_vocab_size: int = 2            # segment embeddings; sentence embedding uses segment 0 only
    layer_norm_eps: float = 1e-12       # BERT's value; a wrong eps shifts every vector slightly, so it is read
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    model_type = "bert"  # a class attribute (not a field): JasperModel tells its two body kinds apart by it

    @classmethod
    def from_hf(cls, cfg: dict | str | os.PathLike, error: type[Exception] = TeacherError) -> "BertConfig":
        """From a Hugging Face config.json (dict or file). `error`: the class raised (a teacher's config gives
        TeacherError, the student's CheckpointError)."""
        where = "config dict"
        if not isinstance(cfg, dict):
            where = str(cfg)
            cfg = read_json(Path(cfg), error=error)
        mt = cfg.get("model_type")
        if mt != "bert":
            raise error(f"{where}: model_type {mt!r} is not supported by the BERT body (needs 'bert')")
        # relative-key position variants would need other attention modules: refused, not silently approximated
        pet = cfg.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise error(f"{where}: position_embedding_type {pet!r} not supported (only 'absolute')")
        if cfg.get("hidden_act", "gelu") not in _BERT_ACTS:
            raise error(f"{where}: hidden_act {cfg.get('hidden_act')!r} not supported ({sorted(_BERT_ACTS)})")
        if cfg.get("hidden_size", 0) % max(1, cfg.get("num_attention_heads", 1)):
            raise error(f"{where}: hidden_size {cfg.get('hidden_size')} is not a multiple of num_attention_heads "
                        f"{cfg.get('num_attention_heads')}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def to_hf(self) -> dict:
        """A config.json that transformers' BertModel (AutoModel) builds the same encoder from."""
        return {"architectures": ["BertModel"], "model_type": "bert", **dataclasses.asdict(self),
                "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}


_BERT_ACTS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, HF "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        T = input_ids.shape[1]
        # single-segment input: token_type_ids are all 0, positions 0..T-1 (absolute), or for packed rows each
        # token's position within its own text (Packed.position_ids, (R, L))
        pos = self.position_embeddings.weight[:T] if position_ids is None else self.position_embeddings(position_ids)
        x = self.word_embeddings(input_ids) + pos + self.token_type_embeddings.weight[0]  # (B, T, H)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, H = x.shape
        # one fused (H -> 3H) matmul instead of three; the concatenated weight is built once per frozen module
        w, b = self._fused()
        qkv = F.linear(x, w, b).view(B, T, 3, self.n_head, H // self.n_head)  # (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd), scale 1/sqrt(hd)
        return y.transpose(1, 2).reshape(B, T, H)

    def _fused(self) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and self.query.weight.requires_grad:  # training: no stale cache
            return (torch.cat([self.query.weight, self.key.weight, self.value.weight]),
                    torch.cat([self.query.bias, self.key.bias, self.value.bias]))
        # storage, device, dtype and the in-place version counter: a reload, .to() or in-place update of the
        # weights builds the (3H, H) concatenation again instead of reusing a stale one
        key = (self.query.weight.data_ptr(), self.key.weight.data_ptr(), self.value.weight.data_ptr(),
               self.query.weight.device, self.query.weight.dtype, self.query.weight._version)
        if getattr(self, "_fused_key", None) != key:
            with torch.no_grad():
                self._fused_wb = (torch.cat([self.query.weight, self.key.weight, self.value.weight]),
                                  torch.cat([self.query.bias, self.key.bias, self.value.bias]))
            self._fused_key = key
        return self._fused_wb


class BertSelfOutput(nn.Module):  # attention.output
    # parameters only (keys attention.output.dense / .LayerNorm); BertLayer.forward applies them, post-LN
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        setattr(self, "self", BertSelfAttention(c))  # key name `attention.self.{query,key,value}`
        self.output = BertSelfOutput(c)


class BertIntermediate(nn.Module):
    # intermediate.dense: (B, T, H) -> (B, T, I); the activation (config hidden_act) is applied in BertLayer
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)
        self.act = _BERT_ACTS[c.hidden_act]

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        att = self.attention
        a = getattr(att, "self")(x, mask)  # (B, T, H)
        x = att.output.LayerNorm(att.output.dense(a) + x)  # post-LN residual
        h = self.act(self.intermediate.dense(x))  # (B, T, I)
        return self.output.LayerNorm(self.output.dense(h) + x)


class BertEncoderStack(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class BertModel(nn.Module):
    """BERT encoder: keys `embeddings.*`, `encoder.layer.N.*` (the pooler is not used by sentence embeddings).
    Also the body of a BERT-family student (model.JasperModel; docs/model.md "A BERT-family student")."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoderStack(config)

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks under the name the decoder body uses (model.Qwen2Encoder.layers), so the trainer's
        per-stage trainable sets, activation checkpointing and per-block FSDP2 treat both bodies alike. A property:
        the checkpoint keys stay `encoder.layer.N.*`."""
        return self.encoder.layer

    def keep_layers(self, keep: list[int]) -> None:
        """Keep only these blocks, in this order (a student cut from a deeper model: export.py init-student)."""
        self.encoder.layer = nn.ModuleList(self.encoder.layer[i] for i in keep)
        self.config = dataclasses.replace(self.config, num_hidden_layers=len(keep))

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                packed: Packed | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = pad -> last hidden state (B, T, H); or `packed`
        texts (packing.py) -> (R, L, H) with per-text positions and block-diagonal attention."""
        mask = None
        if packed is not None:
            x = self.embeddings(packed.input_ids, packed.position_ids)
            mask = packed.attention_mask(causal=False)  # (R, 1, L, L) True = same text
        else:
            x = self.embeddings(input_ids)
            if attention_mask is not None and not bool(attention_mask.all()):
                mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T) True = attend; keys only
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def load_bert_body(body_dir: Path, dtype: torch.dtype = torch.float32,
                   error: type[Exception] = TeacherError) -> BertModel:
    """A BERT encoder from a Hugging Face folder (bare BertModel keys, or under a `bert.` wrapper prefix), strict."""
    cfg = BertConfig.from_hf(body_dir / "config.json", error)
    with torch.device("meta"):  # no random init of weights replaced at once (load_state_strict assigns them)
        module = BertModel(cfg).to(dtype)
    state = read_weights(body_dir)  # model.safetensors, or an older folder's pytorch_model.bin
    # a task wrapper (BertForMaskedLM, ...) saves the body under `bert.`; a bare BertModel has no prefix
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
    # The pooler (`pooler.dense`) and the legacy `embeddings.position_ids` buffer are not used by sentence
    # embeddings; every other key must match exactly.
    state = {k: v for k, v in state.items() if k.startswith(prefix) and not k[len(prefix):].startswith(
        ("pooler.", "embeddings.position_ids"))}
    load_state_strict(module, state, prefix=prefix, what=f"BERT encoder from {body_dir}")
    return module
