"""Peak memory and step time of train.py's default path vs --grad-cache (issue 26), against the global batch.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_grad_cache.py                   # /work/demo_run if present
    .venv/bin/python bench/bench_grad_cache.py --demo-run DIR --batches 64 256 1024 --micro-batch 64 --steps 2

The demo's student and data (demo.py: 4-layer hidden-384 Qwen2 student, texts cut at 32 tokens, packed, bf16
autocast, MiniLM teacher cache): DIR/init, DIR/data/texts.jsonl and DIR/cache of a `demo.py` run; without one, the
same student and a 4096-text cache are built in a temporary folder. Stage 3 (every text parameter trains: the
backward reaches every layer, the largest activation memory).

One subprocess per (path, global batch): it builds train.py's run state (train.build_state), draws its batches,
then runs 1 warm-up + --steps optimizer steps through train.optimizer_step, exactly the training loop's step.
Peak memory is the child's peak RSS (getrusage(RUSAGE_SELF).ru_maxrss, the kernel's high-water mark: allocator
caches included, so an upper bound of what the step needs); "base" is its RSS once the model, optimizer and batches are
built, before any step; "step" = peak - base, the memory the optimizer step adds (activations, gradients, AdamW
state). Step time: mean wall time of the timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(a) -> None:
    """One configuration in this process: prints one JSON line {base_mb, step_s, loss}."""
    import distributed as DI
    import train as TR
    args = ["--stage", "3", "--init", a.init, "--texts", a.texts, "--teacher-cache", a.cache, "--out", a.out,
            "--batch", str(a.batch), "--micro-batch", str(a.micro_batch), "--steps", "100", "--max-length", "32",
            "--dtype", a.dtype, "--ckpt-every", "0", "--no-export", "--device", "cpu"]
    cfg = TR.parse_config(args + (["--grad-cache"] if a.mode == "cache" else []))
    d = DI.Dist()
    run = TR.build_state(cfg, d, *TR.set_up(cfg, d))
    it = iter(run.loader)
    batches = [next(it) for _ in range(a.steps + 1)]  # drawn before the clock starts
    base = rss_mb()
    TR.optimizer_step(run, batches[0])  # warm-up (allocator, AdamW state)
    t = time.perf_counter()
    loss = [TR.optimizer_step(run, b)[0] for b in batches[1:]]
    step_s = (time.perf_counter() - t) / a.steps
    n_micro = len(TR.micro_batches(batches[0]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's high-water RSS (KiB on Linux)
    print(json.dumps(dict(base_mb=base, peak_mb=peak, step_s=step_s, loss=loss[-1], n_micro=n_micro)), flush=True)


def measure(a, inputs: dict, batch: int, mode: str, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--batch", str(batch), "--micro-batch",
           str(a.micro_batch), "--steps", str(a.steps), "--dtype", a.dtype, "--out", str(tmp / f"{mode}{batch}"),
           *[x for k, v in inputs.items() for x in (f"--{k}", str(v))]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"bench: child failed ({mode}, batch {batch}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def demo_inputs(a, tmp: Path) -> dict:
    """The demo run's student and data, or the same built afresh (demo.make_demo_student + a 4096-text cache)."""
    run = Path(a.demo_run)
    if (run / "init").is_dir():
        return dict(init=run / "init", texts=run / "data" / "texts.jsonl", cache=run / "cache")
    from common import minilm_dir
    from demo import make_demo_student
    from train_fixtures import make_cache, make_texts
    make_demo_student(minilm_dir()).save_pretrained(tmp / "init")
    texts = make_texts(tmp / "data", n=4096)
    return dict(init=tmp / "init", texts=texts, cache=make_cache(texts, tmp / "cache"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-run", default="/work/demo_run", help="a demo.py output folder (init/, data/, cache/)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="global batches")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps after 1 warm-up step")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the demo trains in bf16")
    for k in ("child", "mode", "batch", "out", "init", "texts", "cache"):  # the child's own arguments
        ap.add_argument(f"--{k}", **(dict(action="store_true") if k == "child" else {}), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.batch = int(a.batch)
        return child(a)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = demo_inputs(a, Path(tmp))
        res = {(b, m): measure(a, inputs, b, m, Path(tmp)) for b in a.batches for m in ("default", "cache")}
    print(f"stage 3, demo student, micro-batch {a.micro_batch}, {a.dtype}, {a.steps} timed steps, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| global batch | micro-batches | default peak MB (step MB) | grad-cache peak MB (step MB) | default s/step "
          "| grad-cache s/step | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for b in a.batches:
        d, c = res[b, "default"], res[b, "cache"]
        print(f"| {b} | {d['n_micro']} | {d['peak_mb']:.0f} ({d['peak_mb'] - d['base_mb']:.0f}) | {c['peak_mb']:.0f} "
              f"({c['peak_mb'] - c['base_mb']:.0f}) | {d['step_s']:.2f} | {c['step_s']:.2f} | "
              f"{c['step_s'] / d['step_s']:.2f}x |")
    lo, hi = a.batches[0], a.batches[-1]
    for m in ("default", "cache"):
        r0, r1 = res[lo, m], res[hi, m]
        print(f"{m}: peak RSS x{r1['peak_mb'] / r0['peak_mb']:.2f}, step memory "
              f"x{(r1['peak_mb'] - r1['base_mb']) / max(1.0, r0['peak_mb'] - r0['base_mb']):.2f} from batch {lo} "
              f"to {hi}")
    worst = max(res[b, "cache"]["step_s"] / res[b, "default"]["step_s"] for b in a.batches)
    flat = res[hi, "cache"]["peak_mb"] / res[lo, "cache"]["peak_mb"]
    print(f"targets: grad-cache peak RSS flat within 1.2x: {flat:.2f}x ({'met' if flat <= 1.2 else 'MISSED'}); "
          f"time overhead <= 1.4x: worst {worst:.2f}x ({'met' if worst <= 1.4 else 'MISSED'})")


if __name__ == "__main__":
    main()
