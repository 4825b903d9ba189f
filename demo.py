"""The offline demo: the method of arXiv 2412.19048 on a 2-core CPU in about 11 minutes, with real weights, real text
and real evaluation, and nothing else.

    python demo.py                              # writes runs/demo/: results.json, results.md, two PNGs
    python demo.py --out DIR --eval-data DATA --steps N --lr X --batch B --seed S   # and any train.py flag
    python demo.py --eval-every 300             # + evaluation during training (train_eval.py): ~3% more time
    python demo.py --schedule paper             # the paper's stages 1-3 instead of stage 3 from step 1 (issue 25)
    python demo.py --student minilm-3           # the student cut from the teacher: its layers 0, 2, 4 (issue 27)

Every flag of train.py is accepted and overrides the demo's value (DEMO_CONFIG); the stage, --init, --texts and
--teacher-cache of each stage are the demo's own. Design, figures and the deviations from the paper: docs/demo.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from checkpoints import atomic_write, fmt_duration, read_safetensors
from errors import run_cli
from data import build, default_data_dir
from readers import read_jsonl
from eval import EmbeddingCache, evaluate, load_encoder
from model import JasperConfig, JasperModel, Qwen2Config
from teacher_cache import build_cache
from teachers import BertTeacher, minilm_path
from tokenizer import TextTokenizer
from train import ConfigError, TrainConfig, parse_config, train

#   data.py build over <data>/text (the real shared text) -> all-MiniLM-L6-v2 teacher cache (teachers.py) -> a small
#   random-init Qwen2 student -> the schedule's stages through train.train() (the real trainer path) -> eval.py on STS
#   tasks at every head dim for teacher and student -> one table, results.json, loss-curve and score-vs-dim PNGs.
# Design and measured figures: docs/demo.md. The student (why each choice, measured on the prototype
# bench/demo_prototype.py):
#   - Qwen2 architecture (bidirectional, RoPE, SwiGLU, GQA), 4 layers of width 384 (6 query / 2 key-value heads,
#     SwiGLU width 1536): ~8.7M body parameters, the most a 2-core CPU trains ~1,500 steps of in ~12 minutes.
#   - the teacher's WordPiece vocabulary (30,522) with the teacher's input embeddings copied in, LN(word + type_0) as
#     BERT's embedding layer computes them without the position term (RoPE replaces it): a random embedding table
#     cannot be learnt from ~70k texts in minutes. The tokenizer is MiniLM's tokenizer.json.
#   - o_proj and down_proj start at zero, so every residual branch starts as the identity and the untrained student
#     is a bag of (copied) word embeddings: a sensible starting point, and what makes stage 1 meaningful.
#   - heads (FC1..FC4) = 384 / 256 / 128 / 64: FC1 must equal the teacher width for the cosine loss (eq. 1); the
#     Matryoshka heads halve down to 64 as the paper's 1024 -> 512 -> 256 halves, below the 384-d teacher.
#   - texts cut at 32 tokens (teacher cache too, so the target describes the text the student sees), bf16 autocast,
#     global batch 64, AdamW with warmup + cosine per stage.
# Every stage keeps the paper's trainable set exactly (train.set_trainable): 1 = FC1 only (a linear probe on the
# bag-of-embeddings student), 2 = FC1 + the last 3 of 4 layers, 3 = everything with FC2-4 in the losses. The default
# schedule runs stage 3 alone (DEMO_SCHEDULES below). What differs from the paper is the schedule, the student's
# starting point (random body, identity residuals, copied embeddings instead of stella), the loss weights (below)
# and the scale: steps, lr (5e-4: a random body needs more than the paper's 1e-4 fine-tuning rates), batch, text
# length.


DEMO_TASKS = ("STSBenchmark", "STS12", "STS13", "BIOSSES")
DEMO_HEAD_DIMS = (384, 256, 128, 64)
DEMO_STUDENT = dict(num_hidden_layers=4, hidden_size=384, intermediate_size=1536, num_attention_heads=6,
                    num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512)
# --schedule: how the demo spends its training steps over stages 1-3 (docs/demo.md, "Which schedule"): each stage's
# share of --steps (0 = skipped), its lr as a multiple of --lr, and the default --steps (about the same training
# wall time: a stage-3 step costs ~1.4x a stage-2 step and ~5x a stage-1 step on this student).
#   direct  stage 3 from step 1: every parameter and every loss. The demo's default for the Qwen2 student, which
#           starts as a bag of word embeddings, not as an embedder: freezing it holds it back. Measured at a quarter of
#           the job (bench/bench_vs_st.py --scale 0.25, mean of the 4 tasks, heads 384/256/128/64): +0.004 / +0.002 /
#           +0.018 / +0.009 over the paper's staging at equal steps.
#   paper   the paper's stages 1-3 (sec. 3.1), 7 / 60 / 33 % of the steps: stage 1 trains a linear head only (lr x4
#           is safe there), stage 3 restarts the schedule on a trained body (gentler, x0.6). The schedule the paper
#           designed for a student that starts as an embedder (stella): the minilm-3 student's default.
DEMO_SCHEDULES = {"direct": dict(share=(0.0, 0.0, 1.0), lr_mult=(0.0, 0.0, 1.0), steps=1000),
                  "paper": dict(share=(0.07, 0.60, 0.33), lr_mult=(4.0, 1.0, 0.6), steps=1500)}
DEMO_DATA = dict(passage_ratio=0.85, split_ratio=1.0, min_sentences=1, max_sentences=2)  # see docs/demo.md
DEMO_CACHE_DTYPE = torch.bfloat16       # teacher for the cache: bf16 vs fp32 vectors agree to cos >= 0.9999
DEMO_EVAL_MAX_LENGTH = 64               # the student is evaluated on up to 64 tokens (trained on 32; RoPE extends:
                                        # BIOSSES +0.05, STSBenchmark +0.002 over cutting at 32)

# Loss weights (lambda1, lambda2, lambda3) = (10, 12.5, 1.25), the paper's lambda2 and lambda3 / 16: the paper's
# (10, 200, 20) suit a student that starts as stella, close to its teachers; this one starts far away (FC1 cosine
# loss 0.52 after stage 1), and there the full-vector target of eq. 1 carries most of the signal. Measured after
# stage 2 (105 + 900 steps, bench/RESULTS.md), STSBenchmark test: 0.7361 / 0.7466 / 0.7539 / 0.7593 at lambda2 =
# 1000 / 200 / 50 / 12.5 (lambda3 = lambda2 / 10), the similarity and ranking losses themselves ending no higher.
# Precedence: train.py's defaults < DEMO_CONFIG < the schedule's steps and the student's own (DEMO_STUDENTS) < --config
# file < command-line flags.
DEMO_CONFIG = dict(out="runs/demo", max_length=32, batch=64, micro_batch=64, lr=5e-4,
                       warmup_ratio=0.05, dtype="bf16", ckpt_every=0, keep_ckpts=1, log_every=100, eval_data=None,
                       loss_weights=[10.0, 12.5, 1.25], eval_instructions="none")  # the demo's protocol


# --student: which student the demo trains (docs/demo.md, "Which student"), with its default --schedule and its own
# train.py defaults. minilm-3 = layers 0, 2, 4 of the teacher (export.init_student: first and last of the kept depth,
# every other layer) with identity-row heads: it starts as an embedder, so the paper's stages suit it; its steps are
# x1.2 the schedule's (a step costs ~0.83 of the Qwen2 student's: about the same wall time) and its lr is lower (it
# starts from trained weights, not a random body).
# The Qwen2 student's shorter dims are FC1's trained prefixes (--mrl-prefix), not separate heads: at the demo's full
# job (bench/bench_vs_st.py --scale 1, STSBenchmark test at 256 / 128 / 64) 0.7709 / 0.7651 / 0.7564 against
# 0.7669 / 0.7585 / 0.7421 for the heads FC2-4, which even lose to FC1 plain truncated (0.7703 / 0.7633 / 0.7503).
DEMO_STUDENTS = {"qwen2": dict(schedule="direct", steps_x=1.0, mrl_prefix=True),
                 "minilm-3": dict(schedule="paper", steps_x=1.2, lr=2e-4)}
MINILM3_LAYERS = (0, 2, 4)


def make_demo_student(teacher_dir, head_dims=DEMO_HEAD_DIMS, max_length: int = 32, seed: int = 0,
                      **overrides):
    """The demo's random-init Qwen2 student on the teacher's WordPiece vocabulary (see the notes above)."""
    tok = TextTokenizer.from_pretrained(teacher_dir, max_length=max_length)
    text = Qwen2Config(vocab_size=tok.vocab_size, causal=False, **{**DEMO_STUDENT, **overrides})
    torch.manual_seed(seed)
    student = JasperModel(JasperConfig(text=text, head_dims=tuple(head_dims), max_length=max_length))
    st = read_safetensors(teacher_dir)
    pre = "bert." if any(k.startswith("bert.embeddings.") for k in st) else ""
    word = st[pre + "embeddings.word_embeddings.weight"].float()  # (V, H)
    if tuple(word.shape) != tuple(student.model.embed_tokens.weight.shape):
        raise ConfigError(f"teacher embeddings {tuple(word.shape)} do not fit the student "
                         f"{tuple(student.model.embed_tokens.weight.shape)} (vocabulary / width)")
    emb = torch.nn.functional.layer_norm(word + st[pre + "embeddings.token_type_embeddings.weight"][0].float(),
                                         (word.shape[1],), st[pre + "embeddings.LayerNorm.weight"].float(),
                                         st[pre + "embeddings.LayerNorm.bias"].float(), eps=1e-12)
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(emb)
        for layer in student.model.layers:  # identity residual branches at init
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    student.tokenizer = tok
    student.prompts = {}  # trained and evaluated without instructions: its export stores no prompts
    return student


class _Truncated:
    """The teacher at smaller dims by truncation + renormalisation (MiniLM has no Matryoshka heads): the reference
    for how much the student's learnt FC2-4 heads lose relative to its FC1."""

    uses_instructions = False

    def __init__(self, teacher, dims):
        self.t, self.dims, self.name, self._vec = teacher, tuple(dims), getattr(teacher, "name", "teacher"), {}

    def encode(self, texts, dim=None, instruction=None, batch_size=32, show_progress=None):
        todo = list(dict.fromkeys(t for t in texts if t not in self._vec))  # the teacher runs once per text
        if todo:
            self._vec.update(zip(todo, self.t.encode(todo, batch_size=batch_size, show_progress=False)))
        v = torch.stack([self._vec[t] for t in texts])  # (N, 384) normalised
        return torch.nn.functional.normalize(v[:, :dim or self.dims[0]], dim=-1)


def _demo_eval(encoder, tasks, data_dir, dims, engine: str, split: str | None) -> dict[str, dict[int, float]]:
    cache = EmbeddingCache(encoder, batch_size=128, show_progress=False)
    rep = evaluate(cache, list(tasks), data_dir=data_dir, dims=list(dims), instructions="none", engine=engine,
                     split=split)
    return {t: {int(d): r["main_score"] for d, r in per.items()} for t, per in rep["results"].items()}


def _demo_plots(out: Path, stage_dirs: list[Path], results: dict, dims, split: str) -> list[Path]:
    import matplotlib  # optional and slow to import: only the plots need it (as in eval.plot_dims)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    paths = []
    runs = [[row for _, row in read_jsonl(sd / "metrics.jsonl")] for sd in stage_dirs]
    evals = any("eval" in r for recs in runs for r in recs)  # --eval-every: a third panel
    fig, ax = plt.subplots(1, 3 if evals else 2, figsize=(18 if evals else 12, 4))
    offset = 0
    sts: dict[str, list[tuple[int, float]]] = {}  # head -> (step, Spearman) over the stages back to back
    for sd, recs in zip(stage_dirs, runs):
        k = sd.name.removeprefix("stage")  # the stages that ran (a schedule may skip some)
        x = [offset + r["step"] for r in recs]
        ax[0].plot(x, [r["loss"] for r in recs], lw=0.6, label=f"stage {k} total")
        for key in sorted(k2 for k2 in recs[0] if k2.endswith(".cos")):
            ax[1].plot(x, [r[key] for r in recs], lw=0.6, label=f"stage {k} {key}")
        for r in recs:
            for D, v in r.get("eval", {}).get("stsb_dev", {}).items():
                sts.setdefault(D, []).append((offset + r["step"], v))
        offset = x[-1]
        for a in ax:
            a.axvline(offset, color="grey", lw=0.5, ls=":")
    for D, pts in sts.items():  # one line per head across the stages: heads FC2-4 join the losses in stage 3
        ax[2].plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, lw=0.8, label=f"head {D}")
    ax[0].set(xlabel="optimizer step (stages back to back)", ylabel="loss (eq. 4)", yscale="log",
              title="training loss")
    ax[1].set(xlabel="optimizer step", ylabel="1 - cos(student FC1, teacher)", title="cosine loss (eq. 1)")
    if evals:
        ax[2].set(xlabel="optimizer step", ylabel="cosine Spearman", title="STSBenchmark dev during training")
    for a in ax:
        a.legend(fontsize=7)
    paths.append(_save_png(fig, out / "loss_curves.png"))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (task, per) in enumerate(results["student"].items()):
        c = f"C{i}"
        ax.plot(dims, [per[d] for d in dims], "o-", color=c, label=f"{task} student")
        ax.plot(dims, [results["teacher"][task][d] for d in dims], "x--", color=c, lw=0.8,
                label=f"{task} teacher (truncated below {dims[0]})")
    ax.set(xscale="log", xlabel="embedding dim (head FC1..FC4)", ylabel="cosine Spearman",
           title=f"score vs dim ({split} split)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(list(dims), [str(d) for d in dims])
    ax.legend(fontsize=7)
    paths.append(_save_png(fig, out / "score_vs_dim.png"))
    return paths


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # optional and slow to import (see _demo_plots)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


class _Say:
    """The demo's progress lines: `[demo 3m05s] message` on stdout, time since the start."""

    def __init__(self):
        self.t_start = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[demo {fmt_duration(time.time() - self.t_start)}] {msg}", flush=True)


def _demo_data_dir(cfg: TrainConfig) -> Path:
    data_dir = Path(cfg.eval_data) if cfg.eval_data else default_data_dir()
    if not (data_dir / "text").is_dir():
        raise ConfigError(f"no text folder under the data dir {data_dir} (the shared data: "
                         f"text/passages.jsonl, text/short.jsonl and sts/...); pass --eval-data DIR or set "
                         f"JASPER_DATA_DIR")
    return data_dir


def _demo_texts_and_cache(cfg: TrainConfig, out: Path, data_dir: Path, n_texts: int | None, times: dict,
                          say: _Say) -> tuple[dict, Path, Path]:
    """Steps 1-2: the training texts (data.py's recipe, every passage split into 1-2 sentence pieces) and the
    MiniLM teacher cache over them (a rerun over the same texts reuses finished shards)."""
    t0 = time.time()
    meta = build(out / "data", data_dir=data_dir, n_texts=n_texts, seed=cfg.seed, progress=False, **DEMO_DATA)
    texts = out / "data" / "texts.jsonl"
    times["data"] = time.time() - t0
    say(f"data: {meta['n_texts']:,} texts {meta['stats']['texts']} -> {texts}")
    t0 = time.time()
    tdir = minilm_path()
    teacher = BertTeacher(tdir, max_length=cfg.max_length, dtype=DEMO_CACHE_DTYPE)
    say(f"teacher cache: all-MiniLM-L6-v2 ({tdir}), {cfg.max_length} tokens, {DEMO_CACHE_DTYPE} ...")
    build_cache([teacher], texts, out / "cache", batch_size=256)
    del teacher
    times["teacher_cache"] = time.time() - t0
    say(f"teacher cache done in {fmt_duration(times['teacher_cache'])}")
    return meta, texts, tdir


def stage_steps(total: int, share) -> list[int]:
    """--steps split over stages 1-3 by the schedule's shares: a stage with share 0 is skipped (0 steps), every other
    one gets at least 1 step, and the last stage takes the rounding so that the stages add up to --steps (when
    --steps is below the number of stages, each stage still runs 1 step)."""
    steps = [max(1, round(total * s)) if s else 0 for s in share]
    last = max(k for k, s in enumerate(share) if s)
    while sum(steps) - steps[last] > total - 1 and max(steps[:last] or [0]) > 1:
        steps[steps.index(max(steps[:last]))] -= 1  # tiny --steps: the last stage keeps at least one step
    steps[last] = max(1, total - sum(steps) + steps[last])
    return steps


def _demo_train(cfg: TrainConfig, out: Path, texts: Path, init: Path, times: dict, say: _Say, schedule: str
                ) -> tuple[list[int], list[Path]]:
    """Step 4: the schedule's stages through the real trainer, each starting from the previous stage's export (the
    first from init/). With --resume a stage whose export exists and whose settings (config.json) equal this run's is
    kept, one with checkpoints is continued (train.py --resume); a stage trained again makes every later stage train
    again."""
    plan = DEMO_SCHEDULES[schedule]
    steps = stage_steps(cfg.steps, plan["share"])
    say(f"schedule {schedule}: " + ", ".join(f"stage {k} {n} steps" for k, n in enumerate(steps, 1) if n))
    prev, stage_dirs, t_train, redo = init, [], time.time(), not cfg.resume
    for k in (1, 2, 3):
        sd = out / f"stage{k}"
        if not steps[k - 1]:
            if sd.exists():  # an earlier run's stage under another schedule: not this student's history
                say(f"stage {k}: not in schedule {schedule}: removing {sd} (an earlier run's)")
                shutil.rmtree(sd)
            continue
        scfg = dataclasses.replace(cfg, config=None, stage=k, init=str(prev), init_format="jasper", out=str(sd),
                                   texts=str(texts), teacher_cache=str(out / "cache"), teacher=[], steps=steps[k - 1],
                                   lr=cfg.lr * plan["lr_mult"][k - 1], seed=cfg.seed + k,
                                   eval_data=str(_demo_data_dir(cfg)) if cfg.eval_every else None,
                                   resume=False, export=True, stop_at=None,
                                   mrl_teacher=cfg.mrl_teacher if k == 3 else "teacher",  # FC2-4 exist in stage 3
                                   mrl_prefix=cfg.mrl_prefix and k == 3)
        t0 = time.time()
        saved = json.loads((sd / "config.json").read_text()) if (sd / "config.json").is_file() else None
        same = saved is not None and {**saved, "resume": False} == dataclasses.asdict(scfg)
        if not redo and same and (sd / "final" / "model.safetensors").is_file():
            say(f"stage {k}: finished earlier with these settings, kept ({sd / 'final'})")
        else:
            if not redo and saved is not None and not same:
                say(f"stage {k}: settings changed since it was trained: training it (and the later stages) again")
            resume = not redo and same  # a stage cut short with checkpoints continues exactly
            if not resume:
                shutil.rmtree(sd, ignore_errors=True)  # the demo's own output of an earlier run
            train(dataclasses.replace(scfg, resume=resume))
            redo = True  # a new export of this stage: the later stages start from it again
            say(f"stage {k} done: {steps[k - 1]} steps in {fmt_duration(time.time() - t0)}")
        times[f"stage{k}"] = time.time() - t0
        prev = sd / "final"
        stage_dirs.append(sd)
    times["train"] = time.time() - t_train
    return steps, stage_dirs


def stages_note(steps: list[int], times: dict) -> str:
    """'stages 1/2/3: 105/900/495 steps in 15/335/241 s', or 'stage 3 only: 1000 steps in 490 s'."""
    ks = [k for k in (1, 2, 3) if steps[k - 1]]
    secs = [f"{times[f'stage{k}']:.0f}" for k in ks]
    if len(ks) == 1:
        return f"stage {ks[0]} only: {steps[ks[0] - 1]} steps in {secs[0]} s"
    return (f"stages {'/'.join(map(str, ks))}: {'/'.join(str(steps[k - 1]) for k in ks)} steps in "
            f"{'/'.join(secs)} s")


def _demo_table(results: dict, tasks, dims, cfg: TrainConfig, n_params: int, n_texts: int, steps: list[int],
                times: dict, engine: str, split: str | None) -> str:
    """Step 6: one markdown table (teacher vs student per task and dim) and what was measured how."""
    cols = [c for c in ("teacher", "student", "untrained") if c in results]
    lines = ["| task | dim | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for task in tasks:
        for d in dims:
            lines.append(f"| {task} | {d} | " + " | ".join(f"{results[c][task][d]:.4f}" for c in cols) + " |")
    lines += ["", f"teacher: all-MiniLM-L6-v2, fp32 (at dims below {dims[0]}: its first d coordinates, "
                  f"renormalised); student: {n_params / 1e6:.1f}M-parameter Qwen2 trained on {n_texts:,} "
                  f"texts cut at {cfg.max_length} tokens; untrained: the same student before training",
              f"metric: cosine Spearman, {split or 'test'} split (eval.py, {engine} engine, no instructions)",
              f"time: data {times['data']:.0f}s | teacher cache {fmt_duration(times['teacher_cache'])} | training "
              f"{fmt_duration(times['train'])} ({stages_note(steps, times)}) | eval "
              f"{fmt_duration(times['eval'])} | total {fmt_duration(times['total'])}"]
    return "\n".join(lines)


def run_demo(cfg: TrainConfig, *, n_texts: int | None = None, tasks=DEMO_TASKS, engine: str = "builtin",
             split: str | None = None, untrained: bool = True, plots: bool = True, kind: str = "qwen2",
             schedule: str | None = None) -> dict:
    """The demo: data -> teacher cache -> student -> the schedule's stages (train.train) -> evaluation table and
    plots. `cfg` carries DEMO_CONFIG (and any CLI overrides: --out, --steps, --lr, --batch, --eval-data = the shared
    data dir, --seed); `schedule` defaults to the student's (DEMO_STUDENTS). The other keyword arguments are for the
    tests' shortened runs."""
    schedule = schedule or DEMO_STUDENTS[kind]["schedule"]
    say, times = _Say(), {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _demo_data_dir(cfg)
    meta, texts, tdir = _demo_texts_and_cache(cfg, out, data_dir, n_texts, times, say)

    # 3. the student, saved as stage 0 (train() loads --init from a directory); 4. the schedule's stages
    init = out / "init"
    if kind == "minilm-3":  # the teacher's own layers 0, 2, 4 (export.py init-student)
        from export import init_student
        init_student(tdir, MINILM3_LAYERS, init, heads=DEMO_HEAD_DIMS, seed=cfg.seed)
    else:
        make_demo_student(tdir, max_length=cfg.max_length, seed=cfg.seed).save_pretrained(init)
    steps, stage_dirs = _demo_train(cfg, out, texts, init, times, say, schedule)
    prev = stage_dirs[-1] / "final"

    # 5. evaluation: teacher (fp32, its own 256-token limit; truncated below 384) vs student at every head
    t0 = time.time()
    dims = list(DEMO_HEAD_DIMS)
    student = load_encoder(prev, max_length=DEMO_EVAL_MAX_LENGTH)  # a JasperModel; encodes all heads at once
    n_params = sum(p.numel() for p in student.parameters())
    say(f"evaluating teacher and student on {', '.join(tasks)} ({split or 'test'} split) at dims {dims} ...")
    results = {"teacher": _demo_eval(_Truncated(load_encoder(tdir), dims), tasks, data_dir, dims, engine, split),
               "student": _demo_eval(student, tasks, data_dir, dims, engine, split)}
    if untrained:
        results["untrained"] = _demo_eval(load_encoder(init, max_length=DEMO_EVAL_MAX_LENGTH), tasks, data_dir,
                                          dims, engine, split)
    times["eval"] = time.time() - t0
    times["total"] = time.time() - say.t_start

    # 6. report: one table, results.json, results.md, two PNGs
    table = _demo_table(results, tasks, dims, cfg, n_params, meta["n_texts"], steps, times, engine, split)
    if kind != "qwen2":
        table = table.replace("-parameter Qwen2 trained", f"-parameter {kind} (all-MiniLM-L6-v2 layers "
                                                          f"{list(MINILM3_LAYERS)}) trained")
    print("\n" + table, flush=True)
    report = dict(results=results, times=times, steps=steps, n_texts=meta["n_texts"], table=table, student_kind=kind,
                  schedule=schedule,
                  student=str(prev), untrained=str(init), config=dataclasses.asdict(cfg))
    atomic_write(out / "results.json", json.dumps(report, indent=1) + "\n")
    atomic_write(out / "results.md", table + "\n")
    if plots:
        for p in _demo_plots(out, stage_dirs, results, dims, split or "test"):
            say(f"wrote {p}")
    return report


def parse_args(argv: list[str] | None = None, student: str = "qwen2", schedule: str | None = None) -> TrainConfig:
    """train.py's flags (all of them: `python demo.py --help`) over the demo's values: DEMO_CONFIG, the schedule's
    --steps (x the student's steps_x) and the student's own."""
    own = {k: v for k, v in DEMO_STUDENTS[student].items() if k not in ("schedule", "steps_x")}
    plan = DEMO_SCHEDULES[schedule or DEMO_STUDENTS[student]["schedule"]]
    steps = round(plan["steps"] * DEMO_STUDENTS[student]["steps_x"])
    return parse_config(argv, defaults={**DEMO_CONFIG, "steps": steps, **own}, prog="demo.py", description=__doc__)


def split_student(argv: list[str] | None) -> tuple[str, str, list[str]]:
    """The demo's own flags: --student {qwen2, minilm-3} and --schedule {direct, paper} (default: the student's);
    the rest of the command line is train.py's flags."""
    ap = argparse.ArgumentParser(prog="demo.py", add_help=False)
    ap.add_argument("--student", choices=sorted(DEMO_STUDENTS), default="qwen2")
    ap.add_argument("--schedule", choices=sorted(DEMO_SCHEDULES), default=None)
    ns, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    return ns.student, ns.schedule or DEMO_STUDENTS[ns.student]["schedule"], rest


def main(argv: list[str] | None = None) -> dict:
    student, schedule, rest = split_student(argv)
    return run_demo(parse_args(rest, student, schedule), kind=student, schedule=schedule)


def cli(argv: list[str] | None = None) -> int:
    """`python demo.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
