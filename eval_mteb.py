"""Our encoders inside mteb: local data injected into mteb task objects, the encoder protocol, ModelMeta, and runs
through `mteb.evaluate` that write mteb's standard results folder (used by eval.py's default engine).

- `inject_local_data(task, data_dir, split)` builds exactly what the task's `load_data` would have produced from
  the hub (a `DatasetDict` per subset, or `RetrievalSplitData` for retrieval / reranking) from the files of
  eval.py's local layout, runs the task's own `dataset_transform` and marks the task loaded: the hub is never
  reached, and everything after that (splits, main score, classification undersampling, pytrec_eval) is mteb's.
- `MTEBEncoder` implements mteb's encoder protocol over eval.EmbeddingCache: the instruction for each side of each
  task (eval.task_instruction: the paper's Table 2 set, else mteb's own prompt for the task) goes to our encoder,
  which writes "Instruct: {instruction}\nQuery: {text}", the exact string mteb's wrapper for the released Jasper
  builds with its instruction template; documents get none.
- `model_meta(...)`: one ModelMeta per evaluated head: name, revision = a content hash of the weights, parameter
  count, memory, the head's embedding size, cosine similarity, instruction use; head dim and a non-default
  instruction set go to `experiment_kwargs`, so each head has its own results folder. `meta.load_model()` rebuilds
  the encoder (`mteb_loader`).
- `run_task(...)`: one task through `mteb.evaluate` (a ModelResult), results folder
  `<results_dir>/results/<org__name>/<revision>/[experiments/<dim=..>/]<Task>.json` + `model_meta.json`.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import mteb
import numpy as np
import torch
from mteb.abstasks.abstask import get_abstask_prompt
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from eval import (EmbeddingCache, EvalError, Instructions, _split_file, encoder_dims, find_task_dir, load_beir,
                  load_encoder, read_jsonl, require_fields, task_instruction, uses_instructions)


def get_mteb_task(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return mteb.get_task(name)
        except KeyError as e:
            raise EvalError(f"unknown MTEB task {name!r}: {e.args[0] if e.args else e}") from None


def _modules(encoder) -> list[torch.nn.Module]:
    """The torch modules holding an encoder's weights (JasperModel itself, a teacher's `.module`, a MultiTeacher's)."""
    if isinstance(encoder, torch.nn.Module):
        return [encoder]
    if getattr(encoder, "module", None) is not None:
        return [encoder.module]
    return [m for t in getattr(encoder, "teachers", []) for m in _modules(t)]


def weights_hash(encoder) -> str | None:
    """sha256 (40 hex digits, like a git revision) over every tensor's name, dtype, shape and bytes, in name order.

    The same weights give the same revision whatever the file layout or sharding; any changed value changes it.
    None for an encoder with no torch module.
    """
    mods = _modules(encoder)
    if not mods:
        return None
    h = hashlib.sha256()
    for i, m in enumerate(mods):
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:40]


def model_meta(encoder, name: str, dim: int | None, instructions: str, spec: str | None = None,
               revision: str | None = None, max_tokens: int | None = None):
    """mteb ModelMeta of one evaluated head: name, revision (content hash of the weights), parameter count, memory,
    the head's embedding size, cosine similarity, instruction use. `experiment_kwargs` (head dim, a non-default
    instruction set) give each head its own folder under the revision in mteb's results layout. With `spec` (a
    path or hub id), `meta.load_model()` rebuilds this exact encoder through `mteb_loader`."""
    mods = _modules(encoder)
    params = {id(p): p for m in mods for p in m.parameters()}
    n_params = sum(p.numel() for p in params.values()) if mods else None
    mem = sum(p.numel() * p.element_size() for p in params.values()) / 2 ** 20 if mods else None
    dims = encoder_dims(encoder)
    default = "original" if uses_instructions(encoder) else "none"
    exp = {**({"dim": dim} if dim is not None and len(dims) > 1 else {}),
           **({"instructions": instructions} if instructions != default else {})}
    return ModelMeta(
        loader=mteb_loader if spec else None, name=name, revision=revision or "no_revision_available",
        loader_kwargs={"model": str(spec), "dim": dim, "instructions": instructions} if spec else {},
        release_date=None, languages=None, n_parameters=n_params, memory_usage_mb=mem and round(mem, 1),
        max_tokens=max_tokens, embed_dim=dim or (dims[0] if dims else None), license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name=ScoringFunction.COSINE, use_instructions=instructions != "none", training_datasets=None,
        experiment_kwargs=exp or None)


def mteb_loader(model_name: str, revision: str | None = None, *, model: str, dim: int | None = None,
                instructions: str = "original", device: str | None = None, **kw):
    """ModelMeta loader: `meta.load_model()` -> the MTEBEncoder of `model` at head `dim` (as eval.py built it)."""
    enc = load_encoder(model, **kw)
    if device is not None:
        enc.to(device)
    ad = MTEBEncoder(EmbeddingCache(enc), name=model_name, instructions=instructions)
    ad.dim = dim
    return ad


class MTEBEncoder(AbsEncoder):
    """mteb EncoderProtocol over an EmbeddingCache; `dim` / `instructions` select the head and prompt set.

    Texts reach the encoder with the raw instruction; the encoder writes "Instruct: {instruction}\\nQuery: {text}"
    (model.TextTokenizer.format), the string mteb's Jasper wrapper builds with its instruction_template.
    """

    def __init__(self, cache: EmbeddingCache, name: str = "local/encoder", dim: int | None = None,
                 instructions: "Instructions | str" = "original", spec: str | None = None):
        self.cache = cache
        self.dim = dim
        on = uses_instructions(cache.encoder)
        self.instructions = instructions if isinstance(instructions, Instructions) and on else \
            Instructions(instructions if on else "none")
        self.model_name, self.spec = name, spec
        self._revision = None
        self.mteb_model_meta = self.meta()

    def meta(self):
        """The ModelMeta of the current head (revision hashed once per encoder)."""
        if self._revision is None:
            self._revision = weights_hash(self.cache.encoder) or "no_revision_available"
        enc = self.cache.encoder
        max_tokens = getattr(getattr(enc, "config", None), "max_length", None) or getattr(enc, "max_length", None)
        return model_meta(enc, self.model_name, self.dim, self.instructions.kind, self.spec, self._revision,
                          max_tokens)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        ptype = prompt_type.value if prompt_type is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            abst = get_abstask_prompt(task_metadata.name)
        instr = task_instruction(task_metadata.name, task_metadata.type, ptype, self.instructions,
                                 metadata_prompt=task_metadata.prompt, abstask_prompt=abst or None)
        return self.cache.get(texts, self.dim, instr)


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


def default_split(task) -> str:
    splits = list(task.metadata.eval_splits)
    return "test" if "test" in splits else splits[0]


def run_task(adapter, task, split: str, batch_size: int, results_dir=None) -> dict:
    """One task through `mteb.evaluate` (a ModelResult; with `results_dir`, mteb's results folder is written there:
    results/<org__name>/<revision>/[experiments/<dim=..>/]<Task>.json + model_meta.json). Results are always
    recomputed: a cached file may come from other local data under the same task name."""
    cache = mteb.ResultCache(results_dir) if results_dir is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mteb.evaluate(adapter, task, cache=cache, overwrite_strategy="always", co2_tracker=False,
                            encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
    if res.exceptions:
        raise EvalError(f"task {task.metadata.name}: {res.exceptions[0].exception}")
    rows = res.task_results[0].scores[split]
    per_subset = {r["hf_subset"]: {k: _jsonable(v) for k, v in r.items() if k not in ("hf_subset", "languages")}
                  for r in rows}
    return {"main_metric": task.metadata.main_score, "type": task.metadata.type,
            "main_score": float(np.mean([float(r["main_score"]) for r in rows])), "scores": per_subset}


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
