"""Live training curves in TensorBoard (`train.py --tensorboard`): every scalar of each metrics.jsonl record, as it is
written, into TensorBoard event files under OUT/tensorboard/ (`tensorboard --logdir OUT/tensorboard`).

metrics.jsonl stays the record of a run; this is a view of it, written by rank 0 only (train.Logger). Tags follow
the record's keys: top-level scalars under `train/` (train/loss, train/fc1.cos, train/lr, train/grad_norm,
train/tokens, train/elapsed_s, plus train/tokens_per_s = the step's tokens / its wall time), nested records under
their key (eval/heldout_cos, eval/stsb_dev/384, skips/<reason>). A failed evaluation's message goes to the text tab.

Resume: the run continues from its checkpoint at step S, after a killed run may have logged steps beyond S. The
writer opens with purge_step S+1, so TensorBoard drops those orphaned points and shows each step once (the same
steps metrics.jsonl keeps). A fresh run removes an earlier run's event files, as train.Logger removes its metrics.

The `tensorboard` package is optional (requirements-test.txt); train_config refuses --tensorboard without it.
"""
from __future__ import annotations

from pathlib import Path


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """One metrics.jsonl record -> {tag: value} for every number in it (nested dicts flattened with '/'; the step
    is the x axis, not a scalar; strings and booleans are not curves)."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if not prefix and k == "step":
            continue
        tag = f"{prefix}/{k}" if prefix else (k if isinstance(v, dict) else f"train/{k}")
        if isinstance(v, dict):
            out.update(scalars(v, tag))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[tag] = float(v)
    return out


class TensorBoardLog:
    """A torch SummaryWriter fed with metrics.jsonl records; flushed after each so a live TensorBoard sees it."""

    def __init__(self, logdir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: checked at start-up (train_config)

        logdir = Path(logdir)
        if resume_step is None and logdir.is_dir():  # a fresh run: an older run's curves would mix in
            for f in logdir.glob("events.out.tfevents.*"):
                f.unlink()
        self.writer = SummaryWriter(str(logdir), purge_step=None if resume_step is None else resume_step + 1)
        self.last_elapsed = 0.0  # elapsed_s counts from this invocation's start (train.Clock)

    def write(self, rec: dict) -> None:
        step = int(rec["step"])
        values = scalars(rec)
        elapsed = rec.get("elapsed_s")
        if elapsed is not None and "tokens" in rec:
            if elapsed > self.last_elapsed:  # the progress line's tok/s, per step
                values["train/tokens_per_s"] = rec["tokens"] / (elapsed - self.last_elapsed)
            self.last_elapsed = elapsed
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        err = (rec.get("eval") or {}).get("error")
        if err:
            self.writer.add_text("eval/error", str(err), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
