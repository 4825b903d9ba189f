"""Train the Jasper student (arXiv 2412.19048): the four distillation stages of sec. 3.1 under torchrun + FSDP2.

    python train.py --stage 1 --init STELLA_DIR --texts DATA/texts.jsonl --teacher-cache CACHE --out runs/s1
    torchrun --nproc_per_node 8 train.py --stage 2 --init runs/s1/final --texts ... --teacher-cache ... --out runs/s2
    python train.py --help                      # every flag, with the paper's per-stage defaults

Read top to bottom, one optimizer step is:
  config -> distributed setup -> student model -> trainable set of the stage -> (activation checkpointing) ->
  FSDP2 fully_shard per transformer block, then the root -> AdamW + warmup/cosine -> data batch (this rank's share
  of the global batch, in micro-batches) -> the agreement check (every rank about to run the same forwards) ->
  teacher targets (cache, verified row by row; or teachers on the fly) -> student vectors of the rank's share ->
  all-gather of the GLOBAL batch (student: with gradients, teacher: without) -> losses.distill_loss(stage, ...) ->
  backward -> clip -> step -> log / checkpoint. With --grad-cache the vectors, loss and backward run as
  grad_cache.py's two passes (the same gradient, one micro-batch's activations at a time).

The distributed invariant (every rank runs the same collectives at every step, so 1, 2 or 3 ranks give the same run)
and the gradient convention of the gathered global batch: distributed.py, docs/train.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed._composable import checkpoint as checkpoint_block  # keeps parameter names (checkpoints load)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import grad_cache
import losses
from checkpoints import (CheckpointError, atomic_write, checkpoint_keys, fmt_duration, folder_problem, read_json,
                         read_st_layout, resolve_checkpoint, rng_state, set_rng_state, write_checksums)
from data import ImageBatches, TrainLoader, load_index, text_hash
from distributed import Dist, agree, all_sum, gather_global, setup_distributed  # 2. below
from errors import DiskFullError, UserError, is_disk_full, os_error_in, run_cli
from eval import load_encoder, quick_eval
from model import JasperConfig, JasperModel, default_head_dims
from packing import split_even
from teacher_cache import TeacherCache, read_cache_input
from teachers import MultiTeacher, load_teacher
from tensorboard_log import TensorBoardLog
from train_config import ConfigError, TrainConfig, parse_config  # 1. the config of a run (sec. 3.1 defaults)
from train_eval import TrainEval, best_eval, eval_line, plot_eval
from vision import SiglipVisionEncoder


class DivergedError(UserError):
    """A non-finite loss or gradient norm: the run stops; the message names the last good checkpoint."""


# ======================================================================================================================
# 2. Distributed setup (distributed.py): torchrun env -> one process group and a 1-D device mesh for FSDP2, or a plain
#    single process; agree / gather_global / all_sum are the collectives a step adds to FSDP's own.
# ======================================================================================================================

# ======================================================================================================================
# 3. Student model and the trainable set of each stage.
# ======================================================================================================================

def check_inputs(cfg: TrainConfig) -> None:
    """Every path the run needs, and the init's config.json, checked before any model loads (a 1.5B student takes
    minutes to load; a typo in --texts should not cost them). Hub ids (ORG/NAME) are left to resolve_checkpoint."""
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out}: exists and is not a folder")
    if not cfg.init:
        raise ConfigError("--init is required (stage 1: a stella or Jasper dir; stage K: stage K-1's OUT/final)")
    init = Path(cfg.init).expanduser()
    # a local path, not an ORG/NAME hub id
    if init.exists() or cfg.init.startswith(("/", ".", "~")) or cfg.init.count("/") >= 2:
        if not init.is_dir():
            raise ConfigError(f"--init {init}: {'not a folder' if init.exists() else 'no such folder'}")
        if (init_format_of(init) if cfg.init_format == "auto" else cfg.init_format) == "jasper":
            JasperConfig.from_hf(init)  # reads and checks config.json (CheckpointError naming the file and key)
        if not (init / "tokenizer.json").is_file():
            raise ConfigError(f"--init {init}: no tokenizer.json")
    for flag, value, kind in (("--texts", cfg.texts, "file"), ("--images", cfg.images, "file"),
                              ("--teacher-cache", cfg.teacher_cache, "folder"), ("--vision-init", cfg.vision_init,
                                                                                 "folder"),
                              ("--eval-data", cfg.eval_data, "folder")):
        if value and not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            raise ConfigError(f"{flag} {value}: no such {kind}")
    if cfg.stage <= 3 and not cfg.texts:
        raise ConfigError("stages 1-3 need --texts texts.jsonl (`python data.py build --out DIR`)")
    if cfg.stage <= 3 and bool(cfg.teacher_cache) == bool(cfg.teacher):
        raise ConfigError("stages 1-3 need --teacher-cache DIR or --teacher SPEC (on the fly), exactly one of them")
    if cfg.stage == 4 and not cfg.images:
        raise ConfigError("stage 4 needs --images (image-caption jsonl/parquet)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")


def load_student(cfg: TrainConfig, teacher_dim: int | None = None) -> JasperModel:
    """The student of --init: our export / a released Jasper (its own heads), a BERT-family folder (body + heads
    FC1 = the teacher's width, FC2-4 by model.default_head_dims, or --heads) or a stella-like decoder body."""
    src = resolve_checkpoint(cfg.init)  # a local dir as is, or a hub id downloaded
    fmt = init_format_of(src) if cfg.init_format == "auto" else cfg.init_format
    heads = cfg.heads or None
    if fmt == "jasper":
        model = JasperModel.from_pretrained(src)
        if heads and tuple(heads) != model.config.head_dims:
            raise ConfigError(f"--heads {heads}: --init {src} already has heads {list(model.config.head_dims)} "
                              f"(--heads shapes the heads of a body init: a BERT-family or stella folder)")
    elif (body := init_body_config(src)).get("model_type") == "bert":
        if cfg.stage == 4:  # refused before the weights load
            raise ConfigError(STAGE4_BERT.format(src=src))
        if heads is None and teacher_dim is not None:
            heads = default_head_dims(teacher_dim, int(body["hidden_size"]))
        model = JasperModel.from_bert(src, head_dims=heads, seed=cfg.seed)  # serves at the folder's max length
    else:
        model = JasperModel.from_stella(src, **({"head_dims": heads} if heads else {}))
    if model.config.is_bert:
        if cfg.stage == 4 or cfg.vision_init:
            raise ConfigError(STAGE4_BERT.format(src=src))
        if cfg.max_length > model.config.text.max_position_embeddings:
            raise ConfigError(f"--max-length {cfg.max_length}: the BERT student {src} has "
                              f"{model.config.text.max_position_embeddings} positions")
    if cfg.vision_init:
        if model.vision_model is not None:
            raise ConfigError(f"--init {src} already has a vision tower; drop --vision-init")
        model.vision_model = SiglipVisionEncoder.from_pretrained(cfg.vision_init)
        model.config.vision = model.vision_model.config
    if model.tokenizer is None:
        raise ConfigError(f"--init {src} has no tokenizer.json")
    return model


STAGE4_BERT = ("stage 4 / --vision-init: --init {src} is a BERT-family student, and stage 4 splices image features into "
               "a decoder student's image-token positions (sec. 2.5); it is for the Qwen2/Qwen3/Mistral student only")


def init_body_config(src: Path) -> dict:
    """config.json of --init's body: the sentence-transformers Transformer module's, else the folder's own."""
    try:
        body = read_st_layout(src).body_dir
    except CheckpointError:  # a layout sentence-transformers would refuse too: the folder itself is the body
        body = src
    return read_json(body / "config.json")


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
    # FC1: the first and widest head, the teacher's dim (eq. 1)
    fc1 = getattr(model, f"vector_linear_{head_dims(model)[0]}")
    if stage == 1:
        train = [fc1]
    elif stage == 2:
        # the last 3 decoder layers (the final RMSNorm is not a layer); for a BERT body the last 3 encoder layers
        # (BertModel.layers; post-LN: each layer ends in its own LayerNorm); the embeddings stay frozen
        train = [fc1, *model.model.layers[-3:]]
    elif stage == 3:
        # "all parameters": the whole text side and the four heads. The vision tower (if present) gets no gradient
        # from text-only batches, so it stays frozen (and gets no optimizer state).
        train = [model.model] + [getattr(model, f"vector_linear_{D}") for D in head_dims(model)]
    elif stage == 4:
        if model.config.is_bert:
            raise ConfigError(STAGE4_BERT.format(src="the student"))
        if model.vision_model is None:
            raise ConfigError("stage 4 needs a student with a vision tower (JasperConfig.vision)")
        train = [model.vision_model]
    else:
        raise ValueError(stage)
    for m in train:
        m.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def transformer_blocks(model) -> list[nn.Module]:
    blocks = list(model.model.layers)  # the text decoder layers
    if getattr(model, "vision_model", None) is not None:
        blocks += list(model.vision_model.encoder.layers)  # stage 4: the SigLIP encoder layers
    return blocks


def shard_model(model, cfg: TrainConfig, d: Dist):
    """Activation checkpointing (optional), then FSDP2: fully_shard each transformer block, then the root."""
    if cfg.activation_checkpointing:
        for block in transformer_blocks(model):
            checkpoint_block(block)
    if d.mesh is None:
        return model.to(d.device)  # single process: no sharding; bf16 through autocast instead
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.dtype == "bf16"
          else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=d.mesh, mp_policy=mp)  # per block: never the whole model gathered at once
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
            (decay if p.ndim >= 2 else no_decay).append(p)  # matrices decay; biases and norm scales (ndim < 2) do not
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # an empty group (e.g. no biases) is left out
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps)


def set_optimizer_settings(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> float:
    """Write the settings of optimizer step `step` (0-based) into every param group, from the CURRENT config: the
    scheduled lr, betas, eps and weight decay (none on biases and norms). A resumed run with a new --lr,
    --warmup-ratio, --min-lr-ratio or --steps therefore follows the new schedule from the step it is at, and new
    AdamW settings apply from that step, instead of the values restored with the optimizer state. Returns the lr."""
    lr = cfg.lr * lr_factor(step, cfg)  # the same product LambdaLR computes: bit-identical to a scheduler
    for g in opt.param_groups:
        g.update(lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                 weight_decay=cfg.weight_decay if g["params"][0].ndim >= 2 else 0.0)
    return lr


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    # warmup steps, at least 1 when the ratio is > 0
    warm = max(1, round(cfg.warmup_ratio * cfg.steps)) if cfg.warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm  # step 0 already gets lr / warm, not 0
    t = (step - warm) / max(1, cfg.steps - warm)  # decay progress: 0 -> 1 over the remaining steps
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ======================================================================================================================
# 5. Data and teacher targets.
# ======================================================================================================================

class TextTargets:
    """Teacher targets for a text batch: the cache (default; rows verified by (row, hash) in TeacherCache.targets)
    or teachers run on the fly on the batch's texts (small runs)."""

    def __init__(self, cfg: TrainConfig):  # built before the student: a misfit cache fails in seconds
        self.cache = self.teacher = None
        if cfg.teacher_cache:
            self.cache = TeacherCache(cfg.teacher_cache)
            self.dim = self.cache.dim
            n_lines = len(load_index(cfg.texts)["offsets"]) - 1  # the index TrainLoader reads (cached on disk)
            if n_lines != self.cache.n_rows:
                raise ConfigError(f"--teacher-cache {cfg.teacher_cache} holds {self.cache.n_rows} rows but --texts "
                                  f"{cfg.texts} has {n_lines}: the cache was built from other texts "
                                  "(`python teachers.py encode --input` the same texts.jsonl)")
        else:
            self.texts, _ = read_cache_input(cfg.texts)  # row i = texts.jsonl row i; bad lines named file:line
            ts = [load_teacher(s) for s in cfg.teacher]
            self.teacher = ts[0] if len(ts) == 1 else MultiTeacher(ts)
            self.dim = self.teacher.dim
            self.batch_size = cfg.micro_batch  # the teachers' own encode batch size

    def __call__(self, rows: torch.Tensor, hashes: list[str]) -> torch.Tensor:  # -> (b, dim) fp32, L2-normalised
        if len(rows) == 0:  # a rank the step plan left without texts
            return torch.zeros(0, self.dim)
        if self.cache is not None:
            return self.cache.targets(rows, hashes)
        texts = [self.texts[int(r)] for r in rows]
        for r, t, h in zip(rows.tolist(), texts, hashes):
            if text_hash(t) != h:
                raise RuntimeError(f"train.py: texts row {r} has hash {text_hash(t)} but the batch says {h}")
        t = self.teacher.encode(texts, batch_size=self.batch_size, show_progress=False)  # may be an inference tensor
        return t.float().clone()  # a normal tensor: autograd may save it for the loss' backward


def build_text_loader(cfg: TrainConfig, tokenizer, d: Dist) -> TrainLoader:
    # this rank's part of each global batch, laid out by one plan for all ranks (packing.plan_step)
    return TrainLoader(cfg.texts, tokenizer, global_batch=cfg.batch, max_length=cfg.max_length, seed=cfg.seed,
                       rank=d.rank, world_size=d.world_size, micro_batch=cfg.micro_batch, packing=cfg.packing,
                       holdout=cfg.eval_holdout if cfg.eval_every else 0)  # the --eval-every slice


def build_image_loader(cfg: TrainConfig, tokenizer, d: Dist) -> ImageBatches:
    """Stage 4: this rank's share of uniform random global batches of image-caption pairs (data.ImageBatches)."""
    return ImageBatches(cfg.images, tokenizer, cfg.batch, cfg.max_length, cfg.seed, d.rank, d.world_size,
                        image_size=cfg.image_size, num_workers=cfg.num_workers,
                        micro_batch=cfg.micro_batch)  # bad input: DataError, one line


# ======================================================================================================================
# 6. Checkpoints: torch.distributed.checkpoint (DCP) of the sharded model + optimizer (each rank writes its own
#    shards in parallel; no rank ever materialises the full state), plus per-rank trainer state (step, data-loader
#    position, RNG, config) as plain tensors and numbers. Written into step_N.tmp/, checksummed, renamed to step_N/
#    when every rank is done, then the `latest` pointer is replaced atomically: a kill or a full disk at any moment
#    leaves the previous checkpoint usable. Resume takes the newest intact one (checksums, weights_only loading).
# ======================================================================================================================
CKPT_NAME = re.compile(r"step_\d{8}")

# Changing these on --resume would make a different run than the checkpoint's: refused, with the reason.
RUN_DEFINING = dict(stage="the trainable set and the losses", batch="the global batches (data order and in-batch "
                    "losses)", seed="the data order", init="the weights (a resumed run reads them from the checkpoint)",
                    init_format="the weights", vision_init="the weights", image_size="the vision tower's input grid")


def save_checkpoint(run: RunState) -> Path:
    cfg, d, ckdir, step = run.cfg, run.d, run.ckdir, run.step
    final, tmp = ckdir / f"step_{step:08d}", ckdir / f"step_{step:08d}.tmp"
    try:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a save that was killed
            tmp.mkdir(parents=True)
        d.barrier()
        msd, osd = get_state_dict(run.model, run.opt)  # sharded state dicts: each rank holds only its own shards
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended without torchrun
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        err = None
        try:  # no scheduler state: the lr is a pure function of (step, cfg), see set_optimizer_settings
            # per rank: loader position and RNG differ between ranks
            torch.save(dict(step=step, loader=run.loader.state_dict(), rng=rng_state(), world_size=d.world_size,
                            config=dataclasses.asdict(cfg)), tmp / f"trainer_rank{d.rank}.pt")
        except OSError as e:
            err = e
        if all_sum(err is not None, d):  # every rank learns of a failed rank (no one waits at a barrier forever)
            raise err or OSError(f"another rank could not write its trainer state into {tmp}")
        if d.main:
            write_checksums(tmp)  # size + blake2b of every file: resume tells a damaged checkpoint apart
            shutil.rmtree(final, ignore_errors=True)  # a folder of the same step from an earlier try
            os.replace(tmp, final)  # rename: atomic on one filesystem
            atomic_write(ckdir / "latest", final.name + "\n")  # the pointer moves only after the rename
            done = sorted(p for p in ckdir.iterdir() if CKPT_NAME.fullmatch(p.name))
            for old in done[:-cfg.keep_ckpts] if cfg.keep_ckpts > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()  # no rank returns before the checkpoint is in place
    except BaseException as e:  # DCP reports failures as BaseExceptions
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(os_error_in(e)):
            raise DiskFullError(tmp, f"the checkpoint of step {step} was abandoned (no partial folder left); "
                                     f"{run.last_ckpt or 'no earlier checkpoint'} is intact: free space and rerun "
                                     "with --resume") from e
        raise
    return final


def load_checkpoint(run: RunState) -> None:
    """Restore the newest intact checkpoint of OUT/checkpoints into the run. A damaged one (a file missing,
    truncated or altered, unreadable by DCP, or a trainer state that is not plain data) is moved aside to
    step_N.damaged, saying so, and the next older one is tried; none intact is one error listing why."""
    d, ckdir = run.d, run.ckdir
    # newest first
    found = sorted((p for p in ckdir.iterdir() if CKPT_NAME.fullmatch(p.name) and p.is_dir()), reverse=True)
    pointer = (ckdir / "latest").read_text().strip() if (ckdir / "latest").is_file() else None
    # a pointer to a missing folder counts as damage
    damaged = [] if pointer is None or (ckdir / pointer) in found else [(ckdir / pointer, "missing")]
    for path in found:
        why = _restore(run, path)
        if why is None:
            if damaged and d.main:
                for bad, _ in damaged:  # kept for inspection, out of the way of the next saves and resumes
                    if bad.is_dir():
                        shutil.rmtree(bad.with_name(bad.name + ".damaged"), ignore_errors=True)
                        os.replace(bad, bad.with_name(bad.name + ".damaged"))
                print("train.py: damaged checkpoint(s): " + "; ".join(f"{b.name} ({r})" for b, r in damaged)
                      + f"; resuming from the newest intact one, {path.name} (damaged folders renamed *.damaged)",
                      flush=True)
            d.barrier()
            run.last_ckpt = str(path)
            return
        damaged.append((path, why))
    raise ConfigError(f"--resume: no intact checkpoint in {ckdir}: " + "; ".join(f"{b.name}: {r}" for b, r in damaged)
                      + " (move that folder away to start again from step 0)")


def _restore(run: RunState, path: Path) -> str | None:
    """Load one checkpoint into the run; the reason it is damaged, or None. Settings that would make a different
    run are refused (ConfigError), not treated as damage."""
    cfg, d = run.cfg, run.d
    # rank 0 reads every byte, once
    why = folder_problem(path, required=(".metadata", "trainer_rank0.pt"), hashes=d.main)
    ts = own = None
    if why is None:  # rank 0's trainer state holds what every rank shares: step, data position, config
        ts, why = _load_plain(path / "trainer_rank0.pt")
    if why is None and 0 < d.rank < ts["world_size"]:  # this rank's own RNG stream, where the run had this rank
        own, why = _load_plain(path / f"trainer_rank{d.rank}.pt")
    if all_sum(why is not None, d):  # every rank must agree: a collective, so no rank loads alone
        return why or "damaged on another rank"
    check_resume_settings(ts, cfg, d, path)
    msd, osd = get_state_dict(run.model, run.opt)  # templates: dcp.load fills them in place, shard by shard
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path))
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        return f"unreadable by torch.distributed.checkpoint ({str(os_error_in(e) or e).splitlines()[-1][:160]})"
    set_state_dict(run.model, run.opt, model_state_dict=msd, optim_state_dict=osd)
    try:
        run.loader.load_state_dict(loader_state(path, ts, own, d))
    except ValueError as e:
        raise ConfigError(f"--resume from {path}: {e}") from None
    # the same random streams as an uninterrupted run. A rank the run did not have takes rank 0's: nothing in
    # a training step draws from them (no dropout; data order and image draws have their own seeded generators)
    set_rng_state((own or ts)["rng"])
    run.step = int(ts["step"])
    return None


def _load_plain(file: Path) -> tuple[dict | None, str | None]:
    """A trainer state file -> (state, None), or (None, why it cannot be used)."""
    try:  # plain tensors, numbers, strings, lists and dicts only: a checkpoint from elsewhere cannot run code
        return torch.load(file, weights_only=True), None
    except Exception as e:  # noqa: BLE001 - any reason is reported as the file's
        return None, (f"{file.name} holds objects other than tensors and plain data; refusing to unpickle it"
                      if "weights_only" in str(e).lower() or "weights only" in str(e).lower()
                      else f"{file.name} unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def loader_state(path: Path, ts: dict, own: dict | None, d: Dist) -> dict:
    """The data position to restore. TrainLoader's (epoch, step) and ImageBatches' g are global, the same in every
    rank's file. The one per-rank number, stage 4's count of broken images (summed over ranks when logged), goes
    whole to rank 0 when the rank count changed (elastic resume), so the logged sum carries on unchanged."""
    state = dict(ts["loader"])
    if "broken" not in state or ts["world_size"] == d.world_size:
        return dict((own or ts)["loader"])
    total = 0
    for r in range(ts["world_size"] if d.main else 0):
        st, why = _load_plain(path / f"trainer_rank{r}.pt")
        if why:
            raise ConfigError(f"--resume from {path}: {why}")
        total += int(st["loader"]["broken"])
    return dict(state, broken=total)


def check_resume_settings(ts: dict, cfg: TrainConfig, d: Dist, path: Path) -> None:
    """A setting changed on --resume takes effect from the next step or is refused: RUN_DEFINING ones (and the rank
    count) are refused with the reason; lr / warmup / min-lr / steps rebuild the schedule at the current step
    (set_optimizer_settings); every other one is read afresh each step."""
    if ts["world_size"] != d.world_size and d.main:  # elastic resume: the run does not depend on the rank count
        print(f"train.py: checkpoint {path.name} was written by {ts['world_size']} rank(s), this run has "
              f"{d.world_size}: the model and optimizer shards are resharded on load (torch.distributed.checkpoint); "
              "the global batches, losses and schedule continue unchanged", flush=True)
    saved, now = ts["config"], dataclasses.asdict(cfg)
    same = (lambda k, a, b: a == b if k not in ("init", "vision_init") or not (a and b)
            else Path(a).expanduser().resolve() == Path(b).expanduser().resolve())
    for k, what in RUN_DEFINING.items():
        if k in saved and not same(k, saved[k], now[k]):
            raise ConfigError(f"--resume: checkpoint {path} is of a run with {k}={saved[k]!r}, this command has "
                              f"{k}={now[k]!r}, which defines {what}: use the run's value, or another --out for a "
                              "new run")
    held = lambda c: c.get("eval_holdout", 0) if c.get("eval_every") else 0  # noqa: E731 - rows out of the loader
    if held(saved) != held(now):  # the slice is taken out of the rows the batches are drawn from: another order
        raise ConfigError(f"--resume: checkpoint {path} is of a run that held out {held(saved)} texts for "
                          f"--eval-every, this command holds out {held(now)}: the slice defines the data order; use "
                          f"the run's --eval-every/--eval-holdout (the interval may change), or another --out")
    if cfg.steps < int(ts["step"]):
        raise ConfigError(f"--resume: --steps {cfg.steps} is below step {ts['step']} that {path} has reached")
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]
               and k not in ("resume", "stop_at", "config", "out")}  # keys that only control this invocation
    if changed and d.main:
        print(f"train.py: resuming at step {ts['step']} with changed settings (saved -> now), in effect from step "
              f"{int(ts['step']) + 1} (lr, warmup and steps: the schedule is recomputed at that step): {changed}",
              flush=True)


def export_final(model, tokenizer, out_dir: Path, d: Dist, prefix_heads: bool = False):
    """Gather the full (unsharded) state dict and write the HF layout via JasperModel.save_pretrained (rank 0).
    prefix_heads (--mrl-prefix): each shorter head is written as FC1's first D rows, i.e. FC1's trained prefix."""
    # a collective; cpu_offload keeps the full copy off the GPU
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if prefix_heads:
        dims = head_dims(model)
        for D in dims[1:]:
            for w in ("weight", "bias"):
                full[f"vector_linear_{D}.{w}"] = full[f"vector_linear_{dims[0]}.{w}"][:D].clone()
    if d.main:
        model.save_pretrained(out_dir, tokenizer=tokenizer, state_dict=full)  # atomic (tmp dir, then rename)
    d.barrier()


# ======================================================================================================================
# 7. Logging.
# ======================================================================================================================

class Logger:
    def __init__(self, out: Path, d: Dist, resume_step: int | None, tensorboard: bool = False):
        self.path, self.main = out / "metrics.jsonl", d.main
        # --tensorboard: the same records, live, in OUT/tensorboard (rank 0; purges a killed run's extra steps)
        self.tb = TensorBoardLog(out / "tensorboard", resume_step) if tensorboard and d.main else None
        if self.main and resume_step is not None and self.path.exists():
            # drop the lines a killed run wrote after its last checkpoint (the resumed run writes them again) and
            # any line cut short by a kill or a full disk during its write, saying so
            keep, torn = [], []
            for i, ln in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
                try:
                    rec = json.loads(ln) if ln.strip() else None
                except json.JSONDecodeError:
                    torn.append(i)
                    continue
                if rec is not None and rec.get("step", 0) <= resume_step:
                    keep.append(ln)
            if torn:
                print(f"train.py: {self.path}: line(s) {torn} cut short (a kill or a full disk during the write): "
                      "removed", flush=True)
            atomic_write(self.path, "".join(k + "\n" for k in keep))
        # a fresh run: an older run's metrics would mix in
        elif self.main and resume_step is None and self.path.exists():
            self.path.unlink()

    def metrics(self, rec: dict):
        if self.main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                if is_disk_full(e):
                    raise DiskFullError(self.path, "its last line may be cut short (--resume removes it)") from e
                raise
            if self.tb is not None:
                self.tb.write(rec)

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
        raise ConfigError(f"--mrl-teacher self applies to stage 3 (FC2-4 learn from FC1), not stage "
                         f"{cfg.stage}")
    if cfg.mrl_prefix and cfg.stage != 3:
        raise ConfigError(f"--mrl-prefix applies to stage 3 (FC1's prefixes stand in for FC2-4), not stage "
                          f"{cfg.stage}")
    if cfg.eval_every and cfg.stage == 4:
        raise ConfigError("--eval-every is for the text stages 1-3 (stage 4 has no held-out texts)")
    check_inputs(cfg)  # paths and the init's config.json, before the process group and any model
    d = setup_distributed(cfg.device)
    try:
        summary = _train(cfg, d)
        # every rank tears its process group down together: rank 0 alone plots and prints the summary, and a rank
        # that destroyed its gloo group while another still held its own was seen to abort at exit (SIGABRT)
        d.barrier()
        return summary
    finally:
        if d.mesh is not None:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist) -> dict:
    run = build_state(cfg, d, *set_up(cfg, d))
    resume_or_start(run)
    data_iter = iter(run.loader)
    while run.step < run.end:  # run.end: --stop-at or --steps
        try:  # a rank whose batch fails (bad data) still joins the step's agreement check, so no rank waits for it
            batch, failed = next(data_iter), None
        except Exception as e:  # noqa: BLE001 - re-raised in agree() after the other ranks have been told
            batch, failed = None, e
        loss_val, parts, gnorm, lr_now, n_tokens = optimizer_step(run, batch, failed)
        log_step(run, loss_val, parts, gnorm, lr_now, n_tokens, evaluate_step(run))
        # also at the end: --stop-at leaves a resumable checkpoint
        if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or run.step == run.end:
            run.last_ckpt = str(save_checkpoint(run))
            run.log.print(f"checkpoint {run.last_ckpt}")
    return finish(run)


def set_up(cfg: TrainConfig, d: Dist) -> tuple[Path, Path]:
    """The output folder (refusing to overwrite another run's checkpoints), its config.json, and the seeds."""
    if cfg.batch < d.world_size:  # any other batch works: the step plan deals whole rows (texts), not equal shares
        raise ConfigError(f"--batch {cfg.batch} is smaller than the {d.world_size} ranks: every rank needs a text")
    out = Path(cfg.out)
    ckdir = out / "checkpoints"
    if not cfg.resume and (ckdir / "latest").exists():
        raise ConfigError(f"{out} already holds checkpoints of a run: --resume to continue it, or choose "
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
    evaluator: TrainEval | None = None  # --eval-every


def build_state(cfg: TrainConfig, d: Dist, out: Path, ckdir: Path) -> RunState:
    """Teacher targets (checked against the texts first), student, trainable set, FSDP2 sharding, AdamW, then the
    batch source. The lr schedule is a pure function of (step, cfg): set_lr, no scheduler state to restore."""
    targets = TextTargets(cfg) if cfg.stage <= 3 else None  # rows verified against the cache by (row, hash)
    model = load_student(cfg, targets.dim if targets is not None else None)
    tokenizer = model.tokenizer
    trainable = set_trainable(model, cfg.stage)
    if cfg.mrl_prefix:  # FC1's prefixes stand in for FC2-4 (losses.prefix_heads): they get no gradient
        for D in head_dims(model)[1:]:
            model.head(D).requires_grad_(False)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    dims = head_dims(model)
    model = shard_model(model, cfg, d)
    model.train()
    opt = build_optimizer(model, cfg)
    train_params = [p for p in model.parameters() if p.requires_grad]
    if cfg.stage <= 3:
        loader = build_text_loader(cfg, tokenizer, d)
        if targets.dim != dims[0]:
            raise ConfigError(f"teacher dim {targets.dim} != FC1 dim {dims[0]} of the student "
                             f"(heads {dims}); the cosine loss of eq. 1 needs them equal")
        if (cfg.mrl_teacher == "self" or cfg.mrl_prefix) and len(dims) < 2:
            raise ConfigError(f"--{'mrl-prefix' if cfg.mrl_prefix else 'mrl-teacher self'} needs heads shorter "
                              f"than FC1 (their dims); the student has only {dims}")
        if cfg.eval_every and d.main:  # the held-out slice is part of the run's record: cache rows, 0-based lines
            held = {"rows": loader.holdout_records()[1], "lines": loader.holdout_lines.tolist(),
                    "holdout_seed": loader.holdout_seed}
            atomic_write(out / "config.json", json.dumps({**dataclasses.asdict(cfg), "eval_heldout": held},
                                                         indent=1) + "\n")
    else:
        loader = build_image_loader(cfg, tokenizer, d)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bf16" and d.mesh is None)  # FSDP runs use the MP policy
    return RunState(cfg, d, out, ckdir, model, tokenizer, opt, train_params, loader, targets,
                    heads=dims[:1] if cfg.stage <= 2 or cfg.mrl_prefix else dims, autocast=autocast,
                    n_train=n_train, n_all=n_all, n_tensors=len(trainable), end=min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps)


def resume_or_start(run: RunState) -> None:
    """Continue from OUT/checkpoints/latest with --resume (a fresh --out starts at step 0, so one command line
    serves every restart of a preempted job), open the metrics log and print the run's header."""
    cfg, d, ckdir = run.cfg, run.d, run.ckdir
    # resume only when a checkpoint is there
    resuming = cfg.resume and any(CKPT_NAME.fullmatch(p.name) for p in ckdir.iterdir())
    if resuming:
        load_checkpoint(run)
    elif cfg.resume and d.main:
        print(f"train.py: --resume but no checkpoint in {ckdir}: starting at step 0", flush=True)
    run.log = Logger(run.out, d, run.step if resuming else None, cfg.tensorboard)
    run.log.print(f"stage {cfg.stage} | {d.world_size} rank(s) on {d.device} | {cfg.dtype} | trainable "
                  f"{run.n_train / 1e6:.2f}M of {run.n_all / 1e6:.2f}M params ({run.n_tensors} tensors) | global "
                  f"batch {cfg.batch} | lr {cfg.lr:g} | steps {cfg.steps}"
                  + (f" | grad cache ({cfg.micro_batch}-row micro-batches)" if cfg.grad_cache else "")
                  + (f" | resumed at step {run.step}" if run.step else ""))
    run.clock = Clock(start_step=run.step)
    if cfg.eval_every:
        run.evaluator = TrainEval(cfg, run.loader, run.targets, head_dims(run.model), run.autocast, run.log)


def local_vectors(run: RunState, batch) -> tuple[dict, Any]:
    """The default path: forward this rank's share micro-batch by micro-batch, keeping every graph (the in-batch
    losses need the whole global batch before any backward). -> ({D: (b, D)}, this rank's teacher rows)."""
    with run.autocast:
        outs = [forward_micro(run.model, m, run.heads, run.d) for m in micro_batches(batch)]
    return {D: torch.cat([s[D] for s, _ in outs]) for D in run.heads}, share_teacher(run, batch, [c for _, c in outs])


def step_loss(run: RunState, student_local: dict, teacher_local, sizes: list[int]) -> tuple[torch.Tensor, dict]:
    """Gather the GLOBAL batch (student vectors with gradients, teacher without; `sizes`: every rank's row count,
    from agree), then the losses of the stage (eq. 4). A non-finite loss stops the run naming the last good
    checkpoint."""
    cfg, d = run.cfg, run.d
    student = {D: gather_global(v, d, True, sizes) for D, v in student_local.items()}  # (B, D)
    if cfg.stage <= 3:
        teacher = gather_global(teacher_local, d, False, sizes)  # (B, Dt)
    else:
        teacher = {D: gather_global(v, d, False, sizes) for D, v in teacher_local.items()}
    loss, parts = losses.distill_loss(cfg.stage, student, teacher, weights=tuple(cfg.loss_weights),
                                      margin=cfg.margin, mrl_teacher=cfg.mrl_teacher,
                                      prefix_dims=tuple(head_dims(run.model)[1:]) if cfg.mrl_prefix else ())
    loss_val = loss.item()  # identical on every rank (same gathered inputs, same maths)
    if not math.isfinite(loss_val):
        raise DivergedError(f"non-finite loss {loss_val} at step {run.step + 1} (parts {parts}); stopping. "
                         f"Last good checkpoint: {run.last_ckpt or 'none'} (resume with --resume, e.g. with a "
                         f"lower --lr)")
    return loss, parts


def backward_step(run: RunState, batch, sizes: list[int]) -> tuple[float, dict, int]:
    """The gradient of one global batch's loss in the parameters' .grad, by the default path (every graph kept
    until one backward) or, with --grad-cache, by grad_cache.cached_backward (one micro-batch's graph at a time,
    the same gradient). -> (loss, parts, this rank's real tokens)."""
    if run.cfg.grad_cache:
        def forward(micro, with_teacher: bool):  # one micro-batch, pass 1 (no graph) or pass 2 (graph)
            with run.autocast:
                return forward_micro(run.model, micro, run.heads, run.d, with_teacher)
        loss, parts = grad_cache.cached_backward(
            forward, micro_batches(batch), lambda student, caps: step_loss(run, student, share_teacher(
                run, batch, caps), sizes), run.model, run.d.device)
    else:
        loss, parts = step_loss(run, *local_vectors(run, batch), sizes)
        loss.backward()
    return loss.item(), parts, batch.n_tokens if run.cfg.stage <= 3 else batch["n_tokens"]


def batch_counts(batch) -> tuple[int, int]:
    """(forwards, rows) this rank is about to run: what `agree` compares across ranks."""
    if isinstance(batch, dict):  # stage 4 (data.ImageBatches)
        return batch["n_forwards"], batch["pixel_values"].shape[0]
    return batch.n_forwards, len(batch.rows)


def optimizer_step(run: RunState, batch, failed: BaseException | None = None) -> tuple[float, dict, float, float, int]:
    """One optimizer step on one global batch: the agreement check -> forwards and gathers -> losses (eq. 4 per
    stage) -> backward -> clip -> AdamW -> schedule. A non-finite loss or gradient norm stops the run naming the
    last good checkpoint. `failed`: this rank could not build its batch (every rank stops, in agree)."""
    cfg = run.cfg
    sizes = agree(run.d, run.step + 1, *(batch_counts(batch) if failed is None else (0, 0)), failed=failed)
    loss_val, parts, n_tokens = backward_step(run, batch, sizes)
    gnorm = clip_grad_norm(run.train_params, cfg.grad_clip)
    if not math.isfinite(gnorm):
        raise DivergedError(f"non-finite gradient norm at step {run.step + 1}; stopping. Last good "
                         f"checkpoint: {run.last_ckpt or 'none'}")
    lr_now = set_optimizer_settings(run.opt, cfg, run.step)  # the lr of THIS step, set before opt.step
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)  # set_to_none: frees the gradient memory until the next backward
    run.step += 1
    return loss_val, parts, gnorm, lr_now, n_tokens


@dataclass
class Clock:
    """Wall time and tokens since the last progress line, for the tok/s rate and the ETA."""
    start_step: int
    t0: float = dataclasses.field(default_factory=time.time)
    tok_window: float = 0.0
    t_window: float = dataclasses.field(default_factory=time.time)


def evaluate_step(run: RunState) -> dict | None:
    """Every --eval-every steps and at the last: TrainEval's record, or {"error": ...} when it fails. A failure is
    printed and training goes on (under torchrun every rank runs the evaluation: the sharded forward needs all)."""
    if run.evaluator is None or (run.step % run.cfg.eval_every and run.step != run.end):
        return None
    try:
        ev = run.evaluator(run.model)
    except Exception as e:  # noqa: BLE001 - monitoring must never end a training run
        ev = {"error": f"{type(e).__name__}: {e}"}
    run.log.print(eval_line(run.step, ev))
    return ev


def log_step(run: RunState, loss_val: float, parts: dict, gnorm: float, lr_now: float, n_tokens: int,
             ev: dict | None = None) -> None:
    """metrics.jsonl gets every step (loss parts per head, lr, grad norm, tokens, skips, the evaluation record of
    an --eval-every step); stdout every log_every."""
    cfg, d, clock, step = run.cfg, run.d, run.clock, run.step
    tokens = all_sum(n_tokens, d)  # a collective: every rank calls it every step
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
    if ev is not None:
        rec["eval"] = ev
    run.log.metrics(rec)
    if step % cfg.log_every == 0 or step == cfg.steps:
        rate = clock.tok_window / max(1e-9, now - clock.t_window)
        # from this invocation's own rate (a resume does not skew it)
        eta = (now - clock.t0) / max(1, step - clock.start_step) * (cfg.steps - step)
        comp = " ".join(f"{k} {float(v):.4g}" for k, v in parts.items() if k != "total")
        run.log.print(f"step {step}/{cfg.steps} | loss {loss_val:.5g} | {comp} | lr {lr_now:.3g} | gnorm "
                      f"{gnorm:.3g} | {rate:,.0f} tok/s | ETA {fmt_duration(eta)}"
                      + (f" | skips {dict(skips)}" if skips else ""))
        clock.tok_window, clock.t_window = 0.0, now
    run.loss = loss_val


def finish(run: RunState) -> dict:
    """The best evaluated step (--eval-every) and its curves; the HF-layout export of a completed stage (and, with
    --eval-data, its STSBenchmark dev score)."""
    cfg, d, out = run.cfg, run.d, run.out
    summary = dict(step=run.step, loss=run.loss, checkpoint=run.last_ckpt)
    if run.evaluator is not None and d.main:
        best = best_eval(out / "metrics.jsonl")
        if best:
            summary["best_eval"] = best
            failed = f"; {best['n_failed']} failed" if best["n_failed"] else ""
            run.log.print(f"eval: best step {best['step']} ({best['by']}) of {best['n_evals']} evaluations"
                          f"{failed}; curves in {plot_eval(out / 'metrics.jsonl', out / 'eval_curves.png')}")
    if cfg.export and run.step == cfg.steps:
        summary["export"] = str(out / "final")
        if run.clock.start_step == run.step and (out / "final" / "config.json").is_file():
            run.log.print(f"the run had finished: {out / 'final'} is its export")  # a rerun of a finished job
            return summary
        try:
            export_final(run.model, run.tokenizer, out / "final", d, prefix_heads=cfg.mrl_prefix)
        except DiskFullError as e:
            raise DiskFullError(e.path, f"the export was abandoned (no partial folder left); the checkpoint of step "
                                        f"{run.step} is intact: free space and rerun with --resume to export") from e
        run.log.print(f"exported {out / 'final'}")
        if cfg.eval_data and d.main and run.evaluator is None:  # --eval-every scored the last step already
            score = quick_eval(load_encoder(out / "final"), cfg.eval_data)  # rank 0 only: the others are done
            summary["stsb_dev"] = score
            run.log.print(f"STSBenchmark dev spearman {score:.4f}")
    return summary


def micro_batches(batch) -> list[tuple[Any, int]]:
    """This rank's forwards as (input, real rows): packed rows (packing.Packed) or padded (ids, mask) chunks
    (stages 1-3, as data.TrainLoader laid them out), or dicts of image-caption pairs split evenly over
    batch["n_forwards"] (stage 4). Real rows 0: a micro-batch without texts or pairs still runs a one-token dummy
    (a blank image and a one-token caption in stage 4) whose output is dropped, so that its forward and backward
    pair up with the other ranks' FSDP collectives (every rank runs the same number of forwards)."""
    if not isinstance(batch, dict):
        return list(zip(batch.packed if batch.packed is not None else batch.chunks, batch.micro_sizes))
    pv, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    out = []
    for group in split_even(range(pv.shape[0]), batch["n_forwards"]):
        n = len(group)
        sl = slice(group[0], group[-1] + 1) if n else slice(0, 1)
        p_sl, i_sl, m_sl = (pv[sl], ids[sl], mask[sl]) if n else dummy_image_pair(pv, ids)
        out.append((dict(pixel_values=p_sl, input_ids=i_sl, attention_mask=m_sl), n))
    return out


def forward_micro(model, micro: tuple[Any, int], heads: list[int], d: Dist,
                  with_teacher: bool = True) -> tuple[dict, dict | None]:
    """One of micro_batches' forwards -> ({D: (n, D) fp32 student vectors}, teacher part or None), a dummy's row
    dropped ([:n]). Stages 1-3: one vector per text (packed: in the order the texts were given); the teacher part
    is None (TextTargets gives the targets). Stage 4 (sec. 2.5): each caption through the frozen text side (no
    grad) is the teacher of its image (with_teacher=False skips it); the image enters as <img_start> <img_token> x K
    <img_end> with the K tokens replaced by pooled vision features, and its gradient reaches only the vision tower."""
    x, n = micro
    if not isinstance(x, dict):
        out = (model(packed=x.to(d.device), dims=heads) if not isinstance(x, (tuple, list))
               else model(x[0].to(d.device), x[1].to(d.device), dims=heads))
        return {D: out[D][:n].float() for D in heads}, None  # fp32 for the losses (the forward may run in bf16)
    cap = None
    if with_teacher:
        with torch.no_grad():  # frozen text side: the caption vector is the target
            c = model(x["input_ids"].to(d.device), x["attention_mask"].to(d.device), dims=heads)
        cap = {D: c[D][:n].float() for D in heads}
    pv = x["pixel_values"].to(d.device)
    img_ids = torch.tensor(model.image_prompt_ids(), device=d.device)[None].expand(pv.shape[0], -1)  # (m, K + 2)
    img = model(img_ids, torch.ones_like(img_ids), pixel_values=pv, dims=heads)
    return {D: img[D][:n].float() for D in heads}, cap


def share_teacher(run: RunState, batch, caps: list):
    """This rank's teacher rows: stages 1-3 the (b, Dt) fp32 targets (cache verified by (row, hash), or teachers on
    the fly), rows in the order of the micro-batches; stage 4 {D: (b, D)} from forward_micro's caption vectors."""
    if run.cfg.stage <= 3:
        return run.targets(batch.rows, batch.hashes).to(run.d.device)
    return {D: torch.cat([c[D] for c in caps]) for D in run.heads}


def dummy_image_pair(pv: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A blank image and a one-token caption for a forward that has no pair of its own (micro_batches)."""
    return pv.new_zeros(1, *pv.shape[1:]), ids.new_zeros(1, 1), ids.new_ones(1, 1)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Global gradient norm (over all ranks' shards under FSDP), clipped to max_norm when max_norm > 0."""
    params = [p for p in params if p.grad is not None]  # frozen or unused parameters have no grad
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))  # inf: measure only
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(argv, description=__doc__))


def cli(argv: list[str] | None = None) -> int:
    """`python train.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
