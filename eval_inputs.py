"""What an evaluation reads (arXiv 2412.19048, sec. 3.3 and 4): the encoder under test with its embedding cache,
the paper's instruction sets (Table 2), and MTEB tasks' data from local files. eval.py scores with them (its
built-in path, and mteb's through eval_mteb.py); both import this file, so neither imports the other's inputs.

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

import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

import data
from checkpoints import ORIGINAL_PROMPTS, TYPE_DEFAULT_PROMPTS, progress, read_json
from errors import UserError
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
            say(f"[eval] the paper's instruction table ({PAPER_INSTRUCTIONS}) is not in the data dir: every "
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
            say(f"[eval] {task}: not in the paper's instruction table ({self.path}); using the default "
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


def say(msg: str) -> None:
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


def split_file(task_dir: Path, split: str, task: str) -> Path:
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
