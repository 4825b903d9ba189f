"""Evaluation of any encoder of this project on MTEB tasks (arXiv 2412.19048, sec. 4: MTEB results, Table 3
instruction robustness), at every Matryoshka head, as tables, JSON and plots.

Two engines, one set of embeddings:
- engine="mteb" (default): every (task, head) runs through `mteb.evaluate` with a complete ModelMeta, so a score
  means what an MTEB score means, and mteb's standard results folder is written (eval_mteb.py: encoder protocol,
  ModelMeta, local-data injection). With `data_dir`, each task's data is read from local files (layout below) and
  injected into the mteb task object, so mteb never touches the hub; without it, mteb loads the task as usual.
- engine="builtin": a small numpy/torch path for STS (cosine Spearman) and retrieval (nDCG@10, pytrec_eval
  semantics) with no mteb/scipy/sklearn import, used by `quick_eval` during training. It agrees with mteb to 1e-4
  (tests/test_eval.py).

What an evaluation reads (the encoder under test and its embedding cache, the paper's instructions, local task
data in MTEB / BEIR layouts) is eval_inputs.py's; its names are imported here, so `eval.load_encoder`,
`eval.EmbeddingCache`, `eval.Instructions`, ... are where they always were.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import data
from checkpoints import atomic_write
from errors import ArgumentParser, check_args, run_cli
# what an evaluation reads; names a caller may use (eval.load_encoder, eval.EmbeddingCache, eval.ORIGINAL_PROMPTS...)
# are kept importable from here, hence the noqa
from eval_inputs import (INSTRUCTION_SETS, ORIGINAL_PROMPTS, PAPER_INSTRUCTIONS, TYPE_DIRS,  # noqa: F401
                         EmbeddingCache, EvalError, Instructions, document_text, encoder_dims, find_task_dir,
                         load_beir, load_encoder, mteb_name, read_jsonl, require_fields, say, split_file,
                         task_instruction, uses_instructions)


# ---------------------------------------------------------------------------------------------------------------
# Built-in path: STS cosine Spearman and retrieval nDCG@10 (numpy/torch only)
# ---------------------------------------------------------------------------------------------------------------
def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks with ties (scipy.stats.rankdata(method='average'))."""
    x = np.asarray(x, dtype=np.float64)  # (N,)
    order = np.argsort(x, kind="mergesort")  # stable: equal values stay in input order, so runs are contiguous
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    # a run of equal values at sorted positions i..j shares the mean of the ranks i+1 .. j+1 = (i + j) / 2 + 1
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Spearman's rho = the Pearson correlation of the (tie-averaged) ranks, exactly scipy.stats.spearmanr
    return pearson(_rankdata(a), _rankdata(b))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    # r = <a - mean a, b - mean b> / (|a - mean a| |b - mean b|), in float64 as scipy computes it
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    return float((a @ b) / math.sqrt((a @ a) * (b @ b)))


def _cosine_rows(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """Pairwise cosine of matching rows (sklearn's paired_cosine_distances: normalise, then dot)."""
    # (N, D) each; the floor keeps an all-zero vector at cosine 0 instead of NaN, as sklearn's normalize does
    e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    return np.sum(e1 * e2, axis=1)


def builtin_sts(cache: EmbeddingCache, rows: list[dict], dim: int | None, instruction: str | None) -> dict:
    s1 = [r["sentence1"] for r in rows]
    s2 = [r["sentence2"] for r in rows]
    gold = np.array([float(r["score"]) for r in rows])                                    # (N,)
    # both sentences get the instruction: STS is symmetric, mteb passes no prompt type (docs/eval.md)
    cos = _cosine_rows(cache.get(s1, dim, instruction), cache.get(s2, dim, instruction))  # (N,)
    return {"cosine_spearman": spearman(gold, cos), "cosine_pearson": pearson(gold, cos)}


def ndcg_at_k(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int = 10) -> float:
    """trec_eval `ndcg_cut.k` averaged over the judged queries (gain = relevance, only rel > 0 counts)."""
    vals = []
    for qid, docs in ranked.items():
        rel = qrels.get(qid)
        if rel is None:
            continue
        # DCG@k = sum over ranks i = 0..k-1 of rel_i / log2(i + 2) (linear gain, as trec_eval); IDCG@k the same
        # over the judged relevances in their best order, so a perfect ranking scores 1
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(docs[:k]) if rel.get(d, 0) > 0)
        ideal = sorted((r for r in rel.values() if r > 0), reverse=True)[:k]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        vals.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(vals)) if vals else 0.0


def builtin_retrieval(cache: EmbeddingCache, corpus: list[dict], queries: list[dict], qrels: dict,
                      dim: int | None, instruction: str | None, k_values=(1, 3, 5, 10, 100),
                      ignore_identical_ids: bool = False, skip_first_result: bool = False,
                      top_k: int = 1000) -> dict:
    """Dense retrieval scored like mteb: queries without any judgement dropped; cosine in float32; top-k; ties in
    the ranking broken by doc id descending (pytrec_eval's order); optional self-id removal / first-hit skip."""
    queries = [q for q in queries if len(qrels.get(q["id"], {})) > 0]
    # mteb `_combine_queries_with_instruction_text`: a per-query instruction column is appended to the text
    qtexts = [q["text"] + " " + q["instruction"] if q.get("instruction") is not None else q["text"] for q in queries]
    q = torch.from_numpy(cache.get(qtexts, dim, instruction))                       # (Q, D): queries get it
    d = torch.from_numpy(cache.get([document_text(r) for r in corpus], dim, None))  # (N, D): documents never do
    # cosine as a dot product of unit rows, in float32 like mteb's cos_sim, so near-ties order as mteb's do
    q = torch.nn.functional.normalize(q, p=2, dim=1)
    d = torch.nn.functional.normalize(d, p=2, dim=1)
    doc_ids = [r["id"] for r in corpus]
    kk = min(top_k + 1, len(doc_ids))  # one extra: after dropping a self hit, top_k documents are still left
    ranked: dict[str, list[str]] = {}
    for s in range(0, len(queries), 256):  # 256 queries at a time: a (256, N) score block, never (Q, N)
        sims = q[s:s + 256] @ d.T  # (b, n_docs) float32
        vals, idx = torch.topk(sims, kk, dim=1)
        for qi in range(sims.shape[0]):
            qid = queries[s + qi]["id"]
            pairs = [(float(v), doc_ids[j]) for v, j in zip(vals[qi].tolist(), idx[qi].tolist())]
            # topk's order among equal scores is arbitrary; pytrec_eval sorts by (score, doc id) descending, and
            # nDCG depends on that order when scores tie
            pairs = sorted(pairs, key=lambda p: (p[0], p[1]), reverse=True)[:top_k]
            if ignore_identical_ids:
                pairs = [p for p in pairs if p[1] != qid]
            if skip_first_result:
                pairs = pairs[1:]
            ranked[qid] = [p[1] for p in pairs]
    # every cut-off from one ranking, as mteb reports them; main_score is ndcg_at_10 (the metric of Table 3's
    # retrieval rows)
    out = {f"ndcg_at_{k}": ndcg_at_k(ranked, qrels, k) for k in k_values}
    return out


def _in_type_dir(data_dir: Path, task: str, ttype: str) -> bool:
    try:
        return find_task_dir(data_dir, task, ttype).parent.name == TYPE_DIRS[ttype][0]
    except EvalError:
        return False


def _builtin_eval(cache: EmbeddingCache, data_dir: Path, task: str, split: str, dim: int | None,
                  instructions: "Instructions | str", meta: dict | None = None) -> dict:
    meta = meta or {}
    ttype = None
    for t in ("STS", "Retrieval"):
        if _in_type_dir(data_dir, task, t):
            ttype = t
            break
    if ttype is None:
        raise EvalError(f"task {task}: the built-in engine supports STS and retrieval tasks found under "
                        f"{data_dir}/sts or {data_dir}/retrieval; use engine='mteb' for other tasks")
    tdir = find_task_dir(data_dir, task, ttype)
    # mteb's metadata prompts when a caller has them; otherwise task_instruction uses our mirror (ORIGINAL_PROMPTS)
    instr_kw = {k: meta[k] for k in ("metadata_prompt", "abstask_prompt") if k in meta}
    if ttype == "STS":
        path = split_file(tdir, split, task)
        rows = read_jsonl(path, task)
        require_fields(rows, ("sentence1", "sentence2", "score"), path, task)
        instr = task_instruction(task, "STS", None, instructions, **instr_kw)
        scores = builtin_sts(cache, rows, dim, instr)
        return {"main_metric": "cosine_spearman", "main_score": scores["cosine_spearman"], "scores": scores,
                "type": "STS"}
    corpus, queries, qrels = load_beir(tdir, split, task)
    # retrieval is asymmetric: the instruction is the query side's only (documents are encoded plain)
    instr = task_instruction(task, "Retrieval", "query", instructions, **instr_kw)
    scores = builtin_retrieval(cache, corpus, queries, qrels, dim, instr,
                               ignore_identical_ids=meta.get("ignore_identical_ids", False),
                               skip_first_result=meta.get("skip_first_result", False))
    return {"main_metric": "ndcg_at_10", "main_score": scores["ndcg_at_10"], "scores": scores, "type": "Retrieval"}


def quick_eval(encoder, data_dir, task: str = "STSBenchmark", split: str = "dev", dim: int | None = None,
               instructions: "Instructions | str | None" = None, batch_size: int = 32) -> float:
    """Main score of one STS/retrieval task with the built-in path (used by train.py during training).

    `encoder` may be an encoder or an EmbeddingCache wrapping one. Instructions default to "original" for
    instruction-following encoders and none otherwise.
    """
    cache = encoder if isinstance(encoder, EmbeddingCache) else EmbeddingCache(encoder, batch_size, False)
    if instructions is None:
        instructions = "original" if uses_instructions(cache.encoder) else "none"
    if not isinstance(instructions, Instructions):
        instructions = Instructions(instructions, data_dir=data_dir)
    return float(_builtin_eval(cache, Path(data_dir), task, split, dim, instructions)["main_score"])


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def evaluate(encoder, tasks: str | Sequence[str], data_dir=None, dims=None,
             instructions: "Instructions | str" = "original", engine: str = "mteb", batch_size: int = 32,
             split: str | None = None, show_progress: bool | None = None, results_dir=None,
             name: str | None = None, spec: str | None = None, instructions_file=None) -> dict:
    """Evaluate `encoder` on MTEB tasks for every requested head dim.

    Returns {"model", "revision", "engine", "instructions", "dims", "results": {task: {dim_key: {"main_metric",
    "main_score", "scores", "type", "split", "time_s"}}}} where dim_key is str(dim) or "native" for dim=None.
    `encoder` may be an EmbeddingCache to share embeddings across calls. The mteb engine runs each (task, head)
    through `mteb.evaluate` with the head's ModelMeta (see `model_meta`); `results_dir` receives mteb's results
    folder. `name` is the mteb model name (default from `spec`, the path / hub id the encoder came from).

    Named steps: check the request (tasks, engine, instruction set, heads, data folder), name the model, build the
    engine's runner for one (task, head), then run the grid task by task, head by head (the Matryoshka heads
    FC1..FC4, docs/model.md: one score per head, so a table row shows what each smaller head costs).
    """
    tasks = _task_names(tasks)
    if engine not in ("mteb", "builtin"):
        raise EvalError(f"engine must be 'mteb' or 'builtin', got {engine!r}")
    cache = encoder if isinstance(encoder, EmbeddingCache) else EmbeddingCache(encoder, batch_size, show_progress)
    instructions = _instruction_set(cache.encoder, instructions, instructions_file, data_dir)
    dims_l = _head_dims(cache, dims)
    data_dir = _eval_data_dir(data_dir, engine)
    label = _model_label(cache.encoder, spec, name)
    if engine == "builtin":
        run_one, revision = _builtin_runner(cache, data_dir, instructions, split), None
    else:
        run_one, revision = _mteb_runner(cache, tasks, label, instructions, spec, data_dir, split, batch_size,
                                         results_dir, first_dim=dims_l[0])
    results: dict[str, dict] = {}
    for t in tasks:
        results[t] = {}
        for d in dims_l:
            t0 = time.time()
            key = "native" if d is None else str(d)  # a single-output teacher has one "native" column
            r = run_one(t, d)
            r["time_s"] = round(time.time() - t0, 3)
            results[t][key] = r
            say(f"[eval] {t} dim={key}: {r['main_metric']} = {r['main_score']:.5f} ({r['time_s']:.1f}s)")
    return {"model": label, "revision": revision, "engine": engine, "instructions": instructions.kind,
            "instructions_file": str(instructions.path) if instructions.path else None,
            "instruction_fallbacks": dict(instructions.fallbacks),
            "dims": [("native" if d is None else d) for d in dims_l], "results": results}


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    """"STS12, SciFact" or a list -> task names; none at all is refused before any model work."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("no tasks given")
    return list(tasks)


def _instruction_set(enc, instructions: "Instructions | str", instructions_file, data_dir) -> Instructions:
    """The Instructions to use: the asked set (Table 2's original or synonym, or none), read from the paper's table;
    "none" whatever was asked for an encoder that takes no instructions."""
    kind = instructions.kind if isinstance(instructions, Instructions) else instructions
    if kind not in INSTRUCTION_SETS:
        raise EvalError(f"instructions must be {'|'.join(INSTRUCTION_SETS)}, got {kind!r}")
    if not uses_instructions(enc):
        return Instructions("none")  # BERT-family encoders are evaluated without (their published way)
    if not isinstance(instructions, Instructions):
        return Instructions(kind, instructions_file, data_dir)
    return instructions


def _head_dims(cache: EmbeddingCache, dims) -> list[int | None]:
    """The heads to score ([None] = the encoder's one output) after checking each exists; the cache learns them, so a
    Jasper student fills every head from one body pass (EmbeddingCache.dims)."""
    avail = encoder_dims(cache.encoder)
    dims_l: list[int | None] = [None] if not dims else [int(d) for d in dims]
    bad = [d for d in dims_l if d is not None and avail and d not in avail]
    if bad:
        raise EvalError(f"dims {bad} not available; encoder heads: {list(avail)}")
    cache.dims = tuple(dict.fromkeys(d for d in (*cache.dims, *dims_l) if d is not None))
    return dims_l


def _eval_data_dir(data_dir, engine: str) -> Path | None:
    """The local data folder as a Path. With one, mteb and datasets are switched offline (a task missing locally
    must fail loudly, not download); the built-in engine has no hub path, so it needs one."""
    if data_dir is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return Path(data_dir)
    if engine == "builtin":
        raise EvalError("the built-in engine needs data_dir: a local data folder like ../shared/data "
                        "(--data-dir DIR or $JASPER_DATA_DIR)")
    return None


def _model_label(enc, spec: str | None, name: str | None) -> str:
    """The model's name in the report and in mteb's results folder ('org/name'; local folders as local/<name>)."""
    if spec or name:
        return mteb_name(spec, name)
    label = str(getattr(enc, "name", None) or type(enc).__name__)
    return label if "/" in label else f"local/{label}"


def _builtin_runner(cache: EmbeddingCache, data_dir: Path, instructions: Instructions, split: str | None):
    """run(task, dim) -> result dict on the built-in path (STS / retrieval; split "test" unless given)."""
    def run(task: str, dim: int | None) -> dict:
        sp = split or "test"
        r = _builtin_eval(cache, data_dir, task, sp, dim, instructions)
        r["split"] = sp
        return r
    return run


def _mteb_runner(cache: EmbeddingCache, tasks: list[str], label: str, instructions: Instructions, spec: str | None,
                 data_dir: Path | None, split: str | None, batch_size: int, results_dir, first_dim: int | None):
    """(run(task, dim) -> result dict through `mteb.evaluate`, the weights' revision hash). Every task name is
    looked up in mteb first, so a typo fails before any encoding."""
    import eval_mteb as EM  # only this engine imports mteb (slow to import; the built-in path must not need it)
    adapter = EM.MTEBEncoder(cache, name=label, instructions=instructions, spec=spec)
    task_objs = {t: EM.get_mteb_task(t) for t in tasks}  # unknown names fail before any encoding

    def run(t: str, d: int | None) -> dict:
        # an mteb task object keeps its loaded data and filtered splits: the first head uses the one checked above,
        # every other head a fresh one, so no head sees another's state
        task = EM.get_mteb_task(t) if d != first_dim else task_objs[t]
        sp = split or EM.default_split(task)
        task.filter_eval_splits([sp])
        if data_dir is not None:
            EM.inject_local_data(task, data_dir, sp)
        adapter.dim = d
        adapter.mteb_model_meta = adapter.meta()  # per-head ModelMeta: each head gets its own results folder
        say(f"[eval] {t} ({task.metadata.type}, split {sp}, dim {'native' if d is None else d}) ...")
        r = EM.run_task(adapter, task, sp, batch_size, results_dir)
        r["split"] = sp
        return r
    return run, adapter._revision


def markdown_table(report: dict) -> str:
    keys = [str(d) for d in report["dims"]]
    lines = ["| task | metric | " + " | ".join(f"dim {k}" for k in keys) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in keys) + " |"]
    for t, per in report["results"].items():  # one row per task, one column per head: the Matryoshka trade-off
        metric = next(iter(per.values()))["main_metric"]
        lines.append(f"| {t} | {metric} | " + " | ".join(f"{per[k]['main_score']:.5f}" for k in keys) + " |")
    return "\n".join(lines)


def compare_instructions(encoder, tasks, **kw) -> dict:
    """Table 3's experiment: every task with the paper's original and synonym instructions (one EmbeddingCache, so
    texts without an instruction are encoded once), with the paper's two figures where it reports the task."""
    cache = encoder if isinstance(encoder, EmbeddingCache) else \
        EmbeddingCache(encoder, kw.get("batch_size", 32), kw.get("show_progress"))
    if not uses_instructions(cache.encoder):
        raise EvalError("--instructions compare needs an instruction-following encoder; this one takes none")
    runs = {k: evaluate(cache, tasks, instructions=k, **kw) for k in ("original", "synonym")}
    # the paper's Table 3 figures (the released Jasper with each set), keyed by task, from the same table file
    paper = Instructions("original", kw.get("instructions_file"), kw.get("data_dir")).paper or {}
    published = {r["task"]: r for r in paper.get("table3", [])}
    rows = []
    for t, per in runs["original"]["results"].items():
        for key, r in per.items():
            # Table 3's question: does a reworded instruction move the score? diff = synonym - original
            o, s = r["main_score"], runs["synonym"]["results"][t][key]["main_score"]
            p = published.get(t, {})
            rows.append({"task": t, "dim": key, "metric": r["main_metric"], "original": o, "synonym": s,
                         "diff": s - o, "paper_original": p.get("original"), "paper_synonym": p.get("synonym")})
    return {"model": runs["original"]["model"], "revision": runs["original"]["revision"],
            "engine": runs["original"]["engine"], "dims": runs["original"]["dims"], "compare": rows,
            "paper_average": paper.get("average"), "runs": runs}


def compare_table(report: dict) -> str:
    """task | dim | ours original / synonym / diff | the paper's original / synonym / diff (Table 3, the released
    Jasper), '-' where the paper does not report the task."""
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| task | dim | original | synonym | diff | paper original | paper synonym | paper diff |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["compare"]:
        po, ps = r["paper_original"], r["paper_synonym"]
        lines.append(f"| {r['task']} | {r['dim']} | {f(r['original'])} | {f(r['synonym'])} | {r['diff']:+.4f} | "
                     f"{f(po)} | {f(ps)} | {'-' if po is None else f'{ps - po:+.4f}'} |")
    avg = report.get("paper_average")
    if avg:
        lines.append(f"\nThe paper's averages over its 53 tasks: original {avg['original']}, synonym {avg['synonym']}.")
    return "\n".join(lines)


def plot_dims(report: dict, path: Path) -> Path:
    import matplotlib  # imported here: only a multi-head run draws, and matplotlib is slow to import
    matplotlib.use("Agg")  # files only, no display (training nodes, CI)
    import matplotlib.pyplot as plt
    dims = [d for d in report["dims"] if d != "native"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, per in report["results"].items():
        ax.plot(dims, [per[str(d)]["main_score"] for d in dims], marker="o", label=t)
    ax.set_xscale("log", base=2)  # heads 256 .. 12288 (FC4 .. FC1): each halving of the dim one step apart
    ax.set_xticks(dims)
    ax.set_xticklabels([str(d) for d in dims])
    ax.set_xlabel("embedding dim (Matryoshka head)")
    ax.set_ylabel("main score")
    ax.set_title(f"{report['model']}: score vs dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))  # format given: the tmp name has no .png
    plt.close(fig)
    return path


def save_json(report: dict, path: Path) -> None:
    def w(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    atomic_write(Path(path), w)


def _parser() -> ArgumentParser:
    """eval.py's flags (README "Evaluation"; docs/eval.md)."""
    ap = ArgumentParser(prog="eval.py", description="Evaluate an encoder on MTEB tasks (mteb engine; local data "
                        "offline).")
    ap.add_argument("--model", required=True, help="local dir or hub id: Jasper / exported student, stella, "
                    "NV-Embed-v2, or any sentence-transformers model teachers.load_teacher reads")
    ap.add_argument("--tasks", required=True, help="comma-separated MTEB task names")
    ap.add_argument("--data-dir", default=None, help="local data laid out like ../shared/data (offline); default: "
                    "$JASPER_DATA_DIR, else ../shared/data when it exists, else the hub (mteb engine); "
                    "'hub' forces the hub")
    ap.add_argument("--dims", default=None, help="comma-separated head dims, e.g. 12288,1024,512,256")
    ap.add_argument("--instructions", default="original", choices=[*INSTRUCTION_SETS, "compare"],
                    help="the paper's Table 2 set; compare: both sets side by side with Table 3's figures")
    ap.add_argument("--instructions-file", default=None, help="the paper's instruction table (default: "
                    f"<data dir>/{PAPER_INSTRUCTIONS})")
    ap.add_argument("--engine", default="mteb", choices=["mteb", "builtin"])
    ap.add_argument("--split", default=None, help="override the split (default: test, or the task's eval split)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="cut texts at this many tokens (default: the "
                    "model's own limit)")
    ap.add_argument("--out", default=None, help="results JSON; the markdown table (.md), the plot (.png, >1 dim) "
                    "and mteb's results folder (mteb/ beside it) go next to it")
    ap.add_argument("--results-dir", default=None, help="mteb's results folder (default: mteb/ next to --out)")
    ap.add_argument("--name", default=None, help="model name in mteb's results (default: the hub id, or "
                    "local/<folder>)")
    ap.add_argument("--update-card", action="store_true", help="write the scores into --model's README.md model "
                    "card: results table (every head) + model-index of the default head (model_card.py)")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # every flag and path checked before the model loads (errors: one line, exit 2, via cli() / errors.run_cli)
    check_args(args, dict(batch_size=dict(lo=1), max_length=dict(lo=1)))
    out = Path(args.out) if args.out else None
    # mteb's own results folder beside our JSON, so both readers of the run find it (docs/eval.md)
    results_dir = args.results_dir or (out.parent / "mteb" if out else None)
    try:
        dims = [int(x) for x in args.dims.split(",")] if args.dims else None
    except ValueError:
        raise EvalError(f"--dims {args.dims}: expected comma-separated positive integers, e.g. 1024,512") from None
    if dims is not None and min(dims) < 1:
        raise EvalError(f"--dims {args.dims}: expected comma-separated positive integers, e.g. 1024,512")
    data_dir = None if args.data_dir == "hub" else args.data_dir  # "hub": let mteb download, even with local data
    if data_dir is not None and not Path(data_dir).is_dir():
        raise EvalError(f"--data-dir {data_dir}: no such folder")
    if args.data_dir is None:
        if data.default_data_dir().is_dir():  # the one definition of the default data dir (data.py)
            data_dir = data.default_data_dir()
            print(f"eval.py: data from {data_dir} (--data-dir to change)", file=sys.stderr)
    m = Path(args.model).expanduser()
    # a path-looking --model that does not exist is a typo, not a hub id: say so instead of trying the hub
    if not m.exists() and (args.model.startswith(("/", ".", "~")) or args.model.count("/") >= 2):
        raise EvalError(f"--model {args.model}: no such folder (a local checkpoint dir or a hub id ORG/NAME)")
    if args.out and Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: is a folder (expected a results .json file)")
    if args.update_card and not (m / "modules.json").is_file():
        raise EvalError(f"--update-card: {args.model} is not an export folder (no modules.json): only a local "
                        f"export has a card to update")
    # the model loads only now, after every cheap check: a typo in a flag costs no minutes of loading weights
    enc = load_encoder(args.model, **({"max_length": args.max_length} if args.max_length else {}))
    kw = dict(data_dir=data_dir, dims=dims, engine=args.engine, batch_size=args.batch_size, split=args.split,
              results_dir=results_dir if args.engine == "mteb" else None, name=args.name, spec=args.model,
              instructions_file=args.instructions_file)
    if args.instructions == "compare":
        report = compare_instructions(enc, args.tasks, **kw)
        table = compare_table(report)
    else:
        report = evaluate(enc, args.tasks, instructions=args.instructions, **kw)
        table = markdown_table(report)
    report["model_spec"] = args.model  # what was typed (the report's "model" is mteb's name for it)
    print(table)
    if out:
        save_json(report, out)
        atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(table + "\n", encoding="utf-8"))
        print(f"wrote {out}, {out.with_suffix('.md')}" + (f", mteb results in {results_dir}/results"
                                                         if kw["results_dir"] else ""), file=sys.stderr)
    if args.update_card:  # the original-instruction run of a compare report is the model's score
        import model_card
        card_report = report["runs"]["original"] if "runs" in report else report
        print(f"wrote {model_card.update_card(m, card_report, markdown_table(card_report))}", file=sys.stderr)
    if len(report["dims"]) > 1 and "results" in report:  # a plot only says something across several heads
        png = out.with_suffix(".png") if out else Path("eval_dims.png")
        plot_dims(report, png)
        print(f"wrote {png}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python eval.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
