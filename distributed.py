"""The distributed pieces of train.py: torchrun env -> one process group (nccl on GPUs, gloo on CPUs) and a 1-D device
mesh for FSDP2 (without torchrun: a plain single process, no process group, no FSDP), and the three collectives a
training step adds to FSDP's own: the agreement check, the gather of the global batch, and a scalar sum.

The distributed invariant (docs/train.md): at every step every rank runs the same sequence of collectives: the same
number of micro-batch forwards (data.TrainLoader lays out the global batch with one plan for all ranks; an empty
micro-batch still forwards a one-token dummy whose output is dropped), then the same gathers, backward, clip, step,
log and checkpoint collectives. `agree` checks it before any forward and stops every rank with one message instead
of a hang. The run is a function of the global batch, not of the rank count: 1, 2 or 3 ranks give the same losses,
and a checkpoint resumes on another rank count.

Gradient convention (README, training: "The global batch"): every rank computes the SAME loss L on the
gathered global batch. all_gather_single_autograd's backward sums the W ranks' (identical) gradients for the
rank's own rows, giving W * dL/ds_local; FSDP's reduce-scatter then averages over the W ranks, so each parameter's
gradient is exactly dL/dtheta of single-process training on the concatenated global batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_single_autograd, all_gather_tensor
from torch.distributed.device_mesh import init_device_mesh

from errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh when under torchrun

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.mesh is not None:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `python train.py`
        return Dist(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    # LOCAL_RANK: this process's GPU on its node
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    # long: ranks wait at barriers while rank 0 hashes and renames checkpoints
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    mesh = init_device_mesh("cuda" if use_cuda else "cpu", (world,))
    return Dist(rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu"), mesh)


def gather_global(x: torch.Tensor, d: Dist, grad: bool, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (b, D) -> (sum of b, D). With grad=True the backward returns to
    each rank the SUM over ranks of the gradient w.r.t. its rows (the module docstring says why that is exact).
    `sizes` = every rank's row count (from `agree`): shares differ in size (the step plan deals rows, not texts;
    stage 4 drops broken images), so rows are padded to the largest share, gathered, and the padding dropped."""
    if d.mesh is None:
        return x
    if x.shape[0] != sizes[d.rank]:
        raise RuntimeError(f"rank {d.rank}: {x.shape[0]} rows but the agreed share is {sizes[d.rank]}")
    m = max(sizes)
    if m != min(sizes):
        x = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])])  # pad to the largest share: (max b, D)
    else:
        sizes = None  # equal shares: nothing to drop
    if grad:
        # (W * b, D); backward: reduce-scatter, summing over ranks
        y = all_gather_single_autograd(x.contiguous(), 0, d.mesh)
    else:
        with torch.no_grad():
            y = all_gather_tensor(x.detach().contiguous(), 0, d.mesh)  # (W * b, D): targets carry no graph
    if sizes is not None:
        y = torch.cat([y[r * m:r * m + n] for r, n in enumerate(sizes)])  # drop each rank's padding rows
    return y


class DesyncError(UserError):
    """Ranks about to run different collectives: every rank stops with the same message instead of hanging."""


def agree(d: Dist, step: int, n_forwards: int, n_rows: int, failed: BaseException | None = None) -> list[int]:
    """The per-step guard of the invariant above: ONE all_gather of (step, forwards, rows) per rank, before any
    forward. Every rank gets the whole table, so when the ranks disagree on the step or on the number of forwards
    they are about to run (each of which all-gathers every FSDP block), or one rank could not build its batch
    (`failed`), every rank raises the same DesyncError naming the step, the ranks and their counts, where FSDP
    would hang (NCCL) or crash on a size mismatch (gloo). Rows may differ (they are gathered with padding) and are
    returned: every rank's row count, for gather_global. `step` is the step about to run (1-based). Cost:
    bench/bench_dist_guard.py (docs/train.md)."""
    if d.mesh is None:
        if failed is not None:
            raise failed
        return [n_rows]
    mine = torch.tensor([step, -1 if failed is not None else n_forwards, n_rows], dtype=torch.int64,
                        device=d.device if d.device.type == "cuda" else "cpu")  # gloo: CPU tensors, nccl: CUDA
    table = [torch.empty_like(mine) for _ in range(d.world_size)]
    dist.all_gather(table, mine)
    rows = [t.tolist() for t in table]  # (W, 3)
    if failed is not None:
        raise failed  # this rank's own error; the others raise the DesyncError below
    broken = [r for r, (_, f, _) in enumerate(rows) if f < 0]
    if broken:
        raise DesyncError(f"step {step}: rank(s) {broken} could not build their batch (their error is printed by "
                          "them); every rank stops here instead of waiting for them")
    if any(row[:2] != rows[0][:2] for row in rows):
        counts = "; ".join(f"rank {r}: step {s}, {f} forwards, {n} rows" for r, (s, f, n) in enumerate(rows))
        raise DesyncError(f"step {step}: the ranks are about to run different collectives ({counts}); every rank "
                          "must run the same number of forwards at every step (docs/train.md, 'Every rank runs the "
                          "same collectives'): stopping all ranks")
    return [n for _, _, n in rows]


def all_sum(v: float, d: Dist) -> float:
    if d.mesh is None:
        return v
    # float64: token counts sum exactly; gloo needs CPU tensors, nccl CUDA
    t = torch.tensor([float(v)], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item()
