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

Local data layout (`data_dir`, like ../shared/data): `<type dir>/<Task>/...` where the type dir comes from the
task's mteb metadata type (STS -> sts, Retrieval -> retrieval, Classification -> classification, Clustering ->
clustering, PairClassification -> pair_classification, Reranking -> reranking, Summarization -> summarization) and
<Task> is the MTEB name or the MTEB name without its type suffix (Banking77Classification -> Banking77).
- row tasks (STS, classification, clustering, pair classification, summarization, reranking in mteb's old
  query/positive/negative format): `<split>.jsonl` with the columns of the task's hub dataset (classification also
  needs the task's train split).
- retrieval / reranking (BEIR): `corpus.jsonl` {_id, title, text}, `queries.jsonl` {_id, text},
  `qrels/<split>.tsv` (query-id, corpus-id, score; header line), optional `top_ranked/<split>.jsonl`
  {query-id, corpus-ids} for reranking.
- multilingual tasks: `<Task>/<hf_subset>/...`, or files directly in `<Task>/` for the task's English subset.

Instructions (sec. 3.3 / Table 2): the paper's original or synonym set (<data dir>/paper/jasper_instructions.json);
a task it lacks gets mteb's own prompt for it, and the run says so. Queries are encoded as
"Instruct: {instruction}\\nQuery: {text}" (the formatting lives in the encoders), documents without. Which texts
are queries follows mteb's own wrapper for the released Jasper (docs/eval.md): retrieval/reranking queries get the
instruction, corpus documents do not; symmetric tasks (STS, classification, clustering, pair classification,
summarization), where mteb passes no prompt type, get it on every text. Encoders that do not follow instructions
(BERT-family, e.g. all-MiniLM-L6-v2) get none.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

import data
from checkpoints import ORIGINAL_PROMPTS, TYPE_DEFAULT_PROMPTS, atomic_write, progress, read_json
from errors import ArgumentParser, UserError, check_args, run_cli
from model import JasperModel
from teachers import load_teacher


class EvalError(UserError, ValueError):
    """A bad task name, missing or malformed data file, or unsupported request; the message names task/file/line."""


# ---------------------------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------------------------
# The paper's instructions (sec. 3.3, Table 2): one "original" and one GPT-4o "synonym" instruction per MTEB task of
# Table 3, with Table 3's scores for each set. The paper prints Table 2 without task names; the file maps each
# instruction to its task (see docs/eval.md). It lives with the data: <data dir>/paper/jasper_instructions.json.
PAPER_INSTRUCTIONS = Path("paper") / "jasper_instructions.json"
INSTRUCTION_SETS = ("original", "synonym", "none")

# The documented default for a task the paper's table does not list: the prompt MTEB's own wrapper for the released
# Jasper sends (ORIGINAL_PROMPTS, TYPE_DEFAULT_PROMPTS: kept in checkpoints.py, because every export stores them as its
# sentence-transformers prompts, see checkpoints.standard_prompts). On the mteb path it is read from mteb's metadata.

class Instructions:
    """One instruction set ("original" | "synonym" | "none") and the paper's table it draws from.

    `table` is {task: instruction} for the chosen set, `paper` the whole file (Table 3 scores for `--instructions
    compare`). A task the table lacks gets the documented default (mteb's prompt for it) and is reported once.
    """

    def __init__(self, kind: str = "original", path: str | os.PathLike | None = None, data_dir=None):
        if kind not in INSTRUCTION_SETS:
            raise EvalError(f"instructions must be {'|'.join(INSTRUCTION_SETS)}, got {kind!r}")
        self.kind, self.path, self.paper, self.table = kind, None, None, {}
        # {task: the default it got}: reported once per task and written into the report (instruction_fallbacks),
        # so a score made with mteb's prompt instead of Table 2's is never mistaken for a paper setting
        self.fallbacks: dict[str, str | None] = {}
        if kind == "none":
            return
        self.path = Path(path) if path else paper_instructions_path(data_dir)
        if self.path is None or not self.path.is_file():
            # the synonym set exists only in the paper's table (Table 2); "original" has a documented fallback
            if path or kind == "synonym":
                raise EvalError(f"--instructions {kind} needs the paper's instruction table: "
                                f"{path or PAPER_INSTRUCTIONS} not found (--instructions-file PATH)")
            _progress(f"[eval] the paper's instruction table ({PAPER_INSTRUCTIONS}) is not in the data dir: every "
                      "task gets mteb's prompt for it (the documented default)")
            return
        self.paper = read_json(self.path, "instruction table", error=EvalError)
        try:
            self.table = {t: e[kind] for t, e in self.paper["instructions"].items()}
        except (KeyError, TypeError):
            raise EvalError(f"{self.path}: expected {{'instructions': {{task: {{'original', 'synonym'}}}}}}") from None

    def __repr__(self) -> str:
        return self.kind  # what the report's "instructions" field and the progress lines show

    def note_fallback(self, task: str, text: str | None) -> None:
        """Say (once per task) that a task has no entry in the paper's table and what it gets instead."""
        if self.kind != "none" and self.paper is not None and task not in self.table and task not in self.fallbacks:
            self.fallbacks[task] = text
            _progress(f"[eval] {task}: not in the paper's instruction table ({self.path}); using the default "
                      f"(mteb's prompt for it): {text!r}")


def paper_instructions_path(data_dir=None) -> Path | None:
    """<data_dir>/paper/jasper_instructions.json, else the same file in the default data dir."""
    for d in (data_dir, data.default_data_dir()):  # the one definition of the default data dir (data.py)
        if d is not None and d != "hub" and (Path(d) / PAPER_INSTRUCTIONS).is_file():
            return Path(d) / PAPER_INSTRUCTIONS
    return None


def task_instruction(task_name: str, task_type: str, prompt_type: str | None,
                     instructions: "Instructions | str" = "original", metadata_prompt: Any = "__lookup__",
                     abstask_prompt: str | None = None) -> str | None:
    """The instruction for one side of one task; None for documents or when instructions are off.

    prompt_type: "query", "document" or None (symmetric task: every text gets the instruction). The paper's table
    wins; a task it lacks gets the default: `metadata_prompt` / `abstask_prompt` (the mteb task's `metadata.prompt`
    and abstask default, given on the mteb path), else the built-in tables. This mirrors mteb's Jasper wrapper with
    the table as its `prompts_dict` (AbsEncoder.get_instruction: task entry first, then the task's own prompt).
    """
    if not isinstance(instructions, Instructions):
        instructions = Instructions(instructions)
    if instructions.kind == "none" or prompt_type == "document":
        return None
    if task_name in instructions.table:
        return instructions.table[task_name]  # Table 2, verbatim
    # "__lookup__" = the built-in path (no mteb metadata at hand): our mirror of mteb's prompts stands in for it
    prompt = ORIGINAL_PROMPTS.get(task_name) if metadata_prompt == "__lookup__" else metadata_prompt
    if isinstance(prompt, dict):  # mteb: a dict prompt is per prompt type; no entry -> empty
        prompt = prompt.get(prompt_type) if prompt_type else None
        if prompt is None and metadata_prompt == "__lookup__":
            prompt = TYPE_DEFAULT_PROMPTS.get(task_type)
    if not prompt:  # "" or None: mteb falls through to the abstask's default prompt, and so do we
        prompt = abstask_prompt if abstask_prompt is not None else TYPE_DEFAULT_PROMPTS.get(task_type)
    instructions.note_fallback(task_name, prompt or None)
    return prompt or None


# ---------------------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------------------
def _is_jasper(spec: str) -> bool:
    """Released Jasper / our exported students: config.json with head dims or a Jasper architecture."""
    p = Path(spec)
    cfg_path = p / "config.json"
    if p.is_dir():
        if not cfg_path.exists():
            return False
        cfg = read_json(cfg_path, "model config", error=EvalError)
        # our exports carry a `jasper` block (docs/checkpoints.md); the released Jasper names itself in
        # architectures / model_type and lists its heads as head_dims or vector_dim
        arch = " ".join(cfg.get("architectures") or []) + " " + str(cfg.get("model_type", ""))
        return "head_dims" in cfg or "jasper" in arch.lower() or "vector_dim" in cfg or "jasper" in cfg
    return "jasper" in spec.lower()  # a hub id not downloaded yet: only its name can tell


def load_encoder(spec: str | os.PathLike, **kw) -> Any:
    """Load any encoder this project knows, architecture detected from its config files.

    Jasper (released or our exported students) -> model.JasperModel.from_pretrained; everything else (BERT-family
    sentence-transformers folders such as all-MiniLM-L6-v2, stella, NV-Embed-v2) -> teachers.load_teacher.
    The result has `.encode(texts, dim=None, instruction=None, batch_size=..., show_progress=...)` and either
    `.dims` (a Jasper: its head dims) or `.dim` (a teacher: one output); encoder_dims() reads both.
    """
    spec = str(spec)
    if _is_jasper(spec):
        kw.setdefault("vision", False)  # text evaluation: skip the SigLIP tower
        enc = JasperModel.from_pretrained(spec, **kw)
        enc.eval()
        enc.uses_instructions = True
        enc.name = Path(spec).name
        return enc
    return load_teacher(spec, **kw)


def encoder_dims(encoder) -> tuple[int, ...]:
    d = getattr(encoder, "dims", None)
    if d:
        return tuple(int(x) for x in d)
    d = getattr(encoder, "dim", None)
    return (int(d),) if d else ()


def uses_instructions(encoder) -> bool:
    """Jasper students, stella and NV-Embed-v2 take the paper's instructions. BERT-family encoders (MiniLM) and any
    sentence-transformers folder (teachers.SentenceTransformerTeacher) take none: they are evaluated as mteb's
    sentence-transformers wrapper runs a model without task prompts (their own default prompt, if any, applies)."""
    flag = getattr(encoder, "uses_instructions", None)
    if flag is not None:
        return bool(flag)
    return not any("bert" in c.__name__.lower() or "SentenceTransformer" in c.__name__
                   for c in type(encoder).__mro__)


def mteb_name(spec: str, name: str | None = None) -> str:
    """'org/model' as mteb wants it: a hub id as is; a local folder as local/<folder> (parent added for the generic
    names train.py writes: runs/s3/final -> local/s3-final)."""
    if name:
        return name if "/" in name else f"local/{name}"
    p = Path(spec)
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return spec
    p = p.resolve()
    # train.py names its exports runs/<stage>/final, .../step1000: "final" alone would merge every run's results
    generic = p.name in ("final", "latest", "export") or p.name.startswith("step")
    base = f"{p.parent.name}-{p.name}" if generic else p.name
    return f"local/{base or 'model'}"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class EmbeddingCache:
    """Encodes each distinct (text, instruction, dim) once; shared by the mteb and built-in paths and across tasks.

    `get(texts, dim, instruction)` returns (N, D) float32 numpy rows in the order of `texts`.
    """

    def __init__(self, encoder, batch_size: int = 32, show_progress: bool | None = None, chunk: int = 2048):
        self.encoder = encoder
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.chunk = chunk  # texts per encoder call: the progress bar advances and outputs are stored per chunk
        # {(head dim, instruction): {text: (D,) float32 row}}; the same text under another instruction is another
        # vector (the instruction is part of the encoded string), under another head another projection
        self._store: dict[tuple[int | None, str | None], dict[str, np.ndarray]] = {}
        self.n_encoded = 0
        # The heads that will be asked for (evaluate() sets them). An encoder with `encodes_many_dims`
        # (model.JasperModel) then fills all of them in one pass: the body runs once per text, not once per head.
        self.dims: tuple[int, ...] = ()

    def _encode(self, texts: list[str], dims: list[int | None], instruction: str | None) -> list[np.ndarray]:
        kw: dict[str, Any] = {"instruction": instruction, "batch_size": self.batch_size, "show_progress": False}
        if len(dims) > 1:
            kw["dim"] = dims  # JasperModel: one body pass, every head projects the same pooled vector (FC1..FC4)
        elif dims[0] is not None and len(encoder_dims(self.encoder)) > 1:  # single-head encoders take no `dim`
            kw["dim"] = dims[0]
        with torch.inference_mode():
            out = self.encoder.encode(texts, **kw)
        outs = [out[d] for d in dims] if len(dims) > 1 else [out]  # {D: (n, D)} from a many-head call, else (n, D)
        arrays = []
        # shape checks: an encoder that silently drops texts or ignores `dim` would otherwise score the wrong rows
        for d, o in zip(dims, outs):
            if isinstance(o, torch.Tensor):
                o = o.detach().float().cpu().numpy()
            o = np.asarray(o, dtype=np.float32)
            if o.shape[0] != len(texts):
                raise EvalError(f"encoder returned {o.shape[0]} rows for {len(texts)} texts")
            if d is not None and o.shape[1] != d:
                raise EvalError(f"encoder returned dim {o.shape[1]}, asked for {d}")
            arrays.append(o)
        return arrays

    def get(self, texts: Sequence[str], dim: int | None = None, instruction: str | None = None) -> np.ndarray:
        store = self._store.setdefault((dim, instruction), {})
        # distinct texts not encoded yet, in first-seen order: STS pairs and corpora repeat texts, and the second
        # head, set or task reuses the first one's documents (Table 3's compare encodes documents once)
        todo = list(dict.fromkeys(t for t in texts if t not in store))
        if todo:
            group: list[int | None] = [dim]
            if dim in self.dims and len(self.dims) > 1 and getattr(self.encoder, "encodes_many_dims", False):
                group = list(self.dims)  # fill every asked head now: later heads then find their rows stored
            show = self.show_progress if self.show_progress is not None else len(todo) >= 256
            bar = progress(total=len(todo), desc=f"[eval] encode (dim={'/'.join(str(d or 'native') for d in group)})",
                           unit="texts", enabled=show)
            for i in range(0, len(todo), self.chunk):
                part = todo[i:i + self.chunk]
                for d, emb in zip(group, self._encode(part, group, instruction)):
                    st = self._store.setdefault((d, instruction), {})
                    for t, row in zip(part, emb):
                        st[t] = row
                self.n_encoded += len(part)
                bar.update(len(part))
            bar.close()
        if not texts:
            return np.zeros((0, dim or 0), dtype=np.float32)  # (0, D): np.stack refuses an empty list
        return np.stack([store[t] for t in texts])  # (N, D), rows in the order of `texts`


# ---------------------------------------------------------------------------------------------------------------
# Local data: reading files with clear errors
# ---------------------------------------------------------------------------------------------------------------
TYPE_DIRS = {
    "STS": ("sts",),
    "Retrieval": ("retrieval",),
    "Classification": ("classification",),
    "MultilabelClassification": ("multilabel_classification", "classification"),
    "Clustering": ("clustering",),
    "PairClassification": ("pair_classification", "pairclassification", "pair-classification"),
    "Reranking": ("reranking",),
    "Summarization": ("summarization",),
    "InstructionRetrieval": ("instruction_retrieval", "retrieval"),
    "InstructionReranking": ("instruction_reranking", "reranking"),
}


def read_jsonl(path: Path, task: str = "") -> list[dict]:
    """Rows of a jsonl file (data.read_jsonl); a malformed line raises EvalError naming task, file and line."""
    where = f"task {task}: " if task else ""
    rows = [row for _, row in data.read_jsonl(path, error=EvalError, where=where)]
    if not rows:
        raise EvalError(f"{where}{path}: file is empty")
    return rows


def require_fields(rows: list[dict], fields: Iterable[str], path: Path, task: str) -> None:
    for i, row in enumerate(rows, 1):
        for k in fields:
            if k not in row or row[k] is None:
                raise EvalError(f"task {task}: {path}: row {i}: missing field {k!r} (has {sorted(row)})")


def read_qrels(path: Path, task: str = "") -> dict[str, dict[str, int]]:
    """BEIR qrels tsv (header `query-id corpus-id score`) -> {qid: {docid: score}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and not _is_int(parts[-1]):
                continue  # header (BEIR writes `query-id corpus-id score`; a file without one starts with data)
            if not line.strip():
                continue
            # 3 columns (BEIR) or 4 (TREC's `qid iter docid rel`): the doc id is always second to last
            if len(parts) not in (3, 4) or not _is_int(parts[-1]):
                raise EvalError(f"task {task}: {path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score', "
                                f"got {line.rstrip()!r}")
            qid, did, score = parts[0], parts[-2], int(float(parts[-1]))
            qrels.setdefault(qid, {})[did] = score
    if not qrels:
        raise EvalError(f"task {task}: {path}: no judgements")
    return qrels


def _is_int(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def find_task_dir(data_dir: Path, task_name: str, task_type: str | None) -> Path:
    """`<data_dir>/<type dir>/<Task>` (or the name without its type suffix), case-insensitive."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalError(f"data dir {data_dir} does not exist")
    names = [task_name]
    # a versioned mteb name (STSBenchmark.v2) reads the unversioned folder; "Banking77Classification" may live in
    # "classification/Banking77": the type is already in the folder above, so the suffix may be dropped
    base = task_name.split(".v")[0] if re.search(r"\.v\d+$", task_name) else task_name
    names.append(base)
    for suffix in ("PairClassification", "Classification", "Clustering", "Reranking", "Retrieval", "STS",
                   "Summarization", "BitextMining"):
        if base.endswith(suffix) and len(base) > len(suffix):
            names.append(base[: -len(suffix)])
    type_dirs = list(TYPE_DIRS.get(task_type or "", ()))  # the task type's own folder first, then any other
    type_dirs += [p.name for p in sorted(data_dir.iterdir()) if p.is_dir() and p.name not in type_dirs]
    tried = []
    for td in type_dirs:
        tdir = data_dir / td
        if not tdir.is_dir():
            continue
        children = {p.name.lower(): p for p in tdir.iterdir() if p.is_dir()}
        for n in names:
            tried.append(str(tdir / n))
            if n.lower() in children:
                return children[n.lower()]
    raise EvalError(f"task {task_name}: no data folder in {data_dir}; looked for "
                    f"{', '.join(dict.fromkeys(tried)) or '(no type folders)'}")


def _split_file(task_dir: Path, split: str, task: str) -> Path:
    for ext in (".jsonl", ".json"):
        p = task_dir / f"{split}{ext}"
        if p.exists():
            return p
    have = sorted(p.name for p in task_dir.iterdir())
    raise EvalError(f"task {task}: split {split!r} not found: expected {task_dir / (split + '.jsonl')} "
                    f"(folder has: {', '.join(have)})")


def load_beir(task_dir: Path, split: str, task: str) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """corpus rows {id, title, text}, query rows {id, text}, qrels."""
    corpus_p, queries_p = task_dir / "corpus.jsonl", task_dir / "queries.jsonl"
    qrels_p = task_dir / "qrels" / f"{split}.tsv"
    for p in (corpus_p, queries_p, qrels_p):
        if not p.exists():
            raise EvalError(f"task {task}: missing {p} (split {split!r}; BEIR layout: corpus.jsonl, queries.jsonl, "
                            f"qrels/<split>.tsv)")
    corpus = read_jsonl(corpus_p, task)
    queries = read_jsonl(queries_p, task)
    for rows, p in ((corpus, corpus_p), (queries, queries_p)):
        for i, r in enumerate(rows, 1):
            rid = r.get("_id", r.get("id"))  # BEIR's `_id`; `id` as mteb's newer datasets write it
            if rid is None or not isinstance(r.get("text"), str):
                raise EvalError(f"task {task}: {p}:{i}: each row needs '_id' and a string 'text'")
            r["id"] = str(rid)
    corpus = [{"id": r["id"], "title": r.get("title") or "", "text": r["text"]} for r in corpus]
    has_instr = any(r.get("instruction") is not None for r in queries)  # instruction-retrieval tasks
    queries = [{"id": r["id"], "text": r["text"], **({"instruction": r.get("instruction")} if has_instr else {})}
               for r in queries]
    return corpus, queries, read_qrels(qrels_p, task)


def document_text(row: dict) -> str:
    """mteb's `_corpus_to_dict`: title and text joined by a space and stripped, or the stripped text."""
    title = row.get("title")
    return (title + " " + row["text"]).strip() if title else row["text"].strip()


# ---------------------------------------------------------------------------------------------------------------
# Built-in path: STS cosine Spearman and retrieval nDCG@10 (numpy/torch only)
# ---------------------------------------------------------------------------------------------------------------
def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks with ties (scipy.stats.rankdata(method='average'))."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
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
        path = _split_file(tdir, split, task)
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
            _progress(f"[eval] {t} dim={key}: {r['main_metric']} = {r['main_score']:.5f} ({r['time_s']:.1f}s)")
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
        _progress(f"[eval] {t} ({task.metadata.type}, split {sp}, dim {'native' if d is None else d}) ...")
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
    if len(report["dims"]) > 1 and "results" in report:  # a plot only says something across several heads
        png = out.with_suffix(".png") if out else Path("eval_dims.png")
        plot_dims(report, png)
        print(f"wrote {png}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python eval.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    import eval  # run the importable module, so eval_mteb and this CLI share one copy of its classes
    sys.exit(eval.cli())
