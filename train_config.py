"""The configuration of one training run (train.py, demo.py): a dataclass whose every field is a CLI flag and a
`--config file.json` key, the paper's per-stage defaults (sec. 3.1), and the checks that refuse a value before
anything runs (type and range, naming the flag or the file and key).

Precedence (low -> high): dataclass default / per-stage default < a caller's defaults (demo.py) < --config file <
CLI flags. Every setting either takes effect or is refused here or in train.check_inputs; none is ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from checkpoints import read_json
from errors import ArgumentParser, UserError, check_value

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
    heads: list[int] = _f([], "head dims FC1 FC2 ... of a student built from a body (--init a BERT-family or stella "
                              "folder); default: BERT FC1 = the teacher's dim, FC2-4 the three largest powers of two "
                              "below it and the body width; stella (12288, 1024, 512, 256). Refused with an --init "
                              "that has heads")
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
                                 "the in-batch losses see all of it; any value >= the rank count")
    micro_batch: int = _f(16, "rows per forward pass on one rank (memory knob; does not change the maths)")
    packing: bool = _f(True, "stages 1-3: pack the global batch's texts end to end in rows of --max-length tokens, "
                             "each text attending only to itself (packing.py): same losses, no compute on padding; "
                             "--no-packing pads one text per row (docs/data.md)")
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
    mrl_prefix: bool = _f(False, "stage 3: instead of the separate heads FC2-4, train FC1's first d coordinates "
                                 "(renormalised) at each shorter head dim d with the similarity and relative-"
                                 "similarity losses (Matryoshka training, the authors' MRL code); FC2-4 stay frozen "
                                 "and the export writes them as FC1's first d rows, so head d = FC1 truncated to d "
                                 "and renormalised (docs/losses.md)")
    # --- systems
    dtype: str = _f("bf16", "bf16: FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32) (autocast bf16 in a plain "
                            "single process); fp32: everything fp32", choices=["bf16", "fp32"])
    device: str = _f("auto", "auto (cuda if available), cpu or cuda", choices=["auto", "cpu", "cuda"])
    activation_checkpointing: bool = _f(False, "recompute each transformer block in backward (saves memory)")
    grad_cache: bool = _f(False, "cached-gradient training (grad_cache.py): forward every micro-batch without a "
                                 "graph, take the loss' gradient at the vectors, then re-forward and backward one "
                                 "micro-batch at a time: activation memory of ONE --micro-batch whatever --batch, "
                                 "the same gradient, ~1 extra forward of compute; under FSDP one unsharded fp32 "
                                 "gradient of the trainable parameters per rank (docs/train.md)")
    seed: int = _f(0, "seed for the data order and anything random")
    # --- logging, checkpoints, export
    log_every: int = _f(10, "print a progress line every N steps (metrics.jsonl gets every step)")
    tensorboard: bool = _f(False, "also log every metrics.jsonl scalar live to OUT/tensorboard/ (rank 0; view with "
                                  "`tensorboard --logdir OUT/tensorboard`); needs the optional tensorboard package")
    ckpt_every: int = _f(500, "checkpoint every N steps (0 = only at the end)")
    keep_ckpts: int = _f(2, "keep the last N checkpoints")
    stop_at: int | None = _f(None, "end this run after this step (with a checkpoint) without changing the schedule; "
                                   "continue later with --resume (preemptible jobs, time-boxed runs)")
    resume: bool = _f(False, "continue from OUT/checkpoints/latest (exactly: same losses as an uninterrupted run); "
                             "starts at step 0 when OUT has no checkpoint yet")
    export: bool = _f(True, "export the final model to OUT/final: our files, also a standard sentence-transformers "
                            "/ transformers folder (docs/checkpoints.md)")
    eval_data: str | None = _f(None, "the shared data dir: after the export, quick STSBenchmark-dev score of the final "
                                     "model (eval.py; empty = skip); with --eval-every, where its STSBenchmark dev "
                                     "comes from (default: the shared data dir; the last evaluation replaces the "
                                     "quick score)")
    eval_every: int = _f(0, "stages 1-3: every N steps (and at the last), cosine and MSE of student FC1 vs teacher "
                            "on held-out texts, sim-matrix MSE and STSBenchmark dev Spearman at every head (0 = off)")
    eval_holdout: int = _f(256, "texts held out of training for --eval-every (never in a batch; rows recorded in "
                                "config.json)")
    eval_instructions: str = _f("original", "instruction set for the STSBenchmark dev score during training "
                                            "(eval.py's sets)", choices=["original", "synonym", "none"])
    config: str | None = _f(None, "JSON file of config values (keys = field names); CLI flags override it")

    def __post_init__(self):
        if self.mrl_teacher not in ("teacher", "self"):
            raise ConfigError(f"--mrl-teacher must be 'teacher' or 'self', got {self.mrl_teacher!r}")
        if len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"--heads {self.heads}: the head dims must be distinct")
        if self.out is None:
            self.out = f"runs/stage{self.stage}"
        if self.tensorboard:
            require_tensorboard()
        for k, v in STAGE_DEFAULTS[self.stage].items():  # per-stage defaults (sec. 3.1) for fields left unset
            if getattr(self, k) is None:
                setattr(self, k, v)


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog or "train.py", description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # SUPPRESS: given flags only
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = dict(help=f.metadata["help"])
        # a list field has only a default_factory
        shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in STAGE_DEFAULTS[1]:  # batch / lr / steps: None here, filled per stage by __post_init__
            shown = "per stage " + "/".join(str(STAGE_DEFAULTS[s][f.name]) for s in (1, 2, 3, 4))
        kw["help"] += f" (default: {shown})" if shown is not None else ""
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if t == "bool":  # --packing / --no-packing
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("list"):
            kw["nargs"] = "+"
            # list[float] (betas, loss weights), list[int] (--heads) or list[str] (--teacher)
            kw["type"] = float if "float" in t else int if "int" in t else str
        else:
            kw["type"] = int if t.startswith("int") else float if t.startswith("float") else str
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(flag, dest=f.name, **kw)
    return p


class ConfigError(UserError):
    """A setting that cannot work (type, range, a missing input, a resume that would silently differ); the message
    names the flag, --config key or file."""


def require_tensorboard() -> None:
    """--tensorboard needs the optional `tensorboard` package: refused at start-up in one line, not a traceback at
    the first logged step."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboard package, which is not installed (pip install "
                          f"tensorboard): {e}") from None


# Valid values beyond each field's annotated type, checked up front by validate_values (type + range, naming the key).
LIMITS: dict[str, dict[str, Any]] = dict(
    image_size=dict(lo=1), num_workers=dict(lo=0), max_length=dict(lo=1), batch=dict(lo=1), micro_batch=dict(lo=1),
    lr=dict(lo=0, lo_open=True), steps=dict(lo=1), warmup_ratio=dict(lo=0, hi=1, hi_open=True),
    min_lr_ratio=dict(lo=0, hi=1), weight_decay=dict(lo=0), adam_betas=dict(lo=0, hi=1, hi_open=True, length=2),
    adam_eps=dict(lo=0, lo_open=True), grad_clip=dict(lo=0), loss_weights=dict(lo=0, length=3), margin=dict(lo=0),
    seed=dict(lo=0, hi=2**32 - 1), log_every=dict(lo=1), ckpt_every=dict(lo=0), keep_ckpts=dict(lo=0),
    stop_at=dict(lo=1), eval_every=dict(lo=0), eval_holdout=dict(lo=1), heads=dict(lo=1))


def parse_config(argv: list[str] | None = None, defaults: dict[str, Any] | None = None, prog: str | None = None,
                 description: str | None = None) -> TrainConfig:
    """The config of one run: `defaults` (demo.py's values) < --config file < the flags given in argv. Every value
    is checked (validate_values) before the dataclass is built, naming the flag or the file and key."""
    given = vars(build_parser(prog, description).parse_args(argv))  # only the flags actually given
    values: dict[str, Any] = dict(defaults or {})
    source = {k: f"{prog or 'train.py'} default {k}" for k in values}  # where each value came from, named in its error
    if given.get("config"):
        file_values = _read_json_config(given["config"])
        values.update(file_values)
        source.update({k: f"--config {given['config']}: key {k!r}" for k in file_values})
    values.update(given)
    source.update({k: "--" + k.replace("_", "-") for k in given})
    return TrainConfig(**validate_values(values, source))


def validate_values(values: dict[str, Any], source: dict[str, str] | None = None) -> dict[str, Any]:
    """Type (from the annotation) and range (LIMITS, choices) of every value, e.g. `--steps: expected >= 1, got -5`
    or `--config c.json: key 'steps': expected an integer, got 'ten'`. Returns the values with JSON numbers coerced
    (3.0 -> 3 for an int field, 1 -> 1.0 for a float field)."""
    source = source or {}
    out = dict(values)
    for f in fields(TrainConfig):
        # None of an optional field means unset
        if f.name not in values or (values[f.name] is None and "None" in str(f.type)):
            continue
        # f.type is a string here (from __future__ import annotations)
        v, kind = values[f.name], str(f.type).replace(" | None", "")
        why = check_value(v, kind, choices=f.metadata.get("choices"), **LIMITS.get(f.name, {}))
        if why:
            raise ConfigError(f"{source.get(f.name, f.name)}: {why}")
        out[f.name] = (int(v) if kind == "int" else float(v) if kind == "float"
                       else [float(x) for x in v] if kind == "list[float]"
                       else [int(x) for x in v] if kind == "list[int]" else v)
    if "loss_weights" in out and not any(out["loss_weights"]):  # all zero: a constant loss, no gradient at all
        raise ConfigError(f"{source.get('loss_weights', 'loss_weights')}: at least one loss weight must be > 0")
    return out


def _read_json_config(path: str) -> dict[str, Any]:
    raw = read_json(path, "--config file", error=ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings, got {type(raw).__name__}")
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        k2 = k.replace("-", "_")  # keys may be spelled as flags (max-length) or fields
        if k2 == "eval_heldout":  # a record train.py writes into config.json, not a setting
            continue
        if k2 not in names:
            raise ConfigError(f"--config {path}: unknown key {k!r} (known: {sorted(names)})")
        out[k2] = v
    return out
