"""Training-step throughput of train.py (issue 7): tokens/s of a mid-size student, 1 process vs torchrun 2 processes.

    .venv/bin/python bench/bench_train.py                     # CPU: 1 vs 2 processes, fp32 and bf16, prints a table
    .venv/bin/python bench/bench_train.py --stage 3 --steps 8 --peak-tflops 989   # on a GPU: also MFU

Runs train.py through its CLI (exactly what a user runs) on a random-init mid-size Qwen2 student (hidden 512,
8 layers, GQA 8/2, real Qwen tokenizer) with a real all-MiniLM-L6-v2 teacher cache over texts that data.py
materialises from the shared text, then reads metrics.jsonl: tokens/s = real (unpadded) tokens of the steps after
the warm-up steps / their wall time. MFU (CUDA only): model FLOPs = 2 * N_forward * tokens for the forward of the
body + 4 * N_trained_body * tokens for its backward (stage 2 back-propagates through the top 3 layers only),
over the peak of the device(s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train_fixtures import make_cache, make_texts, make_tiny_jasper  # noqa: E402


def run(args: list[str], nproc: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "train.py")]
    t = time.time()
    p = subprocess.run(cmd + args, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"bench: train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.time() - t


def throughput(out: Path, warmup: int) -> tuple[float, float, int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tail = rows[warmup:]
    dt = tail[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    tokens = sum(r["tokens"] for r in tail)
    return tokens / dt, dt / len(tail), tokens // len(tail)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    ap.add_argument("--n-texts", type=int, default=256)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (bf16 dense) for MFU on CUDA")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP/torch threads per process (default: CPU cores // processes). On a CPU shared with other "
                         "jobs, more threads than free cores make torch's thread pool spin and stall: use 1")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir)")
    a = ap.parse_args()

    import torch
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_train_"))
    t = time.time()
    init = work / "init"
    if not init.exists():
        make_tiny_jasper(init, layers=a.layers, vision=False, hidden=a.hidden, intermediate=a.hidden * 11 // 4,
                         heads=8, kv_heads=2, head_dims=(384, 256, 128, 64))
    texts = work / "data" / "texts.jsonl"
    if not texts.exists():
        make_texts(work / "data", n=a.n_texts)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        make_cache(texts, cache)
    print(f"# assets ready in {time.time() - t:.0f} s ({work})", file=sys.stderr)

    from safetensors import safe_open
    n_body = n_embed = 0
    with safe_open(str(init / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n = f.get_slice(k).get_shape()
            n = int(torch.tensor(n).prod())
            if k.startswith("model.embed_tokens"):
                n_embed += n
            elif k.startswith("model."):
                n_body += n
    per_layer = n_body / a.layers
    n_trained_body = {1: 0, 2: 3 * per_layer, 3: n_body, 4: 0}[a.stage]
    cuda = torch.cuda.is_available()
    print(f"stage {a.stage} | student hidden {a.hidden}, {a.layers} layers: {n_body / 1e6:.1f}M body + "
          f"{n_embed / 1e6:.1f}M embedding params | global batch {a.batch}, micro-batch {a.micro_batch}, "
          f"max length {a.max_length} | {os.cpu_count()} CPU cores{', CUDA' if cuda else ', no GPU'}")
    print()
    print("| processes | threads/process | dtype | tokens/step | s/step | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in a.dtypes:
        for nproc in a.procs:
            out = work / f"run_{dtype}_{nproc}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (train.py refuses a dir with checkpoints)
            args = ["--stage", str(a.stage), "--init", str(init), "--texts", str(texts), "--teacher-cache",
                    str(cache), "--out", str(out), "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
                    "--max-length", str(a.max_length), "--steps", str(a.steps), "--lr", "1e-4", "--dtype", dtype,
                    "--log-every", "1000", "--ckpt-every", "0", "--no-export"]
            threads = a.threads or max(1, (os.cpu_count() or 1) // nproc)
            run(args, nproc, threads)
            tps, sps, tok = throughput(out, a.warmup)
            mfu = "n/a (CPU)"
            if cuda and a.peak_tflops:
                flops = (2 * n_body + 4 * n_trained_body) * tps
                mfu = f"{100 * flops / (a.peak_tflops * 1e12 * nproc):.1f}%"
            print(f"| {nproc} | {threads} | {dtype} | {tok:,} | {sps:.2f} | {tps:,.0f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
