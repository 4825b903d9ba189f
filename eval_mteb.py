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
from mteb.models.model_implementations import MODEL_REGISTRY
from mteb.models.model_meta import ModelMeta, ScoringFunction

from eval_inputs import (EmbeddingCache, EvalError, Instructions, encoder_dims, find_task_dir, load_beir, load_encoder,
                         mteb_name, read_jsonl, require_fields, split_file, task_instruction, uses_instructions)


def get_mteb_task(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mteb's superseded / beta / renamed-task warnings: noise in an eval log
        try:
            return mteb.get_task(name)
        except KeyError as e:
            # mteb's KeyError already holds its "Did you mean" suggestion: keep it, as one EvalError line
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
    for i, m in enumerate(mods):  # i: a MultiTeacher's teachers may share key names, their position tells them apart
        for name, t in sorted(m.state_dict().items()):  # name order: independent of module registration order
            t = t.detach().cpu().contiguous()
            # name, dtype and shape first: a bf16 and an fp32 copy of the same values are different models to mteb
            h.update(f"{i}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            # the raw bytes (bf16 has no numpy dtype, hence the uint8 view); an empty tensor adds nothing
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:40]  # 40 hex digits, a git commit's length: mteb's results folders are named by revision


def model_meta(encoder, name: str, dim: int | None, instructions: str, spec: str | None = None,
               revision: str | None = None, max_tokens: int | None = None):
    """mteb ModelMeta of one evaluated head: name, revision (content hash of the weights), parameter count, memory,
    the head's embedding size, cosine similarity, instruction use. `experiment_kwargs` (head dim, a non-default
    instruction set) give each head its own folder under the revision in mteb's results layout. With `spec` (a
    path or hub id), `meta.load_model()` rebuilds this exact encoder through `mteb_loader`."""
    mods = _modules(encoder)
    params = {id(p): p for m in mods for p in m.parameters()}  # by id: a parameter shared by two modules counts once
    n_params = sum(p.numel() for p in params.values()) if mods else None
    mem = sum(p.numel() * p.element_size() for p in params.values()) / 2 ** 20 if mods else None
    dims = encoder_dims(encoder)
    default = "original" if uses_instructions(encoder) else "none"
    # only what differs from the encoder's default run goes into experiment_kwargs: a one-head teacher run with its
    # default instructions keeps mteb's plain <revision>/<Task>.json path, as any other model's result
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
                instructions: str = "original", device: str | None = None, embed_dim: int | None = None, **kw):
    """ModelMeta loader: `meta.load_model()` -> the MTEBEncoder of `model` at head `dim` (as eval.py built it).
    `embed_dim` is how `mteb.get_model(name, embed_dim=D)` asks for a Matryoshka head: it wins over `dim`."""
    dim = embed_dim if embed_dim is not None else dim
    enc = load_encoder(model, **kw)
    if device is not None:
        enc.to(device)
    # a fresh cache: this encoder was not built by eval.py, so it shares no embeddings with a running evaluation
    ad = MTEBEncoder(EmbeddingCache(enc), name=model_name, instructions=instructions)
    ad.dim = dim
    return ad


def register(spec: str, dim: int | None = None, instructions: str = "original", name: str | None = None) -> str:
    """Put the ModelMeta of `spec` (an export folder, any encoder eval.py loads, or a hub id) into mteb's model
    registry and return its name, so that `mteb.get_model(name)` rebuilds it as eval.py evaluates it (same weights
    hash as revision, same instructions). Why: mteb looks a name it does not know up on the hub, so it finds no
    loader for a local folder (mteb 2.x raises NotImplementedError). With `dim` None every head is offered:
    `mteb.get_model(name, embed_dim=D)` picks head D (mteb's Matryoshka convention), default the largest."""
    enc = load_encoder(spec)
    name = mteb_name(str(spec), name)
    meta = MTEBEncoder(EmbeddingCache(enc), name=name, dim=dim, instructions=instructions, spec=str(spec)).meta()
    dims = encoder_dims(enc)
    if dim is None and len(dims) > 1:  # a list: mteb checks embed_dim= against it
        meta = meta.model_copy(update={"embed_dim": list(dims)})
    MODEL_REGISTRY[name] = meta  # this process only: mteb's registry is built at import from its own model files
    return name


class MTEBEncoder(AbsEncoder):
    """mteb EncoderProtocol over an EmbeddingCache; `dim` / `instructions` select the head and prompt set.

    Texts reach the encoder with the raw instruction; the encoder writes "Instruct: {instruction}\\nQuery: {text}"
    (tokenizer.TextTokenizer.format), the string mteb's Jasper wrapper builds with its instruction_template.
    """

    def __init__(self, cache: EmbeddingCache, name: str = "local/encoder", dim: int | None = None,
                 instructions: "Instructions | str" = "original", spec: str | None = None):
        self.cache = cache
        self.dim = dim  # the head evaluated now; eval.evaluate sets it before each (task, head) run
        on = uses_instructions(cache.encoder)
        # an encoder that takes no instructions (BERT family) gets the "none" set whatever was asked, as in
        # eval.evaluate; otherwise an already-read Instructions is kept so its fallback notes stay in one place
        self.instructions = instructions if isinstance(instructions, Instructions) and on else \
            Instructions(instructions if on else "none")
        self.model_name, self.spec = name, spec
        self._revision = None  # the weights hash, computed on first use (hashing a 1.5B model takes seconds)
        self.mteb_model_meta = self.meta()  # mteb reads this attribute (name, revision) when it writes results

    def meta(self):
        """The ModelMeta of the current head (revision hashed once per encoder)."""
        if self._revision is None:
            self._revision = weights_hash(self.cache.encoder) or "no_revision_available"
        enc = self.cache.encoder
        # JasperModel keeps its limit in config.max_length, a teacher as .max_length
        max_tokens = getattr(getattr(enc, "config", None), "max_length", None) or getattr(enc, "max_length", None)
        return model_meta(enc, self.model_name, self.dim, self.instructions.kind, self.spec, self._revision,
                          max_tokens)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        # mteb hands a DataLoader of {"text": [...]} batches; the cache batches by length itself, so flatten
        texts = [t for batch in inputs for t in batch["text"]]
        # "query" / "document" for retrieval and reranking; None for symmetric tasks, where every text gets the
        # instruction (paper sec. 3.3; docs/eval.md "Instructions")
        ptype = prompt_type.value if prompt_type is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            abst = get_abstask_prompt(task_metadata.name)  # the abstask's default, used when the task has none
        # the paper's Table 2 entry for the task, else mteb's prompt for it (what mteb's Jasper wrapper sends)
        instr = task_instruction(task_metadata.name, task_metadata.type, ptype, self.instructions,
                                 metadata_prompt=task_metadata.prompt, abstask_prompt=abst or None)
        return self.cache.get(texts, self.dim, instr)  # (N, D) float32 numpy, what mteb's similarity code takes


def _rows_to_dataset(rows: list[dict]):
    from datasets import Dataset  # imported on use (requirements.txt), needed only on this path
    return Dataset.from_list(rows)


def _english_subset(task) -> str:
    subs = list(task.hf_subsets)
    # files directly in <Task>/ of a multilingual task are its English subset; the names vary across tasks
    for s in subs:
        if s in ("en", "eng", "en-en", "eng-Latn", "default") or s.startswith("en"):
            return s
    return subs[0]


def inject_local_data(task, data_dir: Path, split: str) -> list[str]:
    """Fill `task.dataset` from local files, run the task's own `dataset_transform`, mark it loaded.

    Returns the hf subsets to evaluate. Never touches the hub.
    """
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    name, ttype = task.metadata.name, task.metadata.type
    tdir = find_task_dir(data_dir, name, ttype)
    # {hf subset: its folder}: <Task>/<subset>/ per language where present, else the files in <Task>/ are English
    if task.metadata.is_multilingual:
        local = [s for s in task.hf_subsets if (tdir / s).is_dir()]
        subset_dirs = {s: tdir / s for s in local} or {_english_subset(task): tdir}
    else:
        subset_dirs = {"default": tdir}

    retrieval = isinstance(task, AbsTaskRetrieval)
    dataset = {subset: {split: _load_retrieval_split(sdir, split, name, RetrievalSplitData)} if retrieval
               else _load_row_splits(task, sdir, split) for subset, sdir in subset_dirs.items()}
    # the shape each abstask's load_data leaves behind: {subset: ...} for multilingual and retrieval tasks, the
    # DatasetDict itself for the others
    if task.metadata.is_multilingual or retrieval:
        task.dataset = dataset
    else:
        task.dataset = dataset["default"]
    task.hf_subsets = list(subset_dirs)  # only the subsets we have files for are evaluated
    raw = task.dataset  # kept: the fallback when the task's own transform does not fit local columns
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
        task.dataset = _apply_aliases(task, task.dataset)  # label/labels, sent1/sentence1, ...
        missing = _missing_columns(task, task.dataset)  # checked here, so the error names our data folder
        if missing:
            raise EvalError(f"task {name}: data in {tdir} lacks column(s) {missing} after the task's transform")
    task.data_loaded = True  # mteb's evaluate() skips load_data(), and with it the hub
    return list(subset_dirs)


# column an abstask reads -> names the same column has in hub datasets or older local files
_ALIASES = {"labels": ("label",), "label": ("labels",), "sentence1": ("sent1",), "sentence2": ("sent2",),
            "sentences": ("sentence", "text"), "text": ("sentence",)}


def _load_row_splits(task, sdir: Path, split: str):
    """A row task's DatasetDict for one subset folder: the evaluated split, plus the train split where the task
    needs one, each row checked for the fields the abstask reads."""
    from datasets import DatasetDict
    name, ttype = task.metadata.name, task.metadata.type
    splits = [split]
    # classification trains a logistic regression on the task's train split, so that split is needed too
    train_split = getattr(task, "train_split", None)
    if ttype in ("Classification", "MultilabelClassification") and train_split and train_split != split:
        splits.append(train_split)
    dd = {}
    for sp in splits:
        path = split_file(sdir, sp, name)
        rows = read_jsonl(path, name)
        _check_row_fields(task, rows, path)
        dd[sp] = _rows_to_dataset(rows)
    return DatasetDict(dd)


def _split_dicts(task, dataset) -> list:
    # the {split: Dataset} dicts of a dataset: one per subset for a multilingual task, else the dataset itself
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

    def fix(dd):  # one {split: Dataset}: rename an alias to the required name where the required one is absent
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
    # a task class (in mteb.tasks, below AbsTask) that defines dataset_transform renames hub columns itself: its
    # rows are checked after that transform (_missing_columns), not here
    own_transform = any("dataset_transform" in c.__dict__ for c in cls.__mro__[: cls.__mro__.index(AbsTask)]
                        if c.__module__.startswith("mteb.tasks"))
    if own_transform:
        return
    # a column whose alias is in the file is renamed later (_apply_aliases), so it is not required under its name
    cols = [c for c in _required_columns(task) if not any(a in rows[0] for a in _ALIASES.get(c, ()))]
    require_fields(rows, cols, path, task.metadata.name)


def _required_columns(task) -> list[str]:
    """The columns the task's abstask reads, named by its own attributes (they differ per task class)."""
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
        cols = []  # retrieval / reranking: checked by load_beir instead
    return cols


def _load_retrieval_split(sdir: Path, split: str, name: str, RetrievalSplitData):
    from datasets import Dataset
    old = sdir / f"{split}.jsonl"
    # no corpus.jsonl but <split>.jsonl: a reranking task in mteb's old {query, positive, negative} row format
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
    keep = set(qrels)  # mteb evaluates only judged queries; unjudged ones would be encoded for nothing
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
            continue  # skipped as mteb's transform skips it: nothing to rank against
        qid = f"{split}_query{idx}"
        idx += 1
        queries.append({"id": qid, "text": r["query"]})
        qrels[qid], top[qid] = {}, []
        # doc ids in mteb's own pattern (apositive_ / negative_ + query id + index): ranking ties are broken by doc
        # id, so the same ids give the same order on tied scores as mteb's transform
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
    # "test" where the task has it (MTEB's usual evaluation split), else the task's first eval split
    return "test" if "test" in splits else splits[0]


def run_task(adapter, task, split: str, batch_size: int, results_dir=None) -> dict:
    """One task through `mteb.evaluate` (a ModelResult; with `results_dir`, mteb's results folder is written there:
    results/<org__name>/<revision>/[experiments/<dim=..>/]<Task>.json + model_meta.json). Results are always
    recomputed: a cached file may come from other local data under the same task name."""
    cache = mteb.ResultCache(results_dir) if results_dir is not None else None  # None: nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mteb.evaluate(adapter, task, cache=cache, overwrite_strategy="always", co2_tracker=False,
                            encode_kwargs={"batch_size": batch_size}, show_progress_bar=False)
    if res.exceptions:  # mteb collects a task's failure instead of raising: surface it as one line
        raise EvalError(f"task {task.metadata.name}: {res.exceptions[0].exception}")
    rows = res.task_results[0].scores[split]  # one score dict per hf subset (language) of the split
    per_subset = {r["hf_subset"]: {k: _jsonable(v) for k, v in r.items() if k not in ("hf_subset", "languages")}
                  for r in rows}
    return {"main_metric": task.metadata.main_score, "type": task.metadata.type,
            # one number per task: the mean over its subsets, as MTEB averages a multilingual task
            "main_score": float(np.mean([float(r["main_score"]) for r in rows])), "scores": per_subset}


def _jsonable(v):
    # mteb's scores hold numpy scalars, which json.dump refuses: convert them, recursively through dicts and lists
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
