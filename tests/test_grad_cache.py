"""grad_cache.py / train.py --grad-cache (issue 26): the cached-gradient path gives the default path's gradients and
optimizer step (fp32, <= 1e-6 relative) in every stage, packing on and off, in 1 and 2 processes; random forwards
are replayed exactly; under FSDP2 the gradients are reduce-scattered once per step, not once per micro-batch.

Tiny random students and the real MiniLM teacher cache of tests/train_fixtures.py; 2 processes run under torchrun
(gloo, CPU) through tests/grad_cache_worker.py."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import distributed as DI
import grad_cache
import train as TR
from train_fixtures import ROOT, make_images, make_text_assets, make_tiny_jasper


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_grads_close(got: dict, ref: dict, rel: float = 1e-6) -> None:
    """Per tensor ||got - ref|| <= rel ||ref||, except for a tensor whose reference gradient is itself below rel * G
    (G = the norm of the whole reference gradient): fp32 rounding noise of an exact zero -- the SigLIP key biases
    (no RoPE there: softmax ignores the shift q.b of every score of a query) -- for which both must stay that small."""
    assert got.keys() == ref.keys() and ref
    total = torch.cat([g.flatten() for g in ref.values()]).norm().item()
    for k in ref:
        if ref[k].norm().item() <= rel * total:
            assert got[k].norm().item() <= rel * total, k
        else:
            assert rel_err(got[k], ref[k]) <= rel, (k, rel_err(got[k], ref[k]))


# ---------------------------------------------------------------------------------------------------------------------
# the mechanism on a random forward (dropout): pass 2 must replay pass 1's masks
# ---------------------------------------------------------------------------------------------------------------------
def _dropout_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.GELU(), torch.nn.Linear(16, 5))


def _pair_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An in-batch loss over all pairs (like eq. 2): every row's gradient depends on every other row."""
    s = torch.nn.functional.normalize(s, dim=-1)
    return ((s @ s.T - t @ t.T) ** 2).sum() + (1 - (s * t).sum(-1)).sum()


def _grads_default(net, micros, t):
    torch.manual_seed(7)
    loss = _pair_loss(torch.cat([net(x) for x in micros]), t)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()], torch.rand(3)


def _grads_cached(net, micros, t):
    torch.manual_seed(7)
    loss, extra = grad_cache.cached_backward(lambda x, _: ({"v": net(x)}, None), micros,
                                             lambda v, aux: (_pair_loss(v["v"], t), len(aux)), net,
                                             torch.device("cpu"))
    assert extra == len(micros)
    return loss, [p.grad.clone() for p in net.parameters()], torch.rand(3)


def test_cached_backward_replays_dropout_and_equals_one_backward(monkeypatch):
    g = torch.Generator().manual_seed(1)
    micros = [torch.randn(n, 6, generator=g) for n in (3, 4, 2)]
    t = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=-1)
    net = _dropout_net()
    loss_a, grads_a, after_a = _grads_default(net, micros, t)
    net.zero_grad(set_to_none=True)
    loss_b, grads_b, after_b = _grads_cached(net, micros, t)
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert rel_err(b, a) <= 1e-6
    assert torch.equal(after_a, after_b)  # the random streams go on as after the default path's single forward
    # control: without the RNG replay, pass 2 draws other dropout masks and the gradient is wrong
    net.zero_grad(set_to_none=True)
    monkeypatch.setattr(grad_cache, "rng_set", lambda state, device: None)
    _, grads_c, _ = _grads_cached(net, micros, t)
    assert max(rel_err(c, a) for a, c in zip(grads_a, grads_c)) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# train.py, one process: every stage, packing on and off
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("grad_cache_assets")
    a = make_text_assets(root, layers=3, n_texts=64)
    a["vision_init"] = make_tiny_jasper(root / "vinit", layers=2, vision=True)
    a["images"] = make_images(root / "images")
    return a


def train_args(a: dict, out, stage: int, packing: bool = True) -> list[str]:
    common = ["--stage", str(stage), "--out", str(out), "--steps", "3", "--lr", "1e-3", "--dtype", "fp32",
              "--grad-clip", "0", "--ckpt-every", "0", "--no-export", "--device", "cpu"]
    if stage == 4:
        return common + ["--init", str(a["vision_init"]), "--images", str(a["images"]), "--batch", "8",
                         "--micro-batch", "3", "--image-size", "28", "--num-workers", "0"]
    return common + ["--init", str(a["init"]), "--texts", str(a["texts"]), "--teacher-cache", str(a["cache"]),
                     "--batch", "12", "--micro-batch", "3" if packing else "5", "--max-length", "40",
                     "--packing" if packing else "--no-packing"]


def step_once(args: list[str]) -> tuple[dict, dict, float, int]:
    """One optimizer step through train.optimizer_step -> (gradients as AdamW saw them, parameters after, loss,
    micro-batches)."""
    cfg = TR.parse_config(args)
    d = DI.Dist()
    run = TR.build_state(cfg, d, *TR.set_up(cfg, d))
    batch = next(iter(run.loader))
    names = {p: n for n, p in run.model.named_parameters()}
    seen = {}
    run.opt.register_step_pre_hook(
        lambda opt, *_: seen.update({names[p]: p.grad.clone() for grp in opt.param_groups for p in grp["params"]}))
    loss = TR.optimizer_step(run, batch)[0]
    params = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return seen, params, loss, len(TR.micro_batches(batch))


@pytest.mark.parametrize("stage,packing", [(1, True), (1, False), (2, True), (2, False), (3, True), (3, False),
                                           (4, False)])
def test_grad_cache_equals_default_path_single_process(assets, tmp_path, stage, packing):
    args = train_args(assets, tmp_path / "a", stage, packing)
    grads_a, params_a, loss_a, n_micro = step_once(args)
    grads_b, params_b, loss_b, _ = step_once(train_args(assets, tmp_path / "b", stage, packing) + ["--grad-cache"])
    assert n_micro >= 2  # else there is nothing to cache
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert_grads_close(grads_b, grads_a)
    init = TR.load_student(TR.parse_config(args)).state_dict()
    steps_a = {k: params_a[k] - init[k] for k in params_a}  # the AdamW update of this step
    assert all(v.abs().max() > 0 for v in steps_a.values())
    assert_grads_close({k: params_b[k] - init[k] for k in params_b}, steps_a)


# ---------------------------------------------------------------------------------------------------------------------
# two processes (torchrun, FSDP2): same gradients as one process; one reduce-scatter per sharded module per step
# ---------------------------------------------------------------------------------------------------------------------
def worker(out, args: list[str], nproc: int) -> dict:
    cmd = [sys.executable, str(ROOT / "tests" / "grad_cache_worker.py"), str(out), *args]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage,packing", [(3, True), (4, False)])
def test_two_processes_grad_cache_equals_one_process_and_reduces_once(assets, tmp_path, stage, packing):
    args = train_args(assets, tmp_path / "r", stage, packing)
    two = worker(tmp_path / "two.pt", args, nproc=2)
    one = worker(tmp_path / "one.pt", [a if a != str(tmp_path / "r") else str(tmp_path / "s") for a in args], 1)
    default, cache, control = two["default"], two["cache"], two["cache_no_sync_off"]
    assert cache["n_micro"] >= 2
    # 2 processes: the cached path gives the default path's gradients
    assert_grads_close(cache["grads"], default["grads"])
    assert cache["loss"] == pytest.approx(default["loss"], rel=1e-6)
    # ... and 2 processes == 1 (fp32 summation order in the sharded reductions: ~5e-7 measured)
    assert_grads_close(cache["grads"], one["default"]["grads"])
    assert_grads_close(one["cache"]["grads"], one["default"]["grads"])
    assert cache["loss"] == pytest.approx(one["default"]["loss"], rel=1e-6)
    # FSDP2 reduces once per step: as many reduce-scatters as the default path's single backward (one per sharded
    # module with trainable parameters), against one per micro-batch when no_sync is left off (the control)
    assert default["reduce_scatters"] > 0
    assert cache["reduce_scatters"] == default["reduce_scatters"]
    assert control["reduce_scatters"] == cache["n_micro"] * default["reduce_scatters"]
    assert_grads_close(control["grads"], default["grads"])  # no_sync changes when, not what, is reduced
