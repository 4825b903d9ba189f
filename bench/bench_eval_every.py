"""Cost of `train.py --eval-every N` at the demo's shapes (issue 15): the same run with and without it, side by side.

    .venv/bin/python bench/bench_eval_every.py                         # stage 3, 200 steps, --eval-every 100
    .venv/bin/python bench/bench_eval_every.py --stage 1 --steps 105   # the demo's stage 1

The demo's student (demo.make_demo_student: 4 Qwen2 layers of width 384, heads 384/256/128/64), its settings
(DEMO_CONFIG: 32 tokens, global batch 64, bf16 autocast) and the real all-MiniLM-L6-v2 teacher cache over texts
that data.py builds from the shared text (fewer than the demo's 69k: the per-step cost does not depend on it).
Each side runs `train.train` in this process, the two interleaved `--repeats` times; the table gives the training
wall time (first step to last, from metrics.jsonl) of each, the evaluation time inside it (the `eval.time_s` of each
record), and the overhead. The demo total extrapolates the measured time per evaluation to the full demo
(`--eval-every N` over its 105/900/495 steps: one evaluation every N steps and at each stage's last step) against
the demo's training time measured the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import demo  # noqa: E402
import train  # noqa: E402
from data import build, default_data_dir  # noqa: E402
from teacher_cache import build_cache  # noqa: E402
from teachers import BertTeacher, minilm_path  # noqa: E402


FIXED = {"s": 0.0}  # seconds in the once-per-run parts of --eval-every: reading the slice and STS, the summary plot


def _timed(fn):
    def wrapper(*a, **kw):
        t0 = time.time()
        try:
            return fn(*a, **kw)
        finally:
            FIXED["s"] += time.time() - t0
    return wrapper


train.TrainEval.__init__ = _timed(train.TrainEval.__init__)
train.best_eval, train.plot_eval = _timed(train.best_eval), _timed(train.plot_eval)


def run(cfg: train.TrainConfig) -> dict:
    FIXED["s"] = 0.0
    t0 = time.time()
    train.train(cfg)
    wall = time.time() - t0
    recs = [json.loads(ln) for ln in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    evals = [r["eval"]["time_s"] for r in recs if "eval" in r]
    return {"wall": wall, "steps": len(recs), "n_evals": len(evals), "eval_s": sum(evals), "fixed_s": FIXED["s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-texts", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--demo-train-s", type=float, default=552.0, help="the demo's training time (README: 9m12s)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_every_"))
    try:
        data_dir = default_data_dir()
        build(work / "data", data_dir=data_dir, n_texts=args.n_texts, seed=0, progress=False, **demo.DEMO_DATA)
        texts = work / "data" / "texts.jsonl"
        build_cache([BertTeacher(minilm_path(), max_length=32, dtype=demo.DEMO_CACHE_DTYPE)], texts, work / "cache",
                    batch_size=256)
        init = work / "init"
        demo.make_demo_student(minilm_path(), max_length=32).save_pretrained(init)
        base = train.TrainConfig(**{**demo.DEMO_CONFIG, "stage": args.stage, "init": str(init), "init_format": "jasper",
                                    "texts": str(texts), "teacher_cache": str(work / "cache"), "steps": args.steps,
                                    "export": False, "log_every": 10 ** 6, "eval_data": str(data_dir)})
        res: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.repeats):
            for side in ("off", "on"):
                out = work / f"{side}{r}"
                cfg = dataclasses.replace(base, out=str(out), eval_every=args.eval_every if side == "on" else 0)
                res[side].append(run(cfg))
                shutil.rmtree(out)
        off = min(x["wall"] for x in res["off"])
        on = min(res["on"], key=lambda x: x["wall"])
        per_eval = on["eval_s"] / max(1, on["n_evals"])
        print(f"| stage {args.stage}, {args.steps} steps, demo shapes | run wall | evals | eval time | once per run "
              f"| overhead |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| without --eval-every | {off:.1f} s | 0 | - | - | - |")
        print(f"| --eval-every {args.eval_every} | {on['wall']:.1f} s | {on['n_evals']} | {on['eval_s']:.1f} s "
              f"({per_eval:.2f} s each) | {on['fixed_s']:.1f} s | {100 * (on['wall'] - off) / off:+.1f}% wall, "
              f"{100 * on['eval_s'] / (on['wall'] - on['eval_s'] - on['fixed_s']):.1f}% eval/train |")
        print(f"\nthe full demo ({args.demo_train_s:.0f} s of training over 105/900/495 steps), extrapolated: "
              f"evaluations x {per_eval:.2f} s + 3 stages x {on['fixed_s']:.1f} s once per stage")
        print("| --eval-every | evaluations | added time | of the demo's training |")
        print("| ---: | ---: | ---: | ---: |")
        for n in sorted({args.eval_every, 100, 300, 500}):
            k = sum(s // n + (s % n > 0) for s in (105, 900, 495))  # every n steps and at each stage's last step
            full = k * per_eval + 3 * on["fixed_s"]
            print(f"| {n} | {k} | {full:.0f} s | {100 * full / args.demo_train_s:.1f}% |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
