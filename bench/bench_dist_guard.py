"""Cost of train.py's per-step agreement check (`distributed.agree`, issue 24) against the training step it guards.

    .venv/bin/python bench/bench_dist_guard.py                 # 2 and 3 ranks (torchrun, gloo, this CPU)
    .venv/bin/python bench/bench_dist_guard.py --ranks 2 --steps 5

Each configuration runs under `torchrun --nproc_per_node W` (this script re-launches itself). On every rank, in the
same process and one after the other: (a) `agree()`, the one all_gather of (step, forwards, rows) per rank that
every step now starts with, timed over --calls calls after a warm-up; (b) the per-step all_reduce that logging
already did (distributed.all_sum), for scale; (c) the demo student's training step under FSDP2 (demo.DEMO_STUDENT: 4
Qwen2 layers of width 384, heads 384/256/128/64, fp32), global batch 64 x 32 random tokens split over the ranks,
forward + gathered distill_loss (stage 3) + backward + AdamW, timed over --steps steps. The table gives the medians
and the guard's share of a step. Collectives on GPUs (NCCL) take tens of microseconds; the steps they guard, far
longer: the share only gets smaller there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distributed
    import losses
    from demo import DEMO_HEAD_DIMS, DEMO_STUDENT
    from model import JasperConfig, JasperModel, Qwen2Config

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    d = distributed.Dist(rank, world, torch.device("cpu"), init_device_mesh("cpu", (world,)))

    def timed(fn, n):
        out = []
        for _ in range(n):
            dist.barrier()
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    timed(lambda: distributed.agree(d, 1, 1, 32), 20)  # warm-up
    t_agree = timed(lambda: distributed.agree(d, 1, 1, 32), args.calls)
    t_sum = timed(lambda: distributed.all_sum(1.0, d), args.calls)

    torch.manual_seed(0)
    model = JasperModel(JasperConfig(text=Qwen2Config(vocab_size=30522, causal=False, **DEMO_STUDENT),
                                     head_dims=DEMO_HEAD_DIMS, max_length=32))
    for block in model.model.layers:
        fully_shard(block, mesh=d.mesh)
    fully_shard(model, mesh=d.mesh)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-4)
    sizes = [64 * (r + 1) // world - 64 * r // world for r in range(world)]
    ids = torch.randint(1000, 30000, (sizes[rank], 32), generator=torch.Generator().manual_seed(rank))
    teacher = torch.nn.functional.normalize(torch.randn(64, 384, generator=torch.Generator().manual_seed(9)), dim=-1)

    def step():
        out = model(ids, torch.ones_like(ids), dims=list(DEMO_HEAD_DIMS))
        student = {D: distributed.gather_global(v.float(), d, True, sizes) for D, v in out.items()}
        loss, _ = losses.distill_loss(3, student, teacher)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    t_step = timed(step, args.steps)
    if rank == 0:
        print(f"RESULT {world} {t_agree * 1e6:.1f} {t_sum * 1e6:.1f} {t_step * 1e3:.1f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="2,3", help="comma-separated process counts")
    ap.add_argument("--calls", type=int, default=300, help="agreement checks timed per configuration")
    ap.add_argument("--steps", type=int, default=8, help="training steps timed per configuration")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for w in [int(x) for x in args.ranks.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // w)))
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
                            __file__, "--worker", "--calls", str(args.calls), "--steps", str(args.steps)],
                           env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            sys.exit(f"bench_dist_guard: {w} ranks failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        rows.append([float(v) for v in line.split()[1:]])
    print("| ranks | agree() (us) | all_sum (us, for scale) | demo student step (ms) | agree / step |")
    print("|---:|---:|---:|---:|---:|")
    for w, ta, ts, tstep in rows:
        print(f"| {int(w)} | {ta:.0f} | {ts:.0f} | {tstep:.0f} | {ta / 1e3 / tstep:.3%} |")


if __name__ == "__main__":
    main()
