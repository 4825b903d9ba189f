"""The teacher cache (arXiv 2412.19048, sec. 2.2 and 3.1): teacher vectors precomputed once for the materialised
training texts, so that training reads targets instead of running 9B parameters of teachers every step.

`build_cache` encodes every row of `texts.jsonl` (from `python data.py build`) with every teacher into float32
shards, resumable shard by shard and split across torchrun ranks; `TeacherCache` memory-maps them and returns the
combined targets normalize(concat(normalize(teacher_i))) for a batch's rows, refusing (CacheError naming the row,
teacher and file) anything that does not line up with the texts training asks for. The CLI is
`python teachers.py encode|verify` (teachers.py builds the teachers; this file never imports it). Layout and
manifest format: docs/teachers.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from checkpoints import atomic_write, progress, read_json
from errors import UserError
from data import text_hash
from readers import read_jsonl, read_texts


class CacheError(UserError, ValueError):
    """A teacher cache that does not match what is asked of it; the message names the row / teacher / file."""


def _json(obj) -> str:
    return json.dumps(obj, indent=1) + "\n"  # sidecars and manifest stay human-readable


# =====================================================================================================================
# Layout: row_hashes.bin (N x 8 bytes) + one folder per teacher of float32 shards with JSON sidecars + manifest.json
# =====================================================================================================================
CACHE_FORMAT = "jasper-teacher-cache"
CACHE_VERSION = 2  # 2: per-shard vector checksums (version 1 caches are still read; see verify_cache)
NORM_TOL = 1e-3  # a normalising teacher's stored vectors have norm 1 to ~1e-6 in fp32: 1e-3 leaves room
HASH_BYTES = 8  # data.text_hash: blake2b digest_size=8 -> 16 hex chars


def _hex_to_u8(hashes: Sequence[str]) -> np.ndarray:
    # 16 hex chars per row -> (N, 8) uint8: the exact bytes row_hashes.bin stores
    return np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8).reshape(len(hashes), HASH_BYTES)


def _block_hash(row_hashes_u8: np.ndarray) -> str:
    # blake2b-128 over a run of row digests: one shard's block hash, or the whole input's digest
    return hashlib.blake2b(np.ascontiguousarray(row_hashes_u8).tobytes(), digest_size=16).hexdigest()


def read_cache_input(path: str | os.PathLike, field: str = "text") -> tuple[list[str], list[str]]:
    """(texts, hashes) of the input. texts.jsonl from `data.py build`: `id` must equal the line's row number and a
    stored `hash` must equal text_hash(text) (else CacheError naming the line). Other inputs (.txt, parquet, ...)
    go through data.read_texts."""
    path = Path(path)
    texts: list[str] = []
    if path.suffix in (".jsonl", ".json"):
        for lineno, obj in read_jsonl(path, error=CacheError):
            row = len(texts)  # 0-based row = records read so far
            if "id" in obj and obj["id"] != row:
                raise CacheError(f"{path}:{lineno}: id {obj['id']!r} but this is row {row} (rows must be "
                                 "0..N-1 in file order, as written by `python data.py build`)")
            t = obj.get(field)
            if not isinstance(t, str):
                raise CacheError(f"{path}:{lineno}: no string field {field!r}")
            # the stored hash is the alignment key training checks later, so it must match the text itself
            if "hash" in obj and obj["hash"] != text_hash(t):
                raise CacheError(f"{path}:{lineno}: row {row}: stored hash {obj['hash']} != text_hash(text) "
                                 f"{text_hash(t)} (text edited after `data.py build`?)")
            texts.append(t)
    elif path.suffix == ".txt":
        # one text per line; empty lines stay rows so that row k is always line k+1
        texts = [ln.rstrip("\n") for ln in open(path, encoding="utf-8")]
    else:
        texts = list(read_texts(path, field=field))
    return texts, [text_hash(t) for t in texts]  # recomputed for every input kind


def _teacher_key(i: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)  # names may hold / or @: folder-safe
    return f"t{i}_{safe}"  # index prefix: unique even if two names sanitise alike


# =====================================================================================================================
# Building: shards of S rows, k % world_size == rank under torchrun; a shard counts only when complete
# =====================================================================================================================
def _start_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, started): joins the torchrun process group when there is one and nobody joined yet."""
    # torchrun sets RANK / WORLD_SIZE; a plain `python teachers.py encode` is rank 0 of 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"  # nccl needs a GPU per rank; gloo for CPU
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # else every rank would land on GPU 0
        dist.init_process_group(backend)
        started = True  # only the caller that joined leaves (build_cache's finally)
    return rank, world, started


def _write_row_hashes(out: Path, hashes_u8: np.ndarray) -> None:
    """row_hashes.bin, or refuse an output folder that was built from other texts (rank 0 only)."""
    hashes_file = out / "row_hashes.bin"
    # raw bytes compared: a changed, added, dropped or reordered text makes resuming here unsafe
    if hashes_file.is_file() and hashes_file.read_bytes() != hashes_u8.tobytes():
        old = np.fromfile(hashes_file, dtype=np.uint8)
        raise CacheError(f"{hashes_file}: this output folder was built from different texts "
                         f"({old.size // HASH_BYTES} rows vs {len(hashes_u8)} now, or changed rows); use a new --out")
    if not hashes_file.is_file():  # identical file already there (a resume): keep it
        atomic_write(hashes_file, hashes_u8.tobytes())


def _encode_shards(teacher, tdir: Path, texts: list[str], hashes_u8: np.ndarray, mine: list[int], want: dict,
                   batch_size: int, instruction: str | None, show_progress: bool, rank: int, world: int) -> None:
    """Encode this rank's unfinished shards of one teacher: data file then sidecar, each written atomically."""
    n, S = len(texts), want["shard_size"]  # S rows per shard; the last one may be shorter
    todo = []
    for k in mine:
        a, b = k * S, min(n, (k + 1) * S)  # shard k = rows [a, b)
        bh = _block_hash(hashes_u8[a:b])  # ties the shard to the exact texts it encodes
        if not _shard_finished(tdir, k, a, b, bh, want):  # raises on other texts/settings
            todo.append((k, a, b, bh))
    n_todo = sum(b - a for _, a, b, _ in todo)  # texts, not shards: the bar counts texts
    if show_progress:
        print(f"[cache] rank {rank}/{world} {teacher.name}: {len(mine) - len(todo)} of {len(mine)} shards "
              f"already finished, {n_todo} texts to encode", file=sys.stderr, flush=True)
    bar = progress(total=n_todo, desc=f"cache {teacher.name} rank {rank}", unit="texts", enabled=show_progress)
    for k, a, b, bh in todo:
        vec = teacher.encode(texts[a:b], batch_size=batch_size, instruction=instruction,
                             show_progress=False, on_batch=bar.update)  # (b-a, dim) normalised fp32
        if not torch.isfinite(vec).all():  # refuse before writing: a NaN shard would look finished
            bad = int((~torch.isfinite(vec).all(dim=1)).nonzero()[0]) + a
            raise CacheError(f"teacher {teacher.name}: non-finite vector for row {bad}")
        arr = np.ascontiguousarray(vec.numpy().astype("<f4"))  # explicit little-endian fp32: the on-disk format
        atomic_write(tdir / f"shard_{k:05d}.f32", arr.tobytes())  # data first; the sidecar marks it finished
        atomic_write(tdir / f"shard_{k:05d}.json", _json({**want, "rows": [a, b], "block_hash": bh,
                                                           "nbytes": arr.nbytes, "checksum": vector_checksum(arr)}))
    bar.close()


def build_cache(teachers: Sequence[Any], input_path: str | os.PathLike, out_dir: str | os.PathLike,
                batch_size: int = 32, shard_size: int = 16384, instruction: str | None = None,
                show_progress: bool = True, load: Callable[[str], Any] | None = None) -> Path:
    """Encode every text of `input_path` with every teacher into `out_dir`; returns the manifest path.

    `teachers` are teacher objects (teachers.py: `.name`, `.dim`, `.spec`, `.encode(texts, ...)`) or specs that
    `load(spec)` turns into one (teachers.load_teacher), loaded one at a time so only one teacher is in memory.
    Layout: `row_hashes.bin` (N x 8 bytes, the data.text_hash of each row), one folder per teacher with
    `shard_{k:05d}.f32` (rows [k*S, (k+1)*S) x dim, float32 little-endian, L2-normalised) and a sidecar
    `shard_{k:05d}.json` (rows, dim, teacher revision, block hash of the rows' text hashes). A shard counts as
    finished only when its sidecar exists, matches, and the data file has the exact size; both are written
    tmp + fsync + rename, data first, so a killed run never leaves a shard that looks finished. A rerun skips
    finished shards. Under torchrun each rank encodes shards k with k % world_size == rank; rank 0 writes
    manifest.json after a barrier (gloo on CPU, nccl on GPU).
    """
    out = Path(out_dir)
    rank, world, dist_started = _start_distributed()  # (0, 1, False) outside torchrun
    try:
        texts, hashes = read_cache_input(input_path)  # every rank reads all rows (block hashes)
        if not texts:
            raise CacheError(f"{input_path}: no texts")
        out.mkdir(parents=True, exist_ok=True)
        hashes_u8 = _hex_to_u8(hashes)  # (N, 8)
        if rank == 0:  # one writer for the shared files
            _write_row_hashes(out, hashes_u8)
        # round-robin ownership k % world == rank: no two ranks ever write the same shard file
        mine = [k for k in range((len(texts) + shard_size - 1) // shard_size) if k % world == rank]
        entries = []  # (index, folder key, light record) per teacher
        for ti, t_spec in enumerate(teachers):
            teacher = load(t_spec) if isinstance(t_spec, (str, os.PathLike)) else t_spec
            key = _teacher_key(ti, teacher.name)  # folder name, e.g. t0_<name>
            (out / key).mkdir(exist_ok=True)
            # everything that changes the vectors: a resumed shard must have been encoded with the same values
            want = {"teacher": teacher.name, "revision": teacher.spec.get("revision"), "dim": teacher.dim,
                    "instruction": instruction, "max_length": teacher.spec.get("max_length"),
                    "dtype": teacher.spec.get("dtype"), "shard_size": shard_size}
            _encode_shards(teacher, out / key, texts, hashes_u8, mine, want, batch_size, instruction, show_progress,
                           rank, world)
            # keep only what the manifest needs, so a teacher loaded here is freed before the next one loads
            entries.append((ti, key, SimpleNamespace(name=teacher.name, dim=teacher.dim, spec=teacher.spec,
                                                     normalize=bool(getattr(teacher, "normalize", True)))))
            del teacher  # drop our reference so its weights can be freed
        if world > 1:  # every rank's shards on disk before rank 0 checks them
            dist.barrier()
        manifest = out / "manifest.json"
        # manifest last: its presence marks the whole cache as built (TeacherCache refuses without it)
        if rank == 0:
            man = _make_manifest(out, input_path, texts, hashes_u8, shard_size, entries, instruction)
            atomic_write(manifest, _json(man))
            if show_progress:
                print(f"[cache] wrote {manifest}: {len(texts)} rows, teachers {[e[2].name for e in entries]}, "
                      f"dim {man['dim']}", file=sys.stderr, flush=True)
        if world > 1:  # no rank returns before the manifest exists
            dist.barrier()
        return manifest
    finally:
        if dist_started:  # leave the group only if we joined it; a caller may own it
            dist.destroy_process_group()


def vector_checksum(arr) -> str:
    """blake2b-128 of a shard's float32 bytes (recorded in its sidecar and the manifest; checked by verify_cache)."""
    return "blake2b-128:" + hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8).tobytes(),
                                            digest_size=16).hexdigest()


def bad_rows(vec: np.ndarray, normalized: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mask of rows that cannot be a teacher's output, their norms): non-finite values, a zero vector, or (for a
    normalising teacher) a norm off 1 by more than NORM_TOL. Catches overwritten, scaled and NaN shards."""
    with np.errstate(all="ignore"):  # NaN/inf rows are reported, not warned about
        norms = np.linalg.norm(vec.astype(np.float64), axis=1)  # (n,) in fp64
    bad = ~np.isfinite(norms) | ((np.abs(norms - 1) > NORM_TOL) if normalized else (norms == 0))
    return bad, norms


def vector_problem(vec: np.ndarray, normalized: bool, row0: int = 0) -> str | None:
    """What is wrong with (n, dim) stored vectors whose first row is row `row0`, in words; None when nothing."""
    bad, norms = bad_rows(vec, normalized)
    if not bad.any():
        return None
    i = int(np.argmax(bad))  # first bad row
    return (f"{int(bad.sum())} of {len(vec)} rows are not {'unit' if normalized else 'non-zero finite'} vectors "
            f"(first: row {row0 + i}, norm {norms[i]:.6g})")


def _shard_finished(tdir: Path, k: int, a: int, b: int, bh: str, want: dict) -> bool:
    side, data = tdir / f"shard_{k:05d}.json", tdir / f"shard_{k:05d}.f32"
    if not side.is_file() or not data.is_file():  # never written, or killed before its sidecar
        return False
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError:  # unreadable sidecar: encode the shard again
        return False
    if meta.get("rows") != [a, b] or meta.get("block_hash") != bh:  # refuse: never overwrite another input's shard
        raise CacheError(f"{side}: finished shard for rows {meta.get('rows')} with block hash "
                         f"{meta.get('block_hash')}, but rows [{a}, {b}) of the input now hash to {bh}: "
                         "the input changed since this folder was written; use a new --out")
    diff = {k2: (meta.get(k2), v) for k2, v in want.items() if meta.get(k2) != v}  # setting: (stored, now)
    if diff:
        raise CacheError(f"{side}: finished shard was encoded with different settings {diff} "
                         "(stored, now); use a new --out or the same settings")
    return data.stat().st_size == (b - a) * want["dim"] * 4  # exact size or redo (4 bytes per float32)


def _make_manifest(out: Path, input_path, texts, hashes_u8, shard_size, entries, instruction) -> dict:
    n = len(texts)
    teachers, offset = [], 0  # offset: a teacher's first column in the target
    for ti, key, t in entries:
        shards = []
        for k in range((n + shard_size - 1) // shard_size):
            a, b = k * shard_size, min(n, (k + 1) * shard_size)
            side = out / key / f"shard_{k:05d}.json"
            data = out / key / f"shard_{k:05d}.f32"
            # rank 0 checks every rank's shards: a rank that died must not yield a manifest
            if not side.is_file() or not data.is_file() or data.stat().st_size != (b - a) * t.dim * 4:
                raise CacheError(f"{data}: shard missing or incomplete after all ranks finished")
            meta = json.loads(side.read_text())
            if "checksum" not in meta:  # a shard finished before checksums were recorded: checked, then summed
                vec = np.fromfile(data, dtype="<f4").reshape(b - a, t.dim)
                why = vector_problem(vec, bool(getattr(t, "normalize", True)), a)
                if why:
                    raise CacheError(f"{data}: {why}; delete it and its .json sidecar, then rerun encode")
                meta["checksum"] = vector_checksum(vec)
            shards.append({"file": f"{key}/{data.name}", "rows": [a, b], "block_hash": meta["block_hash"],
                           "checksum": meta["checksum"]})
        teachers.append({"name": t.name, "key": key, "dim": t.dim, "offset": offset, "dtype": "float32",
                         "normalized": bool(getattr(t, "normalize", True)), "spec": t.spec, "shards": shards})
        offset += t.dim  # columns [offset, offset + dim) of the concatenated target
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "n_rows": n, "dim": offset,
        "order": [t["name"] for t in teachers],
        "combine": "targets = normalize(concat(normalize(teacher_i) for i in order)) (arXiv 2412.19048 sec. 2.2)",
        "instruction": instruction, "shard_size": shard_size,
        "input": {"path": str(Path(input_path).resolve()), "n_rows": n,
                  "row_hashes": {"file": "row_hashes.bin", "hash_fn": "data.text_hash (blake2b-64 of UTF-8)",
                                 "digest": _block_hash(hashes_u8)}},
        "teachers": teachers,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# =====================================================================================================================
# Reading: memory-mapped shards, every row checked by its text hash before its targets are returned
# =====================================================================================================================
class TeacherCache:
    """Read side of the cache: memory-maps the shards, checks everything against the manifest, returns targets."""

    def __init__(self, cache_dir: str | os.PathLike, check_shards: bool = True):
        self.dir = Path(cache_dir)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise CacheError(f"{mf}: no manifest (cache not built, or the build did not finish)")
        self.manifest = read_json(mf, "teacher cache manifest", error=CacheError)
        m = self.manifest
        if m.get("format") != CACHE_FORMAT or m.get("version") not in (1, CACHE_VERSION):
            raise CacheError(f"{mf}: not a {CACHE_FORMAT} v1-v{CACHE_VERSION} manifest")
        self.n_rows: int = int(m["n_rows"])  # N = rows of the texts; row id = index
        self.dim: int = int(m["dim"])  # sum of teacher dims, e.g. 4096 + 8192 = 12288 (sec. 2.2)
        self.teachers: list[str] = [t["name"] for t in m["teachers"]]  # manifest order = concat order
        if sum(t["dim"] for t in m["teachers"]) != self.dim:
            raise CacheError(f"{mf}: teacher dims {[t['dim'] for t in m['teachers']]} do not sum to dim {self.dim}")
        hf = self.dir / m["input"]["row_hashes"]["file"]
        if not hf.is_file() or hf.stat().st_size != self.n_rows * HASH_BYTES:  # N x 8 bytes
            size = hf.stat().st_size if hf.is_file() else None
            raise CacheError(f"{hf}: expected {self.n_rows * HASH_BYTES} bytes ({self.n_rows} rows), found {size}")
        self.row_hashes = np.fromfile(hf, dtype=np.uint8).reshape(self.n_rows, HASH_BYTES)  # (N, 8) uint8
        if _block_hash(self.row_hashes) != m["input"]["row_hashes"]["digest"]:
            raise CacheError(f"{hf}: content does not match the digest in {mf} (file modified)")
        self.shard_size = int(m["shard_size"])  # row r: shard r // S, local row r % S
        self._maps: list[list[np.memmap]] = []  # [teacher][shard] -> (rows, dim_t)
        for t in m["teachers"]:
            maps = []
            for s in t["shards"]:
                a, b = s["rows"]
                f = self.dir / s["file"]
                want = (b - a) * t["dim"] * 4  # bytes of float32
                have = f.stat().st_size if f.is_file() else None
                if have != want and not check_shards:  # verify_cache reports it with the others
                    maps.append(None)
                    continue
                if have != want:
                    raise CacheError(f"{f}: teacher {t['name']} rows [{a}, {b}): expected {want} bytes "
                                     f"({b - a} x {t['dim']} float32), found {have} (truncated or missing shard; "
                                     f"`python teachers.py verify --cache {self.dir} --input TEXTS --repair`, then "
                                     "rerun the encode command)")
                # block hash ties the shard to row_hashes.bin: shards of another build cannot be mixed in
                if _block_hash(self.row_hashes[a:b]) != s["block_hash"]:
                    raise CacheError(f"{f}: teacher {t['name']} rows [{a}, {b}) were encoded from texts whose "
                                     "hashes differ from row_hashes.bin")
                # read-only memory map: the OS pages in only the rows a batch touches
                maps.append(np.memmap(f, dtype="<f4", mode="r", shape=(b - a, t["dim"])))
            self._maps.append(maps)

    def check(self, teachers: Sequence[str] | None = None, n_rows: int | None = None, dim: int | None = None) -> None:
        """Refuse (CacheError) a cache whose teacher set/order, row count or dim is not what training asks."""
        mf = self.dir / "manifest.json"
        if teachers is not None:
            teachers = list(teachers)
            missing = [t for t in teachers if t not in self.teachers]
            if missing:
                raise CacheError(f"{mf}: teacher(s) {missing} missing from the cache (it has {self.teachers})")
            if teachers != self.teachers:  # order fixes the target's columns
                raise CacheError(f"{mf}: teachers {self.teachers} (in this order) but {teachers} asked")
        if n_rows is not None and int(n_rows) != self.n_rows:  # row ids index both
            raise CacheError(f"{mf}: cache has {self.n_rows} rows but the training texts have {n_rows}")
        if dim is not None and int(dim) != self.dim:
            raise CacheError(f"{mf}: cache dim {self.dim} ({'+'.join(str(t['dim']) for t in self.manifest['teachers'])})"
                             f" but the student head expects {dim}")

    def verify_texts(self, texts_path: str | os.PathLike) -> None:
        """Full alignment check against a texts.jsonl: same row count, and every row's text_hash equal."""
        _, hashes = read_cache_input(texts_path)
        self.check(n_rows=len(hashes))
        self._check_hashes(np.arange(self.n_rows), hashes, where=str(texts_path))

    def _check_hashes(self, rows: np.ndarray, hashes: Sequence[str], where: str = "") -> None:
        if len(hashes) != len(rows):
            raise CacheError(f"{len(hashes)} hashes for {len(rows)} rows")
        got = _hex_to_u8(list(hashes))  # (n, 8)
        bad = np.nonzero((got != self.row_hashes[rows]).any(axis=1))[0]
        if bad.size:
            i = int(bad[0])  # report the first, count the rest
            raise CacheError(
                f"{self.dir / 'row_hashes.bin'}: row {int(rows[i])}: the text asked for hashes to {hashes[i]} but the "
                f"cache was built from a text hashing to {self.row_hashes[rows[i]].tobytes().hex()} ({bad.size} of "
                f"{len(rows)} rows differ{', ' + where if where else ''}): texts changed or reordered since the cache "
                "was built")

    def targets(self, rows, hashes: Sequence[str] | None = None) -> Tensor:
        """(n, dim) float32: each teacher's vector re-normalised, concatenated in manifest order, normalised."""
        # batch row ids (Tensor, list or array; any order, repeats allowed) -> flat (n,) int64
        rows = np.asarray(rows.cpu().numpy() if isinstance(rows, Tensor) else rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            r = int(rows[(rows < 0) | (rows >= self.n_rows)][0])
            raise CacheError(f"{self.dir / 'manifest.json'}: row {r} out of range (cache has {self.n_rows} rows)")
        if hashes is not None:  # the batch's text hashes: catches reordered or edited texts
            self._check_hashes(rows, hashes)
        shard, local = rows // self.shard_size, rows % self.shard_size  # (n,) shard index, row within it
        parts = []
        for t, maps in zip(self.manifest["teachers"], self._maps):
            buf = np.empty((rows.size, t["dim"]), dtype=np.float32)  # (n, dim_t) fp32, copied out of the maps
            for s in np.unique(shard):  # one fancy-index read per shard touched
                sel = shard == s
                buf[sel] = maps[s][local[sel]]  # keeps the batch's row order
            bad, norms = bad_rows(buf, t.get("normalized", True))  # damaged shards never reach the losses
            if bad.any():
                i = int(np.argmax(bad))
                raise CacheError(f"{self.dir / t['shards'][int(shard[i])]['file']}: teacher {t['name']} row "
                                 f"{int(rows[i])} is not a {'unit' if t.get('normalized', True) else 'finite'} vector "
                                 f"(norm {norms[i]:.6g}): the shard is damaged; `python teachers.py verify --cache "
                                 f"{self.dir} --input TEXTS --repair` names and removes damaged shards")
            parts.append(F.normalize(torch.from_numpy(buf), dim=-1))  # normalize(teacher_i), also for normalize=false
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)  # (n, dim): normalize(concat(...)), sec. 2.2


# =====================================================================================================================
# Verifying: every shard's bytes against its recorded checksum, and its vectors for finiteness and norms
# =====================================================================================================================
def verify_cache(cache_dir: str | os.PathLike, texts_path: str | os.PathLike | None = None,
                 repair: bool = False) -> tuple[list[tuple[Path, str]], list[str]]:
    """([(damaged shard file, why)], [notes]) for a cache: each shard's size, checksum (manifest v2), finiteness and
    norms; with `texts_path`, every row's text hash (CacheError on a mismatch). `repair` deletes each damaged shard
    and its sidecar, so that rerunning the encode command that built the cache re-encodes those shards alone.

    A version 1 cache (built before checksums were recorded) is still checked for size, finiteness and norms, which
    catches overwritten, scaled, zeroed or NaN shards but not a flipped low bit; rerunning its encode command with
    the same flags records the checksums (no re-encoding)."""
    c = TeacherCache(cache_dir, check_shards=False)  # bad sizes listed below, not raised
    notes, damaged = [], []
    unsummed = sum("checksum" not in s for t in c.manifest["teachers"] for s in t["shards"])
    if unsummed:
        notes.append(f"{unsummed} shard(s) have no checksum in the manifest (cache built before checksums were "
                     "recorded): sizes, finiteness and norms checked, bit-level changes cannot be; rerun its encode "
                     "command to record them")
    for t in c.manifest["teachers"]:
        for s in t["shards"]:
            f, (a, b) = c.dir / s["file"], s["rows"]
            want = (b - a) * t["dim"] * 4
            have = f.stat().st_size if f.is_file() else None
            if have != want:  # missing or truncated: nothing to read
                damaged.append((f, "missing" if have is None else f"{have} bytes, {want} expected (truncated)"))
                continue
            vec = np.fromfile(f, dtype="<f4").reshape(b - a, t["dim"])  # the whole shard, read once
            # every reason at once: checksum mismatch (v2 manifests only) and/or non-unit / NaN rows
            why = [w for w in ("checksum mismatch (bytes changed since written)"
                               if s.get("checksum") and vector_checksum(vec) != s["checksum"] else None,
                               vector_problem(vec, t.get("normalized", True), a)) if w]
            if why:
                damaged.append((f, "; ".join(why)))
    if texts_path is not None:  # misaligned texts raise: no shard repair fixes them
        c.verify_texts(texts_path)
    if repair:  # sidecar too, so encode sees the shard unfinished
        for f, _ in damaged:
            f.unlink(missing_ok=True)
            f.with_suffix(".json").unlink(missing_ok=True)
    return damaged, notes
