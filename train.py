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
import torch.nn as nn

from model import atomic_write, fmt_duration

# ======================================================================================================================
# 1. Config: one dataclass; every field is a CLI flag (`--field-name`), a key of `--config file.json` or a preset value.
#    Precedence (low -> high): dataclass default / per-stage default (sec. 3.1) < --preset < --config file < CLI flags.
# ======================================================================================================================

# Paper sec. 3.1 table (REFERENCE.md): global batch, peak lr, optimizer steps per stage.
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
    init_format: str = _f("auto", "how to read --init: 'stella' (JasperModel.from_stella), 'jasper' "
                                  "(JasperModel.from_pretrained) or 'auto' (stella when the dir has modules.json or "
                                  "a 2_Dense_* folder, else jasper)", choices=["auto", "stella", "jasper"])
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
    preset: str | None = _f(None, "a named set of config values plus orchestration (see PRESETS at the end)")
    config: str | None = _f(None, "JSON file of config values (keys = field names); CLI flags override it")

    def __post_init__(self):
        if self.out is None:
            self.out = f"runs/stage{self.stage}"
        for k, v in STAGE_DEFAULTS[self.stage].items():  # per-stage defaults (sec. 3.1) for fields left unset
            if getattr(self, k) is None:
                setattr(self, k, v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # SUPPRESS: we can tell given flags apart
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


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    given = vars(build_parser().parse_args(argv))  # only the flags actually given
    values: dict[str, Any] = {}
    preset = given.get("preset")
    if preset is None and given.get("config"):
        preset = _read_json_config(given["config"]).get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise SystemExit(f"train.py: unknown --preset {preset!r}; known: {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if given.get("config"):
        values.update(_read_json_config(given["config"]))
    values.update(given)
    return TrainConfig(**values)


def _read_json_config(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"train.py: cannot read --config {path}: {e}")
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
    from torch.distributed.device_mesh import init_device_mesh
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
    from torch.distributed._functional_collectives import all_gather_single_autograd, all_gather_tensor
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

def load_student(cfg: TrainConfig):
    import model as M
    if not cfg.init:
        raise SystemExit("train.py: --init is required (stage 1: a stella or Jasper dir; stage K: stage K-1's "
                         "OUT/final)")
    src = M.resolve_checkpoint(cfg.init)
    fmt = cfg.init_format
    if fmt == "auto":
        fmt = "stella" if (src / "modules.json").exists() or any(src.glob("2_Dense*")) else "jasper"
    model = M.JasperModel.from_stella(src) if fmt == "stella" else M.JasperModel.from_pretrained(src)
    if cfg.vision_init:
        if model.vision_model is not None:
            raise SystemExit(f"train.py: --init {src} already has a vision tower; drop --vision-init")
        model.vision_model = M.SiglipVisionEncoder.from_pretrained(cfg.vision_init)
        model.config.vision = model.vision_model.config
    if model.tokenizer is None:
        raise SystemExit(f"train.py: --init {src} has no tokenizer.json")
    return model


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
        from torch.distributed._composable import checkpoint  # composable: keeps parameter names (checkpoints load)
        for block in transformer_blocks(model):
            checkpoint(block)
    if d.mesh is None:
        return model.to(d.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
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
        import teachers as T
        self.cache = self.teacher = None
        if cfg.teacher_cache and cfg.teacher:
            raise SystemExit("train.py: give --teacher-cache OR --teacher (on the fly), not both")
        if cfg.teacher_cache:
            self.cache = T.TeacherCache(cfg.teacher_cache)
            self.dim = self.cache.dim
        elif cfg.teacher:
            ts = [T.load_teacher(s) for s in cfg.teacher]
            self.teacher = ts[0] if len(ts) == 1 else T.MultiTeacher(ts)
            self.dim = self.teacher.dim
            self.texts = [json.loads(line)["text"] for line in open(cfg.texts, encoding="utf-8")]
            self.batch_size = cfg.micro_batch
        else:
            raise SystemExit("train.py: stages 1-3 need --teacher-cache DIR (or --teacher SPEC for small runs)")

    def __call__(self, rows: torch.Tensor, hashes: list[str]) -> torch.Tensor:  # -> (b, dim) fp32, L2-normalised
        if self.cache is not None:
            return self.cache.targets(rows, hashes)
        from data import text_hash
        texts = [self.texts[int(r)] for r in rows]
        for r, t, h in zip(rows.tolist(), texts, hashes):
            if text_hash(t) != h:
                raise RuntimeError(f"train.py: texts row {r} has hash {text_hash(t)} but the batch says {h}")
        t = self.teacher.encode(texts, batch_size=self.batch_size, show_progress=False)  # may be an inference tensor
        return t.float().clone()  # a normal tensor: autograd may save it for the loss' backward


def build_text_loader(cfg: TrainConfig, tokenizer, d: Dist):
    import data as D
    if not cfg.texts:
        raise SystemExit("train.py: stages 1-3 need --texts texts.jsonl (`python data.py build --out DIR`)")
    return D.TrainLoader(cfg.texts, tokenizer, global_batch=cfg.batch, max_length=cfg.max_length, seed=cfg.seed,
                         rank=d.rank, world_size=d.world_size, micro_batch=cfg.micro_batch)


class ImageBatches:
    """Stage 4 batches: this rank's share of a uniform random global batch of image-caption pairs. Global batch g =
    positions [k*B, (k+1)*B) of a seeded permutation of epoch e (g = e * steps_per_epoch + k), rank r takes
    [r*b, (r+1)*b): a pure function of (seed, g, rank), so `g` is the whole resume state (like data.TrainLoader).
    Images are decoded by ImageCaptionDataset.collate in DataLoader workers; broken images are dropped and counted
    (a rank's share may then be smaller: gather_global handles unequal shares)."""

    def __init__(self, cfg: TrainConfig, tokenizer, d: Dist):
        import data as D
        if not cfg.images:
            raise SystemExit("train.py: stage 4 needs --images (image-caption jsonl/parquet)")
        self.ds = D.ImageCaptionDataset(cfg.images, image_size=cfg.image_size)
        self.tok, self.cfg, self.rank = tokenizer, cfg, d.rank
        self.B, self.b = cfg.batch, cfg.batch // d.world_size
        self.steps_per_epoch = len(self.ds) // cfg.batch
        if self.steps_per_epoch == 0:
            raise SystemExit(f"train.py: {cfg.images}: {len(self.ds)} usable pairs < global batch {cfg.batch}")
        self.g = 0
        self.skips: dict[str, int] = dict(self.ds.skips)  # bad rows of the index (the same on every rank)
        self.broken = 0  # images of THIS rank's shares that failed to decode (summed over ranks when logged)

    def state_dict(self) -> dict:
        return dict(g=self.g, broken=self.broken)

    def load_state_dict(self, s: dict):
        self.g, self.broken = int(s["g"]), int(s["broken"])

    def __len__(self):
        return 1 << 62

    def __getitem__(self, g: int) -> dict:  # runs in a DataLoader worker
        e, k = divmod(g, self.steps_per_epoch)
        perm = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + e))
        share = perm[k * self.B:(k + 1) * self.B][self.rank * self.b:(self.rank + 1) * self.b]
        return self.ds.collate([self.ds[int(i)] for i in share])  # pixel_values (n, 3, S, S), captions, n_skipped

    def __iter__(self):
        from torch.utils.data import DataLoader
        dl = DataLoader(self, batch_size=None, sampler=range(self.g, 1 << 62), num_workers=self.cfg.num_workers,
                        collate_fn=_identity)
        for item in dl:
            self.g += 1
            self.broken += item["n_skipped"]
            ids, mask = self.tok(item["captions"], max_length=self.cfg.max_length)
            yield dict(pixel_values=item["pixel_values"], input_ids=ids, attention_mask=mask,
                       n_tokens=int(mask.sum()))


def _identity(x):
    return x


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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
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
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
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
# 8. The training loop.
# ======================================================================================================================

def train(cfg: TrainConfig) -> dict:
    """Run one stage. Returns a summary dict (last step, last loss, export dir)."""
    import losses as L
    d = setup_distributed(cfg.device)
    try:
        return _train(cfg, d, L)
    finally:
        if d.mesh is not None:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, L) -> dict:
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

    # --- model, trainable set, sharding, optimizer
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

    # --- data and targets
    if cfg.stage <= 3:
        loader = build_text_loader(cfg, tokenizer, d)
        targets = TextTargets(cfg)  # every batch's rows are verified against the cache by (row, hash)
        if targets.dim != dims[0]:
            raise SystemExit(f"train.py: teacher dim {targets.dim} != FC1 dim {dims[0]} of the student "
                             f"(heads {dims}); the cosine loss of eq. 1 needs them equal")
    else:
        loader = ImageBatches(cfg, tokenizer, d)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bf16" and d.mesh is None)  # FSDP runs use the MP policy

    # --- resume
    step = 0
    resuming = cfg.resume and (ckdir / "latest").exists()  # --resume on a fresh --out starts at step 0 (so one
    if resuming:                                             # command line serves every restart of a preempted job)
        step = load_checkpoint(ckdir, model, opt, sched, loader, cfg, d)
    elif cfg.resume and d.main:
        print(f"train.py: --resume but no checkpoint in {ckdir}: starting at step 0", flush=True)
    log = Logger(out, d, step if resuming else None)
    log.print(f"stage {cfg.stage} | {d.world_size} rank(s) on {d.device} | {cfg.dtype} | trainable "
              f"{n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M params ({len(trainable)} tensors) | global batch "
              f"{cfg.batch} | lr {cfg.lr:g} | steps {cfg.steps}" + (f" | resumed at step {step}" if step else ""))
    start_step = step
    data_iter = iter(loader)
    heads = dims[:1] if cfg.stage <= 2 else dims  # stages 1-2 train/score FC1 only (sec. 3.1)
    last_ckpt = str(ckdir / (ckdir / "latest").read_text().strip()) if (ckdir / "latest").exists() else None
    t0, tok_window, t_window = time.time(), 0.0, time.time()
    loss_val = float("nan")

    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while step < end:
        batch = next(data_iter)
        # --- this rank's share: student vectors (with graphs) and teacher vectors (without)
        with autocast:
            if cfg.stage <= 3:
                student_local, teacher_local, n_tokens = text_vectors(model, batch, targets, heads, d)
            else:
                student_local, teacher_local, n_tokens = image_vectors(model, batch, heads, cfg.micro_batch, d)
        # --- the GLOBAL batch: student with gradients, teacher without
        eq = cfg.stage <= 3  # text shares are equal; image shares may lose broken images
        student = {D: gather_global(v, d, grad=True, equal=eq) for D, v in student_local.items()}  # (B, D)
        if cfg.stage <= 3:
            teacher = gather_global(teacher_local, d, grad=False)  # (B, Dt)
        else:
            teacher = {D: gather_global(v, d, grad=False, equal=False) for D, v in teacher_local.items()}
        loss, parts = L.distill_loss(cfg.stage, student, teacher, weights=tuple(cfg.loss_weights), margin=cfg.margin)
        loss_val = loss.item()  # identical on every rank (same gathered inputs, same maths)
        if not math.isfinite(loss_val):
            raise SystemExit(f"train.py: non-finite loss {loss_val} at step {step + 1} (parts {parts}); stopping. "
                             f"Last good checkpoint: {last_ckpt or 'none'} (resume with --resume, e.g. with a "
                             f"lower --lr)")
        loss.backward()
        gnorm = clip_grad_norm(train_params, cfg.grad_clip)
        if not math.isfinite(gnorm):
            raise SystemExit(f"train.py: non-finite gradient norm at step {step + 1}; stopping. Last good "
                             f"checkpoint: {last_ckpt or 'none'}")
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # --- log
        tokens = all_sum(n_tokens, d)
        tok_window += tokens
        now = time.time()
        rec = dict(step=step, loss=loss_val, **{k: float(v) for k, v in parts.items()}, lr=lr_now, grad_norm=gnorm,
                   tokens=int(tokens), elapsed_s=round(now - t0, 3))
        skips = {k: v for k, v in loader.skips.items() if v}  # data.py's counts of rows left out
        if cfg.stage == 4:
            broken = int(all_sum(loader.broken, d))  # collective: every rank calls it every step
            if broken:
                skips["broken_image"] = broken
        if skips:
            rec["skips"] = skips
        log.metrics(rec)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = tok_window / max(1e-9, now - t_window)
            eta = (now - t0) / max(1, step - start_step) * (cfg.steps - step)
            comp = " ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k != "total")
            log.print(f"step {step}/{cfg.steps} | loss {loss_val:.5g} | {comp} | lr {lr_now:.3g} | gnorm {gnorm:.3g} "
                      f"| {rate:,.0f} tok/s | ETA {fmt_duration(eta)}" + (f" | skips {dict(skips)}" if skips else ""))
            tok_window, t_window = 0.0, now
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == end:
            last_ckpt = str(save_checkpoint(ckdir, step, model, opt, sched, loader, cfg, d))
            log.print(f"checkpoint {last_ckpt}")

    summary = dict(step=step, loss=loss_val, checkpoint=last_ckpt)
    if cfg.export and step == cfg.steps:
        export_final(model, tokenizer, out / "final", d)
        summary["export"] = str(out / "final")
        log.print(f"exported {out / 'final'}")
        if cfg.eval_data and d.main:
            import eval as E
            score = E.quick_eval(E.load_encoder(out / "final"), cfg.eval_data)
            summary["stsb_dev"] = score
            log.print(f"STSBenchmark dev spearman {score:.4f}")
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


# ======================================================================================================================
# 9. Presets: a preset is a set of config values (PRESETS) plus, if it needs more than one `train()` call, a small
#    orchestration function (PRESET_RUNNERS). Without a runner, the preset's values simply configure one stage.
# ======================================================================================================================

PRESETS: dict[str, dict[str, Any]] = {}
PRESET_RUNNERS: dict[str, Any] = {}

# ==== presets: `python train.py --preset demo` (the offline demo, README) ====
# `python train.py --preset demo`: the whole method, offline, on a laptop CPU, in under 20 minutes (issue 9).
#   data.py build over <data>/text (the real shared text) -> all-MiniLM-L6-v2 teacher cache (teachers.py) -> a small
#   random-init Qwen2 student -> stages 1, 2, 3 through train() above (the real trainer path) -> eval.py on STS tasks
#   at every head dim for teacher and student -> one table, results.json, loss-curve and score-vs-dim PNGs.
# Design and measured figures: docs/demo.md. The student (why each choice, measured on the prototype
# bench/demo_prototype.py):
#   - Qwen2 architecture (bidirectional, RoPE, SwiGLU, GQA), 4 layers of width 384 (6 query / 2 key-value heads,
#     SwiGLU width 1536): ~8.7M body parameters, the most a 2-core CPU trains ~1,500 steps of in ~12 minutes.
#   - the teacher's WordPiece vocabulary (30,522) with the teacher's input embeddings copied in, LN(word + type_0) as
#     BERT's embedding layer computes them without the position term (RoPE replaces it): a random embedding table
#     cannot be learnt from ~70k texts in minutes. The tokenizer is MiniLM's tokenizer.json.
#   - o_proj and down_proj start at zero, so every residual branch starts as the identity and the untrained student
#     is a bag of (copied) word embeddings: a sensible starting point, and what makes stage 1 meaningful.
#   - heads (FC1..FC4) = 384 / 256 / 128 / 64: FC1 must equal the teacher width for the cosine loss (eq. 1); the
#     Matryoshka heads halve down to 64 as the paper's 1024 -> 512 -> 256 halves, below the 384-d teacher.
#   - texts cut at 32 tokens (teacher cache too, so the target describes the text the student sees), bf16 autocast,
#     global batch 64, AdamW with warmup + cosine per stage.
# Stages 1-3 keep the paper's trainable sets exactly (train.set_trainable): 1 = FC1 only (a linear probe on the
# bag-of-embeddings student), 2 = FC1 + the last 3 of 4 layers, 3 = everything with FC2-4 in the losses. What
# differs from the paper is the student's starting point (random body, identity residuals, copied embeddings
# instead of stella), the loss weights (below) and the scale: steps, lr (5e-4: a random body needs more than the
# paper's 1e-4 fine-tuning rates), batch, text length.
import dataclasses as _dc  # noqa: E402

DEMO_TASKS = ("STSBenchmark", "STS12", "STS13", "BIOSSES")
DEMO_HEAD_DIMS = (384, 256, 128, 64)
DEMO_STUDENT = dict(num_hidden_layers=4, hidden_size=384, intermediate_size=1536, num_attention_heads=6,
                    num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512)
DEMO_STAGE_SHARE = (0.07, 0.60, 0.33)   # of --steps, per stage (stage 2 gains the most per step, see docs/demo.md)
DEMO_STAGE_LR_MULT = (4.0, 1.0, 0.6)    # x --lr: stage 1 trains a linear head only (larger steps are safe there);
                                        # stage 3 restarts the schedule on an already trained body: gentler
DEMO_DATA = dict(passage_ratio=0.85, split_ratio=1.0, min_sentences=1, max_sentences=2)  # see docs/demo.md
DEMO_CACHE_DTYPE = torch.bfloat16       # teacher for the cache: bf16 vs fp32 vectors agree to cos >= 0.9999
DEMO_EVAL_MAX_LENGTH = 64               # the student is evaluated on up to 64 tokens (trained on 32; RoPE extends:
                                        # BIOSSES +0.05, STSBenchmark +0.002 over cutting at 32)

# Loss weights (lambda1, lambda2, lambda3) = (10, 12.5, 1.25), the paper's lambda2 and lambda3 / 16: the paper's
# (10, 200, 20) suit a student that starts as stella, close to its teachers; this one starts far away (FC1 cosine
# loss 0.52 after stage 1), and there the full-vector target of eq. 1 carries most of the signal. Measured after
# stage 2 (105 + 900 steps, bench/RESULTS.md), STSBenchmark test: 0.7361 / 0.7466 / 0.7539 / 0.7593 at lambda2 =
# 1000 / 200 / 50 / 12.5 (lambda3 = lambda2 / 10), the similarity and ranking losses themselves ending no higher.
PRESETS["demo"] = dict(out="runs/demo", max_length=32, batch=64, micro_batch=64, lr=5e-4, steps=1500,
                       warmup_ratio=0.05, dtype="bf16", ckpt_every=0, keep_ckpts=1, log_every=100, eval_data=None,
                       loss_weights=[10.0, 12.5, 1.25])


def make_demo_student(teacher_dir, head_dims=DEMO_HEAD_DIMS, max_length: int = 32, seed: int = 0,
                      **overrides):
    """The demo's random-init Qwen2 student on the teacher's WordPiece vocabulary (see the notes above)."""
    import model as M
    tok = M.TextTokenizer.from_pretrained(teacher_dir, max_length=max_length)
    text = M.Qwen2Config(vocab_size=tok.vocab_size, causal=False, **{**DEMO_STUDENT, **overrides})
    torch.manual_seed(seed)
    student = M.JasperModel(M.JasperConfig(text=text, head_dims=tuple(head_dims), max_length=max_length))
    st = M.read_safetensors(teacher_dir)
    pre = "bert." if any(k.startswith("bert.embeddings.") for k in st) else ""
    word = st[pre + "embeddings.word_embeddings.weight"].float()  # (V, H)
    if tuple(word.shape) != tuple(student.model.embed_tokens.weight.shape):
        raise SystemExit(f"train.py demo: teacher embeddings {tuple(word.shape)} do not fit the student "
                         f"{tuple(student.model.embed_tokens.weight.shape)} (vocabulary / width)")
    emb = torch.nn.functional.layer_norm(word + st[pre + "embeddings.token_type_embeddings.weight"][0].float(),
                                         (word.shape[1],), st[pre + "embeddings.LayerNorm.weight"].float(),
                                         st[pre + "embeddings.LayerNorm.bias"].float(), eps=1e-12)
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(emb)
        for layer in student.model.layers:  # identity residual branches at init
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    student.tokenizer = tok
    return student


class _Truncated:
    """The teacher at smaller dims by truncation + renormalisation (MiniLM has no Matryoshka heads): the reference
    for how much the student's learnt FC2-4 heads lose relative to its FC1."""

    uses_instructions = False

    def __init__(self, teacher, dims):
        self.t, self.dims, self.name, self._vec = teacher, tuple(dims), getattr(teacher, "name", "teacher"), {}

    def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
        todo = list(dict.fromkeys(t for t in texts if t not in self._vec))  # the teacher runs once per text
        if todo:
            self._vec.update(zip(todo, self.t.encode(todo, batch_size=batch_size, show_progress=False)))
        v = torch.stack([self._vec[t] for t in texts])  # (N, 384) normalised
        return torch.nn.functional.normalize(v[:, :dim or self.dims[0]], dim=-1)


def _demo_eval(encoder, tasks, data_dir, dims, engine: str, split: str | None) -> dict[str, dict[int, float]]:
    import eval as E
    cache = E.EmbeddingCache(encoder, batch_size=128, show_progress=False)
    rep = E.evaluate(cache, list(tasks), data_dir=data_dir, dims=list(dims), instructions="none", engine=engine,
                     split=split)
    return {t: {int(d): r["main_score"] for d, r in per.items()} for t, per in rep["results"].items()}


def _demo_plots(out: Path, stage_dirs: list[Path], results: dict, dims, split: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    offset = 0
    for k, sd in enumerate(stage_dirs, start=1):
        recs = [json.loads(ln) for ln in (sd / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        x = [offset + r["step"] for r in recs]
        ax[0].plot(x, [r["loss"] for r in recs], lw=0.6, label=f"stage {k} total")
        for key in sorted(k2 for k2 in recs[0] if k2.endswith(".cos")):
            ax[1].plot(x, [r[key] for r in recs], lw=0.6, label=f"stage {k} {key}")
        offset = x[-1]
        for a in ax:
            a.axvline(offset, color="grey", lw=0.5, ls=":")
    ax[0].set(xlabel="optimizer step (stages back to back)", ylabel="loss (eq. 4)", yscale="log",
              title="training loss")
    ax[1].set(xlabel="optimizer step", ylabel="1 - cos(student FC1, teacher)", title="cosine loss (eq. 1)")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (task, per) in enumerate(results["student"].items()):
        c = f"C{i}"
        ax.plot(dims, [per[d] for d in dims], "o-", color=c, label=f"{task} student")
        ax.plot(dims, [results["teacher"][task][d] for d in dims], "x--", color=c, lw=0.8,
                label=f"{task} teacher (truncated below {dims[0]})")
    ax.set(xscale="log", xlabel="embedding dim (head FC1..FC4)", ylabel="cosine Spearman",
           title=f"score vs dim ({split} split)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(list(dims), [str(d) for d in dims])
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "score_vs_dim.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_demo(cfg: TrainConfig, *, n_texts: int | None = None, tasks=DEMO_TASKS, engine: str = "builtin",
             split: str | None = None, untrained: bool = True, plots: bool = True) -> dict:
    """The demo preset: data -> teacher cache -> student -> stages 1-3 (train()) -> evaluation table and plots.
    `cfg` carries the preset's values (and any CLI overrides: --out, --steps, --lr, --batch, --eval-data = the
    shared data dir, --seed). The keyword arguments are for the test's shortened run."""
    import data as D
    import eval as E
    import teachers as T
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.eval_data) if cfg.eval_data else D.default_data_dir()
    if not (data_dir / "text").is_dir():
        raise SystemExit(f"train.py demo: no text folder under the data dir {data_dir} (the shared data: "
                         f"text/passages.jsonl, text/short.jsonl and sts/...); pass --eval-data DIR or set "
                         f"JASPER_DATA_DIR")
    times: dict[str, float] = {}

    def say(msg):
        print(f"[demo {fmt_duration(time.time() - t_start)}] {msg}", flush=True)

    # 1. training texts: the paper's recipe (data.py) with every passage split into 1-2 sentence pieces
    t0 = time.time()
    meta = D.build(out / "data", data_dir=data_dir, n_texts=n_texts, seed=cfg.seed, progress=False, **DEMO_DATA)
    texts = out / "data" / "texts.jsonl"
    times["data"] = time.time() - t0
    say(f"data: {meta['n_texts']:,} texts {meta['stats']['texts']} -> {texts}")

    # 2. teacher cache (a rerun over the same texts reuses finished shards)
    t0 = time.time()
    tdir = T.minilm_path()
    teacher = T.BertTeacher(tdir, max_length=cfg.max_length, dtype=DEMO_CACHE_DTYPE)
    say(f"teacher cache: all-MiniLM-L6-v2 ({tdir}), {cfg.max_length} tokens, {DEMO_CACHE_DTYPE} ...")
    T.build_cache([teacher], texts, out / "cache", batch_size=256)
    del teacher
    times["teacher_cache"] = time.time() - t0
    say(f"teacher cache done in {fmt_duration(times['teacher_cache'])}")

    # 3. the student, saved as stage 0 (train() loads --init from a directory)
    init = out / "init"
    make_demo_student(tdir, max_length=cfg.max_length, seed=cfg.seed).save_pretrained(init)

    # 4. stages 1-3 through the real trainer
    steps = [max(1, round(cfg.steps * s)) for s in DEMO_STAGE_SHARE]
    prev, stage_dirs, t_train = init, [], time.time()
    for k in (1, 2, 3):
        sd = out / f"stage{k}"
        shutil.rmtree(sd, ignore_errors=True)  # the demo's own output of an earlier run
        scfg = _dc.replace(cfg, preset=None, config=None, stage=k, init=str(prev), init_format="jasper", out=str(sd),
                           texts=str(texts), teacher_cache=str(out / "cache"), teacher=[], steps=steps[k - 1],
                           lr=cfg.lr * DEMO_STAGE_LR_MULT[k - 1], seed=cfg.seed + k, eval_data=None, resume=False,
                           export=True, stop_at=None)
        t0 = time.time()
        train(scfg)
        times[f"stage{k}"] = time.time() - t0
        say(f"stage {k} done: {steps[k - 1]} steps in {fmt_duration(times[f'stage{k}'])}")
        prev = sd / "final"
        stage_dirs.append(sd)
    times["train"] = time.time() - t_train

    # 5. evaluation: teacher (fp32, its own 256-token limit; truncated below 384) vs student at every head
    t0 = time.time()
    dims = list(DEMO_HEAD_DIMS)
    student = E.load_encoder(prev, max_length=DEMO_EVAL_MAX_LENGTH)  # a JasperModel; encodes all heads at once
    n_params = sum(p.numel() for p in student.parameters())
    say(f"evaluating teacher and student on {', '.join(tasks)} ({split or 'test'} split) at dims {dims} ...")
    results = {"teacher": _demo_eval(_Truncated(E.load_encoder(tdir), dims), tasks, data_dir, dims, engine, split),
               "student": _demo_eval(student, tasks, data_dir, dims, engine, split)}
    if untrained:
        results["untrained"] = _demo_eval(E.load_encoder(init, max_length=DEMO_EVAL_MAX_LENGTH), tasks, data_dir,
                                          dims, engine, split)
    times["eval"] = time.time() - t0
    times["total"] = time.time() - t_start

    # 6. report: one table (teacher vs student per task and dim), results.json, results.md, two PNGs
    cols = [c for c in ("teacher", "student", "untrained") if c in results]
    lines = ["| task | dim | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for task in tasks:
        for d in dims:
            lines.append(f"| {task} | {d} | " + " | ".join(f"{results[c][task][d]:.4f}" for c in cols) + " |")
    lines += ["", f"teacher: all-MiniLM-L6-v2, fp32 (at dims below {dims[0]}: its first d coordinates, "
                  f"renormalised); student: {n_params / 1e6:.1f}M-parameter Qwen2 trained on {meta['n_texts']:,} "
                  f"texts cut at {cfg.max_length} tokens; untrained: the same student before stage 1",
              f"metric: cosine Spearman, {split or 'test'} split (eval.py, {engine} engine, no instructions)",
              f"time: data {times['data']:.0f}s | teacher cache {fmt_duration(times['teacher_cache'])} | training "
              f"{fmt_duration(times['train'])} (stages 1/2/3: {steps[0]}/{steps[1]}/{steps[2]} steps in "
              + "/".join(f"{times[f'stage{k}']:.0f}" for k in (1, 2, 3)) + f" s) | eval "
              f"{fmt_duration(times['eval'])} | total {fmt_duration(times['total'])}"]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    report = dict(results=results, times=times, steps=steps, n_texts=meta["n_texts"], table=table,
                  student=str(prev), untrained=str(init), config=dataclasses.asdict(cfg))
    atomic_write(out / "results.json", json.dumps(report, indent=1) + "\n")
    atomic_write(out / "results.md", table + "\n")
    if plots:
        for p in _demo_plots(out, stage_dirs, results, dims, split or "test"):
            say(f"wrote {p}")
    return report


PRESET_RUNNERS["demo"] = run_demo
# ==== end presets ====


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    if cfg.preset in PRESET_RUNNERS:
        return PRESET_RUNNERS[cfg.preset](cfg)
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
