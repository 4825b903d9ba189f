"""Worker for tests/test_grad_cache.py, run with plain python (1 process) or under torchrun (gloo, CPU):
    python tests/grad_cache_worker.py OUT.pt TRAIN.PY-ARGS...
builds train.py's run state from TRAIN.PY-ARGS three times -- the default path, --grad-cache, and --grad-cache with
FSDP2's no_sync switched off (the control: a reduction per micro-batch) -- takes one global batch through
train.backward_step, and writes (rank 0) per mode: the full gradient of every trainable parameter, the loss, the
micro-batches of this rank, and the count of FSDP2's gradient reduce-scatters (torch.distributed.
reduce_scatter_single, wrapped; the all-gather's autograd backward uses functional collectives, not counted)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed as DI  # noqa: E402
import grad_cache  # noqa: E402
import train as TR  # noqa: E402


def one(args: list[str], d: DI.Dist, mode: str) -> dict:
    cfg = TR.parse_config(args + (["--grad-cache"] if mode != "default" else []))
    cfg.out = f"{cfg.out}_{mode}"
    run = TR.build_state(cfg, d, *TR.set_up(cfg, d))
    batch = next(iter(run.loader))
    calls = [0]
    real = dist.reduce_scatter_single

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)
    dist.reduce_scatter_single = counted
    sync = grad_cache.set_gradient_sync
    if mode == "cache_no_sync_off":
        grad_cache.set_gradient_sync = lambda model, s: None
    sizes = DI.agree(d, run.step + 1, *TR.batch_counts(batch))  # every rank's rows, as optimizer_step does
    try:
        loss, _, _ = TR.backward_step(run, batch, sizes)
    finally:
        dist.reduce_scatter_single, grad_cache.set_gradient_sync = real, sync
    grads = {}
    for n, p in run.model.named_parameters():
        if p.requires_grad:
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return dict(grads=grads, loss=loss, reduce_scatters=calls[0],
                n_micro=len(TR.micro_batches(batch)))


def main():
    out, args = sys.argv[1], sys.argv[2:]
    d = DI.setup_distributed("cpu")
    try:
        res = {m: one(args, d, m) for m in ("default", "cache", "cache_no_sync_off")}
        if d.main:
            torch.save(res, out)
    finally:
        if d.mesh is not None:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
