"""Cached-gradient training (`train.py --grad-cache`): activation memory bounded by ONE micro-batch, whatever the
global batch, with the same gradient as the default path.

Why it is needed: the losses of eq. 1-3 compare every text of the global batch with every other one, so the
default path (train.global_vectors) keeps the graph of every micro-batch until the one backward: activation memory
grows with the global batch and --micro-batch bounds nothing. The method is gradient caching, from Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"; here it is applied to the
similarity-matrix and pair-ranking losses of the distillation, which see the student only through its vectors.

The maths. Let s = f_theta(x) be this rank's (b, D) student vectors, one block s_i = f_theta(x_i) per micro-batch,
and L(s) the loss on the gathered global batch. The chain rule splits the gradient at the vectors:

    dL/dtheta = sum_i (dL/ds_i)^T  ds_i/dtheta                                          (1)

  pass 1: forward every micro-batch WITHOUT a graph (torch.no_grad) and keep only the vectors s_i (b x D floats).
  loss:   s = cat(s_i) becomes a LEAF tensor (requires_grad); it goes through the same gather (distributed.gather_global,
          grad=True) and the same losses.distill_loss as the default path; loss.backward() stops at the leaf, so
          s.grad = dL/ds is exactly what the default path's graph delivers to this rank's rows (the all-gather's
          backward included: see train.py's docstring for the W-fold sum that FSDP's average undoes).
  pass 2: forward each micro-batch again WITH its graph and backward(gradient=s.grad[rows of i]): the vector-Jacobian
          product (dL/ds_i)^T ds_i/dtheta of (1), accumulated into the parameters' .grad; the graph is freed before
          the next micro-batch. Peak activation memory: one micro-batch's graph plus the b x D vectors.
Cost: one extra forward per micro-batch (pass 1), i.e. ~4/3 of the default step's compute at most (forward F,
backward ~2F: 4F against 3F; less when a stage back-propagates into a few layers only).

Exactness. Pass 2 recomputes the same s_i only if the forward is deterministic given its inputs and the RNG state.
There is no dropout in the bodies today; if a body ever has it, the masks of pass 2 must be those of pass 1. So the
RNG state (CPU, and the device's CUDA generator) is saved before each micro-batch of pass 1 and restored before its
replay in pass 2; after pass 2 the state after pass 1 is put back, so the random streams go on exactly as on the
default path (which forwards each micro-batch once). The gradients differ from the default path's only by the
order in which fp32 additions accumulate (tests/test_grad_cache.py: <= 1e-6 relative).

FSDP2. Without care, every backward of pass 2 would reduce-scatter the gradients: one collective per micro-batch
per sharded module. Gradient reduction runs once per optimizer step instead: the root's
set_requires_gradient_sync(False) (FSDP2's no_sync) for every micro-batch but the last, so FSDP2 accumulates the
UNSHARDED gradients locally (in the reduce dtype: one unsharded fp32 gradient of the trainable parameters per
rank, the price of one reduction per step), then True for the last, whose backward reduce-scatters the sum.
Every rank runs the same number of micro-batches (train.py's step plan and `agree` guarantee it; a micro-batch
without rows is a dummy forward whose output is sliced away: its pass-2 backward gets a (0, D) gradient and still
runs, so the ranks' FSDP collectives pair up).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

# forward(micro, with_aux) -> ({key: (m, D) vectors, with a graph when grad is enabled}, aux or None): one micro-batch
# through the student; aux is whatever pass 1 needs besides the vectors (stage 4: the frozen caption vectors), and
# with_aux=False (pass 2) lets the forward skip computing it.
Forward = Callable[[Any, bool], "tuple[dict[Any, Tensor], Any]"]


def rng_get(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The RNG state a forward on `device` draws from: CPU, and the device's CUDA generator when on a GPU."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def rng_set(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def set_gradient_sync(model, sync: bool) -> None:
    """FSDP2's no_sync on the fully_shard'ed root (recursing into every sharded block); a no-op without FSDP."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def cached_backward(forward: Forward, micros: list, loss_fn: Callable[[dict, list], "tuple[Tensor, Any]"], model,
                    device: torch.device) -> "tuple[Tensor, Any]":
    """Accumulate into the parameters' .grad the gradient of loss_fn over the whole share, one micro-batch's graph at
    a time. loss_fn({key: (b, D) leaf vectors}, [aux of each micro-batch]) -> (loss, extra) may raise (e.g. a
    non-finite loss) before any parameter gradient is touched. Returns (loss, extra); the loss carries no graph."""
    # pass 1: vectors only, no graph; the RNG state each micro-batch starts from, for its replay
    states, outs, auxes = [], [], []
    with torch.no_grad():
        for micro in micros:
            states.append(rng_get(device))
            vec, aux = forward(micro, True)
            outs.append(vec)
            auxes.append(aux)
    after_pass1 = rng_get(device)
    keys = list(outs[0])
    # the local vectors as leaves: the loss' backward stops here, leaving dL/ds in .grad
    leaves = {k: torch.cat([o[k] for o in outs]).requires_grad_(True) for k in keys}  # (b, D)
    sizes = [o[keys[0]].shape[0] for o in outs]  # rows of each micro-batch
    loss, extra = loss_fn(leaves, auxes)
    loss.backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)).split(sizes) for k, v in leaves.items()}
    del outs, leaves, auxes
    # pass 2: the same forward with a graph (same RNG state), backward of its slice of dL/ds; one reduction at the end
    try:
        for i, micro in enumerate(micros):
            set_gradient_sync(model, i == len(micros) - 1)
            rng_set(states[i], device)
            vec, _ = forward(micro, False)
            pairs = [(vec[k], grads[k][i]) for k in keys if vec[k].requires_grad]  # a frozen head has no graph
            if pairs:
                torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
    finally:
        set_gradient_sync(model, True)  # the default path (and the next step) reduce as usual
        rng_set(after_pass1, device)
    return loss.detach(), extra
