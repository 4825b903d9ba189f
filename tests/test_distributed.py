"""Issue 24: torchrun cannot desynchronise. Every rank runs the same collectives at every step whatever its texts,
the run does not depend on the rank count (1, 2 and 3 ranks: the same per-step losses and final weights), a mismatch
stops every rank with one message instead of a hang, and a checkpoint resumes on another rank count.

The texts are built to break the old per-rank packing: in every global batch the positions the old loader gave to
rank 0 hold only long texts (> max_length tokens) and the rest only 2-3 word texts, so a rank-local packing plan gives
the ranks different numbers of forwards (the gloo crash of the issue). Micro-batches do not divide the shares, and
one configuration uses a global batch that no rank count here divides (13).
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import data as D
import distributed as DI
import train as TR
from packing import plan_step
from train_fixtures import make_cache, make_tiny_jasper, read_metrics, run_train, stage4_args

LOSS_TOL = dict(rel=1e-5, abs=1e-7)


def make_skewed_texts(out: Path, data_dir: Path, n: int, batch: int, seed: int) -> Path:
    """n texts in which, for every global batch of epoch 0 drawn with `seed`, the first half of the drawn positions
    (the old rank 0's share with 2 ranks) are long passages and the second half 2-3 word snippets."""
    passages = [json.loads(x)["text"] for x in open(data_dir / "text" / "passages.jsonl", encoding="utf-8")]
    long_ = [p for p in passages if len(p) > 600][:n]
    rnd = random.Random(seed)
    words = " ".join(passages[:50]).split()
    perm = np.random.default_rng([seed, 0]).permutation(n)  # TrainLoader.permutation(0) over n valid rows
    lines = [None] * n
    for i, line in enumerate(perm):
        lines[line] = long_[i] if i % batch < batch // 2 else " ".join(rnd.sample(words, rnd.randint(2, 3)))
    out.mkdir(parents=True, exist_ok=True)
    p = out / "texts.jsonl"
    p.write_text("".join(json.dumps({"id": i, "text": t, "hash": D.text_hash(t)}) + "\n"
                         for i, t in enumerate(lines)))
    return p


@pytest.fixture(scope="module")
def skew(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("skew")
    texts = make_skewed_texts(d / "data", data_dir, n=156, batch=12, seed=11)
    return dict(texts=texts, cache=make_cache(texts, d / "cache"), init=make_tiny_jasper(d / "init", layers=3,
                                                                                        vision=False))


def args_for(a: dict, out: Path, stage: int, steps: int, batch: int = 12, micro: int = 3, **kw) -> list[str]:
    args = ["--stage", str(stage), "--init", str(a["init"]), "--texts", str(a["texts"]), "--teacher-cache",
            str(a["cache"]), "--out", str(out), "--batch", str(batch), "--micro-batch", str(micro), "--steps",
            str(steps), "--max-length", "32", "--dtype", "fp32", "--log-every", "1", "--ckpt-every", "0",
            "--lr", "1e-3", "--seed", "11"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def assert_same_run(ref: Path, got: Path, weights: bool = True):
    """Per-step losses (every part of every head) rel 1e-5 and final weights atol 1e-5 (fp32; only the reduction
    order inside the gathered matmuls differs between rank counts)."""
    m1, m2 = read_metrics(ref), read_metrics(got)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    keys = [k for k in m1[0] if "." in k or k == "loss"]
    for r1, r2 in zip(m1, m2):
        for k in keys:
            assert r2[k] == pytest.approx(r1[k], **LOSS_TOL), (ref.name, got.name, r1["step"], k)
        assert r2.get("tokens") == r1.get("tokens")
        assert (r2.get("eval") is None) == (r1.get("eval") is None)
        if r1.get("eval"):  # held-out cosine / MSE rel 1e-5; STS dev Spearman (a rank statistic) 1e-4
            e1, e2 = _flat(r1["eval"]), _flat(r2["eval"])
            assert e1.keys() == e2.keys() and e1
            for k, v in e1.items():
                assert e2[k] == pytest.approx(v, rel=1e-5, abs=1e-4 if "sts" in k.lower() else 1e-6), (r1["step"], k)
    assert m1[-1]["loss"] != m1[0]["loss"]  # the run trained: the comparison is not between two frozen copies
    if weights:
        a, b = load_file(ref / "final" / "model.safetensors"), load_file(got / "final" / "model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def _flat(rec: dict, pre: str = "") -> dict:
    """An evaluation record's numbers as {dotted key: value}, without its wall time."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{pre}{k}."))
        elif isinstance(v, (int, float)) and k != "time_s":
            out[pre + k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the step plan: one layout of the global batch, the same number of forwards on every rank (fast)
# ---------------------------------------------------------------------------------------------------------------------
def test_plan_step_equal_forwards_and_every_text_once():
    rnd = random.Random(0)
    for _ in range(3000):
        B = rnd.randint(1, 40)
        W, mb = rnd.randint(1, min(B, 6)), rnd.randint(1, 7)
        skewed = rnd.random() < 0.5  # the first half long, the rest tiny: the shape that broke per-rank packing
        lengths = [rnd.randint(28, 32) if skewed and i < B // 2 else rnd.randint(1, 32) for i in range(B)]
        budget = rnd.choice([None, 32, 48])
        plan = plan_step(lengths, W, mb, budget)
        assert len(plan) == W and len({len(p) for p in plan}) == 1  # the same number of forwards on every rank
        texts = sorted(i for p in plan for f in p for row in f for i in row)
        assert texts == list(range(B))  # every text of the global batch exactly once
        assert all(len(f) <= mb for p in plan for f in p)
        if budget:
            assert all(sum(lengths[i] for i in row) <= budget for p in plan for f in p for row in f)
        n_rows = sum(len(f) for p in plan for f in p)
        if n_rows >= W:  # when there is work for everyone, every rank gets some
            assert all(any(f for f in p) for p in plan)
    # balanced: one long text and many short ones over 2 ranks -> the short ones go to the other rank
    lengths = [32] * 6 + [2] * 6
    plan = plan_step(lengths, 2, 2, None)
    tok = [sum(lengths[i] for f in p for row in f for i in row) for p in plan]
    assert max(tok) - min(tok) <= 32


@pytest.mark.parametrize("packing", [True, False])
def test_loader_shares_union_to_the_global_batch_for_any_rank_count(skew, packing, monkeypatch, tmp_path):
    monkeypatch.setenv("JASPER_CACHE_DIR", str(tmp_path))
    from tokenizer import TextTokenizer
    tok = TextTokenizer.from_pretrained(skew["init"], max_length=32)
    one = D.TrainLoader(skew["texts"], tok, 13, 32, seed=11, micro_batch=3, packing=packing)
    for W in (2, 3, 4):
        loaders = [D.TrainLoader(skew["texts"], tok, 13, 32, seed=11, rank=r, world_size=W, micro_batch=3,
                                 packing=packing) for r in range(W)]
        for step in (0, 3):
            parts = [ld.batch_at(0, step) for ld in loaders]
            assert len({b.n_forwards for b in parts}) == 1  # the invariant
            assert all(b.rank_sizes == [len(p.rows) for p in parts] for b in parts)  # every rank knows the sizes
            rows = [r for b in parts for r in b.rows.tolist()]
            assert sorted(rows) == sorted(one.batch_at(0, step).rows.tolist())  # the global batch, whatever W
            assert sum(b.n_tokens for b in parts) == one.batch_at(0, step).n_tokens
            for b in parts:
                assert sum(b.micro_sizes) == len(b.rows)
                micro = b.packed if packing else b.chunks
                assert len(micro) == b.n_forwards


# ---------------------------------------------------------------------------------------------------------------------
# the guard: a mismatch stops every rank with one message (2 processes, gloo, in-process spawn)
# ---------------------------------------------------------------------------------------------------------------------
def _guard_worker(rank: int, world: int, port: int, case: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    d = DI.Dist(rank, world, torch.device("cpu"), mesh=object())  # agree() needs the group, not the mesh itself
    try:
        if case == "forwards":
            DI.agree(d, 7, 3 if rank == 0 else 2, 5 + rank)
        elif case == "failed":
            DI.agree(d, 7, 2, 4, failed=D.DataError("texts.jsonl:9: bad line") if rank == 1 else None)
        else:
            sizes = DI.agree(d, 7, 2, 5 + rank)
            Path(out, f"{rank}.txt").write_text(json.dumps(sizes))
    except Exception as e:  # noqa: BLE001 - the message is what the test reads
        Path(out, f"{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["agree", "forwards", "failed"])
def test_agreement_check_names_step_ranks_and_counts(case, tmp_path):
    mp.spawn(_guard_worker, args=(2, _free_port(), case, str(tmp_path)), nprocs=2, join=True)
    got = [Path(tmp_path, f"{r}.txt").read_text() for r in range(2)]
    if case == "agree":
        assert [json.loads(g) for g in got] == [[5, 6], [5, 6]]  # every rank's rows, for gather_global
    elif case == "forwards":
        for g in got:  # the same message on every rank, naming the step, each rank and its counts
            assert g.startswith("DesyncError: step 7: the ranks are about to run different collectives")
            assert "rank 0: step 7, 3 forwards, 5 rows; rank 1: step 7, 2 forwards, 6 rows" in g
    else:
        assert got[1] == "DataError: texts.jsonl:9: bad line"  # the failing rank: its own one-line error
        assert got[0].startswith("DesyncError: step 7: rank(s) [1] could not build their batch")


# ---------------------------------------------------------------------------------------------------------------------
# the same run on 1, 2 and 3 ranks (torchrun, gloo): the grid
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_packed_skewed_stage2_same_on_1_2_3_ranks(skew, tmp_path):
    """The issue's crash: packed (the default), stage 2, one half of every batch long and the other tiny, a
    micro-batch (3) that divides no share, checkpoints every 2 steps. 2 and 3 ranks == 1 process."""
    TR.main(args_for(skew, tmp_path / "p1", 2, steps=6, ckpt_every=2))
    for n in (2, 3):
        run_train(args_for(skew, tmp_path / f"p{n}", 2, steps=6, ckpt_every=2), nproc=n)
        assert_same_run(tmp_path / "p1", tmp_path / f"p{n}")


@pytest.mark.slow
def test_padded_stage3_eval_every_same_on_1_and_3_ranks(skew, tmp_path):
    """--no-packing, stage 3 (every head, every parameter), micro-batch 5, --eval-every 2 on a held-out slice."""
    extra = dict(no_packing=True, micro=5, eval_every=2, eval_holdout=12)
    TR.main(args_for(skew, tmp_path / "p1", 3, steps=4, **extra))
    run_train(args_for(skew, tmp_path / "p3", 3, steps=4, **extra), nproc=3)
    assert_same_run(tmp_path / "p1", tmp_path / "p3")
    assert sum("eval" in r for r in read_metrics(tmp_path / "p3")) == 2


@pytest.mark.slow
def test_batch_no_rank_count_divides_stage1_same_on_1_2_3_ranks(skew, tmp_path):
    """Global batch 13 (prime): ranks hold 7/6 and 5/4/4-ish texts; stage 1 (FC1 only, a frozen body under FSDP)."""
    TR.main(args_for(skew, tmp_path / "p1", 1, steps=4, batch=13, micro=2))
    for n in (2, 3):
        run_train(args_for(skew, tmp_path / f"p{n}", 1, steps=4, batch=13, micro=2), nproc=n)
        assert_same_run(tmp_path / "p1", tmp_path / f"p{n}")


@pytest.mark.slow
def test_stage4_broken_images_same_on_1_and_3_ranks(tmp_path):
    """Stage 4 on 3 ranks: 8 pairs dealt 2/3/3, broken images dropped on some ranks, 2 forwards each (micro-batch
    2), a forward left empty runs a dummy. Same losses as one process."""
    args = stage4_args(tmp_path, broken=3, micro_batch=2)
    run_train(args + ["--out", str(tmp_path / "p1")])
    run_train(args + ["--out", str(tmp_path / "p3")], nproc=3)
    assert_same_run(tmp_path / "p1", tmp_path / "p3", weights=False)
    assert read_metrics(tmp_path / "p3")[-1]["skips"]["broken_image"] == 9  # 3 per step, summed over ranks


@pytest.mark.slow
def test_elastic_resume_2_to_3_to_1_ranks(skew, tmp_path):
    """A 2-rank run stops at step 2 (its checkpoint), resumes on 3 ranks to step 4, then on 1 process to step 6:
    the losses and final weights equal one uninterrupted process. DCP reshards model and optimizer on load."""
    ref, out = tmp_path / "ref", tmp_path / "elastic"
    TR.main(args_for(skew, ref, 2, steps=6))
    run_train(args_for(skew, out, 2, steps=6, ckpt_every=2, stop_at=2), nproc=2)
    p = run_train(args_for(skew, out, 2, steps=6, ckpt_every=2, stop_at=4, resume=True), nproc=3)
    assert "written by 2 rank(s), this run has 3" in p.stdout
    run_train(args_for(skew, out, 2, steps=6, ckpt_every=2, resume=True))
    assert_same_run(ref, out)


@pytest.mark.slow
def test_readme_shape_torchrun_8_ranks_stage1(skew, tmp_path):
    """The README's command, `torchrun --nproc_per_node 8 train.py --stage 1 ...`, on a tiny model (gloo): global
    batch 12 over 8 ranks (some ranks hold 1 text, packed rows split so all get work) == one process."""
    TR.main(args_for(skew, tmp_path / "p1", 1, steps=3, micro=1))
    run_train(args_for(skew, tmp_path / "p8", 1, steps=3, micro=1), nproc=8)
    assert_same_run(tmp_path / "p1", tmp_path / "p8")
