"""Evaluation during training (`train.py --eval-every N`), like sentence-transformers' evaluators.

A fixed slice of texts held out of the loader (data.TrainLoader(holdout=K): never in a batch, recorded in the
run's config.json) gives student-vs-teacher agreement on unseen texts: the cosine and MSE of eq. 1's pair (student
FC1 vs the teacher) and eq. 2's similarity-matrix MSE at every head. STSBenchmark dev (eval.py's built-in path)
gives a task score at every head. Each evaluation is logged with its step in metrics.jsonl (`eval`), drawn in
OUT/eval_curves.png, and the run's summary names the best step. A failing evaluation is reported and recorded,
and training goes on: a run never dies for its monitoring.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

import losses
from checkpoints import atomic_write
from data import default_data_dir
from eval import builtin_sts
from eval_inputs import EmbeddingCache, EvalError, Instructions, find_task_dir, read_jsonl, require_fields, task_instruction
from readers import read_jsonl as read_jsonl_rows


class _HeadsEncoder:
    """eval.EmbeddingCache's encoder protocol over the model being trained, at the run's max length. `prefix`
    (--mrl-prefix): the shorter dims are FC1's first d coordinates, renormalised, as the export will write them
    (FC2-4 are untrained until then)."""

    encodes_many_dims = True

    def __init__(self, model, dims: list[int], max_length: int, autocast, prefix: bool = False):
        self.model, self.dims, self.max_length, self.autocast = model, tuple(dims), max_length, autocast
        self.prefix = prefix

    def encode(self, texts, dim=None, instruction=None, batch_size=64, show_progress=None):
        # the run's autocast: the scores are those of the model as it trains (bf16 matmuls in a bf16 run); at the
        # run's max length, so a text is cut where training cuts it
        with self.autocast:
            if not self.prefix:
                return self.model.encode(list(texts), dim=dim, instruction=instruction, batch_size=batch_size,
                                         show_progress=False, max_length=self.max_length)
            fc1 = self.model.encode(list(texts), dim=self.dims[0], instruction=instruction, batch_size=batch_size,
                                    show_progress=False, max_length=self.max_length)  # (N, D1) normalised
        cut = {D: torch.nn.functional.normalize(fc1[:, :D], dim=-1) for D in self.dims}  # {D: (N, D)}
        return cut if isinstance(dim, (list, tuple)) else cut[dim or self.dims[0]]


class TrainEval:
    """One evaluation of the model being trained -> {"heldout_cos", "heldout_mse", "heldout_sim_mse": {D},
    "stsb_dev": {D}, "time_s"}. The held-out texts and their teacher targets are read once; STSBenchmark dev comes
    from --eval-data (default: the shared data dir) and is skipped, once and with a message, where it is absent."""

    def __init__(self, cfg, loader, targets, dims: list[int], autocast, log):
        """cfg: train.TrainConfig; loader: data.TrainLoader with a holdout; targets: train.TextTargets (cache rows ->
        teacher vectors); dims: the student's heads; autocast: the run's context; log: train.Logger."""
        self.dims, self.autocast, self.cfg = list(dims), autocast, cfg
        self.texts, rows, hashes = loader.holdout_records()
        # read once: the same K texts and targets at every evaluation, so the curves compare like with like; the
        # cache verifies each row's text hash as it does for a training batch
        self.teacher = targets(torch.tensor(rows), hashes)  # (K, Dt) fixed targets of the held-out texts
        self.sts, data_dir = None, Path(cfg.eval_data) if cfg.eval_data else default_data_dir()
        try:
            path = find_task_dir(data_dir, "STSBenchmark", "STS") / "dev.jsonl"
            self.sts = read_jsonl(path, "STSBenchmark")
            require_fields(self.sts, ("sentence1", "sentence2", "score"), path, "STSBenchmark")
            self.instructions = Instructions(cfg.eval_instructions, data_dir=data_dir)
        except (EvalError, OSError) as e:  # a missing or broken file: monitoring degrades, training does not stop
            self.sts = None
            log.print(f"eval: no STSBenchmark dev score during training ({e}); held-out metrics only")
        log.print(f"eval every {cfg.eval_every} steps: {len(self.texts)} held-out texts"
                  + (f", STSBenchmark dev ({len(self.sts)} pairs) at heads {self.dims}" if self.sts else ""))

    def __call__(self, model) -> dict:
        t0 = time.time()
        enc = _HeadsEncoder(model, self.dims, self.cfg.max_length, self.autocast, prefix=self.cfg.mrl_prefix)
        # model.encode switches to eval mode (no dropout) under inference_mode and restores train mode; the finally
        # below restores it even when an evaluation raises, so the next optimizer step trains as before
        try:
            vec = enc.encode(self.texts, dim=self.dims)  # {D: (K, D)} from one body pass
            s, t = vec[self.dims[0]], self.teacher  # FC1 vs the teacher (eq. 1's pair), both L2-normalised
            out: dict[str, Any] = {"heldout_cos": float((s * t).sum(-1).mean()),
                                   "heldout_mse": float(((s - t) ** 2).mean()),
                                   "heldout_sim_mse": {str(D): float(self._sim_mse(vec[D], t)) for D in self.dims}}
            if self.sts is not None:
                # the built-in STS path of eval.py (cosine Spearman, the metric MTEB reports for STS, as in Table 3),
                # not mteb: no results folder is written on every N steps
                cache = EmbeddingCache(enc, batch_size=64, show_progress=False)
                cache.dims = tuple(self.dims)  # one body pass fills every head
                instr = task_instruction("STSBenchmark", "STS", None, self.instructions)
                out["stsb_dev"] = {str(D): builtin_sts(cache, self.sts, D, instr)["cosine_spearman"]
                                   for D in self.dims}
        finally:
            model.train()
        out["time_s"] = round(time.time() - t0, 3)
        return out

    @staticmethod
    def _sim_mse(s, t):
        # eq. 2 on the held-out slice: (K, D) student vs (K, Dt) teacher, compared through their K x K similarity
        # matrices, so a head shorter than the teacher is scored too
        return losses.similarity_loss(s, t)


def evaluations(metrics_path: Path) -> tuple[list[tuple[int, dict]], int]:
    """([(step, record)] of the successful evaluations, number of failed ones) from a run's metrics.jsonl; a resumed
    run's file holds each step once (train.Logger drops the lines written after the last checkpoint)."""
    rows = [row for _, row in read_jsonl_rows(metrics_path)]  # the project's one jsonl reader
    evs = [(r["step"], r["eval"]) for r in rows if "eval" in r and "error" not in r["eval"]]
    return evs, sum(1 for r in rows if "error" in r.get("eval", {}))


def eval_line(step: int, ev: dict) -> str:
    if "error" in ev:
        return f"eval step {step} FAILED ({ev['error']}); training continues"
    sts = " ".join(f"{d} {v:.4f}" for d, v in ev.get("stsb_dev", {}).items())
    return (f"eval step {step} | held-out cos {ev['heldout_cos']:.4f} mse {ev['heldout_mse']:.3g}"
            + (f" | STSB dev {sts}" if sts else "") + f" | {ev['time_s']:.1f}s")


def best_eval(metrics_path: Path) -> dict | None:
    """The best evaluated step of a run (metrics.jsonl, resumed runs included): highest STSBenchmark dev Spearman at
    FC1, else highest held-out cosine."""
    evs, n_failed = evaluations(metrics_path)
    if not evs:
        return None

    def key(e):  # the task score when there is one (what a user picks a checkpoint by), else teacher agreement
        return next(iter(e[1]["stsb_dev"].values())) if e[1].get("stsb_dev") else e[1]["heldout_cos"]
    step, ev = max(evs, key=key)
    what = (f"STSBenchmark dev Spearman {key((step, ev)):.4f} at head {next(iter(ev['stsb_dev']))}"
            if ev.get("stsb_dev") else f"held-out cosine {ev['heldout_cos']:.4f}")
    return {"step": step, "by": what, "eval": ev, "n_evals": len(evs), "n_failed": n_failed}


def plot_eval(metrics_path: Path, out: Path) -> Path | None:
    """OUT/eval_curves.png: held-out agreement and STSBenchmark dev Spearman per head against the step."""
    evs, _ = evaluations(metrics_path)
    if not evs:
        return None
    import matplotlib  # optional and slow to import: only when there is something to draw
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [s for s, _ in evs]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(x, [e["heldout_cos"] for _, e in evs], "o-", label="cos(student FC1, teacher)")
    ax[0].set(xlabel="step", ylabel="held-out cosine", title=f"held-out texts ({metrics_path.parent.name})")
    ax2 = ax[0].twinx()  # cosine and MSE move together ((2 - 2 cos) / D) but on scales that one axis cannot share
    ax2.plot(x, [e["heldout_mse"] for _, e in evs], "s--", color="C3", label="MSE")
    ax2.set_ylabel("held-out MSE (FC1 vs teacher)")
    ax[0].legend(loc="lower left", fontsize=7)
    ax2.legend(loc="lower right", fontsize=7)
    for D in evs[0][1].get("stsb_dev", {}):
        ax[1].plot(x, [e["stsb_dev"][D] for _, e in evs], "o-", label=f"head {D}")
    ax[1].set(xlabel="step", ylabel="cosine Spearman", title="STSBenchmark dev")
    if evs[0][1].get("stsb_dev"):
        ax[1].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))  # a kill mid-write leaves the old plot
    plt.close(fig)
    return out
