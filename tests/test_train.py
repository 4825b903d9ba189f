"""train.py (issue 7): config, schedule, trainable sets, 1 vs 2 processes, exact resume (incl. kill -9), NaN stop,
and a tiny end-to-end run of the four stages on real text and real photographs.

Tiny random students (tests/train_fixtures.py), a real all-MiniLM-L6-v2 teacher cache over a texts.jsonl that
data.py materialises from the shared text. Multi-process runs go through the CLI under torchrun (gloo, CPU).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as TR
from train_fixtures import (ROOT, make_cache, make_images, make_text_assets, make_texts, make_tiny_jasper,
                            read_metrics, run_train, stage4_args)

LOSS_KEYS = ("loss", "fc1.cos", "fc1.sim", "fc1.resim")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny text-only student, 192 real texts, and their MiniLM teacher cache (built once per module)."""
    return make_text_assets(tmp_path_factory.mktemp("train_assets"), layers=4, n_texts=192)


def base_args(a: dict, out: Path, stage: int, steps: int, **kw) -> list[str]:
    args = ["--stage", str(stage), "--init", str(a["init"]), "--texts", str(a["texts"]), "--teacher-cache",
            str(a["cache"]), "--out", str(out), "--batch", "16", "--micro-batch", "4", "--steps", str(steps),
            "--max-length", "48", "--dtype", "fp32", "--log-every", "1", "--ckpt-every", "0"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


# ---------------------------------------------------------------------------------------------------------------------
# config and schedule (fast)
# ---------------------------------------------------------------------------------------------------------------------
def test_stage_defaults_config_file_and_cli_precedence(tmp_path):
    for stage, (batch, lr, steps) in {1: (128, 1e-4, 4000), 2: (128, 8e-5, 7000), 3: (128, 7e-5, 2200),
                                      4: (90, 1e-4, 3500)}.items():
        c = TR.parse_config(["--stage", str(stage)])
        assert (c.batch, c.lr, c.steps, c.max_length, c.dtype) == (batch, lr, steps, 512, "bf16")
        assert c.out == f"runs/stage{stage}"
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"stage": 2, "lr": 3e-4, "micro-batch": 5, "loss_weights": [1, 2, 3]}))
    c = TR.parse_config(["--config", str(f), "--lr", "1e-3"])
    assert (c.stage, c.lr, c.micro_batch, c.loss_weights, c.batch) == (2, 1e-3, 5, [1, 2, 3], 128)  # CLI > file
    f.write_text(json.dumps({"lr_typo": 1}))
    with pytest.raises(TR.ConfigError, match="unknown key 'lr_typo'"):
        TR.parse_config(["--config", str(f)])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        TR.main(["--help"])  # train_config.py builds the parser, train.py gives it its own usage text
    text = capsys.readouterr().out
    for f in dataclasses.fields(TR.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "per stage 128/128/128/90" in text and "python train.py --stage 1" in text


def test_lr_schedule_warmup_then_cosine():
    c = TR.TrainConfig(steps=100, lr=1.0)
    f = [TR.lr_factor(s, c) for s in range(100)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)  # 5 warmup steps: 1/5 .. 5/5
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # non-increasing after warmup
    assert f[-1] < 1e-3 and f[52] == pytest.approx(0.5, abs=0.02)  # cosine: half way at the middle of the decay


# ---------------------------------------------------------------------------------------------------------------------
# trainable sets (sec. 3.1): frozen tensors bit-identical, trained ones changed
# ---------------------------------------------------------------------------------------------------------------------
def trained_prefixes(stage: int, n_layers: int = 4) -> tuple[str, ...]:
    if stage == 1:
        return ("vector_linear_384.",)
    if stage == 2:
        return ("vector_linear_384.",) + tuple(f"model.layers.{i}." for i in range(n_layers - 3, n_layers))
    if stage == 3:
        return ("model.", "vector_linear_")
    return ("vision_model.",)


def assert_trainable_set(init: Path, final: Path, stage: int):
    a, b = load_file(init / "model.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys()
    pref = trained_prefixes(stage)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    expected = {k for k in a if k.startswith(pref)}
    assert expected, stage
    frozen_changed = changed - expected
    assert not frozen_changed, f"stage {stage}: frozen tensors changed: {sorted(frozen_changed)[:5]}"
    # every trained tensor moved (the embedding: only rows of tokens seen; compare the whole tensor)
    assert expected <= changed, f"stage {stage}: trained tensors unchanged: {sorted(expected - changed)[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainable_set_per_stage(assets, tmp_path, stage):
    summary = TR.main(base_args(assets, tmp_path / "o", stage, steps=2, lr=1e-3))
    assert summary["step"] == 2
    assert_trainable_set(assets["init"], Path(summary["export"]), stage)


@pytest.mark.slow
def test_stage3_mrl_teacher_self(assets, tmp_path):
    """--mrl-teacher self (sec. 2.4's proposal): a tiny stage-3 run trains; at step 1 (same init, same batch) FC1's
    losses equal the teacher-taught run's while the short heads' differ (other targets: FC1's own vectors)."""
    runs = {}
    for mode in ("teacher", "self"):
        summary = TR.main(base_args(assets, tmp_path / mode, 3, steps=2, lr=1e-3, mrl_teacher=mode))
        assert summary["step"] == 2
        runs[mode] = read_metrics(tmp_path / mode)
    assert json.loads((tmp_path / "self" / "config.json").read_text())["mrl_teacher"] == "self"
    a, b = runs["teacher"][0], runs["self"][0]
    for k in ("fc1.cos", "fc1.sim", "fc1.resim"):
        assert a[k] == pytest.approx(b[k], rel=1e-6), k
    for k in ("fc2.sim", "fc3.sim", "fc4.sim"):
        assert a[k] != pytest.approx(b[k], rel=1e-3), k
    assert_trainable_set(assets["init"], tmp_path / "self" / "final", 3)


def test_stage3_mrl_prefix(assets, tmp_path):
    """--mrl-prefix: FC1's prefixes take FC2-4's place in the losses; FC2-4 get no update and the export writes each
    as FC1's first D rows, so head D encodes exactly FC1's first D coordinates, renormalised."""
    summary = TR.main(base_args(assets, tmp_path / "p", 3, steps=2, lr=1e-3) + ["--mrl-prefix"])
    rec = read_metrics(tmp_path / "p")[0]
    dims = json.loads((Path(summary["export"]) / "config.json").read_text())["jasper"]["head_dims"]
    assert {f"fc1[:{D}].sim" for D in dims[1:]} <= set(rec) and "fc2.sim" not in rec
    from eval import load_encoder
    enc = load_encoder(summary["export"])
    texts = ["a cat sat on the mat", "stocks fell sharply on monday", "the cat is on the mat"]
    out = enc.encode(texts, dim=list(dims))
    for D in dims[1:]:
        want = torch.nn.functional.normalize(out[dims[0]][:, :D].float(), dim=-1)
        assert torch.allclose(out[D].float(), want, atol=1e-5), D
    init = load_file(str(assets["init"] / "model.safetensors"))
    final = load_file(str(Path(summary["export"]) / "model.safetensors"))
    fc1 = f"vector_linear_{dims[0]}.weight"
    assert not torch.equal(init[fc1], final[fc1])  # FC1 trained (and its prefixes with it)


def test_mrl_prefix_refused_outside_stage3(tmp_path):
    with pytest.raises(TR.ConfigError, match="--mrl-prefix applies to stage 3"):
        TR.main(["--stage", "2", "--mrl-prefix", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_mrl_teacher_self_refused_outside_stage3(tmp_path):
    with pytest.raises(TR.ConfigError, match="applies to stage 3"):
        TR.main(["--stage", "2", "--mrl-teacher", "self", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(SystemExit):  # argparse: not a choice
        TR.parse_config(["--stage", "3", "--mrl-teacher", "fc1"])


# ---------------------------------------------------------------------------------------------------------------------
# global batch: torchrun 2 processes == 1 process on the same global batch (fp32)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_match_one_process(assets, tmp_path):
    """Stage 3 (every path: encoder, embeddings, all four heads, FSDP sharding of all of them). Same global batch
    (data.TrainLoader draws it independently of the world size), so per-step losses agree to fp32 rounding
    (different reduction order inside the all-gathered matmuls): rel 1e-5. Parameters after 4 AdamW steps agree to
    atol 1e-5 (lr 1e-3: a parameter moves <= ~4e-3 in 4 steps; Adam's normalised update amplifies rounding only
    where a gradient is ~0)."""
    args = dict(lr=1e-3)
    run_train(base_args(assets, tmp_path / "p1", 3, steps=4, **args))
    run_train(base_args(assets, tmp_path / "p2", 3, steps=4, **args), nproc=2)
    m1, m2 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    keys = [k for k in m1[0] if "." in k or k == "loss"]
    assert "fc4.resim" in keys
    for r1, r2 in zip(m1, m2):
        for k in keys:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), (r1["step"], k)
        assert r2["tokens"] == r1["tokens"]
    # the losses moved (a test that cannot pass trivially with a frozen model)
    assert m1[-1]["loss"] != m1[0]["loss"]
    a = load_file(tmp_path / "p1" / "final" / "model.safetensors")
    b = load_file(tmp_path / "p2" / "final" / "model.safetensors")
    init = load_file(assets["init"] / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the parameters did train, so the comparison is not between two copies of the init


@pytest.mark.slow
def test_two_processes_match_one_process_stage4_with_a_broken_image(tmp_path):
    """Stage 4 under FSDP (vision blocks sharded, frozen text side as the teacher): one of the 8 images is broken, so
    the two ranks' shares differ in size (3 and 4 images, or 4 and 3) and gather_global (padded to the largest
    share) must still give the 1-process loss on the same 7 images, every step; `skips` counts the broken image."""
    args = stage4_args(tmp_path, broken=1, micro_batch=4)
    run_train(args + ["--out", str(tmp_path / "p1")])
    run_train(args + ["--out", str(tmp_path / "p2")], nproc=2)
    m1, m2 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert len(m1) == len(m2) == 3
    for r1, r2 in zip(m1, m2):
        for k in [k for k in r1 if "." in k or k == "loss"]:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), (r1["step"], k)
    assert m1[-1]["skips"]["broken_image"] == m2[-1]["skips"]["broken_image"] == 3  # one per step, summed over ranks
    assert m1[-1]["loss"] != m1[0]["loss"]


# ---------------------------------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------------------------------
def loss_rows(metrics: list[dict]) -> list[tuple]:
    return [tuple([r["step"], r["tokens"]] + [r[k] for k in sorted(r) if "." in k or k in ("loss", "lr")])
            for r in metrics]


@pytest.mark.slow
def test_resume_is_exact_single_process(assets, tmp_path):
    """3 steps + resume + 2 steps == 5 steps, bit for bit (CPU, same process count; the stop at 3 is off the
    checkpoint interval of 2). Stage 2: optimizer state for encoder layers and FC1, scheduler, data position, RNG."""
    straight = TR.main(base_args(assets, tmp_path / "a", 2, steps=5, lr=1e-3, ckpt_every=2))
    out = tmp_path / "b"
    first = TR.main(base_args(assets, out, 2, steps=5, lr=1e-3, ckpt_every=2, stop_at=3))
    assert first["step"] == 3 and "export" not in first
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")  # the tail a killed run may leave
    second = TR.main(base_args(assets, out, 2, steps=5, lr=1e-3, ckpt_every=2) + ["--resume"])
    assert second["step"] == 5
    assert loss_rows(read_metrics(out)) == loss_rows(read_metrics(tmp_path / "a"))
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["loss"] == second["loss"]


@pytest.mark.slow
def test_kill9_two_processes_then_resume_is_exact(assets, tmp_path):
    """A 2-process bf16 run (FSDP2 MixedPrecisionPolicy) is killed with SIGKILL between checkpoints; a half-written
    checkpoint dir is left behind as a kill during a save would; --resume continues from the last complete
    checkpoint and the per-step metrics equal an uninterrupted 2-process run's exactly. Both launches use the same
    command line (with --resume), as a preemptible job would."""
    common = dict(lr=1e-3, ckpt_every=2, dtype="bf16")
    run_train(base_args(assets, tmp_path / "ref", 2, steps=8, **common), nproc=2)
    out = tmp_path / "killed"
    args = base_args(assets, out, 2, steps=8, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *args, "--resume"]  # --resume on a fresh --out starts at step 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once step 3 is logged: checkpoint 2 exists, 4 not yet (or just)
            m = out / "metrics.jsonl"
            if m.exists() and any(json.loads(x)["step"] >= 3 for x in m.read_text().splitlines() if x.strip()):
                break
            if p.poll() is not None:
                pytest.fail(f"training ended (rc {p.returncode}) before it could be killed")
            time.sleep(0.02)
        else:
            pytest.fail("step 3 never logged")
    finally:
        _kill_tree(p)  # the launcher AND its workers, as a preempted node loses them all
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and int(latest[5:]) < 8
    assert not (out / "final").exists()
    (out / "checkpoints" / "step_00000006.tmp").mkdir(exist_ok=True)  # a save cut short: must be ignored
    (out / "checkpoints" / "step_00000006.tmp" / "garbage.distcp").write_bytes(b"\0" * 10)
    run_train(args + ["--resume"], nproc=2)
    got, ref = read_metrics(out), read_metrics(tmp_path / "ref")
    assert loss_rows(got) == loss_rows(ref)
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same command once more on the finished run (a job restarted after it ended): nothing to do, exits 0
    run_train(args + ["--resume"], nproc=2)
    assert loss_rows(read_metrics(out)) == loss_rows(ref)


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a launcher and every descendant. torchrun starts each worker in a session of its own, so killing
    the launcher's process group alone would leave the workers training on (and checkpointing) in the background."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [p.pid]
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += children.get(q, [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    deadline = time.time() + 30
    for q in tree:  # orphaned workers are reaped by init; a zombie ("Z") counts as gone
        while time.time() < deadline:
            try:
                if Path(f"/proc/{q}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.05)


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing_but_memory(assets, tmp_path):
    """The composable checkpoint() recomputes each block in backward: same losses (fp32, rel 1e-6) and the same
    parameter names in the export (it does not wrap modules)."""
    a = TR.main(base_args(assets, tmp_path / "a", 2, steps=2, lr=1e-3))
    b = TR.main(base_args(assets, tmp_path / "b", 2, steps=2, lr=1e-3) + ["--activation-checkpointing"])
    for r1, r2 in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    wa, wb = load_file(Path(a["export"]) / "model.safetensors"), load_file(Path(b["export"]) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_vision_init_attaches_a_siglip_tower(assets, tmp_path):
    """--vision-init: a text-only init + a SigLIP checkpoint dir = the paper's student; the export carries the
    tower's weights unchanged through stage 1 (only FC1 trains)."""
    from safetensors.torch import save_file
    with_vision = make_tiny_jasper(tmp_path / "jv", layers=2, vision=True, seed=3)
    cfg = json.loads((with_vision / "config.json").read_text())
    sig = tmp_path / "siglip"
    sig.mkdir()
    (sig / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **cfg["jasper"]["vision_config"]}))
    w = {k[len("vision_model."):]: v for k, v in load_file(with_vision / "model.safetensors").items()
         if k.startswith("vision_model.")}
    save_file(w, str(sig / "model.safetensors"))
    s = TR.main(base_args(assets, tmp_path / "o", 1, steps=1) + ["--vision-init", str(sig)])
    out = load_file(Path(s["export"]) / "model.safetensors")
    assert {k for k in out if k.startswith("vision_model.")} == {"vision_model." + k for k in w}
    assert all(torch.equal(out["vision_model." + k], v) for k, v in w.items())
    assert json.loads((Path(s["export"]) / "config.json").read_text())["jasper"]["vision_config"]


# ---------------------------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "nan"
    p = run_train(base_args(assets, out, 3, steps=6, lr=1e30, ckpt_every=1, grad_clip=0), check=False)
    assert p.returncode != 0
    assert "non-finite" in p.stderr + p.stdout
    assert "Last good checkpoint" in p.stderr + p.stdout
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.is_dir() and not (out / "final").exists()
    rows = read_metrics(out)
    assert all(map(lambda r: all(v == v for v in r.values() if isinstance(v, float)), rows))  # no NaN logged


@pytest.mark.slow
def test_teacher_on_the_fly_equals_cache(assets, tmp_path):
    """--teacher minilm (encoded on the fly from the batch texts) gives the step-1 loss of the cache run (same global
    batch, same teacher, same max length; rel 1e-4 for batch-composition rounding in the teacher's forward)."""
    a = TR.main(base_args(assets, tmp_path / "cache", 1, steps=1))
    args = base_args(assets, tmp_path / "fly", 1, steps=1)
    i = args.index("--teacher-cache")
    args[i:i + 2] = ["--teacher", "minilm@max_length=64"]
    b = TR.main(args)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


@pytest.mark.slow
def test_misaligned_cache_is_refused(assets, tmp_path):
    """A teacher cache built from other texts: the first batch's (row, hash) check stops the run."""
    other = make_texts(tmp_path / "other", n=192, seed=1)
    with pytest.raises(Exception, match="row"):
        TR.main(base_args(dict(assets, texts=other), tmp_path / "o", 1, steps=1))


# ---------------------------------------------------------------------------------------------------------------------
# end to end: the four stages on tiny random models, real text and real photographs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_four_stages_end_to_end_loss_goes_down(tmp_path, data_dir):
    init = make_tiny_jasper(tmp_path / "init", layers=4, vision=True)
    images = make_images(tmp_path / "images")
    # 16 real texts = the global batch: every step sees the same texts (in a new order), so 12 steps can show the
    # loss going down on a tiny random student (fresh texts every step make the per-step loss mostly batch noise)
    texts = make_texts(tmp_path / "data", n=16)
    cache = make_cache(texts, tmp_path / "cache")
    prev, first_last = init, {}
    for stage, lr, steps in ((1, 1e-2, 12), (2, 5e-4, 12), (3, 3e-4, 12), (4, 3e-3, 12)):
        out = tmp_path / f"s{stage}"
        args = ["--stage", str(stage), "--init", str(prev), "--out", str(out), "--steps", str(steps), "--lr", str(lr),
                "--micro-batch", "8", "--max-length", "48", "--log-every", "4", "--ckpt-every", "0",
                "--warmup-ratio", "0.1"]
        if stage <= 3:
            args += ["--texts", str(texts), "--teacher-cache", str(cache), "--batch", "16"]
        else:
            args += ["--images", str(images), "--batch", "8", "--image-size", "28", "--num-workers", "0"]
        if stage == 3:
            args += ["--eval-data", str(data_dir)]
        summary = TR.main(args)  # default dtype bf16: autocast in a plain process
        if stage == 3:
            assert -1.0 <= summary["stsb_dev"] <= 1.0
        m = read_metrics(out)
        first_last[stage] = (m[0]["loss"], sum(r["loss"] for r in m[-3:]) / 3)  # step 1 vs the last 3 steps
        if stage == 4:  # stage 4 also passes the trainable-set check: only the vision tower moved
            assert_trainable_set(prev, Path(summary["export"]), 4)
            assert "fc4.cos" in m[0]
        prev = Path(summary["export"])
    for stage, (a, b) in first_last.items():
        assert b < a, f"stage {stage}: loss did not go down ({a:.4f} -> {b:.4f})"
