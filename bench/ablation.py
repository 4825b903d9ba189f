"""What each distillation loss is worth: the loss ablation on the demo student (issue 19, item 3).

The paper (arXiv 2412.19048) trains with three losses at fixed weights (eq. 4: lambda = 10 / 200 / 20) and gives no
ablation; the Matryoshka heads FC2-4 learn from the teacher, and sec. 2.4 ends by proposing, untested, that they learn
from the student's own FC1 instead.  This script trains the demo's student (the random-init Qwen2 of the offline
demo, docs/demo.md) through the demo's stages 1-3 with the REAL trainer (`train.train`, as demo.py does) once per variant and seed, on
the same texts, the same teacher cache and the same number of steps, and prints one table: every STS task of the
demo at every head (FC1..FC4 = 384 / 256 / 128 / 64), mean over the seeds.

Variants (lambda1, lambda2, lambda3; stage 3's FC2-4 targets):
  cos          (10, 0, 0)         cosine only.  FC2-4 receive no loss at all (eq. 1 needs equal widths), so their
                                  rows show what untrained random heads on the trained body give
  cos+sim      (10, 12.5, 0)      cosine + similarity (eq. 1 + 2) at the demo's lambda2
  paper        (10, 200, 20)      all three at the paper's weights
  demo         (10, 12.5, 1.25)   all three at the demo's weights (the demo preset); FC2-4 taught by the teacher
  demo+self    (10, 12.5, 1.25)   as demo, FC2-4 taught by the student's own FC1 (`--mrl-teacher self`, sec. 2.4)
`demo` and `demo+self` differ only in stage 3, so they share stages 1-2 (one run of them per seed).

Budget (the full demo is ~11 min of training on an idle 2-core machine; 5 variants x 2 seeds of it do not fit a
session): the paper schedule's stages (`demo.py --schedule paper`, the demo's default when this ablation was run) at
`--fraction` of its 1,500 steps (default 0.25: 26 / 225 / 124 steps, batch 64, its learning rates and shape), on
a uniform random `--n-texts` of the demo's training texts (default 32,000; the full demo draws from 69,426), one
teacher cache reused by every run.  Seeds change the student's init
and the data order, not the texts.  Results are written per run to WORK/results.json, so an interrupted run
resumes where it stopped and a partial table can be printed at any time (`--table-only`).

    OMP_NUM_THREADS=1 python bench/ablation.py --work runs/ablation               # everything (hours on 1 thread)
    python bench/ablation.py --work runs/ablation --table-only                    # the table of what is done
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data as D  # noqa: E402
import eval as E  # noqa: E402
import teachers as T  # noqa: E402
import demo as DEMO  # noqa: E402  the demo's pieces: make_demo_student, _demo_eval, DEMO_*
import train as TR  # noqa: E402
from checkpoints import atomic_write  # noqa: E402
from teacher_cache import build_cache  # noqa: E402

PAPER = DEMO.DEMO_SCHEDULES["paper"]  # the stages 1-3 this ablation measures

VARIANTS = {  # name: (loss weights, stage-3 teacher of FC2-4, label)
    "cos": ((10.0, 0.0, 0.0), "teacher", "cosine only"),
    "cos+sim": ((10.0, 12.5, 0.0), "teacher", "cosine + similarity"),
    "paper": ((10.0, 200.0, 20.0), "teacher", "all three, paper weights 10/200/20"),
    "demo": ((10.0, 12.5, 1.25), "teacher", "all three, demo weights 10/12.5/1.25"),
    "demo+self": ((10.0, 12.5, 1.25), "self", "demo weights, FC2-4 taught by FC1 (self)"),
}
LOSS_KEYS = ("fc1.cos", "fc1.sim", "fc1.resim", "fc4.sim", "fc4.resim")  # last-20-step means reported per run


def say(msg: str) -> None:
    print(f"[ablation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_subset(rows: list[str], path: Path, n: int | None, seed: int = 0) -> int:
    """A seeded uniform random n of the texts.jsonl rows (all of them when n is None or too large), in their order,
    renumbered 0..N-1 (a teacher cache is built over the new file), written to path. Returns the count."""
    if n and n < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]
    out = []
    for i, line in enumerate(rows):
        r = json.loads(line)
        r["id"] = i
        out.append(json.dumps(r, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(out) + "\n")
    return len(out)


def prepare(work: Path, data_dir: Path, n_texts: int | None) -> Path:
    """The demo's training texts (data.py recipe, DEMO_DATA), optionally a uniform random subset renumbered 0..N-1,
    and one teacher cache over them (all-MiniLM-L6-v2, 32 tokens, bf16: exactly the demo's cache)."""
    texts = work / "data" / "texts.jsonl"
    if not texts.exists():
        full = work / "data_full"
        D.build(full, data_dir=data_dir, seed=0, progress=False, **DEMO.DEMO_DATA)
        n = write_subset((full / "texts.jsonl").read_text(encoding="utf-8").splitlines(), texts, n_texts)
        say(f"texts: {n:,} -> {texts}")
    teacher = T.BertTeacher(T.minilm_path(), max_length=32, dtype=DEMO.DEMO_CACHE_DTYPE)
    build_cache([teacher], texts, work / "cache", batch_size=256)  # reuses finished shards
    return texts


def stage_cfg(k: int, init: Path, out: Path, texts: Path, cache: Path, steps: int, seed: int,
              weights, mrl: str) -> TR.TrainConfig:
    base = dict(DEMO.DEMO_CONFIG)
    base.update(stage=k, init=str(init), init_format="jasper", out=str(out), texts=str(texts),
                teacher_cache=str(cache), steps=steps, lr=base["lr"] * PAPER["lr_mult"][k - 1],
                seed=seed + k, loss_weights=list(weights), mrl_teacher=mrl if k == 3 else "teacher",
                log_every=max(1, steps // 4))
    return TR.TrainConfig(**base)


def last_mean(metrics: Path, key: str, n: int = 20) -> float | None:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    vals = [r[key] for r in recs[-n:] if key in r]
    return sum(vals) / len(vals) if vals else None


def run_one(work: Path, texts: Path, data_dir: Path, name: str, seed: int, steps: list[int]) -> dict:
    weights, mrl, _ = VARIANTS[name]
    sdir = work / f"seed{seed}"
    init = sdir / "init"
    if not (init / "config.json").exists():
        DEMO.make_demo_student(T.minilm_path(), max_length=32, seed=seed).save_pretrained(init)
    wkey = "w" + "_".join(f"{w:g}" for w in weights)  # stages 1-2 depend on the weights only: shared
    prev = init
    t0 = time.time()
    for k in (1, 2, 3):
        sd = sdir / wkey / f"stage{k}" if k < 3 else sdir / name / "stage3"
        if k < 3 and (sd / "final" / "config.json").exists():
            prev = sd / "final"
            continue
        shutil.rmtree(sd, ignore_errors=True)
        TR.train(stage_cfg(k, prev, sd, texts, work / "cache", steps[k - 1], seed, weights, mrl))
        prev = sd / "final"
    train_s = time.time() - t0
    student = E.load_encoder(prev, max_length=DEMO.DEMO_EVAL_MAX_LENGTH)
    dims = list(DEMO.DEMO_HEAD_DIMS)
    scores = DEMO._demo_eval(student, DEMO.DEMO_TASKS, data_dir, dims, "builtin", None)
    metrics = sdir / name / "stage3" / "metrics.jsonl"
    losses_end = {k: last_mean(metrics, k) for k in LOSS_KEYS}
    return dict(variant=name, seed=seed, weights=list(weights), mrl_teacher=mrl, steps=steps,
                scores={t: {str(d): v for d, v in per.items()} for t, per in scores.items()},
                stage3_losses_last20=losses_end, wall_s=round(time.time() - t0, 1), train_s=round(train_s, 1))


def table(res: dict, names: list[str], fraction: float, n_texts: int, steps: list[int]) -> str:
    """Rows: task x head dim; columns: variants; cells: mean over the seeds done (+- half the seed range)."""
    cols = [n for n in names if any(r["variant"] == n for r in res.values())]
    if not cols:
        return "(no run finished yet)"
    seeds = {n: sorted(r["seed"] for r in res.values() if r["variant"] == n) for n in cols}
    lines = [f"Loss ablation on the demo student: stages 1-3 at {fraction:g} of the demo's steps "
             f"({'/'.join(map(str, steps))} steps, batch 64), {n_texts:,} texts, one teacher cache; STS test "
             f"split, cosine Spearman; mean over seeds (+- half the range); seeds per column: "
             + ", ".join(f"{n} {seeds[n]}" for n in cols), "",
             "| task | dim | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]

    def cell(vals):
        if not vals:
            return "-"
        m = sum(vals) / len(vals)
        return f"{m:.4f}" + (f" ±{(max(vals) - min(vals)) / 2:.4f}" if len(vals) > 1 else "")

    for task in DEMO.DEMO_TASKS:
        for d in DEMO.DEMO_HEAD_DIMS:
            vals = {n: [r["scores"][task][str(d)] for r in res.values() if r["variant"] == n] for n in cols}
            lines.append(f"| {task} | {d} | " + " | ".join(cell(vals[n]) for n in cols) + " |")
    for d in DEMO.DEMO_HEAD_DIMS:  # mean over the four tasks, per head
        vals = {n: [sum(r["scores"][t][str(d)] for t in DEMO.DEMO_TASKS) / len(DEMO.DEMO_TASKS)
                    for r in res.values() if r["variant"] == n] for n in cols}
        lines.append(f"| **mean of 4** | {d} | " + " | ".join(cell(vals[n]) for n in cols) + " |")
    for k in LOSS_KEYS:
        vals = {n: [r["stage3_losses_last20"][k] for r in res.values()
                    if r["variant"] == n and r["stage3_losses_last20"].get(k) is not None] for n in cols}
        lines.append(f"| end loss {k} | | " + " | ".join(cell(vals[n]) for n in cols) + " |")
    lines.append("")
    lines.append("variants: " + "; ".join(f"{n} = {VARIANTS[n][2]}" for n in cols) + ". End losses: unweighted, "
                 "mean of the last 20 steps of stage 3 (fc4 = the 64-d head; under `self` its targets are FC1's "
                 "vectors, not the teacher's).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/ablation", help="working folder (texts, cache, runs, results.json)")
    p.add_argument("--data-dir", default=None, help="shared data folder (default $JASPER_DATA_DIR or ../shared/data)")
    p.add_argument("--fraction", type=float, default=0.25, help="fraction of the demo's 1,500 steps (default 0.25)")
    p.add_argument("--n-texts", type=int, default=32000, help="random subset of the demo's texts (0 = all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--table-only", action="store_true", help="print the table of the runs done so far and exit")
    a = p.parse_args(argv)
    if not 0 < a.fraction <= 4:
        raise SystemExit(f"bench/ablation.py: --fraction must be in (0, 4], got {a.fraction}")
    work = Path(a.work)
    data_dir = Path(a.data_dir) if a.data_dir else D.default_data_dir()
    total = round(PAPER["steps"] * a.fraction)
    steps = DEMO.stage_steps(total, PAPER["share"])
    res_path = work / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if a.table_only:
        n = json.loads((work / "meta.json").read_text())["n_texts"] if (work / "meta.json").exists() else 0
        print(table(res, a.variants, a.fraction, n, steps))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    texts = prepare(work, data_dir, a.n_texts or None)
    n_texts = sum(1 for _ in open(texts, encoding="utf-8"))
    atomic_write(work / "meta.json", json.dumps(dict(n_texts=n_texts, fraction=a.fraction, steps=steps)) + "\n")
    for seed in a.seeds:  # seed-major: a partial table has every variant of the first seed
        for name in a.variants:
            key = f"{name}/seed{seed}"
            if key in res and res[key]["steps"] == steps:
                continue
            say(f"{key}: stages 1-3 = {steps} steps ...")
            res[key] = run_one(work, texts, data_dir, name, seed, steps)
            atomic_write(res_path, json.dumps(res, indent=1) + "\n")
            say(f"{key} done in {res[key]['wall_s']:.0f}s: STSBenchmark "
                + " / ".join(f"{v:.4f}" for v in res[key]["scores"]["STSBenchmark"].values()))
            print(table(res, a.variants, a.fraction, n_texts, steps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
