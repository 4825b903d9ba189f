"""The demo's job, side by side with the recipe people would use instead (issue 25): the standard sentence-transformers
distillation script against this project's trainer, on the same untrained student, the same texts, the same teacher,
the same machine, scored by the same code.

  theirs  SentenceTransformer(<the demo's untrained student folder>), the teacher's vectors (model.encode) as labels,
          SentenceTransformerTrainer + losses.MSELoss, batch 64, peak lr 5e-4, 5 % warmup + cosine, bf16 autocast,
          every parameter trainable from step 1; its lower dims are its first d coordinates, renormalised
          ("truncated"). Run twice: at our number of steps, and at our training wall time (its steps/s from the
          first run x our training seconds).
  ours    train.train() (the real trainer, as demo.py calls it) with one of RECIPES below; lower dims from the
          Matryoshka heads FC2-4 (eval.py's heads) and from FC1 truncated, both reported.

Both students are scored by demo._demo_eval (eval.py's built-in STS engine, test splits, cosine Spearman, no
instructions) on STSBenchmark, STS12, STS13 and BIOSSES at 384 / 256 / 128 / 64 dims, inputs cut at
--eval-max-length tokens (default the demo's 64) for both. Teacher-encoding time: our cache (teacher_cache.py,
bf16, batch 256) vs sentence-transformers' encode (fp32, its default batch 32), over the same texts.

--scale s runs the comparison at a fraction of the demo's job: a seeded random s x 69,426 of the demo's texts and
s x 1,000 optimizer steps (the demo's default: about 0.9 passes over the texts); 1.0 is the full comparison. Every
piece is stored in WORK/results.json when it finishes, so the bench can be split into several jobs (--parts) and a rerun
skips what is done; the table comes from whatever is there. sentence-transformers, accelerate and datasets are
test-only dependencies (requirements-test.txt): nothing at the root imports them.

    python bench/bench_vs_st.py --demo-run runs/demo --scale 0.25 --work runs/vs_st_025          # everything
    python bench/bench_vs_st.py ... --parts encode ours --ours demo heads paper                  # one job
    python bench/bench_vs_st.py ... --parts st-steps st-time                                     # the next job
    python bench/bench_vs_st.py ... --parts table                                                # the table only
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import demo as DEMO  # noqa: E402  the demo's student, config, evaluation and the truncating encoder
import train as TR  # noqa: E402
from checkpoints import atomic_write, fmt_duration  # noqa: E402
from data import default_data_dir  # noqa: E402
from eval import EmbeddingCache, evaluate, load_encoder  # noqa: E402
from teacher_cache import build_cache  # noqa: E402
from teachers import BertTeacher, minilm_path  # noqa: E402
from ablation import write_subset  # noqa: E402  (bench/ is this script's folder)

DEMO_STEPS = DEMO.DEMO_SCHEDULES["direct"]["steps"]  # the demo's job at --scale 1 (1,000 steps of stage 3)
ST_BATCH, ST_LR, ST_WARMUP = 64, 5e-4, 0.05   # theirs: the demo's batch, peak lr and warmup share
DIMS = list(DEMO.DEMO_HEAD_DIMS)
TASKS = list(DEMO.DEMO_TASKS)

# Our recipes: stage shares of the steps (a 0 share skips the stage), lr multipliers per stage (x the demo's 5e-4),
# loss weights (eq. 4), FC2-4's teacher in stage 3, Matryoshka prefixes of FC1 instead of the heads (--mrl-prefix).
_DW = tuple(DEMO.DEMO_CONFIG["loss_weights"])
_DIRECT, _PAPER = DEMO.DEMO_SCHEDULES["direct"], DEMO.DEMO_SCHEDULES["paper"]
_PREFIX = DEMO.DEMO_STUDENTS["qwen2"].get("mrl_prefix", False)
RECIPES = {
    "demo": dict(share=_DIRECT["share"], lr_mult=_DIRECT["lr_mult"], weights=_DW, mrl="teacher", prefix=_PREFIX,
                 label="demo.py's default: stage 3 from step 1 (--schedule direct), shorter dims = FC1's trained "
                       "prefixes (--mrl-prefix)"),
    "heads": dict(share=_DIRECT["share"], lr_mult=_DIRECT["lr_mult"], weights=_DW, mrl="teacher", prefix=False,
                  label="as demo, with the paper's separate heads FC2-4 (--no-mrl-prefix)"),
    "paper": dict(share=_PAPER["share"], lr_mult=_PAPER["lr_mult"], weights=_DW, mrl="teacher", prefix=False,
                  label="demo.py --schedule paper --no-mrl-prefix: the paper's stages 1-3 at 7 / 60 / 33 % of the "
                        "steps, heads FC2-4"),
    "s3-self": dict(share=(0, 0, 1), lr_mult=(0, 0, 1.0), weights=_DW, mrl="self", prefix=False,
                    label="stage 3 only, --mrl-teacher self"),
    "s3-cos": dict(share=(0, 0, 1), lr_mult=(0, 0, 1.0), weights=(10.0, 0.0, 0.0), mrl="teacher", prefix=False,
                   label="stage 3 only, cosine loss only (FC2-4 untaught: read the truncated rows)"),
    "short": dict(share=(0.02, 0.05, 0.93), lr_mult=(4.0, 1.0, 1.0), weights=_DW, mrl="teacher", prefix=False,
                  label="short frozen phases: stages 1-3 at 2 / 5 / 93 %"),
}


def say(msg: str) -> None:
    print(f"[vs_st {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# texts and teacher vectors
# ---------------------------------------------------------------------------------------------------------------------
def prepare_texts(work: Path, demo_run: Path, scale: float) -> Path:
    """A seeded uniform random `scale` share of the demo's texts, renumbered 0..N-1 (its order kept)."""
    texts = work / "data" / "texts.jsonl"
    if texts.exists():
        return texts
    rows = (demo_run / "data" / "texts.jsonl").read_text(encoding="utf-8").splitlines()
    write_subset(rows, texts, max(DEMO.DEMO_CONFIG["batch"], round(scale * len(rows))) if scale < 1 else None)
    return texts


def read_texts(texts: Path) -> list[str]:
    return [json.loads(line)["text"] for line in texts.read_text(encoding="utf-8").splitlines()]


def encode_both(work: Path, texts: Path) -> dict:
    """Teacher vectors both ways, timed: our cache (the demo's call) and sentence-transformers' encode (the labels
    of their run, saved to WORK/st_labels.pt)."""
    from sentence_transformers import SentenceTransformer
    shutil.rmtree(work / "cache", ignore_errors=True)
    t0 = time.time()
    build_cache([BertTeacher(minilm_path(), max_length=32, dtype=DEMO.DEMO_CACHE_DTYPE)], texts, work / "cache",
                batch_size=256, show_progress=False)
    ours_s = time.time() - t0
    t0 = time.time()
    teacher = SentenceTransformer(str(minilm_path()), device="cpu")
    teacher.max_seq_length = 32
    labels = teacher.encode(read_texts(texts), convert_to_tensor=True, show_progress_bar=False)  # (N, 384)
    st_s = time.time() - t0
    torch.save(labels.float().cpu(), work / "st_labels.pt")
    return dict(ours_s=ours_s, st_s=st_s, n_texts=int(labels.shape[0]))


# ---------------------------------------------------------------------------------------------------------------------
# training: ours and theirs
# ---------------------------------------------------------------------------------------------------------------------
def train_ours(work: Path, name: str, texts: Path, init: Path, total: int) -> tuple[float, Path, list[int]]:
    r = RECIPES[name]
    steps = DEMO.stage_steps(total, r["share"])  # the stages add up to the budget
    prev, t0 = init, time.time()
    for k, n in zip((1, 2, 3), steps):
        if n <= 0:
            continue
        out = work / "ours" / name / f"stage{k}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = {**DEMO.DEMO_CONFIG, "stage": k, "init": str(prev), "init_format": "jasper", "out": str(out),
               "texts": str(texts), "teacher_cache": str(work / "cache"), "steps": n, "seed": k,
               "lr": DEMO.DEMO_CONFIG["lr"] * r["lr_mult"][k - 1], "loss_weights": list(r["weights"]),
               "mrl_teacher": r["mrl"] if k == 3 else "teacher", "mrl_prefix": r["prefix"] and k == 3,
               "log_every": max(1, n // 4)}
        TR.train(TR.TrainConfig(**cfg))
        prev = out / "final"
    return time.time() - t0, prev, steps


def train_st(work: Path, tag: str, texts: Path, init: Path, steps: int):
    """The standard sentence-transformers distillation script (MSELoss on the teacher's vectors) -> (seconds, the
    trained model as saved and reloaded). Scored reloaded, in fp32, as ours is (an export read back from disk): in
    memory, accelerate's bf16 autocast stays wrapped around the trained model's forward (vectors ~1e-3 off)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    model = SentenceTransformer(str(init), device="cpu")
    model.max_seq_length = 32
    labels = torch.load(work / "st_labels.pt")
    ds = Dataset.from_dict({"text": read_texts(texts), "label": labels.numpy()})
    out = work / "st" / tag
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=ST_BATCH, learning_rate=ST_LR,
        warmup_steps=round(ST_WARMUP * steps), lr_scheduler_type="cosine", bf16=True, use_cpu=True, seed=0,
        logging_steps=max(1, steps // 5), save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=losses.MSELoss(model))
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    return train_s, save_st(model, out / "final")


def save_st(model, folder: Path):
    """sentence-transformers' save(), one repair, and the folder read back (what is scored). The repair: this
    student is a Qwen2 body on a WordPiece vocabulary, and sentence-transformers' save() drops the `tokenizer_args:
    {tokenizer_type: bert}` of sentence_bert_config.json; transformers >= 5 then builds a Qwen2 tokenizer that splits
    words into characters (STSBenchmark 0.50 instead of 0.73 after 375 steps). It is written back, and the reloaded
    model must agree with the one in memory (cosine >= 0.999: only bf16 autocast apart)."""
    from sentence_transformers import SentenceTransformer
    model.save(str(folder))
    cfg = json.loads((folder / "sentence_bert_config.json").read_text())
    cfg["tokenizer_args"] = {**cfg.get("tokenizer_args", {}), "tokenizer_type": "bert"}
    atomic_write(folder / "sentence_bert_config.json", json.dumps(cfg, indent=2) + "\n")
    back = SentenceTransformer(str(folder), device="cpu")
    probe = ["A man is playing a guitar.", "Stocks fell sharply on Monday after the report."]
    cos = (model.encode(probe, convert_to_tensor=True).float() * back.encode(probe, convert_to_tensor=True).float()
           ).sum(-1).min().item()
    if cos < 0.999:
        raise SystemExit(f"bench/bench_vs_st.py: {folder} reloads with other vectors than the trained model "
                         f"(cosine {cos:.4f})")
    return back


# ---------------------------------------------------------------------------------------------------------------------
# scoring: the same code for both
# ---------------------------------------------------------------------------------------------------------------------
class _Full:
    """Full-width normalised vectors (N, 384), the input of demo._Truncated (first d coordinates, renormalised):
    theirs from model.encode, ours from the FC1 rows the heads' evaluation already stored (one body pass for both)."""

    def __init__(self, st_model=None, cache: EmbeddingCache | None = None):
        self.st, self.cache, self.name = st_model, cache, "student"

    def encode(self, texts, batch_size=32, show_progress=False):
        if self.st is not None:
            return self.st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False).float().cpu()
        return torch.from_numpy(self.cache.get(list(texts), dim=DIMS[0]))


def _eval(cache: EmbeddingCache, data_dir: Path) -> dict:
    """demo.py's evaluation (eval.py's built-in STS engine, test splits, no instructions) -> {task: {"384": ...}}."""
    rep = evaluate(cache, TASKS, data_dir=data_dir, dims=DIMS, instructions="none", engine="builtin")
    return {t: {str(d): r["main_score"] for d, r in per.items()} for t, per in rep["results"].items()}


def score(model, st: bool, eval_len: int, data_dir: Path) -> dict:
    """{"heads": ..., "truncated": ...} (ours: an export folder) or {"truncated": ...} (theirs: the trained
    SentenceTransformer): {task: {dim: Spearman}}."""
    if st:
        m = model.eval()
        m.max_seq_length = eval_len
        return {"truncated": _eval(EmbeddingCache(DEMO._Truncated(_Full(st_model=m), DIMS), batch_size=128), data_dir)}
    heads = EmbeddingCache(load_encoder(model, max_length=eval_len), batch_size=128, show_progress=False)
    return {"heads": _eval(heads, data_dir),
            "truncated": _eval(EmbeddingCache(DEMO._Truncated(_Full(cache=heads), DIMS), batch_size=128), data_dir)}


# ---------------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------------
def table(res: dict, scale: float) -> str:
    enc = res.get("encode")
    rows = []  # (recipe label, steps, train s, lower dims by, scores)
    for key, r in res.items():
        if key.startswith("ours/"):
            name = key[5:]
            steps = "/".join(str(s) for s in r["steps"] if s)
            if RECIPES[name]["prefix"]:  # its heads ARE FC1's first d coordinates (trained as such): one row
                rows.append((f"ours: {name}", steps, r["train_s"], "FC1 prefixes (trained)", r["scores"]["heads"]))
                continue
            for how in ("heads", "truncated"):
                rows.append((f"ours: {name}", steps, r["train_s"], how, r["scores"][how]))
        elif key == "st/steps" or key.startswith("st/time@"):
            how = "equal steps" if key == "st/steps" else f"time of ours: {key.split('@')[1]}"
            rows.append((f"sentence-transformers MSELoss ({how})",
                         str(r["steps"]), r["train_s"], "truncated", r["scores"]["truncated"]))
    head = ["recipe", "steps", "train time", "lower dims", "task"] + [str(d) for d in DIMS]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---|---|" + "---:|" * len(DIMS)]
    for label, steps, secs, how, sc in rows:
        for task in TASKS + ["mean of 4"]:
            vals = ([sum(sc[t][str(d)] for t in TASKS) / len(TASKS) for d in DIMS] if task == "mean of 4"
                    else [sc[task][str(d)] for d in DIMS])
            cells = [f"**{v:.4f}**" if task == "mean of 4" else f"{v:.4f}" for v in vals]
            lines.append(f"| {label} | {steps} | {fmt_duration(secs)} | {how} | {task} | " + " | ".join(cells) + " |")
    n = enc["n_texts"] if enc else "?"
    lines += ["", f"scale {scale:g}: {n:,} texts, {round(DEMO_STEPS * scale)} optimizer steps of batch 64 (scale 1 = "
              f"the demo's job); STS test splits, cosine Spearman (eval.py built-in engine); lower dims: FC2-4 heads "
              f"or the first d coordinates of the 384-d vector, renormalised (truncated)" if enc else ""]
    if enc:
        lines.append(f"teacher encoding of the {n:,} texts: ours (teacher cache) {fmt_duration(enc['ours_s'])}, "
                     f"sentence-transformers encode {fmt_duration(enc['st_s'])} ({enc['st_s'] / enc['ours_s']:.1f}x)")
    for key, r in res.items():
        if key.startswith("ours/"):
            lines.append(f"ours: {key[5:]} = {RECIPES[key[5:]]['label']}" + (f" ({r['note']})" if r.get("note")
                                                                             else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-run", default="runs/demo", help="a finished demo.py output folder: init/ (the untrained "
                   "student), data/texts.jsonl; with --reuse-demo also stage3/final and results.json")
    p.add_argument("--work", default="runs/vs_st", help="working folder (one per scale): texts, caches, runs, "
                   "results.json")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the demo's texts and steps (1 = full)")
    p.add_argument("--parts", nargs="+", default=["encode", "ours", "st-steps", "st-time", "table"],
                   choices=["encode", "ours", "st-steps", "st-time", "table"])
    p.add_argument("--ours", nargs="+", default=["demo"], choices=list(RECIPES),
                   help="our recipes to train (the first one sets the equal-time budget of theirs)")
    p.add_argument("--time-ref", default=None, choices=list(RECIPES), help="st-time matches the training time of "
                   "this recipe of ours (default: the first of --ours)")
    p.add_argument("--reuse-demo", action="store_true", help="recipe 'demo' at scale 1: score --demo-run's "
                   "stage3/final with its results.json training time instead of training it again")
    p.add_argument("--eval-max-length", type=int, default=DEMO.DEMO_EVAL_MAX_LENGTH)
    p.add_argument("--data-dir", default=None, help="shared data folder (default $JASPER_DATA_DIR or ../shared/data)")
    a = p.parse_args(argv)
    if not 0 < a.scale <= 1:
        raise SystemExit(f"bench/bench_vs_st.py: --scale must be in (0, 1], got {a.scale}")
    demo_run, work = Path(a.demo_run), Path(a.work)
    if not (demo_run / "init" / "config.json").is_file() or not (demo_run / "data" / "texts.jsonl").is_file():
        raise SystemExit(f"bench/bench_vs_st.py: --demo-run {demo_run}: no init/config.json or data/texts.jsonl "
                         f"(run demo.py first)")
    if a.reuse_demo and a.scale != 1:
        raise SystemExit("bench/bench_vs_st.py: --reuse-demo needs --scale 1 (the demo run is the full job)")
    work.mkdir(parents=True, exist_ok=True)
    res_path = work / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if res.setdefault("scale", a.scale) != a.scale:
        raise SystemExit(f"bench/bench_vs_st.py: {res_path} holds scale {res['scale']}, not {a.scale}: use another "
                         f"--work")
    data_dir = Path(a.data_dir) if a.data_dir else default_data_dir()
    init, total = demo_run / "init", round(DEMO_STEPS * a.scale)
    texts = prepare_texts(work, demo_run, a.scale)

    def save(key, value):
        res[key] = value
        atomic_write(res_path, json.dumps(res, indent=1) + "\n")
        say(f"{key} done")

    if "encode" in a.parts and "encode" not in res:
        say("teacher vectors: our cache and sentence-transformers' encode ...")
        save("encode", encode_both(work, texts))
    if "ours" in a.parts:
        for name in a.ours:
            if f"ours/{name}" in res:
                continue
            if name == "demo" and a.reuse_demo:
                info = json.loads((demo_run / "results.json").read_text())
                got = (info.get("schedule", "paper"), info["config"]["steps"], info["config"].get("mrl_prefix"))
                if got != ("direct", total, _PREFIX):
                    raise SystemExit(f"bench/bench_vs_st.py: --reuse-demo: {demo_run}/results.json is a run of "
                                     f"(schedule, steps, mrl_prefix) = {got}, not the demo's default "
                                     f"{('direct', total, _PREFIX)}")
                secs, final, steps, note = (info["times"]["train"], demo_run / "stage3" / "final", info["steps"],
                                            f"the run in {demo_run}, trained in its own job")
            else:
                say(f"ours: {name} ({total} steps) ...")
                (secs, final, steps), note = train_ours(work, name, texts, init, total), ""
            save(f"ours/{name}", dict(train_s=secs, steps=steps, note=note,
                                      scores=score(final, False, a.eval_max_length, data_dir)))
    if "st-steps" in a.parts and "st/steps" not in res:
        say(f"theirs: {total} steps ...")
        secs, final = train_st(work, "steps", texts, init, total)
        save("st/steps", dict(train_s=secs, steps=total, scores=score(final, True, a.eval_max_length, data_dir)))
    ref = a.time_ref or a.ours[0]
    if "st-time" in a.parts and f"st/time@{ref}" not in res:
        if f"ours/{ref}" not in res or "st/steps" not in res:
            raise SystemExit(f"bench/bench_vs_st.py: st-time needs st-steps and ours {ref} done first")
        rate = res["st/steps"]["steps"] / res["st/steps"]["train_s"]  # their steps per second on this machine
        steps = max(1, round(rate * res[f"ours/{ref}"]["train_s"]))
        say(f"theirs at the training time of ours {ref} ({fmt_duration(res[f'ours/{ref}']['train_s'])} x "
            f"{rate:.2f} steps/s = {steps} steps) ...")
        secs, final = train_st(work, f"time@{ref}", texts, init, steps)
        save(f"st/time@{ref}", dict(train_s=secs, steps=steps, scores=score(final, True, a.eval_max_length, data_dir)))
    print(table({k: v for k, v in res.items() if k != "scale"}, a.scale), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
