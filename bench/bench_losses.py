"""Benchmark of the relative-similarity loss (eq. 3): forward+backward time and peak memory, reference vs ours.

    .venv/bin/python bench/bench_losses.py                       # m = 64 .. 1024, CPU (or CUDA if present)
    .venv/bin/python bench/bench_losses.py --sizes 128 --impls sort,chunked --repeat 5
    .venv/bin/python bench/bench_losses.py --device cuda --no-reference   # kernel vs sort: the measured crossover

Each (engine, m) case runs in a fresh subprocess on the CPU, so its peak memory is the growth of the process's peak
RSS (ru_maxrss) over the baseline measured just before the loss (inputs and imports excluded).  On CUDA the peak is
torch.cuda.max_memory_allocated over the same baseline, and the Triton kernel's achieved fraction of the GPU's fp32
peak is printed too (work counted as 8 fp32 operations per pair of pairs: 2 subtractions, 2 margin adds, 2 compares,
2 accumulations).  The materialising reference is skipped where its (P, P) temporaries would not fit: that is printed.

On CUDA the script also prints where the sort engine overtakes the Triton kernel (the crossover `impl="auto"` should
use), measured from the two engines' times side by side, next to losses.resim_cost_model's prediction; the default
CUDA sizes are dense around the model's crossover (m = 488).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REF_BYTES_PER_ENTRY = 32  # the reference's peak per (P, P) entry: dx, dy, label, hinge, masks (measured 2,025 MiB at m=128)
FP32_PEAK_TFLOPS = {"H100": 67.0, "H200": 67.0, "A100": 19.5, "A6000": 38.7, "L40S": 91.6, "4090": 82.6}


def _case(impl: str, m: int, d: int, repeat: int, device: str, ties: str, threads: int = 0) -> dict:
    """Run one case in this process; returns timings (s) and peak extra memory (bytes)."""
    import resource

    import torch
    import torch.nn.functional as F

    import losses

    if threads:
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    dev = torch.device(device)
    s0 = F.normalize(torch.randn(m, d, device=dev), dim=-1)
    t = F.normalize(torch.randn(m, d, device=dev), dim=-1)

    def step():
        s = s0.clone().requires_grad_()
        loss = losses.resim_loss(s, t, ties=ties, impl=impl)
        loss.backward()
        return float(loss), s.grad

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        step()  # compile / warm up
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    loss = None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        loss, _ = step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"time": statistics.median(times), "times": times, "peak": peak, "loss": loss}


def run_case(impl: str, m: int, args) -> dict:
    if args.device == "cuda":  # in-process (CUDA memory stats are per process and resettable)
        try:
            return _case(impl, m, args.dim, args.repeat, "cuda", args.ties)
        except Exception as e:  # noqa: BLE001 - report and continue
            return {"error": f"{type(e).__name__}: {e}"[:200]}
    cmd = [sys.executable, __file__, "--_case", json.dumps([impl, m, args.dim, args.repeat, "cpu", args.ties, args.threads])]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_t(r):
    return f"{r['time'] * 1e3:,.1f} ms" if "time" in r else "-"


def _fmt_m(r):
    return f"{r['peak'] / 2**20:,.1f} MiB" if "peak" in r else "-"


def print_crossover(rows) -> None:
    """Kernel vs sort engine per m (measured, fwd+bwd) next to the cost model, and the measured crossover."""
    import losses
    t = {(m, impl): ours["time"] for m, _, impl, _, ours in rows if "time" in ours}
    ms = sorted(m for m, impl in t if impl == "triton" and (m, "sort") in t)
    if not ms:
        print("# crossover: needs both triton and sort timings (--impls triton,sort)")
        return
    print("\n| m | P | kernel ms | sort ms | model kernel ms | model sort ms | faster (measured) | auto picks |")
    print("|---|---|---|---|---|---|---|---|")
    for m in ms:
        P = m * (m - 1) // 2
        mk, msrt = losses.resim_cost_model(P)
        fast = "triton" if t[m, "triton"] < t[m, "sort"] else "sort"
        print(f"| {m} | {P:,} | {t[m, 'triton'] * 1e3:.3f} | {t[m, 'sort'] * 1e3:.3f} | {mk * 1e3:.3f} | "
              f"{msrt * 1e3:.3f} | {fast} | {losses.auto_engine(P, 'cuda')} |")
    # crossover: first m where sort wins after the kernel won; interpolate log(t_k / t_s) linearly in m between them
    prev = None
    for m in ms:
        r = t[m, "triton"] / t[m, "sort"]
        if r >= 1 and prev is not None and prev[1] < 1:
            m0, r0 = prev
            mx = m0 + (m - m0) * (-math.log(r0)) / (math.log(r) - math.log(r0))
            print(f"# measured crossover: kernel faster up to m = {m0}, sort faster from m = {m} (interpolated "
                  f"m ~ {mx:.0f}, P ~ {mx * (mx - 1) / 2:,.0f}); the cost model behind auto says m = 488")
            return
        prev = (m, r)
    winner = "kernel" if t[ms[-1], "triton"] < t[ms[-1], "sort"] else "sort engine"
    print(f"# measured crossover: not inside m = {ms[0]}..{ms[-1]} (the {winner} wins at m = {ms[-1]}); the cost "
          f"model behind auto says m = 488")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="batch sizes m (default 64,128,256,512,1024; on CUDA a denser "
                                                  "grid up to 1024 for the crossover)")
    ap.add_argument("--no-reference", action="store_true", help="skip the materialising reference")
    ap.add_argument("--impls", default=None, help="ours to compare with the reference (default: auto + the engines "
                                                  "that run on this device)")
    ap.add_argument("--dim", type=int, default=256, help="vector width (the Gram matmul is not the point here)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ties", default="skip", choices=["skip", "authors"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--ref-max-gb", type=float, default=None,
                    help="skip the reference where its estimated (P, P) memory exceeds this (default: half the RAM "
                         "or GPU memory)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads per case (default 1: reproducible "
                                                                "on a shared machine; 0 = torch's default)")
    ap.add_argument("--chunked-max-m", type=int, default=128, help="the O(P^2)-work torch mirror is slow on the CPU")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._case:
        print(json.dumps(_case(*json.loads(args._case))))
        return

    import torch

    import losses

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory
        where = f"CUDA: {name}"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = f"CPU: {os.cpu_count()} cores, torch threads {args.threads or torch.get_num_threads()}, RAM {total / 2**30:.0f} GiB"
        name = ""
    ref_max = (args.ref_max_gb * 2**30) if args.ref_max_gb else total / 2
    impls = args.impls.split(",") if args.impls else (
        ["triton", "sort"] if args.device == "cuda" else ["sort", "chunked"])
    sizes = [int(v) for v in (args.sizes or ("64,90,128,192,256,320,384,448,512,576,640,768,1024"
                                            if args.device == "cuda" else "64,128,256,512,1024")).split(",")]
    print(f"# resim_loss fwd+bwd, {where}, d={args.dim}, ties={args.ties}, median of {args.repeat}")
    print(f"# torch {torch.__version__}; auto picks: " + ", ".join(
        f"m={m}: {losses.auto_engine(m * (m - 1) // 2, args.device)}" for m in sizes))
    rows = []
    for m in sizes:
        P = m * (m - 1) // 2
        est = REF_BYTES_PER_ENTRY * P * P
        if args.no_reference:
            ref = {"error": "skipped (--no-reference)"}
        elif est > ref_max:
            ref = {"error": f"skipped: needs ~{est / 2**30:,.0f} GiB for the (P, P) matrices"}
        else:
            ref = run_case("reference", m, args)
        for impl in impls:
            if impl == "chunked" and args.device == "cpu" and m > args.chunked_max_m:
                ours = {"error": f"skipped: O(P^2) work, slow on the CPU beyond m={args.chunked_max_m}"}
            else:
                ours = run_case(impl, m, args)
            rows.append((m, P, impl, ref, ours))
            t_ratio = (f"{ref['time'] / ours['time']:,.1f}x" if "time" in ref and "time" in ours else "-")
            m_ratio = (f"{ref['peak'] / max(ours['peak'], 1):,.0f}x" if "peak" in ref and "peak" in ours else "-")
            agree = ""
            if "loss" in ref and "loss" in ours:
                agree = f"{abs(ref['loss'] - ours['loss']) / abs(ref['loss']):.1e}"
            line = (f"| {m} | {P:,} | {_fmt_t(ref)} | {_fmt_m(ref)} | {impl} | {_fmt_t(ours)} | {_fmt_m(ours)} "
                    f"| {t_ratio} | {m_ratio} | {agree} |")
            if len(rows) == 1:
                print("| m | P | reference time | reference peak | ours | ours time | ours peak | speed-up "
                      "| memory ratio | loss rel. diff |")
                print("|---|---|---|---|---|---|---|---|---|---|")
            print(line, flush=True)
            for label, r in (("reference", ref), (impl, ours)):
                if "error" in r and not (label == "reference" and (impl != impls[0] or args.no_reference)):
                    print(f"#   m={m} {label}: {r['error']}", flush=True)
    if args.device == "cuda":
        peak = next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
        print(f"\n# Triton kernel on {name}: work = 8 fp32 ops per pair of pairs (P^2 of them), "
              f"fp32 peak {peak or '?'} TFLOP/s")
        for m, P, impl, _, ours in rows:
            if impl == "triton" and "time" in ours:
                tflops = 8 * P * P / ours["time"] / 1e12
                frac = f"{tflops / peak:.1%}" if peak else "? (unknown device peak)"
                print(f"#   m={m}: {ours['time'] * 1e3:.3f} ms, {tflops:.1f} TFLOP/s, {frac} of fp32 peak")
        print_crossover(rows)
    else:
        print("\n# No GPU here: the Triton kernel only runs on CUDA (or under TRITON_INTERPRET=1, which is not a "
              "timing); rerun this script on a CUDA machine for its timings and fraction of fp32 peak.")


if __name__ == "__main__":
    main()
