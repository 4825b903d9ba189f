"""Fault probe (issue 20): what a user meets when something goes wrong, through the CLIs of data.py, teachers.py,
train.py, eval.py and the demo. Each case asserts the target behaviour: a project error is ONE line `error: ...`
naming the file, line or key, exit code 2, no traceback (JASPER_TRACEBACK=1 shows it); or an exact recovery.

Most cases call a CLI's entry point in-process (`cli(argv)`: what `python X.py` runs) on tiny inputs
(tests/train_fixtures.py); a few go through a real subprocess to prove the entry point itself. Rerun:

    flock /tmp/cpu.lock .venv/bin/python -m pytest -q tests/test_faults.py
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import data as D
import eval as E
import teachers as T
import train as TR
from train_fixtures import ROOT, make_text_assets, make_texts, make_tiny_jasper, read_metrics


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith("error:")]

    def __repr__(self):
        return f"rc={self.rc}\n--- stdout\n{self.out[-2000:]}\n--- stderr\n{self.err[-3000:]}"


def cli(mod, argv, capsys) -> Result:
    """Run a CLI's entry point in-process, as `python X.py argv` would: its `cli` (what __main__ calls), else
    `main`. An escaping exception is reported as the interpreter would (traceback, rc 1)."""
    entry = getattr(mod, "cli", None) or mod.main
    capsys.readouterr()
    rc, tb = 0, ""
    try:
        r = entry([str(a) for a in argv])
        rc = r if isinstance(r, int) else 0
    except SystemExit as e:
        if isinstance(e.code, str):
            rc, tb = 1, e.code + "\n"
        else:
            rc = e.code or 0
    except (Exception, BaseException) as e:  # noqa: BLE001 - the probe records what escapes (DCP's errors are
        if isinstance(e, KeyboardInterrupt):   # BaseExceptions)
            raise
        rc, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return _log(Result(rc, out, err + tb))


def _log(r: Result) -> Result:
    """PROBE_LOG=FILE: one JSON line per CLI call (case, exit code, what the user saw), for the behaviour table."""
    if os.environ.get("PROBE_LOG"):
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        tb = "Traceback" in r.err
        seen = (r.error_lines[0] if r.error_lines and not tb else lines[-1] if lines else "")[:160]
        with open(os.environ["PROBE_LOG"], "a") as f:
            f.write(json.dumps(dict(case=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], rc=r.rc,
                                    traceback=tb, n_err_lines=len(r.error_lines), seen=seen)) + "\n")
    return r


def subproc(script: str, argv, env: dict | None = None, timeout: int = 120) -> Result:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    e.pop("JASPER_TRACEBACK", None) if not env or "JASPER_TRACEBACK" not in env else None
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], env=e, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return _log(Result(p.returncode, p.stdout, p.stderr))


def assert_error(r: Result, *needles: str):
    """One `error:` line naming every needle, exit code 2, no traceback."""
    assert r.rc == 2, r
    assert "Traceback" not in r.err, r
    assert len(r.error_lines) == 1, r
    for n in needles:
        assert n in r.error_lines[0], (n, r)


def demo_module():
    return importlib.import_module("demo")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_text_assets(tmp_path_factory.mktemp("faults"), layers=2, n_texts=128)


def targs(a: dict, out: Path, stage: int = 1, steps: int = 3, **kw) -> list[str]:
    args = ["--stage", stage, "--init", a["init"], "--texts", a["texts"], "--teacher-cache", a["cache"], "--out", out,
            "--batch", 8, "--micro-batch", 4, "--steps", steps, "--max-length", 32, "--dtype", "fp32",
            "--log-every", 1, "--ckpt-every", 0, "--lr", "1e-3"]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        if flag in args:
            args[args.index(flag) + 1] = v
        else:
            args += [flag, v] if v is not True else [flag]
    return [str(x) for x in args]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a student model is loaded: path and config checks must come first. (Off under PROBE_LOG,
    so that the log shows what the user gets today.)"""
    import model as M
    if os.environ.get("PROBE_LOG"):
        return

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(M.JasperModel, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(M.JasperModel, "from_stella", classmethod(boom), raising=False)


# =====================================================================================================================
# 1. train.py: flags, --config JSON and init config.json validated up front by type and range, naming the key
# =====================================================================================================================
BAD_FLAGS = [
    (["--steps", "-5"], "steps"), (["--steps", "0"], "steps"), (["--batch", "0"], "batch"),
    (["--micro-batch", "0"], "micro_batch"), (["--log-every", "0"], "log_every"), (["--lr", "-1"], "lr"),
    (["--lr", "nan"], "lr"), (["--warmup-ratio", "1.5"], "warmup_ratio"), (["--loss-weights", "1"], "loss_weights"),
    (["--loss-weights", "1", "2", "-3"], "loss_weights"), (["--adam-betas", "0.9"], "adam_betas"),
    (["--grad-clip", "-1"], "grad_clip"), (["--ckpt-every", "-1"], "ckpt_every"), (["--max-length", "0"],
                                                                                    "max_length"),
    (["--seed", "-1"], "seed"), (["--stop-at", "0"], "stop_at"), (["--keep-ckpts", "-2"], "keep_ckpts"),
    (["--margin", "-0.1"], "margin"), (["--min-lr-ratio", "2"], "min_lr_ratio"), (["--adam-eps", "0"], "adam_eps"),
]


@pytest.mark.parametrize("flags,key", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_train_bad_flag_value(assets, tmp_path, capsys, no_model_load, flags, key):
    r = cli(TR, targs(assets, tmp_path / "o") + flags, capsys)
    assert_error(r, "--" + key.replace("_", "-"))  # named as the user typed it


BAD_CONFIGS = [({"stage": 7}, "stage"), ({"steps": "ten"}, "steps"), ({"resume": "yes"}, "resume"),
               ({"loss_weights": 5}, "loss_weights"), ({"lr": True}, "lr"), ({"batch": 12.5}, "batch"),
               ({"dtype": "bf17"}, "dtype"), ({"texts": 3}, "texts")]


@pytest.mark.parametrize("cfg,key", BAD_CONFIGS, ids=[json.dumps(c) for c, _ in BAD_CONFIGS])
def test_train_bad_config_value(assets, tmp_path, capsys, no_model_load, cfg, key):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(cfg))
    args = targs(assets, tmp_path / "o")
    for k in cfg:  # a flag would override the file's value (flags > --config)
        if f"--{k.replace('_', '-')}" in args:
            i = args.index(f"--{k.replace('_', '-')}")
            del args[i:i + 2]
    r = cli(TR, args + ["--config", f], capsys)
    assert_error(r, key, "c.json")


@pytest.mark.parametrize("content,needle", [("{not json", "c.json"), ("[1, 2]", "c.json"), (None, "c.json"),
                                            ('{"lr_typo": 1}', "lr_typo")], ids=["malformed", "list", "missing",
                                                                                 "unknown-key"])
def test_train_bad_config_file(assets, tmp_path, capsys, no_model_load, content, needle):
    f = tmp_path / "c.json"
    if content is not None:
        f.write_text(content)
    r = cli(TR, targs(assets, tmp_path / "o") + ["--config", f], capsys)
    assert_error(r, needle)


@pytest.mark.parametrize("which", ["init", "texts", "teacher-cache", "eval-data", "vision-init"])
def test_train_missing_path_before_model_loads(assets, tmp_path, capsys, no_model_load, which):
    missing = tmp_path / f"no_{which}"
    r = cli(TR, targs(assets, tmp_path / "o", **{which.replace("-", "_"): missing}), capsys)
    assert_error(r, str(missing))


def test_train_cache_without_manifest_and_misaligned_cache_before_model_loads(assets, tmp_path, capsys,
                                                                              no_model_load):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    assert_error(cli(TR, targs(assets, tmp_path / "o", teacher_cache=empty), capsys), "manifest.json")
    other = make_texts(tmp_path / "other", n=96, seed=1)  # 96 rows vs a 128-row cache
    assert_error(cli(TR, targs(assets, tmp_path / "o2", texts=other), capsys), "rows")


def test_train_stage4_missing_images_and_no_texts(assets, tmp_path, capsys, no_model_load):
    r = cli(TR, targs(assets, tmp_path / "o", stage=4, images=tmp_path / "none.jsonl"), capsys)
    assert_error(r, "none.jsonl")
    args = targs(assets, tmp_path / "o2")
    i = args.index("--texts")
    del args[i:i + 2]
    assert_error(cli(TR, args, capsys), "--texts")


def test_train_cache_and_teacher_both(assets, tmp_path, capsys, no_model_load):
    r = cli(TR, targs(assets, tmp_path / "o", teacher="minilm"), capsys)
    assert_error(r, "--teacher")


def test_train_out_is_a_file_or_holds_a_run(assets, tmp_path, capsys, no_model_load):
    f = tmp_path / "afile"
    f.write_text("x")
    assert_error(cli(TR, targs(assets, f), capsys), str(f))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_00000001\n")
    assert_error(cli(TR, targs(assets, out), capsys), "--resume")


# An export's config.json is the body's own config (top-level keys) plus our fields in a `jasper` block (issue 14).
@pytest.mark.parametrize("edit,key", [({"hidden_size": "32"}, "hidden_size"),
                                      ({"jasper": {"head_dims": ["abc"]}}, "head_dims"),
                                      ({"num_hidden_layers": -1}, "num_hidden_layers"),
                                      ({"rms_norm_eps": "small"}, "rms_norm_eps")],
                         ids=["hidden_size-str", "head_dims-str", "layers-negative", "eps-str"])
def test_train_init_config_json_value(assets, tmp_path, capsys, edit, key):
    init = tmp_path / "init"
    shutil.copytree(assets["init"], init)
    cfg = json.loads((init / "config.json").read_text())
    assert "jasper" in cfg and "hidden_size" in cfg, "the init fixture is not in the export layout"
    for k, v in edit.items():
        if isinstance(v, dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    (init / "config.json").write_text(json.dumps(cfg))
    r = cli(TR, targs(assets, tmp_path / "o", init=init), capsys)
    assert_error(r, "config.json", key)


def test_train_init_malformed_config_and_no_tokenizer(assets, tmp_path, capsys):
    init = tmp_path / "init"
    shutil.copytree(assets["init"], init)
    (init / "config.json").write_text("{oops")
    assert_error(cli(TR, targs(assets, tmp_path / "o", init=init), capsys), "config.json")
    shutil.copy(assets["init"] / "config.json", init / "config.json")
    (init / "tokenizer.json").unlink()
    assert_error(cli(TR, targs(assets, tmp_path / "o2", init=init), capsys), "tokenizer")


def test_train_on_the_fly_teacher_malformed_texts_names_line(assets, tmp_path, capsys):
    bad = tmp_path / "texts.jsonl"
    lines = assets["texts"].read_text().splitlines()
    lines[5] = '{"id": 5, "text": "broken'
    bad.write_text("\n".join(lines) + "\n")
    args = targs(assets, tmp_path / "o", texts=bad)
    i = args.index("--teacher-cache")
    args[i:i + 2] = ["--teacher", "minilm@max_length=32"]
    r = cli(TR, args, capsys)
    assert_error(r, "texts.jsonl:6")


def test_train_fewer_texts_than_the_batch(assets, tmp_path, capsys):
    r = cli(TR, targs(assets, tmp_path / "o", batch=256, micro_batch=8), capsys)
    assert_error(r, "256")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_device_cuda_without_a_gpu(assets, tmp_path, capsys, no_model_load):
    assert_error(cli(TR, targs(assets, tmp_path / "o", device="cuda"), capsys), "cuda")


def test_train_stage4_on_a_text_only_student(assets, tmp_path, capsys):
    from train_fixtures import make_images
    images = make_images(tmp_path / "img")
    r = cli(TR, targs(assets, tmp_path / "o", stage=4, images=images, image_size=28, num_workers=0), capsys)
    assert_error(r, "vision")


def test_train_error_is_one_line_exit_2_and_traceback_on_request(assets, tmp_path):
    """The real entry point (`python train.py`), and JASPER_TRACEBACK=1 for the traceback."""
    r = subproc("train.py", targs(assets, tmp_path / "o", steps=-5))
    assert_error(r, "steps")
    r = subproc("train.py", targs(assets, tmp_path / "o", steps=-5), env={"JASPER_TRACEBACK": "1"})
    assert r.rc == 2 and "Traceback" in r.err and "steps" in r.err


# =====================================================================================================================
# 2. train.py resume: changed settings take effect exactly or are refused; torn metrics; damaged checkpoints;
#    disk full; nothing unpickled
# =====================================================================================================================
@pytest.fixture(scope="module")
def stopped_run(assets):
    """5-step stage-2 run stopped at step 3 with checkpoints at steps 2 and 3 (keep 2)."""
    out = assets["root"] / "stopped"
    TR.main(targs(assets, out, stage=2, steps=5, ckpt_every=2, stop_at=3, keep_ckpts=2))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(out)}


@pytest.mark.parametrize("change", [dict(lr="5e-4"), dict(steps=8), dict(warmup_ratio=0.4),
                                    dict(lr="2e-3", steps=6, warmup_ratio=0.0)],
                         ids=["lr", "steps", "warmup", "all-three"])
def test_resume_schedule_change_takes_effect_exactly(assets, stopped_run, tmp_path, capsys, change):
    out = copy_run(stopped_run, tmp_path / "r")
    args = targs(assets, out, **{**dict(stage=2, steps=5, ckpt_every=2, keep_ckpts=2), **change}) + ["--resume"]
    r = cli(TR, args, capsys)
    assert r.rc == 0, r
    cfg = TR.parse_config(args)
    got = lrs(out)
    assert sorted(got) == list(range(1, cfg.steps + 1))
    for s in range(4, cfg.steps + 1):  # optimizer step s (1-based) uses lr * factor(s - 1) of the NEW settings
        assert got[s] == pytest.approx(cfg.lr * TR.lr_factor(s - 1, cfg), rel=1e-12, abs=1e-18), (s, got)
    for s in (1, 2, 3):  # the steps already taken are history
        assert got[s] == lrs(stopped_run)[s]


def test_resume_optimizer_settings_take_effect(assets, stopped_run, tmp_path, capsys, monkeypatch):
    out = copy_run(stopped_run, tmp_path / "r")
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append([(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in self.param_groups])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2, weight_decay=0.3, adam_eps="1e-6")
            + ["--adam-betas", "0.8", "0.95", "--resume"], capsys)
    assert r.rc == 0, r
    assert seen and all(g[0][0] == 0.3 and g[0][1] == (0.8, 0.95) and g[0][2] == 1e-6 for g in seen), seen


@pytest.mark.parametrize("change,key", [(dict(seed=5), "seed"), (dict(batch=16), "batch"), (dict(stage=3), "stage")])
def test_resume_run_defining_change_refused(assets, stopped_run, tmp_path, capsys, change, key):
    out = copy_run(stopped_run, tmp_path / "r")
    r = cli(TR, targs(assets, out, **{**dict(stage=2, steps=5, ckpt_every=2), **change}) + ["--resume"], capsys)
    assert_error(r, key)
    assert lrs(out) == lrs(stopped_run)  # nothing written


def test_resume_changed_init_refused(assets, stopped_run, tmp_path, capsys):
    out = copy_run(stopped_run, tmp_path / "r")
    other = make_tiny_jasper(tmp_path / "init2", layers=2, vision=False, seed=7)
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2, init=other) + ["--resume"], capsys)
    assert_error(r, "init")


def test_resume_repairs_torn_metrics_line(assets, stopped_run, tmp_path, capsys):
    out = copy_run(stopped_run, tmp_path / "r")
    ref = copy_run(stopped_run, tmp_path / "ref")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # a write cut short by a full disk
    assert cli(TR, targs(assets, ref, stage=2, steps=5, ckpt_every=2) + ["--resume"], capsys).rc == 0
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2) + ["--resume"], capsys)
    assert r.rc == 0, r
    assert "metrics.jsonl" in r.out + r.err and ("cut short" in r.out + r.err or "torn" in r.out + r.err)
    assert [(m["step"], m["loss"]) for m in read_metrics(out)] == [(m["step"], m["loss"]) for m in read_metrics(ref)]


def _damage_latest(out: Path, how: str) -> Path:
    ck = out / "checkpoints"
    latest = ck / (ck / "latest").read_text().strip()
    if how == "truncated":
        f = sorted(latest.glob("*.distcp"))[0]
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing-metadata":
        (latest / ".metadata").unlink()
    elif how == "trainer-state-garbage":
        (latest / "trainer_rank0.pt").write_bytes(b"\0garbage" * 10)
    elif how == "pointer-to-nothing":
        (ck / "latest").write_text("step_00000099\n")
    return latest


@pytest.mark.parametrize("how,resumed", [("truncated", 2), ("missing-metadata", 2), ("trainer-state-garbage", 2),
                                         ("pointer-to-nothing", 3)])
def test_resume_falls_back_to_newest_intact_checkpoint(assets, stopped_run, tmp_path, capsys, how, resumed):
    out = copy_run(stopped_run, tmp_path / "r")
    ref = tmp_path / "ref"
    TR.main(targs(assets, ref, stage=2, steps=5, ckpt_every=2))
    _damage_latest(out, how)
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2) + ["--resume"], capsys)
    assert r.rc == 0, r
    said = r.out + r.err
    assert f"resuming from the newest intact one, step_{resumed:08d}" in said and "damaged" in said, r
    assert f"resumed at step {resumed}" in said
    # resumed exactly from step 2: the same losses as the uninterrupted run
    assert [(m["step"], m["loss"]) for m in read_metrics(out)] == [(m["step"], m["loss"]) for m in read_metrics(ref)]


def test_resume_all_checkpoints_damaged_is_one_error(assets, stopped_run, tmp_path, capsys):
    out = copy_run(stopped_run, tmp_path / "r")
    for d in (out / "checkpoints").glob("step_*"):
        for f in d.glob("*.distcp"):
            f.write_bytes(b"")
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2) + ["--resume"], capsys)
    assert_error(r, "checkpoint")


def test_resume_never_unpickles_code(assets, stopped_run, tmp_path, capsys):
    """A trainer_rank0.pt crafted to run code when unpickled: refused, the code never runs."""
    out = copy_run(stopped_run, tmp_path / "r")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    from checkpoints import write_checksums
    for d in (out / "checkpoints").glob("step_*"):
        torch.save({"step": 3, "evil": Evil()}, d / "trainer_rank0.pt")
        write_checksums(d)  # as a crafted folder would: the integrity check passes, the loader must refuse
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=2) + ["--resume"], capsys)
    assert not marker.exists()
    assert_error(r, "trainer_rank0.pt")


def test_disk_full_during_checkpoint(assets, stopped_run, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing step 4's checkpoint: reported as disk full with the path, no temp dir left, step 3's
    checkpoint intact and resumable."""
    import torch.distributed.checkpoint.filesystem as fs
    out = copy_run(stopped_run, tmp_path / "r")
    real = fs._write_item

    def full(*a, **k):
        real(*a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fs, "_write_item", full)
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=1) + ["--resume"], capsys)
    assert_error(r, "disk full", "checkpoints")
    ck = out / "checkpoints"
    assert not [p for p in ck.iterdir() if "tmp" in p.name], list(ck.iterdir())
    assert (ck / "latest").read_text().strip() == "step_00000003"
    monkeypatch.setattr(fs, "_write_item", real)
    r = cli(TR, targs(assets, out, stage=2, steps=5, ckpt_every=1) + ["--resume"], capsys)
    assert r.rc == 0, r
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_disk_full_during_export(assets, tmp_path, capsys, monkeypatch):
    import checkpoints as st
    out = tmp_path / "o"
    real = st.save_file

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(st, "save_file", full)
    r = cli(TR, targs(assets, out, steps=2), capsys)
    assert_error(r, "disk full", str(out))
    assert not (out / "final").exists() and not [p for p in out.iterdir() if "tmp" in p.name]
    monkeypatch.setattr(st, "save_file", real)
    r = cli(TR, targs(assets, out, steps=2) + ["--resume"], capsys)  # the checkpoint at the end is there
    assert r.rc == 0 and (out / "final" / "model.safetensors").is_file(), r


def test_nonfinite_loss_is_one_error_line(assets, tmp_path, capsys):
    r = cli(TR, targs(assets, tmp_path / "o", stage=3, steps=4, lr="1e30", ckpt_every=1, grad_clip=0), capsys)
    assert_error(r, "non-finite")


def test_resume_finished_run_is_a_no_op(assets, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(TR, targs(assets, out, steps=2), capsys).rc == 0
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    r = cli(TR, targs(assets, out, steps=2) + ["--resume"], capsys)
    assert r.rc == 0 and (out / "final" / "model.safetensors").stat().st_mtime_ns == before, r


# =====================================================================================================================
# 3. teachers.py: flags, inputs, cache integrity (checksums, finiteness, norms), a damaged shard rebuilt alone
# =====================================================================================================================
@pytest.fixture(scope="module")
def sharded_cache(assets):
    """The 128 texts in 4 shards of 32 rows, through the CLI."""
    out = assets["root"] / "sharded"
    assert T.main(["encode", "--teacher", "minilm@max_length=32", "--input", str(assets["texts"]), "--out",
                   str(out), "--shard-size", "32", "--batch-size", "32", "--quiet"]) == 0
    return out


def encode_args(assets, out, **kw):
    a = dict(teacher="minilm@max_length=32", input=assets["texts"], out=out, shard_size=32, batch_size=32)
    a.update(kw)
    return ["encode"] + [x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))] + ["--quiet"]


@pytest.mark.parametrize("kw,needle", [(dict(shard_size=0), "shard"), (dict(batch_size=0), "batch"),
                                       (dict(dtype="bf16"), "bf16"), (dict(teacher="/no/such/teacher"),
                                                                      "/no/such/teacher")],
                         ids=["shard-size-0", "batch-size-0", "dtype-bf16", "teacher-missing"])
def test_encode_bad_flags(assets, tmp_path, capsys, kw, needle):
    assert_error(cli(T, encode_args(assets, tmp_path / "c", **kw), capsys), needle)


def test_encode_missing_and_malformed_input(assets, tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert_error(cli(T, encode_args(assets, tmp_path / "c", input=missing), capsys), str(missing))
    bad = tmp_path / "bad.jsonl"
    lines = assets["texts"].read_text().splitlines()
    lines[3] = "{oops"
    bad.write_text("\n".join(lines) + "\n")
    assert_error(cli(T, encode_args(assets, tmp_path / "c2", input=bad), capsys), "bad.jsonl:4")


@pytest.mark.parametrize("spec,needle", [("minilm@max_length=abc", "max_length"), ("minilm@dtype=bf16", "bf16"),
                                         ("minilm@colour=red", "colour")], ids=["int", "dtype", "unknown"])
def test_encode_bad_teacher_spec_option(assets, tmp_path, capsys, spec, needle):
    assert_error(cli(T, encode_args(assets, tmp_path / "c", teacher=spec), capsys), needle)


def test_encode_other_texts_into_a_used_folder(assets, sharded_cache, tmp_path, capsys):
    c = shutil.copytree(sharded_cache, tmp_path / "c")
    other = make_texts(tmp_path / "other", n=128, seed=3)
    assert_error(cli(T, encode_args(assets, c, input=other), capsys), "row_hashes.bin")


def test_verify_ok_and_missing_cache(assets, sharded_cache, tmp_path, capsys):
    r = cli(T, ["verify", "--cache", sharded_cache, "--input", assets["texts"]], capsys)
    assert r.rc == 0 and "ok" in r.out, r
    assert_error(cli(T, ["verify", "--cache", tmp_path / "nope", "--input", assets["texts"]], capsys), "nope")


def test_verify_other_texts(assets, sharded_cache, tmp_path, capsys):
    other = make_texts(tmp_path / "other", n=128, seed=3)
    assert_error(cli(T, ["verify", "--cache", sharded_cache, "--input", other], capsys), "row")


def _shard(cache: Path, k: int) -> Path:
    return sorted(cache.glob(f"t0_*/shard_{k:05d}.f32"))[0]


def _damage_shard(f: Path, how: str):
    a = np.fromfile(f, dtype="<f4")
    if how == "noise":
        a = np.random.default_rng(0).standard_normal(a.size).astype("<f4")
    elif how == "nan":
        a[5] = np.nan
    elif how == "scaled":
        a = a * 3.0
    elif how == "zeros":
        a[:] = 0
    elif how == "bitflip":
        a.view(np.uint32)[100] ^= 1
    a.tofile(f)


@pytest.mark.parametrize("how", ["noise", "nan", "scaled", "zeros", "bitflip"])
def test_verify_names_a_damaged_shard(assets, sharded_cache, tmp_path, capsys, how):
    c = shutil.copytree(sharded_cache, tmp_path / "c")
    _damage_shard(_shard(c, 2), how)
    r = cli(T, ["verify", "--cache", c, "--input", assets["texts"]], capsys)
    assert r.rc == 2 and "shard_00002" in r.err and "shard_00001" not in r.err, r


def test_training_refuses_a_damaged_shard(assets, sharded_cache, tmp_path, capsys):
    c = shutil.copytree(sharded_cache, tmp_path / "c")
    for k in range(4):
        _damage_shard(_shard(c, k), "scaled")
    r = cli(TR, targs(assets, tmp_path / "o", teacher_cache=c, steps=1), capsys)
    assert_error(r, "shard_0000")


def test_damaged_shard_is_rebuilt_alone(assets, sharded_cache, tmp_path, capsys):
    c = shutil.copytree(sharded_cache, tmp_path / "c")
    before = {k: _shard(c, k).stat().st_mtime_ns for k in range(4)}
    good = _shard(c, 1).read_bytes()
    _damage_shard(_shard(c, 1), "noise")
    r = cli(T, ["verify", "--cache", c, "--input", assets["texts"], "--repair"], capsys)
    assert r.rc == 2 and "shard_00001" in r.err, r
    r = cli(T, encode_args(assets, c), capsys)
    assert r.rc == 0, r
    assert _shard(c, 1).read_bytes() == good
    assert {k: _shard(c, k).stat().st_mtime_ns for k in (0, 2, 3)} == {k: before[k] for k in (0, 2, 3)}
    assert cli(T, ["verify", "--cache", c, "--input", assets["texts"]], capsys).rc == 0


def test_old_cache_without_checksums(assets, sharded_cache, tmp_path, capsys):
    """A cache written before checksums: still read; verify says what it could not check and still checks
    finiteness and norms."""
    c = shutil.copytree(sharded_cache, tmp_path / "c")
    m = json.loads((c / "manifest.json").read_text())
    for t in m["teachers"]:
        for s in t["shards"]:
            s.pop("checksum", None)
    m["version"] = 1
    (c / "manifest.json").write_text(json.dumps(m))
    r = cli(T, ["verify", "--cache", c, "--input", assets["texts"]], capsys)
    assert r.rc == 0 and "checksum" in r.out + r.err, r
    T.TeacherCache(c).targets([0, 1])
    _damage_shard(_shard(c, 3), "nan")
    r = cli(T, ["verify", "--cache", c, "--input", assets["texts"]], capsys)
    assert r.rc == 2 and "shard_00003" in r.err, r


def test_disk_full_during_cache_encode(assets, tmp_path, capsys, monkeypatch):
    """ENOSPC on the fsync of the second shard's data file (written 4th: row hashes, shard 0 data + sidecar)."""
    out = tmp_path / "c"
    real = os.fsync
    calls = []

    def full(fd):
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", full)
    r = cli(T, encode_args(assets, out), capsys)
    assert_error(r, "disk full", str(out), "shard_00001.f32")
    assert not [p for p in out.rglob("*") if "tmp" in p.name]
    monkeypatch.setattr(os, "fsync", real)
    assert cli(T, encode_args(assets, out), capsys).rc == 0
    assert cli(T, ["verify", "--cache", out, "--input", assets["texts"]], capsys).rc == 0


def test_teachers_error_subprocess_one_line(assets, tmp_path):
    r = subproc("teachers.py", encode_args(assets, tmp_path / "c", shard_size=0))
    assert_error(r, "shard")


# =====================================================================================================================
# 4. data.py
# =====================================================================================================================
BAD_BUILD = [(["--n-texts", "0"], "n-texts"), (["--n-texts", "-3"], "n-texts"),
             (["--passage-ratio", "1.5"], "passage-ratio"), (["--min-sentences", "0"], "min-sentences"),
             (["--min-sentences", "5", "--max-sentences", "2"], "sentences"), (["--max-chars", "0"], "max-chars"),
             (["--split-ratio", "-0.1"], "split-ratio"), (["--shuffle-ratio", "2"], "shuffle-ratio")]


@pytest.mark.parametrize("flags,needle", BAD_BUILD, ids=[" ".join(f) for f, _ in BAD_BUILD])
def test_build_bad_flags(data_dir, tmp_path, capsys, flags, needle):
    r = cli(D, ["build", "--out", tmp_path / "o", "--data-dir", data_dir] + flags, capsys)
    assert_error(r, needle)


def test_build_missing_input_and_out_is_a_file(data_dir, tmp_path, capsys):
    missing = tmp_path / "none.jsonl"
    assert_error(cli(D, ["build", "--out", tmp_path / "o", "--passages", missing,
                         "--short", data_dir / "text" / "short.jsonl"], capsys), str(missing))
    f = tmp_path / "afile"
    f.write_text("x")
    assert_error(cli(D, ["build", "--out", f, "--data-dir", data_dir, "--n-texts", 10], capsys), str(f))


def test_build_counts_bad_lines(data_dir, tmp_path, capsys):
    """Already handled well: malformed JSON, missing field, invalid UTF-8 are counted, not fatal."""
    good = [json.dumps({"text": f"A sentence number {i}. And another one here."}).encode() + b"\n" for i in range(40)]
    p = tmp_path / "p.jsonl"
    p.write_bytes(b"".join(good[:10] + [b"{bad json\n", b'{"other": 1}\n', b'{"text": "\xff\xfe"}\n'] + good[10:]))
    r = cli(D, ["build", "--out", tmp_path / "o", "--passages", p, "--short", data_dir / "text" / "short.jsonl",
                "--n-texts", 30], capsys)
    assert r.rc == 0, r
    assert "skips" in r.out
    r = cli(D, ["build", "--out", tmp_path / "o2", "--passages", p, "--short", data_dir / "text" / "short.jsonl",
                "--n-texts", 30, "--on-error", "raise"], capsys)
    assert_error(r, "p.jsonl:11")


def test_build_disk_full(data_dir, tmp_path, capsys, monkeypatch):
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith("texts.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", full)
    out = tmp_path / "o"
    r = cli(D, ["build", "--out", out, "--data-dir", data_dir, "--n-texts", 20], capsys)
    assert_error(r, "disk full", str(out))
    assert not [p for p in out.rglob("*") if "tmp" in p.name]


# =====================================================================================================================
# 5. eval.py
# =====================================================================================================================
BAD_EVAL = [(["--dims", "384,abc"], "dims"), (["--dims", "0"], "dims"), (["--dims", "-384"], "dims"),
            (["--batch-size", "0"], "batch-size"), (["--max-length", "0"], "max-length")]


@pytest.mark.parametrize("flags,needle", BAD_EVAL, ids=[" ".join(f) for f, _ in BAD_EVAL])
def test_eval_bad_flags(assets, data_dir, tmp_path, capsys, no_model_load, flags, needle):
    r = cli(E, ["--model", assets["init"], "--tasks", "STSBenchmark", "--data-dir", data_dir, "--engine", "builtin"]
            + flags, capsys)
    assert_error(r, needle)


def test_eval_missing_model_and_data_dir(assets, data_dir, tmp_path, capsys):
    missing = tmp_path / "nomodel"
    assert_error(cli(E, ["--model", missing, "--tasks", "STSBenchmark", "--data-dir", data_dir], capsys),
                 str(missing))
    assert_error(cli(E, ["--model", assets["init"], "--tasks", "STSBenchmark", "--data-dir", tmp_path / "nodata",
                         "--engine", "builtin"], capsys), "nodata")


def test_eval_damaged_model_weights(assets, data_dir, tmp_path, capsys):
    m = shutil.copytree(assets["init"], tmp_path / "m")
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert_error(cli(E, ["--model", m, "--tasks", "STSBenchmark", "--data-dir", data_dir, "--engine", "builtin"],
                     capsys), "model.safetensors")


def test_eval_out_is_a_directory(assets, data_dir, tmp_path, capsys, monkeypatch):
    class Fake:
        dims = (4,)
        uses_instructions = False
        name = "fake"

        def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
            g = torch.Generator().manual_seed(0)
            return torch.nn.functional.normalize(torch.randn(len(texts), 4, generator=g), dim=-1)
    monkeypatch.setattr(E, "load_encoder", lambda *a, **k: Fake())
    (tmp_path / "res.json").mkdir()
    r = cli(E, ["--model", "x", "--tasks", "STSBenchmark", "--data-dir", data_dir, "--engine", "builtin",
                "--split", "dev", "--out", tmp_path / "res.json"], capsys)
    assert_error(r, "res.json")


def test_eval_unknown_task_subprocess(assets, data_dir):
    r = subproc("eval.py", ["--model", assets["init"], "--tasks", "NoSuchTask", "--data-dir", data_dir,
                            "--engine", "builtin"])
    assert_error(r, "NoSuchTask")


# =====================================================================================================================
# 6. the demo
# =====================================================================================================================
def demo_cli(argv):
    return argv


@pytest.mark.parametrize("flags,key", [(["--steps", "-1"], "steps"), (["--batch", "0"], "batch"),
                                       (["--lr", "zero"], "lr")])
def test_demo_bad_flags(tmp_path, capsys, flags, key):
    dm = demo_module()
    r = cli(dm, demo_cli(["--out", tmp_path / "d"] + flags), capsys)
    assert_error(r, key)  # argparse's errors too are one line naming the flag


def test_demo_missing_data_dir(tmp_path, capsys):
    dm = demo_module()
    r = cli(dm, demo_cli(["--out", tmp_path / "d", "--eval-data", tmp_path / "nodata"]), capsys)
    assert_error(r, "nodata")


@pytest.mark.slow
def test_demo_resume_keeps_finished_stages(data_dir, tmp_path, capsys, monkeypatch):
    """A shortened demo; then stage 3 is lost (as a kill during it would leave it) and the demo reruns with
    --resume: stages 1-2 are kept as they are, stage 3 is trained again; a changed --lr retrains every stage."""
    dm = demo_module()
    monkeypatch.setattr(dm, "_demo_eval", lambda enc, tasks, *a, **k: {t: {d: 0.5 for d in (384, 256, 128, 64)}
                                                                        for t in tasks})
    args = ["--out", tmp_path / "d", "--eval-data", data_dir, "--steps", "8", "--batch", "32", "--micro-batch", "32"]
    run = (lambda extra: dm.run_demo(dm.parse_args([str(a) for a in args + extra]), n_texts=96,
                                     tasks=("STSBenchmark",), split="dev", untrained=False, plots=False,
                                     schedule="paper"))  # three stages: the first two must be kept
    run([])
    d = tmp_path / "d"
    stamp = {k: (d / f"stage{k}" / "final" / "model.safetensors").stat().st_mtime_ns for k in (1, 2, 3)}
    shutil.rmtree(d / "stage3")
    capsys.readouterr()
    run(["--resume"])
    printed = capsys.readouterr()
    for k in (1, 2):
        assert (d / f"stage{k}" / "final" / "model.safetensors").stat().st_mtime_ns == stamp[k]
    assert (d / "stage3" / "final" / "model.safetensors").is_file()
    assert "stage 1" in printed.out and ("kept" in printed.out or "finished" in printed.out)
    run(["--resume", "--lr", "1e-3"])
    assert (d / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns != stamp[1]
