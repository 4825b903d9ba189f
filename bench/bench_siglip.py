"""Vision tower forward throughput (images/s): vision.SiglipVisionEncoder vs transformers' SiglipVisionModel.

Same weights (ours loaded from the transformers model's state dict), same inputs, inference mode, timed interleaved
(ours, theirs, ours, ...) so that load from other processes hits both alike; the median of the repeats is reported.

    .venv/bin/python bench/bench_siglip.py                       # mid-size: SigLIP base-patch16-224 shape
    .venv/bin/python bench/bench_siglip.py --config so400m --batch 2 --repeats 3 --dtype bfloat16

Prints a markdown table (paste into bench/RESULTS.md). No GPU is lent to this task: CPU figures only
(`--device cuda` works where one exists).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vision  # noqa: E402
from checkpoints import load_state_strict  # noqa: E402

CONFIGS = {
    # google/siglip-base-patch16-224 vision tower: 86M params, 196 patches
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=16),
    # google/siglip-so400m-patch14-384 (Jasper's vision tower): 413M params, 729 patches
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14),
}


def timeit(fn, device, clock) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (process_time), robust to other load on a "
                         "shared machine; images/s is then per CPU-second of work")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import SiglipVisionConfig as HFConfig, SiglipVisionModel  # reference only (bench, not runtime)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    hcfg = HFConfig(**CONFIGS[args.config], vision_use_head=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    theirs = SiglipVisionModel(hcfg).to(device, dtype).eval()
    ours = vision.SiglipVisionEncoder(vision.SiglipVisionConfig.from_hf(hcfg.to_dict()))
    load_state_strict(ours, theirs.state_dict())
    ours = ours.to(device, dtype).eval()
    S = hcfg.image_size
    x = torch.randn(args.batch, 3, S, S, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    with torch.inference_mode():
        a, b = ours(x), theirs(pixel_values=x).last_hidden_state
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        runs = {"ours": lambda: ours(x), "transformers": lambda: theirs(pixel_values=x)}
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(timeit(fn, device, clock))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    n_params = ours.num_parameters()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# SigLIP vision forward, config {args.config} ({n_params / 1e6:.0f}M params, {S}px, "
          f"{ours.config.num_patches} patches), batch {args.batch}, {args.dtype}, {dev}, torch {torch.__version__}, "
          f"{args.clock} clock, median of {args.repeats} (interleaved, {args.warmup} warm-up), "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"# output rel. err ours vs transformers: {err:.2e}")
    print("| implementation | median s / batch | images/s | min s | max s |")
    print("| --- | --- | --- | --- | --- |")
    for k in runs:
        print(f"| {k} | {med[k]:.4f} | {ips[k]:.2f} | {min(times[k]):.4f} | {max(times[k]):.4f} |")
    print(f"| **ratio ours / transformers** | | **{ips['ours'] / ips['transformers']:.3f}x** | | |")


if __name__ == "__main__":
    main()
