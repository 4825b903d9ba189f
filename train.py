"""Train the Jasper student (arXiv 2412.19048): the four distillation stages of sec. 3.1 under torchrun + FSDP2.

    python train.py --stage 1 --init STELLA_DIR --texts DATA/texts.jsonl --teacher-cache CACHE --out runs/s1
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/s1/final --texts ... --teacher-cache ... --out runs/s2
    python train.py --help                      # every flag, with the paper's per-stage defaults

Read top to bottom, one optimizer step is:
  config -> distributed setup -> student model -> trainable set of the stage -> (activation checkpointing) ->
  FSDP2 fully_shard per transformer block, then the root -> AdamW + warmup/cosine -> data batch (this rank's share
  of the global batch, in micro-batches) -> teacher targets (cache, verified row by row; or teachers on the fly) ->
  student vectors of the rank's share -> all-gather of the GLOBAL batch (student: with gradients, teacher: without)
  -> losses.distill_loss(stage, ...) -> backward -> clip -> step -> log / checkpoint.

Gradient convention (README, training: "The global batch"): every rank computes the SAME loss L on the
gathered global batch. all_gather_single_autograd's backward sums the W ranks' (identical) gradients for the
rank's own rows, giving W * dL/ds_local; FSDP's reduce-scatter then averages over the W ranks, so each parameter's
gradient is exactly dL/dtheta of single-process training on the concatenated global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed._composable import checkpoint as checkpoint_block  # keeps parameter names (checkpoints load)
from torch.distributed._functional_collectives import all_gather_single_autograd, all_gather_tensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import losses
from checkpoints import atomic_write, checkpoint_keys, fmt_duration, read_json, resolve_checkpoint
from data import DataError, ImageBatches, TrainLoader, text_hash
from eval import load_encoder, quick_eval
from model import JasperModel
from teacher_cache import TeacherCache, read_cache_input
from teachers import MultiTeacher, load_teacher
from vision import SiglipVisionEncoder

# ======================================================================================================================
# 1. Config: one dataclass; every field is a CLI flag (`--field-name`) or a key of `--config file.json`.
#    Precedence (low -> high): dataclass default / per-stage default (sec. 3.1) < a caller's defaults (demo.py) <
#    --config file < CLI flags.
# ======================================================================================================================

# Paper sec. 3.1 (the stage table): global batch, peak lr, optimizer steps per stage.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(batch=128, lr=1e-4, steps=4000),  # distillation: FC1 only
    2: dict(batch=128, lr=8e-5, steps=7000),  # distillation: FC1 + last 3 encoder layers
    3: dict(batch=128, lr=7e-5, steps=2200),  # dimension reduction: all parameters, FC2-4 join the losses
    4: dict(batch=90, lr=1e-4, steps=3500),   # multimodal: vision encoder only, frozen text side is the teacher
}


def _f(default, help, **kw):
    if isinstance(default, list):  # mutable default -> default_factory
        return field(default_factory=lambda: list(default), metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    # --- what to train
    stage: int = _f(1, "training stage 1-4 (paper sec. 3.1): 1 = FC1; 2 = FC1 + last 3 encoder layers; "
                       "3 = all text parameters + FC2-4; 4 = vision encoder only", choices=[1, 2, 3, 4])
    init: str | None = _f(None, "student init: a Jasper-layout dir (our export of stage K-1, or a released Jasper) "
                                "or, for stage 1, a stella dir (qwen2 body + 2_Dense_*); see --init-format")
    init_format: str = _f("auto", "how to read --init: 'stella' (JasperModel.from_stella: a body checkpoint such as "
                                  "stella, Qwen3-Embedding or a plain Qwen2/Qwen3 LM, heads from its 2_Dense_* "
                                  "folders or fresh), 'jasper' (JasperModel.from_pretrained) or 'auto' (jasper when "
                                  "the checkpoint has vector_linear_* heads, else stella)",
                          choices=["auto", "stella", "jasper"])
    vision_init: str | None = _f(None, "SigLIP checkpoint dir for the vision tower when --init has none (the paper's "
                                       "student: stella text side + SigLIP so400m-patch14-384 vision side)")
    out: str | None = _f(None, "output dir (default runs/stageN): metrics.jsonl, config.json, checkpoints/, final/ "
                               "(the HF-layout export)")
    # --- data and targets
    texts: str | None = _f(None, "stages 1-3: texts.jsonl written by `python data.py build` (row i == cache row i)")
    teacher_cache: str | None = _f(None, "stages 1-3: teacher cache dir (`python teachers.py encode ...`); rows are "
                                         "verified against texts.jsonl by (row, hash) on every batch. Default source")
    teacher: list[str] = _f([], "stages 1-3, small runs: teacher spec(s) run on the fly instead of "
                                                 "a cache (several -> normalise, concatenate, normalise)")
    images: str | None = _f(None, "stage 4: image-caption jsonl/parquet for data.ImageCaptionDataset")
    image_size: int = _f(384, "stage 4: image side in pixels (SigLIP so400m: 384)")
    num_workers: int = _f(2, "stage 4: DataLoader workers decoding images")
    max_length: int = _f(512, "max tokens per text (paper: 512)")
    # --- optimisation (None -> the stage's default from STAGE_DEFAULTS)
    batch: int | None = _f(None, "GLOBAL batch (texts per optimizer step, all ranks together; paper 128/128/128/90); "
                                 "the in-batch losses see all of it")
    micro_batch: int = _f(16, "rows per forward pass on one rank (memory knob; does not change the maths)")
    lr: float | None = _f(None, "peak learning rate (paper 1e-4/8e-5/7e-5/1e-4)")
    steps: int | None = _f(None, "optimizer steps (paper 4000/7000/2200/3500)")
    warmup_ratio: float = _f(0.05, "linear warmup over this fraction of the steps, then cosine decay (authors' code)")
    min_lr_ratio: float = _f(0.0, "cosine decays to lr * min_lr_ratio")
    weight_decay: float = _f(0.01, "AdamW weight decay (authors' code: 0.01; never on biases or norms)")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW eps")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    # --- losses (paper eq. 1-4)
    loss_weights: list[float] = _f([10.0, 200.0, 20.0], "lambda1 (cosine), lambda2 (similarity), lambda3 (relative "
                                                        "similarity) of eq. 4")
    margin: float = _f(0.015, "relative-similarity margin of eq. 3")
    mrl_teacher: str = _f("teacher", "stage 3: targets of FC2-4's similarity and relative-similarity losses: the "
                                     "teacher (paper's recipe) or 'self' = FC1's own vectors of the same forward "
                                     "pass, detached (the proposal closing sec. 2.4); FC1 always learns from the "
                                     "teacher", choices=["teacher", "self"])
    # --- systems
    dtype: str = _f("bf16", "bf16: FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32) (autocast bf16 in a plain "
                            "single process); fp32: everything fp32", choices=["bf16", "fp32"])
    device: str = _f("auto", "auto (cuda if available), cpu or cuda", choices=["auto", "cpu", "cuda"])
    activation_checkpointing: bool = _f(False, "recompute each transformer block in backward (saves memory)")
    seed: int = _f(0, "seed for the data order and anything random")
    # --- logging, checkpoints, export
    log_every: int = _f(10, "print a progress line every N steps (metrics.jsonl gets every step)")
    ckpt_every: int = _f(500, "checkpoint every N steps (0 = only at the end)")
    keep_ckpts: int = _f(2, "keep the last N checkpoints")
    stop_at: int | None = _f(None, "end this run after this step (with a checkpoint) without changing the schedule; "
                                   "continue later with --resume (preemptible jobs, time-boxed runs)")
    resume: bool = _f(False, "continue from OUT/checkpoints/latest (exactly: same losses as an uninterrupted run); "
                             "starts at step 0 when OUT has no checkpoint yet")
    export: bool = _f(True, "export the final model in HF layout to OUT/final (config.json, safetensors, tokenizer)")
    eval_data: str | None = _f(None, "after the export, quick STSBenchmark-dev score of the final model (eval.py) "
                                     "with this shared data dir; empty = skip")
    config: str | None = _f(None, "JSON file of config values (keys = field names); CLI flags override it")

    def __post_init__(self):
        if self.mrl_teacher not in ("teacher", "self"):
            raise SystemExit(f"train.py: --mrl-teacher must be 'teacher' or 'self', got {self.mrl_teacher!r}")
        if self.out is None:
            self.out = f"runs/stage{self.stage}"
        for k, v in STAGE_DEFAULTS[self.stage].items():  # per-stage defaults (sec. 3.1) for fields left unset
            if getattr(self, k) is None:
                setattr(self, k, v)


def build_parser(prog: str | None = None, description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # SUPPRESS: given flags only
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = dict(help=f.metadata["help"])
        shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in STAGE_DEFAULTS[1]:
            shown = "per stage " + "/".join(str(STAGE_DEFAULTS[s][f.name]) for s in (1, 2, 3, 4))
        kw["help"] += f" (default: {shown})" if shown is not None else ""
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("list"):
            kw["nargs"] = "+"
            kw["type"] = float if "float" in t else str
        else:
            kw["type"] = int if t.startswith("int") else float if t.startswith("float") else str
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(flag, dest=f.name, **kw)
    return p


def parse_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str | None = None,
                 description: str = __doc__) -> TrainConfig:
    """The config of one run: `defaults` (demo.py's values) < --config file < the flags given in argv."""
    given = vars(build_parser(prog, description).parse_args(argv))  # only the flags actually given
    values: dict[str, Any] = dict(defaults or {})
    if given.get("config"):
        values.update(_read_json_config(given["config"]))
    values.update(given)
    return TrainConfig(**values)


class _ConfigFileError(Exception):
    pass


def _read_json_config(path: str) -> dict[str, Any]:
    try:
        raw = read_json(path, "--config file", error=_ConfigFileError)
    except _ConfigFileError as e:
        raise SystemExit(f"train.py: cannot read --config {path}: {e}") from None
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        k2 = k.replace("-", "_")
        if k2 not in names:
            raise SystemExit(f"train.py: --config {path}: unknown key {k!r} (known: {sorted(names)})")
        out[k2] = v
    return out


# ======================================================================================================================
# 2. Distributed setup: torchrun env -> one process group (nccl on GPUs, gloo on CPUs) and a 1-D device mesh for FSDP2;
#    without torchrun a plain single process (no process group, no FSDP; bf16 through autocast).
# ======================================================================================================================

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh when under torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.mesh is not None:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `python train.py`
        return Dist(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,))
    return Dist(rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu"), mesh)


def gather_global(x: torch.Tensor, d: Dist, grad: bool, equal: bool = True) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (b, D) -> (sum of b, D). With grad=True the backward returns to
    each rank the SUM over ranks of the gradient w.r.t. its rows (see the module docstring for why that is exact).
    equal=False allows shares of different sizes (stage 4 drops broken images): pad to the largest, gather, unpad."""
    if d.mesh is None:
        return x
    sizes = None
    if not equal:
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = all_gather_tensor(n, 0, d.mesh).tolist()  # (W,)
        x = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])])
    if grad:
        y = all_gather_single_autograd(x.contiguous(), 0, d.mesh)
    else:
        with torch.no_grad():
            y = all_gather_tensor(x.detach().contiguous(), 0, d.mesh)
    if sizes is not None:
        m = max(sizes)
        y = torch.cat([y[r * m:r * m + n] for r, n in enumerate(sizes)])
    return y


def all_sum(v: float, d: Dist) -> float:
    if d.mesh is None:
        return v
    t = torch.tensor([float(v)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item()


# ======================================================================================================================
# 3. Student model and the trainable set of each stage.
# ======================================================================================================================

def load_student(cfg: TrainConfig) -> JasperModel:
    if not cfg.init:
        raise SystemExit("train.py: --init is required (stage 1: a stella or Jasper dir; stage K: stage K-1's "
                         "OUT/final)")
    src = resolve_checkpoint(cfg.init)
    fmt = init_format_of(src) if cfg.init_format == "auto" else cfg.init_format
    model = JasperModel.from_stella(src) if fmt == "stella" else JasperModel.from_pretrained(src)
    if cfg.vision_init:
        if model.vision_model is not None:
            raise SystemExit(f"train.py: --init {src} already has a vision tower; drop --vision-init")
        model.vision_model = SiglipVisionEncoder.from_pretrained(cfg.vision_init)
        model.config.vision = model.vision_model.config
    if model.tokenizer is None:
        raise SystemExit(f"train.py: --init {src} has no tokenizer.json")
    return model


def init_format_of(src: Path) -> str:
    """'jasper' when the checkpoint holds the student's heads (`vector_linear_*` keys: our exports, the released
    Jasper), else 'stella': a body to start from (stella, Qwen3-Embedding, a Qwen2/Qwen3 LM) with heads taken from
    its 2_Dense_* folders where present and fresh otherwise. Only key names are read."""
    return "jasper" if any(k.startswith("vector_linear_") for k in checkpoint_keys(src)) else "stella"


def head_dims(model) -> list[int]:
    return list(model.config.head_dims)


def set_trainable(model, stage: int) -> list[str]:
    """Freeze everything, then unfreeze the stage's set (sec. 3.1). Returns the trainable parameter names."""
    model.requires_grad_(False)
    fc1 = getattr(model, f"vector_linear_{head_dims(model)[0]}")
    if stage == 1:
        train = [fc1]
    elif stage == 2:
        train = [fc1, *model.model.layers[-3:]]  # the last 3 decoder layers (the final RMSNorm is not a layer)
    elif stage == 3:
        # "all parameters": the whole text side and the four heads. The vision tower (if present) gets no gradient
        # from text-only batches, so it stays frozen (and gets no optimizer state).
        train = [model.model] + [getattr(model, f"vector_linear_{D}") for D in head_dims(model)]
    elif stage == 4:
        if model.vision_model is None:
            raise SystemExit("train.py: stage 4 needs a student with a vision tower (JasperConfig.vision)")
        train = [model.vision_model]
    else:
        raise ValueError(stage)
    for m in train:
        m.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def transformer_blocks(model) -> list[nn.Module]:
    blocks = list(model.model.layers)
    if getattr(model, "vision_model", None) is not None:
        blocks += list(model.vision_model.encoder.layers)
    return blocks


def shard_model(model, cfg: TrainConfig, d: Dist):
    """Activation checkpointing (optional), then FSDP2: fully_shard each transformer block, then the root."""
    if cfg.activation_checkpointing:
        for block in transformer_blocks(model):
            checkpoint_block(block)
    if d.mesh is None:
        return model.to(d.device)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.dtype == "bf16"
          else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)  # the root: embeddings, final norm, heads
    return model


# ======================================================================================================================
# 4. Optimizer and schedule: AdamW over trainable parameters only (frozen ones get no state), no decay on biases and
#    norms (ndim < 2), linear warmup then cosine (authors' code).
# ======================================================================================================================

def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    warm = max(1, round(cfg.warmup_ratio * cfg.steps)) if cfg.warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ======================================================================================================================
# 5. Data and teacher targets.
# ======================================================================================================================

class TextTargets:
    """Teacher targets for a text batch: the cache (default; rows verified by (row, hash) in TeacherCache.targets)
    or teachers run on the fly on the batch's texts (small runs)."""

    def __init__(self, cfg: TrainConfig):
        self.cache = self.teacher = None
        if cfg.teacher_cache and cfg.teacher:
            raise SystemExit("train.py: give --teacher-cache OR --teacher (on the fly), not both")
        if cfg.teacher_cache:
            self.cache = TeacherCache(cfg.teacher_cache)
            self.dim = self.cache.dim
        elif cfg.teacher:
            ts = [load_teacher(s) for s in cfg.teacher]
            self.teacher = ts[0] if len(ts) == 1 else MultiTeacher(ts)
            self.dim = self.teacher.dim
            self.texts, _ = read_cache_input(cfg.texts)  # row i = texts.jsonl row i, ids and hashes checked
            self.batch_size = cfg.micro_batch
        else:
            raise SystemExit("train.py: stages 1-3 need --teacher-cache DIR (or --teacher SPEC for small runs)")

    def __call__(self, rows: torch.Tensor, hashes: list[str]) -> torch.Tensor:  # -> (b, dim) fp32, L2-normalised
        if self.cache is not None:
            return self.cache.targets(rows, hashes)
        texts = [self.texts[int(r)] for r in rows]
        for r, t, h in zip(rows.tolist(), texts, hashes):
            if text_hash(t) != h:
                raise RuntimeError(f"train.py: texts row {r} has hash {text_hash(t)} but the batch says {h}")
        t = self.teacher.encode(texts, batch_size=self.batch_size, show_progress=False)  # may be an inference tensor
        return t.float().clone()  # a normal tensor: autograd may save it for the loss' backward


def build_text_loader(cfg: TrainConfig, tokenizer, d: Dist) -> TrainLoader:
    if not cfg.texts:
        raise SystemExit("train.py: stages 1-3 need --texts texts.jsonl (`python data.py build --out DIR`)")
    return TrainLoader(cfg.texts, tokenizer, global_batch=cfg.batch, max_length=cfg.max_length, seed=cfg.seed,
                         rank=d.rank, world_size=d.world_size, micro_batch=cfg.micro_batch)


def build_image_loader(cfg: TrainConfig, tokenizer, d: Dist) -> ImageBatches:
    """Stage 4: this rank's share of uniform random global batches of image-caption pairs (data.ImageBatches)."""
    if not cfg.images:
        raise SystemExit("train.py: stage 4 needs --images (image-caption jsonl/parquet)")
    try:
        return ImageBatches(cfg.images, tokenizer, cfg.batch, cfg.max_length, cfg.seed, d.rank, d.world_size,
                            image_size=cfg.image_size, num_workers=cfg.num_workers)
    except DataError as e:
        raise SystemExit(f"train.py: {e}") from None


# ======================================================================================================================
# 6. Checkpoints: torch.distributed.checkpoint (DCP) of the sharded model + optimizer (each rank writes its own
#    shards in parallel; no rank ever materialises the full state), plus per-rank trainer state (step, scheduler,
#    data-loader position, RNG). Written into step_N.tmp/, renamed to step_N/ when every rank is done, then the
#    `latest` pointer is replaced atomically: a kill at any moment leaves the previous checkpoint usable.
# ======================================================================================================================

def rng_state() -> dict:
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckdir: Path, step: int, model, opt, sched, loader, cfg: TrainConfig, d: Dist):
    final, tmp = ckdir / f"step_{step:08d}", ckdir / f"step_{step:08d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended without torchrun
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(dict(step=step, scheduler=sched.state_dict(), loader=loader.state_dict(), rng=rng_state(),
                    world_size=d.world_size, config=dataclasses.asdict(cfg)), tmp / f"trainer_rank{d.rank}.pt")
    d.barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(ckdir / "latest", final.name + "\n")
        done = sorted(p for p in ckdir.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[:-cfg.keep_ckpts] if cfg.keep_ckpts > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def load_checkpoint(ckdir: Path, model, opt, sched, loader, cfg: TrainConfig, d: Dist) -> int:
    pointer = ckdir / "latest"
    if not pointer.exists():
        raise SystemExit(f"train.py: --resume but no checkpoint pointer {pointer}")
    path = ckdir / pointer.read_text().strip()
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    ts = torch.load(path / f"trainer_rank{d.rank}.pt", weights_only=False)
    if ts["world_size"] != d.world_size:
        raise SystemExit(f"train.py: checkpoint {path} was written by {ts['world_size']} ranks, this run has "
                         f"{d.world_size}: data shares and RNG streams would differ (exact resume needs the same)")
    saved, now = ts["config"], dataclasses.asdict(cfg)
    for k in ("stage", "batch", "seed", "steps"):  # these define the run: a different value is a different run
        if saved.get(k) != now[k]:
            raise SystemExit(f"train.py: checkpoint {path} is of a run with {k}={saved.get(k)!r}, this run has "
                             f"{k}={now[k]!r}: use another --out for a different run")
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]
               and k not in ("resume", "stop_at", "config")}
    if changed and d.main:
        print(f"train.py: resuming with changed settings (saved -> now): {changed}", flush=True)
    sched.load_state_dict(ts["scheduler"])
    loader.load_state_dict(ts["loader"])
    set_rng_state(ts["rng"])
    return int(ts["step"])


def export_final(model, tokenizer, out_dir: Path, d: Dist):
    """Gather the full (unsharded) state dict and write the HF layout via JasperModel.save_pretrained (rank 0)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        model.save_pretrained(out_dir, tokenizer=tokenizer, state_dict=full)  # atomic (tmp dir, then rename)
    d.barrier()


# ======================================================================================================================
# 7. Logging.
# ======================================================================================================================

class Logger:
    def __init__(self, out: Path, d: Dist, resume_step: int | None):
        self.path, self.main = out / "metrics.jsonl", d.main
        if self.main and resume_step is not None and self.path.exists():
            # drop the lines a killed run wrote after its last checkpoint: the resumed run writes them again
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(k + "\n" for k in keep))
        elif self.main and resume_step is None and self.path.exists():
            self.path.unlink()

    def metrics(self, rec: dict):
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def print(self, msg: str):
        if self.main:
            print(msg, flush=True)


# ======================================================================================================================
# 8. The training loop, as named steps: set-up (output folder, seeds) -> state (model, optimizer, data, targets,
#    resume) -> per step: one optimizer step -> logging -> checkpoint -> at the end: export (+ a quick score).
# ======================================================================================================================

def train(cfg: TrainConfig) -> dict:
    """Run one stage. Returns a summary dict (last step, last loss, export dir)."""
    if cfg.mrl_teacher == "self" and cfg.stage != 3:  # checked here, not at parsing: demo.py passes it to stage 3
        raise SystemExit(f"train.py: --mrl-teacher self applies to stage 3 (FC2-4 learn from FC1), not stage "
                         f"{cfg.stage}")
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d)
    finally:
        if d.mesh is not None:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist) -> dict:
    run = build_state(cfg, d, *set_up(cfg, d))
    resume_or_start(run)
    data_iter = iter(run.loader)
    while run.step < run.end:
        loss_val, parts, gnorm, lr_now, n_tokens = optimizer_step(run, next(data_iter))
        log_step(run, loss_val, parts, gnorm, lr_now, n_tokens)
        if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or run.step == run.end:
            run.last_ckpt = str(save_checkpoint(run.ckdir, run.step, run.model, run.opt, run.sched, run.loader,
                                                cfg, d))
            run.log.print(f"checkpoint {run.last_ckpt}")
    return finish(run)


def set_up(cfg: TrainConfig, d: Dist) -> tuple[Path, Path]:
    """The output folder (refusing to overwrite another run's checkpoints), its config.json, and the seeds."""
    if cfg.batch % d.world_size:
        raise SystemExit(f"train.py: --batch {cfg.batch} is not divisible by the {d.world_size} ranks")
    out = Path(cfg.out)
    ckdir = out / "checkpoints"
    if not cfg.resume and (ckdir / "latest").exists():
        raise SystemExit(f"train.py: {out} already holds checkpoints of a run: --resume to continue it, or choose "
                         f"another --out (refusing to overwrite it)")
    if d.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    d.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    return out, ckdir


@dataclass
class RunState:
    """What the loop reads and updates: the sharded model, optimizer and schedule, the batch source and the teacher
    targets, the heads that enter the losses, and the position (step, last checkpoint)."""
    cfg: TrainConfig
    d: Dist
    out: Path
    ckdir: Path
    model: Any
    tokenizer: Any
    opt: torch.optim.Optimizer
    sched: Any
    train_params: list[torch.Tensor]
    loader: Any                      # data.TrainLoader (stages 1-3) or data.ImageBatches (stage 4)
    targets: TextTargets | None      # stages 1-3
    heads: list[int]                 # FC1 alone in stages 1-2, every head from stage 3 on (sec. 3.1)
    autocast: Any
    n_train: int
    n_all: int
    n_tensors: int
    step: int = 0
    end: int = 0
    loss: float = float("nan")
    last_ckpt: str | None = None
    log: Logger | None = None
    clock: Any = None


def build_state(cfg: TrainConfig, d: Dist, out: Path, ckdir: Path) -> RunState:
    """Student, trainable set, FSDP2 sharding, AdamW + schedule, then the batch source and the teacher targets."""
    model = load_student(cfg)
    tokenizer = model.tokenizer
    trainable = set_trainable(model, cfg.stage)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    dims = head_dims(model)
    model = shard_model(model, cfg, d)
    model.train()
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    train_params = [p for p in model.parameters() if p.requires_grad]
    targets = None
    if cfg.stage <= 3:
        loader = build_text_loader(cfg, tokenizer, d)
        targets = TextTargets(cfg)  # every batch's rows are verified against the cache by (row, hash)
        if targets.dim != dims[0]:
            raise SystemExit(f"train.py: teacher dim {targets.dim} != FC1 dim {dims[0]} of the student "
                             f"(heads {dims}); the cosine loss of eq. 1 needs them equal")
        if cfg.mrl_teacher == "self" and len(dims) < 2:
            raise SystemExit(f"train.py: --mrl-teacher self needs heads shorter than FC1 to teach; the student "
                             f"has only {dims}")
    else:
        loader = build_image_loader(cfg, tokenizer, d)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bf16" and d.mesh is None)  # FSDP runs use the MP policy
    return RunState(cfg, d, out, ckdir, model, tokenizer, opt, sched, train_params, loader, targets,
                    heads=dims[:1] if cfg.stage <= 2 else dims, autocast=autocast, n_train=n_train, n_all=n_all,
                    n_tensors=len(trainable), end=min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps)


def resume_or_start(run: RunState) -> None:
    """Continue from OUT/checkpoints/latest with --resume (a fresh --out starts at step 0, so one command line
    serves every restart of a preempted job), open the metrics log and print the run's header."""
    cfg, d, ckdir = run.cfg, run.d, run.ckdir
    resuming = cfg.resume and (ckdir / "latest").exists()
    if resuming:
        run.step = load_checkpoint(ckdir, run.model, run.opt, run.sched, run.loader, cfg, d)
    elif cfg.resume and d.main:
        print(f"train.py: --resume but no checkpoint in {ckdir}: starting at step 0", flush=True)
    run.log = Logger(run.out, d, run.step if resuming else None)
    run.log.print(f"stage {cfg.stage} | {d.world_size} rank(s) on {d.device} | {cfg.dtype} | trainable "
                  f"{run.n_train / 1e6:.2f}M of {run.n_all / 1e6:.2f}M params ({run.n_tensors} tensors) | global "
                  f"batch {cfg.batch} | lr {cfg.lr:g} | steps {cfg.steps}"
                  + (f" | resumed at step {run.step}" if run.step else ""))
    run.last_ckpt = str(ckdir / (ckdir / "latest").read_text().strip()) if (ckdir / "latest").exists() else None
    run.clock = Clock(start_step=run.step)


def global_vectors(run: RunState, batch) -> tuple[dict, Any, int]:
    """Forward this rank's share, then gather the GLOBAL batch: student vectors with gradients, teacher without.
    -> ({D: (B, D)}, teacher (B, Dt) or {D: (B, D)} in stage 4, this rank's real tokens)."""
    cfg, d = run.cfg, run.d
    with run.autocast:
        if cfg.stage <= 3:
            student_local, teacher_local, n_tokens = text_vectors(run.model, batch, run.targets, run.heads, d)
        else:
            student_local, teacher_local, n_tokens = image_vectors(run.model, batch, run.heads, cfg.micro_batch, d)
    eq = cfg.stage <= 3  # text shares are equal; image shares may lose broken images
    student = {D: gather_global(v, d, grad=True, equal=eq) for D, v in student_local.items()}  # (B, D)
    if cfg.stage <= 3:
        teacher = gather_global(teacher_local, d, grad=False)  # (B, Dt)
    else:
        teacher = {D: gather_global(v, d, grad=False, equal=False) for D, v in teacher_local.items()}
    return student, teacher, n_tokens


def optimizer_step(run: RunState, batch) -> tuple[float, dict, float, float, int]:
    """One optimizer step on one global batch: losses (eq. 4 per stage) -> backward -> clip -> AdamW -> schedule.
    A non-finite loss or gradient norm stops the run naming the last good checkpoint."""
    cfg = run.cfg
    student, teacher, n_tokens = global_vectors(run, batch)
    loss, parts = losses.distill_loss(cfg.stage, student, teacher, weights=tuple(cfg.loss_weights),
                                      margin=cfg.margin, mrl_teacher=cfg.mrl_teacher)
    loss_val = loss.item()  # identical on every rank (same gathered inputs, same maths)
    if not math.isfinite(loss_val):
        raise SystemExit(f"train.py: non-finite loss {loss_val} at step {run.step + 1} (parts {parts}); stopping. "
                         f"Last good checkpoint: {run.last_ckpt or 'none'} (resume with --resume, e.g. with a "
                         f"lower --lr)")
    loss.backward()
    gnorm = clip_grad_norm(run.train_params, cfg.grad_clip)
    if not math.isfinite(gnorm):
        raise SystemExit(f"train.py: non-finite gradient norm at step {run.step + 1}; stopping. Last good "
                         f"checkpoint: {run.last_ckpt or 'none'}")
    lr_now = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    return loss_val, parts, gnorm, lr_now, n_tokens


@dataclass
class Clock:
    """Wall time and tokens since the last progress line, for the tok/s rate and the ETA."""
    start_step: int
    t0: float = dataclasses.field(default_factory=time.time)
    tok_window: float = 0.0
    t_window: float = dataclasses.field(default_factory=time.time)


def log_step(run: RunState, loss_val: float, parts: dict, gnorm: float, lr_now: float, n_tokens: int) -> None:
    """metrics.jsonl gets every step (loss parts per head, lr, grad norm, tokens, skips); stdout every log_every."""
    cfg, d, clock, step = run.cfg, run.d, run.clock, run.step
    tokens = all_sum(n_tokens, d)
    clock.tok_window += tokens
    now = time.time()
    rec = dict(step=step, loss=loss_val, **{k: float(v) for k, v in parts.items()}, lr=lr_now, grad_norm=gnorm,
               tokens=int(tokens), elapsed_s=round(now - clock.t0, 3))
    skips = {k: v for k, v in run.loader.skips.items() if v}  # data.py's counts of rows left out
    if cfg.stage == 4:
        broken = int(all_sum(run.loader.broken, d))  # collective: every rank calls it every step
        if broken:
            skips["broken_image"] = broken
    if skips:
        rec["skips"] = skips
    run.log.metrics(rec)
    if step % cfg.log_every == 0 or step == cfg.steps:
        rate = clock.tok_window / max(1e-9, now - clock.t_window)
        eta = (now - clock.t0) / max(1, step - clock.start_step) * (cfg.steps - step)
        comp = " ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k != "total")
        run.log.print(f"step {step}/{cfg.steps} | loss {loss_val:.5g} | {comp} | lr {lr_now:.3g} | gnorm "
                      f"{gnorm:.3g} | {rate:,.0f} tok/s | ETA {fmt_duration(eta)}"
                      + (f" | skips {dict(skips)}" if skips else ""))
        clock.tok_window, clock.t_window = 0.0, now
    run.loss = loss_val


def finish(run: RunState) -> dict:
    """The HF-layout export of a completed stage (and, with --eval-data, its STSBenchmark dev score)."""
    cfg, d, out = run.cfg, run.d, run.out
    summary = dict(step=run.step, loss=run.loss, checkpoint=run.last_ckpt)
    if cfg.export and run.step == cfg.steps:
        export_final(run.model, run.tokenizer, out / "final", d)
        summary["export"] = str(out / "final")
        run.log.print(f"exported {out / 'final'}")
        if cfg.eval_data and d.main:
            score = quick_eval(load_encoder(out / "final"), cfg.eval_data)
            summary["stsb_dev"] = score
            run.log.print(f"STSBenchmark dev spearman {score:.4f}")
    return summary


def text_vectors(model, batch, targets: TextTargets, heads: list[int], d: Dist):
    """Stages 1-3: forward the share micro-batch by micro-batch, keeping every graph (the in-batch losses need the
    whole global batch before any backward). -> ({D: (b, D)}, teacher (b, Dt), real tokens)."""
    teacher = targets(batch.rows, batch.hashes).to(d.device)  # (b, Dt) fp32, rows in the order of the chunks
    outs = [model(ids.to(d.device), mask.to(d.device), dims=heads) for ids, mask in batch.chunks]
    return {D: torch.cat([o[D] for o in outs]).float() for D in heads}, teacher, batch.n_tokens


def image_vectors(model, batch: dict, heads: list[int], micro_batch: int, d: Dist):
    """Stage 4 (sec. 2.5): each caption through the frozen text side (no grad) is the teacher of its image; the
    image enters as <img_start> <img_token> x K <img_end> with the K tokens replaced by pooled vision features.
    -> ({D: (b, D) image vectors}, {D: (b, D) caption vectors}, real caption tokens)."""
    pv, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    prompt = torch.tensor(model.image_prompt_ids(), device=d.device)  # (K + 2,)
    student, teacher = {D: [] for D in heads}, {D: [] for D in heads}
    for s in range(0, pv.shape[0], micro_batch):
        sl = slice(s, s + micro_batch)
        with torch.no_grad():
            cap = model(ids[sl].to(d.device), mask[sl].to(d.device), dims=heads)
        img_ids = prompt[None].expand(pv[sl].shape[0], -1)  # (m, K + 2)
        img = model(img_ids, torch.ones_like(img_ids), pixel_values=pv[sl].to(d.device), dims=heads)
        for D in heads:
            student[D].append(img[D].float())
            teacher[D].append(cap[D].float())
    return ({D: torch.cat(v) for D, v in student.items()}, {D: torch.cat(v) for D, v in teacher.items()},
            batch["n_tokens"])


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm (over all ranks' shards under FSDP), clipped to max_norm when max_norm > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
