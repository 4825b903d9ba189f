"""The tokenizer that feeds every body (model.py's student, teachers.py's teachers): any tokenizer.json (Qwen2
byte-level BPE, BERT WordPiece) through the `tokenizers` library, with instruction prompts, truncation that keeps
the special tokens, and padding (`pad_ids`). The Jasper image tokens of sec. 2.1 are added to a Qwen vocabulary."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import AddedToken, Tokenizer
from torch import Tensor

from checkpoints import CheckpointError


def pad_ids(ids: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None,
            left: bool = False) -> tuple[Tensor, Tensor]:
    """Right-pad (or, `left=True`, left-pad) token id lists to the longest (or `pad_to`): input_ids (B, T) and
    attention_mask (B, T), int64, mask 1 = real token. An empty list still gets one padded slot (T >= 1), so no
    batch has zero width. Left padding is for decoder embedders read at their last position (Qwen3-Embedding)."""
    T = max([len(x) for x in ids] + [pad_to or 0, 1])
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(T - len(x), T) if left else slice(0, len(x))
        input_ids[i, sl] = torch.as_tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return input_ids, mask


JASPER_IMAGE_TOKENS = ("<|jasper_img_start|>", "<|jasper_img_token|>", "<|jasper_img_end|>")  # sec. 2.1


class TextTokenizer:
    """Wraps `tokenizers.Tokenizer`: instruction prompts, truncation (special tokens kept), right padding.

    Queries get "Instruct: {instruction}\\nQuery: " in front (docs/eval.md, "Instructions"); documents get nothing. For a Qwen
    vocabulary the three Jasper image tokens are added when missing: with the Qwen2/stella tokenizer (3 special
    tokens) they get the released ids 151646-151648; with a larger Qwen2.5 vocabulary they get the next free ids, and
    `image_token_ids` says which (JasperModel takes its ids from there).
    """

    def __init__(self, tok, max_length: int = 512, add_image_tokens: bool | None = None, source: str = ""):
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
                   max_length: int | None = None, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text (with the tokenizer's own special tokens, e.g. BERT's [CLS]/[SEP], unless
        add_special_tokens is False: a rendered chat template writes its own), unpadded, truncated to max_length
        tokens in total (the special tokens are kept)."""
        if isinstance(texts, str):
            texts = [texts]
        max_length = max_length or self.max_length
        if self._trunc != max_length:
            self.tok.enable_truncation(max_length)
            self._trunc = max_length
        texts = [self.format(t, instruction) for t in texts]
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        enc = encode(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in enc]

    def pad(self, ids: Sequence[Sequence[int]], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
        """Right-pad to the longest (or `pad_to`): input_ids (B, T), attention_mask (B, T), both int64."""
        return pad_ids(ids, self.pad_id, pad_to)

    def __call__(self, texts: str | Sequence[str], instruction: str | None = None,
                 max_length: int | None = None) -> tuple[Tensor, Tensor]:
        return self.pad(self.encode_ids(texts, instruction, max_length))

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir) / "tokenizer.json"
        self.tok.no_truncation()  # the file carries no per-call truncation state
        self._trunc = None
        self.tok.save(str(out))
        return out
