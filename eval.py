"""Evaluation of any encoder of this project on MTEB tasks (arXiv 2412.19048, sec. 4: MTEB results, Table 3
instruction robustness), at every Matryoshka head, as tables, JSON and plots.

Two engines, one set of embeddings:
- engine="mteb" (default): the `mteb` package's own tasks, evaluators and protocols (classification undersampling,
  pytrec_eval retrieval metrics, clustering v-measure, ...), so a score means what an MTEB score means. Our encoders
  reach mteb through `MTEBEncoder`, which implements mteb's encoder protocol. With `data_dir`, each task's data is
  read from local files (layout below) and injected into the mteb task object before evaluation, so mteb never
  touches the hub; without it, mteb loads the task from the hub as usual.
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

Instructions (sec. 3.3 / Table 2): queries are encoded as "Instruct: {instruction}\\nQuery: {text}" (the
formatting lives in the encoders), documents without. Which texts are "queries" follows MTEB's wrapper for the
released Jasper (mteb/models/model_implementations/jasper_models.py): retrieval/reranking queries get the
instruction, corpus documents do not; symmetric tasks (STS, classification, clustering, pair classification,
summarization), where mteb passes no prompt type, get it on every text. Encoders that do not follow instructions
(BERT-family, e.g. all-MiniLM-L6-v2) get none. See docs/eval.md for the instruction sets.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

import data
from checkpoints import atomic_write, progress, read_json
from errors import ArgumentParser, UserError, check_args, run_cli
from model import JasperModel
from teachers import load_teacher


class EvalError(UserError, ValueError):
    """A bad task name, missing or malformed data file, or unsupported request; the message names task/file/line."""


# ---------------------------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------------------------
# "original": the per-task prompts of the MTEB task metadata, i.e. exactly what MTEB's wrapper for the released
# Jasper model (NovaSearch/jasper_en_vision_language_v1) sends (task metadata `prompt`, else the abstask default
# prompt). The paper's Table 2 text could not be retrieved offline; these are the released model's documented MTEB
# prompts (see docs/eval.md). The table below mirrors mteb's metadata for the tasks in ../shared/data so that the
# built-in path needs no mteb import; tests assert it equals mteb's metadata.
ORIGINAL_PROMPTS: dict[str, str | dict[str, str]] = {
    "STSBenchmark": "Retrieve semantically similar text.",
    "STS12": "Retrieve semantically similar text.",
    "STS13": "Retrieve semantically similar text.",
    "BIOSSES": "Retrieve semantically similar text.",
    "SciFact": {"query": "Given a scientific claim, retrieve documents that support or refute the claim"},
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
}
# Defaults per task type when a task is neither in the table above nor known to mteb (built-in path only).
TYPE_DEFAULT_PROMPTS = {"STS": "Retrieve semantically similar text.",
                        "Retrieval": "Given a web search query, retrieve relevant passages that answer the query"}

# "synonym" (Table 3 robustness): every instruction rewritten with synonyms. OUR OWN deterministic rewrite of the
# original instruction (word-level synonym map), NOT the paper's Table 2 synonym text, which we could not retrieve.
_SYNONYMS = {
    "retrieve": "fetch", "given": "provided", "find": "locate", "relevant": "pertinent", "similar": "alike",
    "semantically": "meaningfully", "documents": "texts", "document": "text", "passages": "paragraphs",
    "query": "question", "identify": "determine", "classify": "categorize", "answer": "respond to",
    "support": "back", "refute": "contradict", "corresponding": "matching", "text": "passage", "claim": "statement",
    "topic": "subject", "questions": "queries", "question": "inquiry", "duplicate": "repeated",
    "equivalent": "identical", "scientific": "academic", "online": "internet", "intents": "intentions",
    "given,": "provided,",
}


def synonym_instruction(instruction: str) -> str:
    """Word-level synonym rewrite of an instruction (case of the first letter kept)."""
    def swap(m: re.Match) -> str:
        w = m.group(0)
        s = _SYNONYMS.get(w.lower())
        if s is None:
            return w
        return s[0].upper() + s[1:] if w[0].isupper() else s
    return re.sub(r"[A-Za-z]+", swap, instruction)


def task_instruction(task_name: str, task_type: str, prompt_type: str | None, instructions: str = "original",
                     metadata_prompt: Any = "__lookup__", abstask_prompt: str | None = None) -> str | None:
    """The instruction for one side of one task; None for documents or when instructions are off.

    prompt_type: "query", "document" or None (symmetric task: every text gets the instruction).
    metadata_prompt / abstask_prompt: the mteb task's `metadata.prompt` and abstask default (mteb path); when not
    given, the built-in table is used.
    """
    if instructions == "none" or prompt_type == "document":
        return None
    if instructions not in ("original", "synonym"):
        raise EvalError(f"instructions must be original|synonym|none, got {instructions!r}")
    prompt = ORIGINAL_PROMPTS.get(task_name) if metadata_prompt == "__lookup__" else metadata_prompt
    if isinstance(prompt, dict):  # mteb: a dict prompt is per prompt type; no entry -> empty
        prompt = prompt.get(prompt_type) if prompt_type else None
        if prompt is None and metadata_prompt == "__lookup__":
            prompt = TYPE_DEFAULT_PROMPTS.get(task_type)
    if not prompt:
        prompt = abstask_prompt if abstask_prompt is not None else TYPE_DEFAULT_PROMPTS.get(task_type)
    if not prompt:
        return None
    return synonym_instruction(prompt) if instructions == "synonym" else prompt


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
        arch = " ".join(cfg.get("architectures") or []) + " " + str(cfg.get("model_type", ""))
        return "head_dims" in cfg or "jasper" in arch.lower() or "vector_dim" in cfg or "jasper" in cfg
    return "jasper" in spec.lower()


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
    """BERT-family encoders (MiniLM) take no instructions; instruction-tuned LLM encoders do."""
    flag = getattr(encoder, "uses_instructions", None)
    if flag is not None:
        return bool(flag)
    return "bert" not in type(encoder).__name__.lower()


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
        self.chunk = chunk
        self._store: dict[tuple[int | None, str | None], dict[str, np.ndarray]] = {}
        self.n_encoded = 0
        # The heads that will be asked for (evaluate() sets them). An encoder with `encodes_many_dims`
        # (model.JasperModel) then fills all of them in one pass: the body runs once per text, not once per head.
        self.dims: tuple[int, ...] = ()

    def _encode(self, texts: list[str], dims: list[int | None], instruction: str | None) -> list[np.ndarray]:
        kw: dict[str, Any] = {"instruction": instruction, "batch_size": self.batch_size, "show_progress": False}
        if len(dims) > 1:
            kw["dim"] = dims
        elif dims[0] is not None and len(encoder_dims(self.encoder)) > 1:  # single-head encoders take no `dim`
            kw["dim"] = dims[0]
        with torch.inference_mode():
            out = self.encoder.encode(texts, **kw)
        outs = [out[d] for d in dims] if len(dims) > 1 else [out]
        arrays = []
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
        todo = list(dict.fromkeys(t for t in texts if t not in store))
        if todo:
            group: list[int | None] = [dim]
            if dim in self.dims and len(self.dims) > 1 and getattr(self.encoder, "encodes_many_dims", False):
                group = list(self.dims)
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
            return np.zeros((0, dim or 0), dtype=np.float32)
        return np.stack([store[t] for t in texts])


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
                continue  # header
            if not line.strip():
                continue
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
    base = task_name.split(".v")[0] if re.search(r"\.v\d+$", task_name) else task_name
    names.append(base)
    for suffix in ("PairClassification", "Classification", "Clustering", "Reranking", "Retrieval", "STS",
                   "Summarization", "BitextMining"):
        if base.endswith(suffix) and len(base) > len(suffix):
            names.append(base[: -len(suffix)])
    type_dirs = list(TYPE_DIRS.get(task_type or "", ()))
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
            rid = r.get("_id", r.get("id"))
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
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rankdata(a), _rankdata(b))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
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
    gold = np.array([float(r["score"]) for r in rows])
    cos = _cosine_rows(cache.get(s1, dim, instruction), cache.get(s2, dim, instruction))
    return {"cosine_spearman": spearman(gold, cos), "cosine_pearson": pearson(gold, cos)}


def ndcg_at_k(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int = 10) -> float:
    """trec_eval `ndcg_cut.k` averaged over the judged queries (gain = relevance, only rel > 0 counts)."""
    vals = []
    for qid, docs in ranked.items():
        rel = qrels.get(qid)
        if rel is None:
            continue
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
    q = torch.from_numpy(cache.get(qtexts, dim, instruction))
    d = torch.from_numpy(cache.get([document_text(r) for r in corpus], dim, None))
    q = torch.nn.functional.normalize(q, p=2, dim=1)
    d = torch.nn.functional.normalize(d, p=2, dim=1)
    doc_ids = [r["id"] for r in corpus]
    kk = min(top_k + 1, len(doc_ids))
    ranked: dict[str, list[str]] = {}
    for s in range(0, len(queries), 256):
        sims = q[s:s + 256] @ d.T  # (b, n_docs) float32
        vals, idx = torch.topk(sims, kk, dim=1)
        for qi in range(sims.shape[0]):
            qid = queries[s + qi]["id"]
            pairs = [(float(v), doc_ids[j]) for v, j in zip(vals[qi].tolist(), idx[qi].tolist())]
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
                  instructions: str, meta: dict | None = None) -> dict:
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
    instr = task_instruction(task, "Retrieval", "query", instructions, **instr_kw)
    scores = builtin_retrieval(cache, corpus, queries, qrels, dim, instr,
                               ignore_identical_ids=meta.get("ignore_identical_ids", False),
                               skip_first_result=meta.get("skip_first_result", False))
    return {"main_metric": "ndcg_at_10", "main_score": scores["ndcg_at_10"], "scores": scores, "type": "Retrieval"}


def quick_eval(encoder, data_dir, task: str = "STSBenchmark", split: str = "dev", dim: int | None = None,
               instructions: str | None = None, batch_size: int = 32) -> float:
    """Main score of one STS/retrieval task with the built-in path (used by train.py during training).

    `encoder` may be an encoder or an EmbeddingCache wrapping one. Instructions default to "original" for
    instruction-following encoders and none otherwise.
    """
    cache = encoder if isinstance(encoder, EmbeddingCache) else EmbeddingCache(encoder, batch_size, False)
    if instructions is None:
        instructions = "original" if uses_instructions(cache.encoder) else "none"
    return float(_builtin_eval(cache, Path(data_dir), task, split, dim, instructions)["main_score"])


# ---------------------------------------------------------------------------------------------------------------
# mteb path. mteb and datasets are imported inside the functions that use them: importing them takes seconds and
# pulls in sklearn/scipy, which the built-in engine (quick_eval during training, the demo) never needs.
# ---------------------------------------------------------------------------------------------------------------
def get_mteb_task(name: str):
    import mteb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return mteb.get_task(name)
        except KeyError as e:
            raise EvalError(f"unknown MTEB task {name!r}: {e.args[0] if e.args else e}") from None


def _mteb_adapter_class():
    """Built lazily so the built-in path never imports mteb."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    class MTEBEncoder(AbsEncoder):
        """mteb EncoderProtocol over an EmbeddingCache; `dim` / `instructions` select the head and prompt set."""

        def __init__(self, cache: EmbeddingCache, name: str = "local/encoder", dim: int | None = None,
                     instructions: str = "original"):
            self.cache = cache
            self.dim = dim
            self.instructions = instructions if uses_instructions(cache.encoder) else "none"
            self.model_name = name
            self.mteb_model_meta = ModelMeta(
                loader=None, name=name if "/" in name else f"local/{name}", revision="local", release_date=None,
                languages=None, n_parameters=None, memory_usage_mb=None, max_tokens=None, embed_dim=dim,
                license=None, open_weights=True, public_training_code=None, public_training_data=None,
                framework=["PyTorch"], similarity_fn_name=ScoringFunction.COSINE,
                use_instructions=self.instructions != "none", training_datasets=None)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            from mteb.abstasks.abstask import get_abstask_prompt
            ptype = prompt_type.value if prompt_type is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                abst = get_abstask_prompt(task_metadata.name)
            instr = task_instruction(task_metadata.name, task_metadata.type, ptype, self.instructions,
                                     metadata_prompt=task_metadata.prompt, abstask_prompt=abst or None)
            return self.cache.get(texts, self.dim, instr)

    return MTEBEncoder


def _rows_to_dataset(rows: list[dict]):
    from datasets import Dataset
    return Dataset.from_list(rows)


def _english_subset(task) -> str:
    subs = list(task.hf_subsets)
    for s in subs:
        if s in ("en", "eng", "en-en", "eng-Latn", "default") or s.startswith("en"):
            return s
    return subs[0]


def inject_local_data(task, data_dir: Path, split: str) -> list[str]:
    """Fill `task.dataset` from local files, run the task's own `dataset_transform`, mark it loaded.

    Returns the hf subsets to evaluate. Never touches the hub.
    """
    from datasets import DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    name, ttype = task.metadata.name, task.metadata.type
    tdir = find_task_dir(data_dir, name, ttype)
    if task.metadata.is_multilingual:
        local = [s for s in task.hf_subsets if (tdir / s).is_dir()]
        subset_dirs = {s: tdir / s for s in local} or {_english_subset(task): tdir}
    else:
        subset_dirs = {"default": tdir}

    retrieval = isinstance(task, AbsTaskRetrieval)
    dataset: dict = {}
    for subset, sdir in subset_dirs.items():
        if retrieval:
            dataset[subset] = {split: _load_retrieval_split(sdir, split, name, RetrievalSplitData)}
        else:
            splits = [split]
            train_split = getattr(task, "train_split", None)
            if ttype in ("Classification", "MultilabelClassification") and train_split and train_split != split:
                splits.append(train_split)
            dd = {}
            for sp in splits:
                path = _split_file(sdir, sp, name)
                rows = read_jsonl(path, name)
                _check_row_fields(task, rows, path)
                dd[sp] = _rows_to_dataset(rows)
            dataset[subset] = DatasetDict(dd)
    if task.metadata.is_multilingual or retrieval:
        task.dataset = dataset
    else:
        task.dataset = dataset["default"]
    task.hf_subsets = list(subset_dirs)
    raw = task.dataset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task.dataset_transform()
    except Exception as e:  # noqa: BLE001 - a task's own transform expects its hub columns
        # Local files may already be in the abstask's column layout (e.g. sentence1 where the hub has sent1):
        # then the task's renaming transform does not apply and the raw rows are used as they are.
        if retrieval or not _missing_columns(task, _apply_aliases(task, raw)):
            task.dataset = raw
        else:
            raise EvalError(f"task {name}: data in {tdir} has neither the task's hub columns (its dataset_transform "
                            f"failed: {type(e).__name__}: {e}) nor the columns "
                            f"{_required_columns(task)}") from None
    if not retrieval:
        task.dataset = _apply_aliases(task, task.dataset)
        missing = _missing_columns(task, task.dataset)
        if missing:
            raise EvalError(f"task {name}: data in {tdir} lacks column(s) {missing} after the task's transform")
    task.data_loaded = True
    return list(subset_dirs)


_ALIASES = {"labels": ("label",), "label": ("labels",), "sentence1": ("sent1",), "sentence2": ("sent2",),
            "sentences": ("sentence", "text"), "text": ("sentence",)}


def _split_dicts(task, dataset) -> list:
    return list(dataset.values()) if task.metadata.is_multilingual else [dataset]


def _missing_columns(task, dataset) -> list[str]:
    req = _required_columns(task)
    miss = []
    for dd in _split_dicts(task, dataset):
        for ds in dd.values():
            miss += [c for c in req if c not in ds.column_names and c not in miss]
    # pair classification v1 stores one row of lists; those columns are checked by mteb itself
    return miss


def _apply_aliases(task, dataset):
    req = _required_columns(task)
    from datasets import DatasetDict

    def fix(dd):
        out = {}
        for sp, ds in dd.items():
            for c in req:
                if c not in ds.column_names:
                    alt = next((a for a in _ALIASES.get(c, ()) if a in ds.column_names), None)
                    if alt is not None:
                        ds = ds.rename_column(alt, c)
            out[sp] = ds
        return DatasetDict(out)
    if task.metadata.is_multilingual:
        return {k: fix(v) for k, v in dataset.items()}
    return fix(dataset)


def _check_row_fields(task, rows: list[dict], path: Path) -> None:
    """Fields the abstask reads, checked per row (only when the task does not rename columns itself)."""
    from mteb.abstasks.abstask import AbsTask
    cls = type(task)
    own_transform = any("dataset_transform" in c.__dict__ for c in cls.__mro__[: cls.__mro__.index(AbsTask)]
                        if c.__module__.startswith("mteb.tasks"))
    if own_transform:
        return
    cols = [c for c in _required_columns(task) if not any(a in rows[0] for a in _ALIASES.get(c, ()))]
    require_fields(rows, cols, path, task.metadata.name)


def _required_columns(task) -> list[str]:
    t = task.metadata.type
    if t == "STS":
        cols = [c for c in task.column_names if isinstance(c, str)] + ["score"]
    elif t in ("Classification", "Clustering", "MultilabelClassification"):
        cols = [c for c in (getattr(task, "input_column_name", None), getattr(task, "label_column_name", None))
                if isinstance(c, str)]
    elif t == "PairClassification":
        cols = [c for c in (task.input1_column_name, task.input2_column_name, task.label_column_name)
                if isinstance(c, str)]
    elif t == "Summarization":
        cols = [task.text_column_name, task.human_summaries_column_name, task.machine_summaries_column_name,
                task.relevancy_column_name]
    else:
        cols = []
    return cols


def _load_retrieval_split(sdir: Path, split: str, name: str, RetrievalSplitData):
    from datasets import Dataset
    old = sdir / f"{split}.jsonl"
    if not (sdir / "corpus.jsonl").exists() and old.exists():
        return _old_reranking_format(old, split, name, RetrievalSplitData)
    corpus, queries, qrels = load_beir(sdir, split, name)
    top_ranked = None
    for p in (sdir / "top_ranked" / f"{split}.jsonl", sdir / "top_ranked.jsonl"):
        if p.exists():
            rows = read_jsonl(p, name)
            require_fields(rows, ("query-id", "corpus-ids"), p, name)
            top_ranked = {str(r["query-id"]): [str(x) for x in r["corpus-ids"]] for r in rows}
            break
    keep = set(qrels)
    queries = [q for q in queries if q["id"] in keep]
    if not queries:
        raise EvalError(f"task {name}: no query of {sdir / 'queries.jsonl'} has a judgement in qrels/{split}.tsv")
    return RetrievalSplitData(corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries),
                              relevant_docs=qrels, top_ranked=top_ranked)


def _old_reranking_format(path: Path, split: str, name: str, RetrievalSplitData):
    """mteb's AbsTaskReranking.transform_old_dataset_format: rows {query, positive: [...], negative: [...]}."""
    from datasets import Dataset
    rows = read_jsonl(path, name)
    require_fields(rows, ("query", "positive", "negative"), path, name)
    corpus, queries, qrels, top = [], [], {}, {}
    idx = 0
    for r in rows:
        if len(r["positive"]) == 0 or len(r["negative"]) == 0:
            continue
        qid = f"{split}_query{idx}"
        idx += 1
        queries.append({"id": qid, "text": r["query"]})
        qrels[qid], top[qid] = {}, []
        for kind, docs, rel in (("apositive", r["positive"], 1), ("negative", r["negative"], 0)):
            for i, doc in enumerate(docs):
                did = f"{kind}_{qid}_{str(i).zfill(5)}"
                corpus.append({"id": did, "title": "", "text": doc})
                top[qid].append(did)
                qrels[qid][did] = rel
    return RetrievalSplitData(corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries),
                              relevant_docs=qrels, top_ranked=top)


def _default_split(task) -> str:
    splits = list(task.metadata.eval_splits)
    return "test" if "test" in splits else splits[0]


def _mteb_eval(adapter, task, split: str, batch_size: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = task.evaluate(adapter, split, encode_kwargs={"batch_size": batch_size})
    main = task.metadata.main_score
    per_subset = {s: {k: _jsonable(v) for k, v in sc.items()} for s, sc in res.items()}
    mains = [float(sc["main_score"]) for sc in res.values()]
    return {"main_metric": main, "main_score": float(np.mean(mains)), "scores": per_subset,
            "type": task.metadata.type}


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------
def evaluate(encoder, tasks: str | Sequence[str], data_dir=None, dims=None, instructions: str = "original",
             engine: str = "mteb", batch_size: int = 32, split: str | None = None,
             show_progress: bool | None = None) -> dict:
    """Evaluate `encoder` on MTEB tasks for every requested head dim.

    Returns {"engine", "instructions", "dims", "results": {task: {dim_key: {"main_metric", "main_score",
    "scores", "type", "split", "time_s"}}}} where dim_key is str(dim) or "native" for dim=None.
    `encoder` may be an EmbeddingCache to share embeddings across calls.
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("no tasks given")
    if engine not in ("mteb", "builtin"):
        raise EvalError(f"engine must be 'mteb' or 'builtin', got {engine!r}")
    if instructions not in ("original", "synonym", "none"):
        raise EvalError(f"instructions must be original|synonym|none, got {instructions!r}")
    cache = encoder if isinstance(encoder, EmbeddingCache) else EmbeddingCache(encoder, batch_size, show_progress)
    enc = cache.encoder
    avail = encoder_dims(enc)
    dims_l: list[int | None] = [None] if not dims else [int(d) for d in dims]
    bad = [d for d in dims_l if d is not None and avail and d not in avail]
    if bad:
        raise EvalError(f"dims {bad} not available; encoder heads: {list(avail)}")
    cache.dims = tuple(dict.fromkeys(d for d in (*cache.dims, *dims_l) if d is not None))
    eff_instr = instructions if uses_instructions(enc) else "none"
    if data_dir is not None:
        data_dir = Path(data_dir)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    elif engine == "builtin":
        raise EvalError("the built-in engine needs data_dir: a local data folder like ../shared/data "
                        "(--data-dir DIR or $JASPER_DATA_DIR)")

    results: dict[str, dict] = {}
    name = getattr(enc, "name", None) or type(enc).__name__
    if engine == "mteb":
        adapter = _mteb_adapter_class()(cache, name=str(name), instructions=eff_instr)
        task_objs = {t: get_mteb_task(t) for t in tasks}  # unknown names fail before any encoding
    for t in tasks:
        results[t] = {}
        for d in dims_l:
            t0 = time.time()
            key = "native" if d is None else str(d)
            if engine == "builtin":
                sp = split or ("test")
                r = _builtin_eval(cache, data_dir, t, sp, d, eff_instr)
            else:
                task = get_mteb_task(t) if d != dims_l[0] else task_objs[t]
                sp = split or _default_split(task)
                if data_dir is not None:
                    inject_local_data(task, data_dir, sp)
                adapter.dim = d
                _progress(f"[eval] {t} ({task.metadata.type}, split {sp}, dim {key}) ...")
                r = _mteb_eval(adapter, task, sp, batch_size)
            r["split"] = sp
            r["time_s"] = round(time.time() - t0, 3)
            results[t][key] = r
            _progress(f"[eval] {t} dim={key}: {r['main_metric']} = {r['main_score']:.5f} ({r['time_s']:.1f}s)")
    return {"model": str(name), "engine": engine, "instructions": eff_instr,
            "dims": [("native" if d is None else d) for d in dims_l], "results": results}


def markdown_table(report: dict) -> str:
    keys = [str(d) for d in report["dims"]]
    lines = ["| task | metric | " + " | ".join(f"dim {k}" for k in keys) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in keys) + " |"]
    for t, per in report["results"].items():
        metric = next(iter(per.values()))["main_metric"]
        lines.append(f"| {t} | {metric} | " + " | ".join(f"{per[k]['main_score']:.5f}" for k in keys) + " |")
    return "\n".join(lines)


def plot_dims(report: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = [d for d in report["dims"] if d != "native"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, per in report["results"].items():
        ax.plot(dims, [per[str(d)]["main_score"] for d in dims], marker="o", label=t)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims)
    ax.set_xticklabels([str(d) for d in dims])
    ax.set_xlabel("embedding dim (Matryoshka head)")
    ax.set_ylabel("main score")
    ax.set_title(f"{report['model']}: score vs dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return path


def save_json(report: dict, path: Path) -> None:
    def w(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    atomic_write(Path(path), w)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="eval.py", description="Evaluate an encoder on MTEB tasks (mteb engine; local data offline).")
    ap.add_argument("--model", required=True, help="local dir or hub id (Jasper/student, stella, NV-Embed-v2, BERT)")
    ap.add_argument("--tasks", required=True, help="comma-separated MTEB task names")
    ap.add_argument("--data-dir", default=None, help="local data laid out like ../shared/data (offline); default: "
                    "$JASPER_DATA_DIR, else ../shared/data when it exists, else the hub (mteb engine); "
                    "'hub' forces the hub")
    ap.add_argument("--dims", default=None, help="comma-separated head dims, e.g. 12288,1024,512,256")
    ap.add_argument("--instructions", default="original", choices=["original", "synonym", "none"])
    ap.add_argument("--engine", default="mteb", choices=["mteb", "builtin"])
    ap.add_argument("--split", default=None, help="override the split (default: test, or the task's eval split)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="cut texts at this many tokens (default: the "
                    "model's own limit)")
    ap.add_argument("--out", default=None, help="results JSON (a PNG plot goes next to it when >1 dim)")
    args = ap.parse_args(argv)
    # every flag and path checked before the model loads (errors: one line, exit 2, via cli() / errors.run_cli)
    check_args(args, dict(batch_size=dict(lo=1), max_length=dict(lo=1)))
    try:
        dims = [int(x) for x in args.dims.split(",")] if args.dims else None
    except ValueError:
        raise EvalError(f"--dims {args.dims}: expected comma-separated positive integers, e.g. 1024,512") from None
    if dims is not None and min(dims) < 1:
        raise EvalError(f"--dims {args.dims}: expected comma-separated positive integers, e.g. 1024,512")
    data_dir = None if args.data_dir == "hub" else args.data_dir
    if data_dir is not None and not Path(data_dir).is_dir():
        raise EvalError(f"--data-dir {data_dir}: no such folder")
    if args.data_dir is None:
        if data.default_data_dir().is_dir():  # the one definition of the default data dir (data.py)
            data_dir = data.default_data_dir()
            print(f"eval.py: data from {data_dir} (--data-dir to change)", file=sys.stderr)
    m = Path(args.model).expanduser()
    if not m.exists() and (args.model.startswith(("/", ".", "~")) or args.model.count("/") >= 2):
        raise EvalError(f"--model {args.model}: no such folder (a local checkpoint dir or a hub id ORG/NAME)")
    if args.out and Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: is a folder (expected a results .json file)")
    enc = load_encoder(args.model, **({"max_length": args.max_length} if args.max_length else {}))
    report = evaluate(enc, args.tasks, data_dir=data_dir, dims=dims, instructions=args.instructions,
                      engine=args.engine, batch_size=args.batch_size, split=args.split)
    report["model_spec"] = args.model
    print(markdown_table(report))
    if args.out:
        save_json(report, Path(args.out))
        print(f"wrote {args.out}", file=sys.stderr)
    if len(report["dims"]) > 1:
        png = Path(args.out).with_suffix(".png") if args.out else Path("eval_dims.png")
        plot_dims(report, png)
        print(f"wrote {png}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python eval.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
