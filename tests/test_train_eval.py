"""train.py --eval-every N: the held-out slice (never in a batch, recorded in config.json), the evaluation record
in metrics.jsonl (held-out cosine / MSE, sim-matrix MSE and STSBenchmark dev Spearman at every head), the plot,
the best step in the summary, and a failing evaluation that is reported while training goes on.

Tiny random student, 192 real texts and their MiniLM cache (tests/train_fixtures.py); a small STSBenchmark dev
file in a temporary data dir keeps each evaluation fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import data as D
import model as M
import train as TR
from common import qwen_tokenizer_dir
from train_fixtures import make_text_assets, read_metrics, run_train


@pytest.fixture(scope="module")
def assets(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("train_eval")
    a = make_text_assets(d, layers=2, n_texts=192)
    sts = d / "evaldata" / "sts" / "STSBenchmark"
    sts.mkdir(parents=True)
    rows = (data_dir / "sts" / "STSBenchmark" / "dev.jsonl").read_text().splitlines()[:60]
    (sts / "dev.jsonl").write_text("\n".join(rows) + "\n")
    return dict(a, eval_data=d / "evaldata")


def _cfg(a, out: Path, **kw) -> TR.TrainConfig:
    base = dict(stage=3, init=str(a["init"]), texts=str(a["texts"]), teacher_cache=str(a["cache"]), out=str(out),
                batch=16, micro_batch=8, steps=6, max_length=32, dtype="fp32", log_every=100, ckpt_every=0,
                export=False, eval_every=3, eval_holdout=24, eval_data=str(a["eval_data"]))
    base.update(kw)
    return TR.TrainConfig(**base)


def test_holdout_lines_never_drawn_and_fixed_across_seeds(assets):
    tok = M.TextTokenizer.from_pretrained(qwen_tokenizer_dir(), max_length=32)
    plain = D.TrainLoader(assets["texts"], tok, global_batch=16, max_length=32, seed=0)
    held = {}
    for seed in (0, 7):
        ld = D.TrainLoader(assets["texts"], tok, global_batch=16, max_length=32, seed=seed, holdout=24, epochs=3)
        assert len(ld.holdout_lines) == 24 and ld.n_valid == plain.n_valid - 24
        out = {int(r) for b in ld for r in b.rows}
        assert not out & set(ld.holdout_records()[1])  # three epochs: no held-out row in any batch
        assert len(out) >= ld.n_valid - 15  # everything else is drawn (an epoch drops < one batch)
        held[seed] = ld.holdout_lines.tolist()
    assert held[0] == held[7]  # the slice does not follow the training seed: stages of a pipeline share it
    with pytest.raises(D.DataError, match="cannot hold out"):
        D.TrainLoader(assets["texts"], tok, global_batch=16, max_length=32, seed=0, holdout=10 ** 6)


def test_eval_every_logs_records_and_plots(assets, tmp_path, monkeypatch, capsys):
    seen = []
    real = D.TrainLoader.batch_at
    monkeypatch.setattr(D.TrainLoader, "batch_at", lambda self, e, s: seen.append(r := real(self, e, s)) or r)
    out = tmp_path / "run"
    summary = TR.train(_cfg(assets, out))
    cfg = json.loads((out / "config.json").read_text())
    held = cfg["eval_heldout"]["rows"]
    assert len(held) == 24 and cfg["eval_every"] == 3
    assert not {int(r) for b in seen for r in b.rows} & set(held)  # never in a training batch
    recs = read_metrics(out)
    evs = {r["step"]: r["eval"] for r in recs if "eval" in r}
    assert set(evs) == {3, 6}
    heads = ["384", "64", "32", "16"]
    for ev in evs.values():
        assert -1 <= ev["heldout_cos"] <= 1 and ev["heldout_mse"] >= 0
        assert list(ev["heldout_sim_mse"]) == heads and list(ev["stsb_dev"]) == heads
        assert all(-1 <= v <= 1 for v in ev["stsb_dev"].values())
    # unit vectors: the mean squared error over the D coordinates is (2 - 2 cos) / D
    ev = evs[6]
    assert ev["heldout_mse"] == pytest.approx((2 - 2 * ev["heldout_cos"]) / 384, rel=1e-4)
    best = summary["best_eval"]
    assert best["step"] in (3, 6) and best["n_evals"] == 2 and best["n_failed"] == 0
    want = max(evs, key=lambda s: evs[s]["stsb_dev"]["384"])
    assert best["step"] == want
    text = capsys.readouterr().out
    assert f"eval: best step {want} (STSBenchmark dev Spearman" in text and "eval step 3 | held-out cos" in text
    assert (out / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --config accepts the run's own config.json back (the held-out record is not a setting)
    assert TR.parse_config(["--config", str(out / "config.json")]).eval_every == 3


def test_eval_failure_is_reported_and_training_continues(assets, tmp_path, monkeypatch, capsys):
    calls = []
    real = TR.TrainEval.__call__

    def flaky(self, model):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk vanished")
        return real(self, model)
    monkeypatch.setattr(TR.TrainEval, "__call__", flaky)
    out = tmp_path / "run"
    summary = TR.train(_cfg(assets, out, steps=9))
    assert summary["step"] == 9  # all steps ran
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 10))
    evs = {r["step"]: r["eval"] for r in recs if "eval" in r}
    assert evs[3] == {"error": "RuntimeError: disk vanished"} and "stsb_dev" in evs[6] and "stsb_dev" in evs[9]
    text = capsys.readouterr().out
    assert "eval step 3 FAILED (RuntimeError: disk vanished); training continues" in text
    assert summary["best_eval"]["n_failed"] == 1 and summary["best_eval"]["step"] in (6, 9)
    # the model kept training after the failure: losses after it are finite and the model is in train mode
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_eval_without_sts_data_and_stage4_refusal(assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # a data dir without sts/STSBenchmark
    summary = TR.train(_cfg(assets, tmp_path / "run", eval_data=str(tmp_path / "empty"), steps=3))
    ev = read_metrics(tmp_path / "run")[-1]["eval"]
    assert "heldout_cos" in ev and "stsb_dev" not in ev
    assert "no STSBenchmark dev score during training" in capsys.readouterr().out
    assert summary["best_eval"]["by"].startswith("held-out cosine")
    with pytest.raises(TR.ConfigError, match="--eval-every is for the text stages"):
        TR.train(TR.TrainConfig(stage=4, out=str(tmp_path / "s4"), eval_every=5, init=str(assets["init"]),
                                images="x.jsonl"))


@pytest.mark.slow
def test_eval_under_torchrun_matches_one_process(assets, tmp_path):
    """Every rank runs the evaluation through the FSDP-sharded model (inference mode, between optimizer steps):
    2 processes log the same evaluation records as 1 process on the same global batches, and training after an
    evaluation is unchanged (same losses)."""
    args = ["--stage", "3", "--init", str(assets["init"]), "--texts", str(assets["texts"]), "--teacher-cache",
            str(assets["cache"]), "--batch", "16", "--micro-batch", "8", "--steps", "4", "--max-length", "32",
            "--dtype", "fp32", "--ckpt-every", "0", "--no-export", "--eval-every", "2", "--eval-holdout", "24",
            "--eval-data", str(assets["eval_data"])]
    run_train(args + ["--out", str(tmp_path / "p1")])
    run_train(args + ["--out", str(tmp_path / "p2")], nproc=2)
    m1, m2 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    e1 = {r["step"]: r["eval"] for r in m1 if "eval" in r}
    e2 = {r["step"]: r["eval"] for r in m2 if "eval" in r}
    assert set(e1) == set(e2) == {2, 4}
    for s in e1:
        assert e2[s]["heldout_cos"] == pytest.approx(e1[s]["heldout_cos"], rel=1e-5)
        for head, v in e1[s]["stsb_dev"].items():
            assert e2[s]["stsb_dev"][head] == pytest.approx(v, abs=1e-4)
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def test_resume_refuses_a_changed_holdout(assets, tmp_path):
    """The held-out slice is taken out of the loader's rows, so it defines the data order: --resume with another
    --eval-holdout (or with --eval-every switched on or off) is refused with the reason, not silently reshuffled."""
    out = tmp_path / "run"
    TR.train(_cfg(assets, out, steps=4, stop_at=2, ckpt_every=2))
    with pytest.raises(TR.ConfigError, match="held out 24 texts"):
        TR.train(_cfg(assets, out, steps=4, resume=True, eval_holdout=32))
    with pytest.raises(TR.ConfigError, match="held out 24 texts"):
        TR.train(_cfg(assets, out, steps=4, resume=True, eval_every=0))
    assert TR.train(_cfg(assets, out, steps=4, resume=True, eval_every=1))["step"] == 4  # the interval may change


def test_tensorboard_events_equal_metrics_once_per_step_after_resume(assets, tmp_path):
    """--tensorboard: the event files read back with TensorBoard's own reader hold every scalar of every
    metrics.jsonl line (losses per head, lr, grad norm, tokens, the --eval-every records) at its step, once, even after
    a resume from an earlier checkpoint than the killed run had logged (purge_step), plus tokens_per_s."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import shutil

    import tensorboard_log as TB

    out = tmp_path / "run"
    kw = dict(steps=6, eval_every=2, ckpt_every=2, tensorboard=True)
    TR.train(_cfg(assets, out, stop_at=4, **kw))
    ck = out / "checkpoints"  # as if killed after logging step 4 but before its checkpoint: resume from step 2
    shutil.rmtree(ck / "step_00000004")
    (ck / "latest").write_text("step_00000002\n")
    TR.train(_cfg(assets, out, resume=True, **kw))
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    want: dict[str, list] = {}
    for r in recs:
        for tag, v in TB.scalars(r).items():
            want.setdefault(tag, []).append((r["step"], v))
    acc = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={ea.SCALARS: 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/fc1.cos", "train/fc4.sim", "train/lr", "train/grad_norm", "train/tokens",
            "eval/heldout_cos", "eval/stsb_dev/384", "eval/heldout_sim_mse/16"} <= set(want)
    assert tags == set(want) | {"train/tokens_per_s"}
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag  # each step once, in order
        assert all(v == pytest.approx(w, rel=1e-6, abs=1e-30) for (_, v), (_, w) in zip(got, pts)), tag  # float32
    rate = acc.Scalars("train/tokens_per_s")
    assert [e.step for e in rate] == list(range(1, 7)) and all(e.value > 0 for e in rate)
    assert sorted(p.name for p in (out / "tensorboard").iterdir())[0].startswith("events.out.tfevents.")
    # a fresh run in a folder without checkpoints starts a clean board (an older run's curves would mix in)
    TR.train(_cfg(assets, tmp_path / "run2", steps=2, eval_every=0, tensorboard=True))
    shutil.rmtree(tmp_path / "run2" / "checkpoints")
    TR.train(_cfg(assets, tmp_path / "run2", steps=1, eval_every=0, tensorboard=True))
    acc = ea.EventAccumulator(str(tmp_path / "run2" / "tensorboard")).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1]


def test_tensorboard_missing_is_one_config_line(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(TR.ConfigError, match=r"--tensorboard needs the tensorboard package") as e:
        TR.parse_config(["--stage", "1", "--tensorboard"])
    assert "\n" not in str(e.value)
    assert TR.parse_config(["--stage", "1"]).tensorboard is False  # off by default: nothing imported
    assert TR.cli(["--stage", "1", "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --tensorboard needs the tensorboard package")


def test_eval_every_with_mrl_prefix_scores_what_the_export_writes(assets, tmp_path):
    """--mrl-prefix with --eval-every: the shorter dims are scored as FC1's renormalised prefixes (FC2-4 stay
    untrained until the export writes FC1's rows into them), so the evaluation at the last step equals the export's
    own STSBenchmark dev scores at every head."""
    from eval import builtin_sts, load_encoder
    from eval_inputs import EmbeddingCache, Instructions, task_instruction
    out = tmp_path / "run"
    summary = TR.train(_cfg(assets, out, steps=3, mrl_prefix=True, export=True))
    ev = read_metrics(out)[-1]["eval"]
    assert list(ev["stsb_dev"]) == ["384", "64", "32", "16"]
    rows = [json.loads(ln) for ln in (assets["eval_data"] / "sts" / "STSBenchmark" / "dev.jsonl").read_text()
            .splitlines()]
    instr = task_instruction("STSBenchmark", "STS", None, Instructions("original", data_dir=assets["eval_data"]))
    cache = EmbeddingCache(load_encoder(summary["export"], max_length=32), batch_size=64, show_progress=False)
    for D, v in ev["stsb_dev"].items():
        assert builtin_sts(cache, rows, int(D), instr)["cosine_spearman"] == pytest.approx(v, abs=1e-6), D
