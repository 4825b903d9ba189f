"""Training data for Jasper & Stella distillation (arXiv 2412.19048, sec. 3.2): texts and image-caption pairs from
files to this rank's share of every global batch.

Four parts, top to bottom:
  1. readers    - in readers.py: texts streamed out of jsonl / parquet / txt files, folders, globs and hub datasets,
                  never a corpus in memory; bad input skipped and counted, or raised naming file:line.
  2. recipe     - the paper's text mix (sec. 3.2; the mix, sentence splitter and word shuffle are recipe.py's):
                  its inputs opened here, 80% passages / 20% short texts by default, every ratio a parameter.
                  `python data.py build --out DIR` materialises it once as DIR/texts.jsonl; the teacher cache is
                  built over the same file (cache row i == texts.jsonl row i, checked by (row, hash)).
  3. TrainLoader - batches over texts.jsonl through a byte-offset index: a seeded permutation per epoch, every global
                  batch a uniform random draw, laid out over the ranks by ONE plan of the whole global batch
                  (packing.plan_step: texts packed end to end in rows of max_length tokens, or one text per row
                  with packing=False; rows dealt to ranks so that every rank runs the same number of forwards).
                  A batch is a pure function of (seed, epoch, step, rank): resume is exact, whatever the worker
                  count, and the global batch does not depend on the rank count.
  4. ImageCaptionDataset / ImageBatches - stage 4 image-caption pairs, decoded with vision.py's image code in
                  DataLoader workers, drawn as uniform random global batches exactly like TrainLoader's.
Every jsonl file of the project (texts, captions, eval tasks, the teacher cache input) is read through the one
line parser of readers.py (`parse_jsonl_line`): `read_jsonl` raises naming file:line, `scan_jsonl` indexes and
counts skips.

The authors released no code for this part; everything here follows the paper's text, choices are documented in
docs/data.md.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from checkpoints import atomic_write
from checkpoints import progress as progress_bar  # build() has a `progress` flag of its own
from errors import ArgumentParser, check_args, run_cli
from packing import Packed, plan_step
# 1. readers (readers.py): the raw text sources and the one jsonl parser. DataError, read_jsonl and read_texts are
#    also re-exported here (noqa), where callers and users have always found them.
from readers import (DEFAULT_MAX_CHARS, ON_ERROR, DataError, check_policy, iter_records, line_bytes,  # noqa: F401
                     read_jsonl, read_texts, scan_jsonl, text_problem)
from recipe import Example, RecipeStats, SourceSpec, mix
from vision import preprocess_images


def text_hash(text: str) -> str:
    """Stable identity of a text: aligns teacher-cache rows with training rows (row id + this hash)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()  # unlike hash(): not salted per run


# ==================================================================================================================
# 2. the recipe (sec. 3.2): recipe.py mixes, splits and shuffles; here its inputs are opened and `build` writes it
# ==================================================================================================================

def recipe_stream(sources: list[SourceSpec], *, on_error: str = "skip", max_chars: int = DEFAULT_MAX_CHARS,
                  stats: RecipeStats | None = None, **mix_kw) -> Iterator[Example]:
    """recipe.mix over the inputs' files: each SourceSpec.spec (file, folder, glob or hf://) is streamed by
    iter_records; bad lines are skipped and counted in stats.skips (on_error="skip") or raise naming file:line."""
    check_policy(on_error)
    stats = stats if stats is not None else RecipeStats()  # the caller's stats: build reads counts from it
    # one lazy reader per input: the mix pulls a document from an input only when that input is drawn
    readers = [iter_records(s.spec, s.field, on_error=on_error, max_chars=max_chars, skips=stats.skips)
               for s in sources]
    return mix(sources, readers, stats=stats, **mix_kw)


def default_data_dir() -> Path:
    """$JASPER_DATA_DIR, else ../shared/data next to the repository."""
    env = os.environ.get("JASPER_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "shared" / "data"


def build(out_dir: str | Path, passages: str | None = None, short: str | None = None, *, n_texts: int | None = None,
          seed: int = 0, passage_ratio: float = 0.8, split_ratio: float = 0.3, min_sentences: int = 1,
          max_sentences: int = 10, shuffle_ratio: float = 0.0008, field: str = "text", on_error: str = "skip",
          max_chars: int = DEFAULT_MAX_CHARS, data_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Materialise the recipe as OUT/texts.jsonl (rows {"id","text","hash","source","kind"}, id 0..N-1 in order)
    plus OUT/build.json (parameters and counts). Streaming write to a temp file, renamed into place at the end."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    passages = passages or _default_input(data_dir / "text" / "passages.jsonl", "--passages")
    short = short or _default_input(data_dir / "text" / "short.jsonl", "--short")
    # the mix of sec. 3.2: only passages may be split into sentence pieces (recipe.py)
    sources = [SourceSpec("passages", str(passages), passage_ratio, "passage", True, field),
               SourceSpec("short", str(short), 1.0 - passage_ratio, "short", False, field)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "texts.jsonl"  # row i here == teacher-cache row i
    stats = RecipeStats()  # filled while the mix streams; read by write_rows and build.json
    bar = progress_bar(total=n_texts, desc="build", unit="texts", enabled=progress)

    def write_rows(tmp: Path) -> None:  # streamed into atomic_write's temporary file, renamed when complete
        with open(tmp, "w", encoding="utf-8") as f:
            for row, ex in enumerate(recipe_stream(sources, seed=seed, split_ratio=split_ratio,
                                                   min_sentences=min_sentences, max_sentences=max_sentences,
                                                   shuffle_ratio=shuffle_ratio, n_texts=n_texts, on_error=on_error,
                                                   max_chars=max_chars, stats=stats)):
                f.write(json.dumps({"id": row, "text": ex.text, "hash": text_hash(ex.text), "source": ex.source,
                                    "kind": ex.kind}, ensure_ascii=False) + "\n")
                bar.update()
        if sum(stats.texts.values()) == 0:  # raised inside: the empty temp file is never renamed in
            raise DataError(f"build produced no text from {passages} and {short} (skips: {dict(stats.skips)})")

    atomic_write(final, write_rows)  # a crash leaves no half-written texts.jsonl
    bar.close()
    n = sum(stats.texts.values())
    if n_texts is not None and n < n_texts:  # not an error: fewer texts, reported
        print(f"build: input {stats.exhausted!r} ran out after {n:,} of {n_texts:,} texts", file=sys.stderr)
    meta = {"texts": str(final), "n_texts": n, "seed": seed, "inputs": {"passages": str(passages),
            "short": str(short)}, "field": field,
            "params": {"passage_ratio": passage_ratio, "split_ratio": split_ratio, "min_sentences": min_sentences,
                       "max_sentences": max_sentences, "shuffle_ratio": shuffle_ratio, "max_chars": max_chars,
                       "on_error": on_error, "n_texts": n_texts},
            "stats": stats.as_dict()}
    atomic_write(out_dir / "build.json", json.dumps(meta, indent=2))  # parameters + counts: how to rebuild it
    if stats.skips:
        print(f"build: skipped bad input: {dict(stats.skips)}", file=sys.stderr)
    return meta


def _default_input(path: Path, flag: str) -> str:
    if not path.exists():
        raise DataError(f"default input {path} not found: pass {flag} (file, folder, glob or hf://ORG/NAME) "
                        f"or --data-dir / JASPER_DATA_DIR")
    return str(path)


# ==================================================================================================================
# 3. TrainLoader over texts.jsonl
# ==================================================================================================================

_INDEX_VERSION = 1  # bump when the index layout changes: old sidecars are rebuilt


def _scan_index(path: Path, field: str, max_chars: int, on_error: str) -> dict:
    """scan_jsonl with the training-row check: a usable row is a JSON object with a non-blank string `field` of at
    most max_chars chars whose "hash" (when present) equals text_hash(text)."""
    def check_row(row: Any) -> tuple[str | None, str]:
        if not isinstance(row, dict):
            return "missing_field", f"no {field!r} field"
        kind, detail = text_problem(row.get(field), field, max_chars)
        if kind is None and row.get("hash") is not None and row["hash"] != text_hash(row[field]):
            return "hash_mismatch", f"hash {row['hash']!r} != text_hash(text) {text_hash(row[field])!r}"
        return kind, detail

    idx = scan_jsonl(path, check_row, line_bytes(max_chars), on_error)
    st = path.stat()
    return {"version": _INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "field": field,
            "max_chars": max_chars, **idx}


def load_index(path: str | Path, field: str = "text", max_chars: int = DEFAULT_MAX_CHARS, on_error: str = "skip",
               cache: bool = True) -> dict:
    """The byte-offset index of a jsonl file (see _scan_index), cached in $JASPER_CACHE_DIR/data-index (default
    ~/.cache/jasper) keyed by the file's absolute path, and rebuilt when its size or mtime or the field / max_chars
    change; kept in memory only when the cache folder is not writable."""
    path = Path(path).resolve()
    st = path.stat()
    cache_dir = Path(os.environ.get("JASPER_CACHE_DIR", Path.home() / ".cache" / "jasper")) / "data-index"
    key = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()  # same name, other folder: other key
    side = cache_dir / f"{path.name}.{key}.index.npz"  # never next to the data: shared data stays untouched
    if cache and side.exists():
        try:
            z = np.load(side, allow_pickle=False)  # no pickle: a sidecar cannot run code
            meta = json.loads(str(z["meta"]))
            if (meta["version"], meta["size"], meta["mtime_ns"], meta["field"], meta["max_chars"]) == (
                    _INDEX_VERSION, st.st_size, st.st_mtime_ns, field, max_chars):
                idx = dict(meta, offsets=z["offsets"], valid=z["valid"])
                if on_error == "raise" and idx["bad"]:  # a cached index must fail like a fresh scan
                    line, why = idx["bad"][0]
                    raise DataError(f"{path}:{line}: {why.replace('_', ' ', 1)}")
                return idx
        except DataError:  # the bad-input error above, not a cache problem
            raise
        except Exception:
            pass  # stale or corrupt sidecar: rebuild
    idx = _scan_index(path, field, max_chars, on_error)
    if cache:
        meta = {k: v for k, v in idx.items() if k not in ("offsets", "valid")}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, offsets=idx["offsets"], valid=idx["valid"], meta=np.array(json.dumps(meta)))

        try:
            atomic_write(side, write)
        except OSError:
            pass  # read-only folder: keep the index in memory
    return idx


@dataclass
class Batch:
    """This rank's share of one global batch. rows/hashes are in the order of the concatenated micro-batches'
    texts. Every rank's Batch of the same step has the same number of micro-batches (packing.plan_step); one with
    no text (micro_sizes[k] == 0) holds a one-token dummy input that the trainer forwards and drops."""
    input_ids: torch.Tensor               # (b, T) the whole share padded to its longest (b may be 0)
    attention_mask: torch.Tensor          # (b, T)
    rows: torch.Tensor                    # (b,) row ids in texts.jsonl ("id" field, else 0-based line) = cache rows
    hashes: list[str]                     # text_hash of each text, to verify teacher-cache rows
    n_tokens: int                         # real (unpadded) tokens in the share
    chunks: list[tuple[torch.Tensor, torch.Tensor]]  # padded micro-batches (<= micro_batch rows); [] when packed
    epoch: int
    step: int                             # step within the epoch (global batch index)
    packed: list[Packed] | None = None    # packed micro-batches (<= micro_batch rows of <= pack_length tokens)
    micro_sizes: list[int] = dataclasses.field(default_factory=list)  # texts per micro-batch (0: a dummy forward)
    rank_sizes: list[int] = dataclasses.field(default_factory=list)   # texts of every rank this step (W,)

    @property
    def n_forwards(self) -> int:
        return len(self.micro_sizes)

    @property
    def n_processed(self) -> int:
        """Tokens the model processes over the chunks, padding included (padding efficiency = n_tokens / this)."""
        if self.packed is not None:
            return sum(p.numel() for p in self.packed)
        return sum(ids.numel() for ids, _ in self.chunks)


def _identity(x):  # module-level, not a lambda: picklable for spawned workers
    return x


class _StepDataset(torch.utils.data.Dataset):
    """Map-style view for DataLoader workers: item g = the batch at global step g."""

    def __init__(self, loader: "TrainLoader"):
        self.loader = loader

    def __len__(self):
        return 1 << 62  # effectively endless: _CountFrom picks the steps

    def __getitem__(self, g: int) -> Batch:
        spe = self.loader.steps_per_epoch
        return self.loader.batch_at(g // spe, g % spe)


class _CountFrom(torch.utils.data.Sampler):  # step ids start, start+1, ... (stop exclusive, None = forever)
    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop)) if self.stop is not None else itertools.count(self.start)


class TrainLoader:
    """Batches over texts.jsonl (sec. 3.1: global batch m = 128, max length 512).

    Global batch (epoch e, step k) = valid rows perm_e[k*m:(k+1)*m], perm_e = a seeded permutation: a uniform random
    draw without replacement within the epoch (the last incomplete batch of an epoch is dropped). Every rank reads
    and tokenises the WHOLE global batch and lays it out with the same plan (packing.plan_step): packed end to end
    into rows of pack_length tokens (packing=True, the default) or one text per row, longest first (packing=False);
    rows dealt to the ranks longest first in snake order, then cut into the same number of micro-batches (`packed`,
    or padded `chunks`, of at most micro_batch rows) on every rank. Rank r keeps plan[r]: disjoint shares whose
    union is the global batch, of about equal tokens, and, whatever the texts, the same number of forwards on every
    rank (the FSDP invariant, docs/train.md). Which texts meet in a batch is exactly as random as plain shuffled
    batching and does not depend on the world size; only which rank computes which text does, and the gathered
    losses (eq. 1-3) do not see it.

    Iterating yields Batch objects forever (or `epochs` epochs); state_dict() is the position of the next batch to be
    yielded, so a restored loader continues with exactly the batches the uninterrupted one would have yielded,
    with any num_workers (a batch is a pure function of seed, epoch, step and rank) and even a different world size.
    `.skips` counts bad rows left out of the index (kinds as in iter_records, plus hash_mismatch).
    `holdout=K` sets K usable rows aside before anything is drawn (`holdout_lines`, chosen by `holdout_seed` alone,
    so every stage and seed of a pipeline over the same file holds out the same texts): they never reach a batch,
    and `holdout_records()` reads them for evaluation during training.
    """

    def __init__(self, texts_path: str | Path, tokenizer, global_batch: int, max_length: int, seed: int,
                 rank: int = 0, world_size: int = 1, *, micro_batch: int | None = None, num_workers: int = 0,
                 epochs: int | None = None, field: str = "text", on_error: str = "skip",
                 max_chars: int = DEFAULT_MAX_CHARS, prefetch_factor: int = 2, index_cache: bool = True,
                 packing: bool = True, pack_length: int | None = None, holdout: int = 0, holdout_seed: int = 0):
        check_policy(on_error)
        if world_size <= 0 or global_batch < world_size:
            raise ValueError(f"global_batch ({global_batch}) must be at least world_size ({world_size}): every "
                             "rank needs a text")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.path = Path(texts_path)
        self.tokenizer = tokenizer
        self.global_batch, self.max_length, self.seed = global_batch, max_length, seed
        self.rank, self.world_size = rank, world_size
        # default: a rank's whole share of rows in one forward
        self.micro_batch = micro_batch or -(-global_batch // world_size)
        self.num_workers, self.epochs, self.prefetch_factor = num_workers, epochs, prefetch_factor
        self.field, self.max_chars = field, max_chars
        # packing: the share's texts laid end to end in rows of pack_length tokens (default max_length), each text
        # attending only to itself (packing.py); micro_batch then counts such rows
        self.packing, self.pack_length = bool(packing), int(pack_length or max_length)
        if self.pack_length < max_length:
            raise ValueError(f"pack_length {self.pack_length} < max_length {max_length}: a text of max_length "
                             f"tokens must fit in one row")
        idx = load_index(self.path, field, max_chars, on_error, cache=index_cache)
        self._offsets = idx["offsets"]                       # (n_lines + 1,) int64 byte offsets
        self._rows = np.flatnonzero(idx["valid"]).astype(np.int64)  # (n_valid,) usable line numbers (0-based)
        if not 0 <= holdout < len(self._rows):
            raise DataError(f"{self.path}: cannot hold out {holdout} of {len(self._rows)} usable rows")
        self.holdout_lines = np.sort(np.random.default_rng([holdout_seed, 0x4E1D]).choice(
            self._rows, holdout, replace=False))  # (holdout,) 0-based lines set aside, never in a batch
        self._rows = np.setdiff1d(self._rows, self.holdout_lines)
        self.holdout_seed, self._holdout_recs = holdout_seed, None  # records read on first use, then kept
        self.skips: dict[str, int] = dict(idx["skips"])
        self.bad_lines: list = idx["bad"]                     # first 100 (1-based line, reason)
        self.n_valid = len(self._rows)
        if self.n_valid < global_batch:
            raise DataError(f"{self.path}: {self.n_valid} usable rows < global_batch {global_batch} "
                            f"(skipped: {self.skips})")
        self.steps_per_epoch = self.n_valid // global_batch  # last incomplete batch dropped
        self._epoch, self._step = 0, 0  # position of the next batch to yield
        self._perm_cache: tuple[int, np.ndarray] | None = None  # (epoch, permuted lines): one permutation at a time
        self._fh = None  # opened lazily, per process (_read_line)
        self._fh_pid = None

    # ---- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "step": self._step, "seed": self.seed, "global_batch": self.global_batch,
                "n_valid": self.n_valid, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "n_valid"):  # other values would draw other batches
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: state {key}={state[key]} but this loader has "
                                 f"{getattr(self, key)} ({self.path})")
        if not (0 <= state["step"] < self.steps_per_epoch and state["epoch"] >= 0):
            raise ValueError(f"cannot resume: bad position epoch={state['epoch']} step={state['step']}")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    # ---- the pure batch function ---------------------------------------------------------------------------------
    def permutation(self, epoch: int) -> np.ndarray:
        """Seeded permutation of the usable rows for one epoch (numpy PCG64 seeded by (seed, epoch))."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_valid)  # (n_valid,)
            self._perm_cache = (epoch, self._rows[perm])  # permuted line numbers, not positions
        return self._perm_cache[1]

    def global_lines(self, epoch: int, step: int) -> np.ndarray:
        """0-based line numbers of the whole global batch (all ranks), in draw order."""
        return self.permutation(epoch)[step * self.global_batch:(step + 1) * self.global_batch]

    def _read_line(self, line: int) -> dict:
        if self._fh is None or self._fh_pid != os.getpid():  # one handle per process (DataLoader workers fork)
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()
        a, b = self._offsets[line], self._offsets[line + 1]  # the line's bytes, newline included
        self._fh.seek(a)
        return json.loads(self._fh.read(b - a).decode("utf-8"))  # valid lines were checked at indexing

    def records(self, lines) -> tuple[list[str], list[int], list[str]]:
        """(texts, row ids, text hashes) of 0-based lines: the row id is the "id" field (= teacher-cache row)."""
        recs = [self._read_line(int(i)) for i in lines]
        texts = [r[self.field] for r in recs]
        rows = [int(r["id"]) if isinstance(r.get("id"), int) else int(i) for r, i in zip(recs, lines)]
        hashes = [r["hash"] if isinstance(r.get("hash"), str) else text_hash(t) for r, t in zip(recs, texts)]
        return texts, rows, hashes

    def holdout_records(self) -> tuple[list[str], list[int], list[str]]:
        if self._holdout_recs is None:  # read once: config.json's record and the evaluator both want them
            self._holdout_recs = self.records(self.holdout_lines)
        return self._holdout_recs

    def batch_at(self, epoch: int, step: int) -> Batch:
        """This rank's part of global batch (epoch, step): plan_step over the whole global batch, rank r's rows."""
        texts, rows, hashes = self.records(self.global_lines(epoch, step))  # the whole global batch, (B,)
        ids = self.tokenizer.encode_ids(texts, max_length=self.max_length)  # one batched call, truncated
        plan = plan_step([len(x) for x in ids], self.world_size, self.micro_batch,
                         self.pack_length if self.packing else None)
        mine = plan[self.rank]  # [forward][row][text]: global batch positions
        order = [j for fwd in mine for row in fwd for j in row]  # rows/hashes below follow the forwards' order
        micro_sizes = [sum(len(row) for row in fwd) for fwd in mine]
        dummy = [[self.tokenizer.pad_id]]  # a forward with no text runs on one pad token; its output is dropped
        packed, chunks = ([], None) if self.packing else (None, [])
        for fwd in mine:
            texts_of = [ids[j] for row in fwd for j in row] or dummy
            if self.packing:
                local, n = [], 0  # rows as positions within this micro-batch's texts
                for row in fwd or [[None]]:
                    local.append(list(range(n, n + len(row))))
                    n += len(row)
                packed.append(Packed.from_ids(texts_of, self.pack_length, self.tokenizer.pad_id, rows=local))
            else:
                chunks.append(self.tokenizer.pad(texts_of))  # padded to this micro-batch's longest
        share = [ids[j] for j in order]
        input_ids, attention_mask = self.tokenizer.pad(share) if share else (torch.zeros(0, 1, dtype=torch.long),) * 2
        return Batch(input_ids=input_ids, attention_mask=attention_mask,
                     rows=torch.tensor([rows[j] for j in order], dtype=torch.long),
                     hashes=[hashes[j] for j in order], n_tokens=sum(len(x) for x in share),
                     chunks=chunks if chunks is not None else [], epoch=epoch, step=step, packed=packed,
                     micro_sizes=micro_sizes,
                     rank_sizes=[sum(len(row) for fwd in p for row in fwd) for p in plan])

    # ---- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        start = self._epoch * self.steps_per_epoch + self._step  # global index of the next batch
        stop = None if self.epochs is None else self.epochs * self.steps_per_epoch
        if stop is not None and start >= stop:
            return
        if self.num_workers == 0:
            source = (self.batch_at(g // self.steps_per_epoch, g % self.steps_per_epoch)
                      for g in (range(start, stop) if stop is not None else itertools.count(start)))
        else:
            source = iter(torch.utils.data.DataLoader(  # batches come back in step order
                _StepDataset(self), batch_size=None, sampler=_CountFrom(start, stop), num_workers=self.num_workers,
                collate_fn=_identity, prefetch_factor=self.prefetch_factor))
        for batch in source:
            g = batch.epoch * self.steps_per_epoch + batch.step + 1  # position of the next batch
            self._epoch, self._step = divmod(g, self.steps_per_epoch)  # set before the yield
            yield batch

    def __getstate__(self):  # DataLoader workers under spawn: no open file handle
        d = dict(self.__dict__)
        d["_fh"], d["_fh_pid"] = None, None
        return d


# ==================================================================================================================
# 4. image-caption pairs (stage 4)
# ==================================================================================================================

def _infinity_mm_caption(row: dict) -> str | None:
    """Infinity-MM / LLaVA layout: {"image": path, "conversations": [{"from": "human", ...}, {"from": "gpt",
    "value": caption}]} -> the first answer."""
    for turn in row.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("gpt", "assistant") and isinstance(turn.get("value"), str):
            return turn["value"]
    return None


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Stage-4 image-caption pairs from a jsonl or parquet file (sec. 3.2: captions of BAAI/Infinity-MM).

    Rows: `image_field` holds a path (relative to image_root, default the file's folder), raw bytes (parquet binary)
    or an HF Image struct {"bytes", "path"}; `caption_field` holds the caption, or, when absent, the first gpt turn of
    an Infinity-MM/LLaVA "conversations" list. __getitem__ returns the undecoded row; `collate` decodes and
    preprocesses images with vision.load_image / vision.preprocess_images, so the work happens in DataLoader workers.
    Broken images are skipped and counted: each batch carries n_skipped, and `loader()` sums them into `.skips`.
    jsonl is read by byte offset (random access); parquet keeps one row group cached per worker (shuffled access
    then reads a row group per row: prefer jsonl + image files for large sets).
    """

    def __init__(self, path: str | Path, image_field: str = "image", caption_field: str = "caption",
                 image_root: str | Path | None = None, image_size: int = 384, on_error: str = "skip",
                 max_chars: int = DEFAULT_MAX_CHARS, index_cache: bool = True):
        check_policy(on_error)
        self.path = Path(path)
        self.image_field, self.caption_field = image_field, caption_field
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.image_size, self.on_error, self.max_chars = image_size, on_error, max_chars
        self.skips: Counter = Counter()
        self._fh, self._fh_pid, self._rg_cache = None, None, None
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq  # optional (parquet inputs only) and slow to import
            md = pq.ParquetFile(self.path).metadata
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            self._rg_starts = np.cumsum([0] + sizes)  # (n_groups + 1,) first row of each group
            self._lines = np.arange(self._rg_starts[-1], dtype=np.int64)  # not pre-validated (see collate)
        else:
            self._rg_starts = None
            idx = scan_jsonl(self.path, self._check_row, line_bytes(max_chars), on_error)
            self._offsets, self._lines = idx["offsets"], np.flatnonzero(idx["valid"]).astype(np.int64)
            for k, v in idx["skips"].items():
                self.skips[k] += v

    def _check_row(self, row: Any) -> tuple[str | None, str]:
        """scan_jsonl's row check for a pair: an image field, and a caption (or a conversations answer)."""
        if not isinstance(row, dict) or not row.get(self.image_field):
            return "missing_field", f"no {self.image_field!r} field"
        cap = self._caption(row)
        if not isinstance(cap, str):
            return "missing_field", f"no {self.caption_field!r} field nor a conversations answer"
        if not cap.strip():
            return "empty_text", "empty caption"
        if len(cap) > self.max_chars:
            return "too_long", f"caption of {len(cap):,} chars"
        return None, ""

    def _caption(self, row: dict):
        cap = row.get(self.caption_field)
        return cap if cap is not None else _infinity_mm_caption(row)

    def __len__(self) -> int:
        return len(self._lines)

    def _row(self, i: int) -> dict:
        if self._fh_pid != os.getpid():  # forked worker: drop the parent's handle and cache
            self._fh, self._rg_cache, self._fh_pid = None, None, os.getpid()
        if self._rg_starts is None:
            if self._fh is None:
                self._fh = open(self.path, "rb")
            line = int(self._lines[i])
            self._fh.seek(self._offsets[line])
            return json.loads(self._fh.read(self._offsets[line + 1] - self._offsets[line]).decode("utf-8"))
        import pyarrow.parquet as pq  # optional (parquet inputs only) and slow to import
        g = int(np.searchsorted(self._rg_starts, i, side="right") - 1)  # row group holding row i
        if self._rg_cache is None or self._rg_cache[0] != g:
            self._rg_cache = (g, pq.ParquetFile(self.path).read_row_group(g).to_pylist())
        return self._rg_cache[1][i - int(self._rg_starts[g])]

    def __getitem__(self, i: int) -> dict:
        row = self._row(i)
        img = row.get(self.image_field)
        if isinstance(img, dict):  # HF Image feature {"bytes": ..., "path": ...}
            img = img.get("bytes") or img.get("path")  # bytes preferred when both are set
        if isinstance(img, str) and not os.path.isabs(img):
            img = str(self.image_root / img)  # relative paths: under image_root
        return {"index": i, "image": img, "caption": self._caption(row)}

    def collate(self, items: list[dict]) -> dict:
        """Decode + preprocess in the worker (vision.preprocess_images): broken images are dropped and counted
        (on_error="skip") or raise vision.ImageError naming the data file, the row and the image."""
        n_bad_caption = len(items)
        items = [it for it in items if isinstance(it["caption"], str) and it["caption"].strip()]
        n_bad_caption -= len(items)  # parquet rows are not pre-validated: a null / blank caption is dropped here
        if n_bad_caption and self.on_error == "raise":
            raise DataError(f"{self.path}: a row in this batch has no caption ({self.caption_field!r})")
        caps = [it["caption"] for it in items]
        names = [f"{self.path} row {it['index']} (image {it['image'] if isinstance(it['image'], str) else '<bytes>'})"
                 for it in items]
        images = [it["image"] if it["image"] is not None else b"" for it in items]  # None -> "not an image"
        pixel_values, kept, n_skipped = preprocess_images(images, size=self.image_size, on_error=self.on_error,
                                                          names=names)
        return {"pixel_values": pixel_values,                                   # (n, 3, S, S) float32
                "captions": [caps[k] for k in kept],
                "indices": torch.tensor([items[k]["index"] for k in kept], dtype=torch.long),  # (n,)
                "n_skipped": n_skipped + n_bad_caption}

    def loader(self, batch_size: int, *, seed: int = 0, shuffle: bool = True, num_workers: int = 0,
               drop_last: bool = True) -> Iterator[dict]:
        """Batches of decoded pairs; broken images are dropped (batches may be smaller) and summed into
        self.skips["broken_image"] in the main process."""
        gen = torch.Generator().manual_seed(seed)
        dl = torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                         num_workers=num_workers, collate_fn=self.collate, drop_last=drop_last)
        for batch in dl:
            if batch["n_skipped"]:
                self.skips["broken_image"] += batch["n_skipped"]
            yield batch

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fh"], d["_fh_pid"], d["_rg_cache"] = None, None, None  # handles cannot be pickled to spawned workers
        return d


class ImageBatches:
    """Stage 4 batches: this rank's share of a uniform random global batch of image-caption pairs. Global batch g =
    positions [k*B, (k+1)*B) of a seeded permutation of epoch e (g = e * steps_per_epoch + k), rank r takes
    positions [r*B//W, (r+1)*B//W): a pure function of (seed, g, rank), so `g` is the whole resume state (like
    TrainLoader). Images are decoded by ImageCaptionDataset.collate in DataLoader workers; broken images are dropped
    and counted (a rank's share may then be smaller, or empty: distributed.gather_global handles unequal shares). Every
    batch carries `n_forwards` = ceil(ceil(B / W) / micro_batch), the same on every rank whatever was dropped: the
    trainer splits the surviving pairs over that many forwards (the FSDP invariant, docs/train.md)."""

    def __init__(self, path: str | Path, tokenizer, global_batch: int, max_length: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, image_size: int = 384, num_workers: int = 2, micro_batch: int | None = None):
        if world_size <= 0 or global_batch < world_size:
            raise ValueError(f"global_batch ({global_batch}) must be at least world_size ({world_size})")
        self.ds = ImageCaptionDataset(path, image_size=image_size)
        self.tok, self.max_length, self.seed, self.num_workers = tokenizer, max_length, seed, num_workers
        self.rank, self.B = rank, global_batch
        self.lo, self.hi = rank * global_batch // world_size, (rank + 1) * global_batch // world_size  # my positions
        self.n_forwards = -(-(-(-global_batch // world_size)) // (micro_batch or global_batch))
        self.steps_per_epoch = len(self.ds) // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{path}: {len(self.ds)} usable pairs < global batch {global_batch}")
        self.g = 0  # next global batch index: the whole resume state
        self.skips: dict[str, int] = dict(self.ds.skips)  # bad rows of the index (the same on every rank)
        self.broken = 0  # images of THIS rank's shares that failed to decode (summed over ranks when logged)

    def state_dict(self) -> dict:
        return dict(g=self.g, broken=self.broken)

    def load_state_dict(self, s: dict):
        self.g, self.broken = int(s["g"]), int(s["broken"])

    def __len__(self):
        return 1 << 62

    def __getitem__(self, g: int) -> dict:  # runs in a DataLoader worker
        e, k = divmod(g, self.steps_per_epoch)
        perm = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
        share = perm[k * self.B:(k + 1) * self.B][self.lo:self.hi]
        return self.ds.collate([self.ds[int(i)] for i in share])  # pixel_values (n, 3, S, S), captions, n_skipped

    def __iter__(self):
        dl = torch.utils.data.DataLoader(self, batch_size=None, sampler=range(self.g, 1 << 62),
                                         num_workers=self.num_workers, collate_fn=_identity)
        for item in dl:
            self.g += 1  # after the batch arrived: resume continues after it
            self.broken += item["n_skipped"]
            ids, mask = self.tok(item["captions"], max_length=self.max_length)  # (n, T) in the main process
            yield dict(pixel_values=item["pixel_values"], input_ids=ids, attention_mask=mask,
                       n_tokens=int(mask.sum()), n_forwards=self.n_forwards)


# ==================================================================================================================
# CLI
# ==================================================================================================================

def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="materialise the training texts (sec. 3.2 recipe) as OUT/texts.jsonl")
    b.add_argument("--out", required=True, help="output folder (texts.jsonl, build.json)")
    b.add_argument("--data-dir", default=None,
                   help="shared data folder with text/passages.jsonl and text/short.jsonl "
                        "(default: $JASPER_DATA_DIR, else ../shared/data next to the repo)")
    b.add_argument("--passages", default=None, help="passage input (fineweb-edu role): file, folder, glob or "
                   "hf://HuggingFaceFW/fineweb-edu[/GLOB] (default: DATA_DIR/text/passages.jsonl)")
    b.add_argument("--short", default=None, help="short-text input (embedding-training-data role): file, folder, "
                   "glob or hf://sentence-transformers/embedding-training-data (default: DATA_DIR/text/short.jsonl)")
    b.add_argument("--n-texts", type=int, default=None, help="stop after N texts (default: until an input runs out)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--passage-ratio", type=float, default=0.8, help="share of passage texts (paper: 0.8)")
    b.add_argument("--split-ratio", type=float, default=0.3, help="share of passage documents split (paper: 0.3)")
    b.add_argument("--min-sentences", type=int, default=1)
    b.add_argument("--max-sentences", type=int, default=10)
    b.add_argument("--shuffle-ratio", type=float, default=0.0008, help="share of texts word-shuffled (paper: 0.0008)")
    b.add_argument("--field", default="text", help="text field of jsonl/parquet inputs")
    b.add_argument("--on-error", choices=ON_ERROR, default="skip", help="bad input: skip and count, or raise")
    b.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="longer documents are bad input")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        # every value checked before anything is read (errors: one line naming the flag, exit 2 via run_cli)
        check_args(args, dict(n_texts=dict(lo=1), seed=dict(lo=0), min_sentences=dict(lo=1), max_chars=dict(lo=1),
                              **{k: dict(kind="float", lo=0, hi=1) for k in ("passage_ratio", "split_ratio",
                                                                              "shuffle_ratio")}))
        if args.max_sentences < args.min_sentences:
            raise DataError(f"--max-sentences {args.max_sentences} < --min-sentences {args.min_sentences}")
        if Path(args.out).exists() and not Path(args.out).is_dir():  # before any input is read
            raise DataError(f"--out {args.out}: exists and is not a folder")
        meta = build(args.out, args.passages, args.short, n_texts=args.n_texts, seed=args.seed,
                     passage_ratio=args.passage_ratio, split_ratio=args.split_ratio,
                     min_sentences=args.min_sentences, max_sentences=args.max_sentences,
                     shuffle_ratio=args.shuffle_ratio, field=args.field, on_error=args.on_error,
                     max_chars=args.max_chars, data_dir=args.data_dir)
        print(json.dumps({"texts": meta["texts"], "n_texts": meta["n_texts"], **meta["stats"]}))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python data.py ...`: main() with the project's errors as one `error:` line and exit code 2 (errors.py)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
