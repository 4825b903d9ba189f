"""Checkpoints on disk: everything the project reads or writes as files, and nothing else.

Reading: safetensors checkpoints (one file or shards + index), strict key/shape loading into meta-built modules
(gpt-fast style: mmap + assign, no random init first), JSON files with one-line errors, and the sentence-transformers
`2_Dense_{D}` head folders of stella. Writing: `atomic_write` for single files and `atomic_dir` for whole folders
(the HF layout of an exported student), so a kill at any moment never leaves a half-written file behind. The export
folder is also a standard sentence-transformers / transformers model: its module files, checks and default head.
The other direction, reading any sentence-transformers folder's modules.json / Pooling / prompts into an `STLayout`,
lives here too (teachers.py builds its teachers from it), so both sides of that layout are in one place.
Folder layouts: docs/checkpoints.md, docs/teachers.md.

This is the bottom module of the project: every other file imports it and it imports no project file. That is why
the two small console helpers every stage needs (`progress` and `fmt_duration`) live at its end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from errors import DiskFullError, UserError, check_value, is_disk_full, os_error_in


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint loading: real safetensors files, strict key/shape checks, meta-device construction + assign.
# ---------------------------------------------------------------------------------------------------------------------
class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: the message names the file, key(s) and shapes involved."""


def resolve_checkpoint(src: str | os.PathLike) -> Path:
    """`src` is a local directory (used as is) or a hub id (downloaded with huggingface_hub when online)."""
    path = Path(src).expanduser()  # `~/models/x` works; a hub id such as org/name is not a folder here
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src}: expected a checkpoint directory, found a file")
    try:
        from huggingface_hub import snapshot_download  # only for hub ids (online); slow to import

        return Path(snapshot_download(str(src)))  # the local cache folder; a second call reuses it
    except Exception as e:  # offline, unknown repo, no permission, ...
        raise CheckpointError(
            f"{src!r} is not a local directory and could not be fetched from the hugging face hub "
            f"({type(e).__name__}: {e})") from e


def _safetensors_keys(file: Path) -> list[str]:
    if not file.is_file():
        raise CheckpointError(f"{file}: safetensors file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())  # header only: no tensor bytes are read
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _keys_by_file(ckpt_dir: Path) -> dict[str, list[str]]:
    """{file name: tensor names} of a checkpoint directory, read from the index (shards) or the single file's
    header; no tensor data is read."""
    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]  # {key: shard file}
        except Exception as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)  # grouped per shard: each file is opened once
        return by_file
    if single.is_file():
        return {single.name: _safetensors_keys(single)}
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json")


def checkpoint_keys(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tensor names of a checkpoint directory without reading any tensor data (to find a prefix first)."""
    return [k for keys in _keys_by_file(Path(ckpt_dir)).values() for k in keys]


def read_safetensors(ckpt_dir: str | os.PathLike, prefix_filter: str | Sequence[str] | None = None) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    `prefix_filter` (a prefix or several) keeps only matching keys; the others are never read from disk.
    A missing, truncated or corrupt file raises CheckpointError naming the file.
    """
    ckpt_dir = Path(ckpt_dir)
    prefixes = (prefix_filter,) if isinstance(prefix_filter, str) else tuple(prefix_filter or ())  # () keeps every key
    state: dict[str, Tensor] = {}
    for fname, keys in _keys_by_file(ckpt_dir).items():
        file = ckpt_dir / fname
        present = set(_safetensors_keys(file))  # also proves the header is readable
        absent = [k for k in keys if k not in present]  # an index out of step with its shards (a partial copy)
        if absent:
            raise CheckpointError(f"{file}: keys listed in model.safetensors.index.json but missing from the file: "
                                  f"{absent[:10]}")
        wanted = [k for k in keys if not prefixes or k.startswith(prefixes)]  # any prefix matches
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in wanted:  # memory-mapped: only the wanted tensors are read from disk
                    state[k] = f.get_tensor(k)
        except CheckpointError:
            raise  # already names the file: not wrapped twice
        except Exception as e:
            raise CheckpointError(f"{file}: failed reading tensor data (truncated or corrupt?): {e}") from e
    return state


def read_weights(ckpt: str | os.PathLike, prefix_filter: str | None = None) -> dict[str, Tensor]:
    """safetensors (single or sharded) via read_safetensors; a lone pytorch_model.bin (older sentence-transformers
    exports) as the fallback, read with weights_only=True so that the pickle can run no code."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file() or (ckpt / "model.safetensors.index.json").is_file():
        return read_safetensors(ckpt, prefix_filter)
    binf = ckpt / "pytorch_model.bin"
    if binf.is_file():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{binf}: unreadable ({e})") from e
        return {k: v for k, v in sd.items() if prefix_filter is None or k.startswith(prefix_filter)}
    raise CheckpointError(f"{ckpt}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def fmt_shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_state_strict(module: nn.Module, state: dict[str, Tensor], prefix: str = "", what: str = "") -> None:
    """Load the keys of `state` under `prefix` (stripped) into `module`, requiring exactly the module's keys.

    Missing keys, unexpected keys and shape mismatches raise CheckpointError listing them (with shapes). Tensors are
    cast to the dtype of the module's own parameter/buffer (build the module in the dtype you want, e.g. on meta) and
    loaded with assign=True, so a meta-device module gets real storage without a random init first. Non-persistent
    buffers (the RoPE frequencies) are rebuilt afterwards on the parameters' device.
    """
    what = what or type(module).__name__
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # prefix stripped
    own = module.state_dict()  # on meta: names, shapes, dtypes, no storage
    missing = [k for k in own if k not in sub]
    unexpected = [k for k in sub if k not in own]
    bad_shape = [k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)]  # all mismatches at once
    if missing or unexpected or bad_shape:
        lines = [f"cannot load {what} (key prefix {prefix!r}):"]
        if missing:
            # 20 names at most: a wrong prefix lists hundreds
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(
                f"{prefix}{k} {fmt_shape(own[k])}" for k in missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(
                f"{prefix}{k} {fmt_shape(sub[k])}" for k in unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if bad_shape:
            lines.append("  shape mismatch: " + ", ".join(
                f"{prefix}{k} checkpoint {fmt_shape(sub[k])} vs model {fmt_shape(own[k])}" for k in bad_shape[:20]))
        raise CheckpointError("\n".join(lines))
    # floats take the module's dtype (a bf16 build loads bf16); integer tensors keep theirs
    casted = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sub.items()}
    module.load_state_dict(casted, strict=True, assign=True)  # the tensors become the parameters: no copy into meta
    for m in module.modules():
        if hasattr(m, "reset_nonpersistent_buffers"):
            m.reset_nonpersistent_buffers()  # not in the state dict, so still meta after assign
    # anything left on meta would fail only at the first forward
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"cannot load {what}: tensors left without data after loading: {still_meta[:10]}")


def read_json(path: str | os.PathLike, what: str = "", error: type[Exception] = CheckpointError) -> dict:
    """A JSON file (config.json, a manifest, a --config file); a missing or malformed file raises `error` (the
    caller's own exception type) naming the file and, when given, `what` the file is for."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found{f' ({what})' if what else ''}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from e


def check_config_values(where: str, cfg: dict, limits: dict[str, dict]) -> None:
    """Type and range of the config.json keys in `limits` ({key: check_value keywords + kind}) that are present and
    not null: CheckpointError `FILE: KEY: expected an integer, got '32'` instead of a crash deep in a constructor."""
    for key, kw in limits.items():
        if cfg.get(key) is not None:
            kw = dict(kw)  # a copy: the pop below must not edit the caller's table
            why = check_value(cfg[key], kw.pop("kind", "int"), **kw)  # None when valid, else the reason in words
            if why:
                raise CheckpointError(f"{where}: {key}: {why}")


def read_config(cfg: dict | str | os.PathLike) -> tuple[str, dict]:
    """(where, config dict) of a config given as a dict, a config.json file or its directory; `where` names the
    file (or "config dict") for the caller's error messages."""
    if isinstance(cfg, dict):
        return "config dict", cfg
    p = Path(cfg)
    p = p / "config.json" if p.is_dir() else p  # the folder or the file itself
    return str(p), read_json(p)


# ---------------------------------------------------------------------------------------------------------------------
# sentence-transformers layout: stella ships its Matryoshka heads as `2_Dense_{D}/` folders beside the Qwen2 body
# (docs/checkpoints.md). The student copies FC2 / FC4 from them (docs/model.md); the stella teacher uses one.
# ---------------------------------------------------------------------------------------------------------------------
def read_dense_folder(folder: Path) -> tuple[Tensor, Tensor | None]:
    """A sentence-transformers Dense module folder (`2_Dense_{D}`): config.json + model.safetensors (or .bin)."""
    cfg = read_json(folder / "config.json")
    # no `activation_function` key means Tanh to sentence-transformers (its Dense default): refused like any
    # activation a plain linear head cannot hold
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if not act.endswith("Identity"):
        raise CheckpointError(f"{folder}/config.json: activation {act!r} is not supported (Identity only)")
    state = read_weights(folder)
    if "linear.weight" not in state:
        raise CheckpointError(f"{folder}: no 'linear.weight' key (found {sorted(state)[:6]})")
    w, b = state["linear.weight"], state.get("linear.bias")  # w (D, hidden); bias optional
    if tuple(w.shape) != (cfg["out_features"], cfg["in_features"]):
        raise CheckpointError(f"{folder}: linear.weight {fmt_shape(w)} does not match config "
                              f"({cfg['out_features']}, {cfg['in_features']})")
    return w, b


def stella_dense_folders(path: Path) -> dict[int, Path]:
    """{D: folder} for the `2_Dense_{D}` folders of a stella checkpoint (`2_Dense` alone is D = 1024 in stella)."""
    found: dict[int, Path] = {}
    for f in sorted(Path(path).glob("2_Dense*")):  # `2_Dense` sorts before `2_Dense_1024`: setdefault keeps it
        if not f.is_dir() or not (f / "config.json").is_file():
            continue
        found.setdefault(int(read_json(f / "config.json")["out_features"]), f)  # D from the config
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Writing: a file or a whole folder appears complete or not at all (a kill never leaves a short file).
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes | memoryview | str | Callable[[Path], None]) -> None:
    """Write `path` so that a kill at any moment leaves the old file or the complete new one, never a short one.

    The bytes (or text, utf-8; or whatever `data(tmp_path)` writes) go to a hidden sibling `.NAME.tmp<pid>`, are
    fsync'ed, then `os.replace`d over `path` (atomic on POSIX). A killed writer leaves at most a *.tmp* file; a
    full disk (ENOSPC) removes it and raises DiskFullError naming `path`, the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # same folder: the rename stays on one filesystem
    try:
        if callable(data):
            data(tmp)  # a writer that wants a path (save_file)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # bytes on disk before the rename, else a crash could publish an empty file
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(path, "the write was abandoned; the previous file is unchanged") from e
        raise
    finally:
        if tmp.exists():  # only after a failure: a successful replace consumed tmp
            tmp.unlink()


def atomic_dir(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a whole folder atomically: `fill(tmp)` writes into a hidden temporary sibling directory, which is then
    renamed over `out_dir` (the old folder, if any, is moved aside first and removed after). A kill leaves either
    the old folder or the new one complete, plus at most a hidden `.NAME.tmp-*` / `.NAME.old-*` sibling."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))  # sibling: atomic renames
    try:
        fill(tmp)
        make_readable(tmp)  # mkdtemp made it 0700 and safetensors writes 0600: a model folder is shared
        old = None
        if out_dir.exists():
            # a kill between the two renames below leaves only this copy
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)  # moved aside: a rename cannot replace a non-empty folder
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:  # Ctrl-C too: the tmp folder never stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(os_error_in(e)):  # the OSError may sit in the cause chain
            raise DiskFullError(out_dir, "the folder was abandoned (no partial copy left); any previous one is "
                                         "unchanged") from e
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# RNG streams as plain data: a training checkpoint's trainer state holds only tensors, numbers, strings, lists and
# dicts, so it loads with torch.load(weights_only=True) and a checkpoint folder from elsewhere cannot run code.
# ---------------------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG stream as tensors and plain numbers: the file then loads with torch.load(weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # MT19937: 624 uint32 words, position, gauss cache
    version, words, py_gauss = random.getstate()           # (3, 625 ints, None)
    s = dict(torch=torch.get_rng_state(),
             # numpy's uint32 words fit int64 exactly
             numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                        gauss=float(gauss)),
             python=dict(version=version, words=torch.tensor(words, dtype=torch.int64), gauss=py_gauss))
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()  # one state tensor per visible GPU
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    n, p = s["numpy"], s["python"]
    # the int64 words go back to numpy's uint32
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss"]))  # setstate wants a tuple
    if "cuda" in s and torch.cuda.is_available():  # a CPU-only resume skips the GPU streams
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Integrity of a written folder (a training checkpoint): size + blake2b of every file, recorded after the last write
# and checked before loading, so a truncated, missing or altered file is named instead of failing deep in a loader.
# ---------------------------------------------------------------------------------------------------------------------
CHECKSUMS = "checksums.json"


def file_digest(path: str | os.PathLike, digest_size: int = 16) -> str:
    """blake2b of a file's bytes, read in 16 MB pieces (about 1 GB/s: seconds for a checkpoint, once per save)."""
    h = hashlib.blake2b(digest_size=digest_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):  # 16 MiB: constant memory for multi-GB shards
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    files = {p.name: dict(size=p.stat().st_size, blake2b=file_digest(p))
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}  # top-level files; never itself
    atomic_write(folder / CHECKSUMS, json.dumps(files, indent=1) + "\n")


def folder_problem(folder: str | os.PathLike, required: Sequence[str] = (), hashes: bool = True) -> str | None:
    """Why `folder` is not intact, or None: a required file missing, or (when it holds checksums.json) a file
    missing, of another size or (hashes=True) with other bytes than recorded."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    for name in required:
        if not (folder / name).is_file():
            return f"{name} missing"
    if not (folder / CHECKSUMS).is_file():
        return None  # written before checksums were recorded: the loader's own checks decide
    try:
        want = json.loads((folder / CHECKSUMS).read_text())
    except json.JSONDecodeError:
        return f"{CHECKSUMS} unreadable"
    for name, w in want.items():
        f = folder / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != w["size"]:  # cheap test first: a truncated copy fails without hashing
            return f"{name} has {f.stat().st_size} bytes, {w['size']} were written"
        if hashes and file_digest(f) != w["blake2b"]:  # hashes=False: sizes only, no full read
            return f"{name} differs from what was written (checksum)"
    return None


def save_hf_checkpoint(out_dir: str | os.PathLike, config: dict, state: dict[str, Tensor], tokenizer=None,
                       max_shard_bytes: int = 5 * 1024**3, extra: Callable[[Path], None] | None = None) -> Path:
    """The Hugging Face layout, written atomically (atomic_dir): config.json, model.safetensors (or shards
    `model-0000K-of-0000N.safetensors` of at most `max_shard_bytes` + model.safetensors.index.json, the layout
    read_safetensors reads back) and, when a tokenizer is given, its tokenizer.json (`tokenizer.save(dir)`);
    `extra(dir)` writes more files into the folder before it appears (the sentence-transformers modules)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}  # save_file wants contiguous

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))  # atomic_dir publishes it
        shards: list[dict[str, Tensor]] = [{}]
        size = 0
        for k, v in state.items():  # greedy, in key order: a shard closes when the next tensor would overflow it
            nbytes = v.numel() * v.element_size()
            # `shards[-1] and`: a tensor over the limit gets a shard of its own
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, sh in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"  # the transformers shard names, 1-based
                save_file(sh, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in sh})
            total = sum(v.numel() * v.element_size() for v in state.values())  # headers excluded
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)

    return atomic_dir(out_dir, fill)


# ---------------------------------------------------------------------------------------------------------------------
# The export folder is also a standard sentence-transformers / transformers model (docs/checkpoints.md "The export
# folder"): config.json is the body's qwen2 config (+ our `jasper` block), model.safetensors JasperModel's state dict,
# and the sentence-transformers modules (mean pooling, one Dense per head, Normalize) sit beside them.
# ---------------------------------------------------------------------------------------------------------------------
# Module type names as every sentence-transformers release since 2.x resolves them (6.x maps these old names to its
# own classes), so the folder also loads in the older versions servers pin.
ST_TYPES = {"Transformer": "sentence_transformers.models.Transformer",
            "Pooling": "sentence_transformers.models.Pooling",
            "Dense": "sentence_transformers.models.Dense",
            "Normalize": "sentence_transformers.models.Normalize"}
IDENTITY = "torch.nn.modules.linear.Identity"  # written explicitly: a Dense config without it gets Tanh
POOLING_DIR, NORMALIZE_DIR = "1_Pooling", "3_Normalize"


def dense_dir(D: int) -> str:
    return f"2_Dense_{D}"


# The documented default for a task the paper's table does not list: the prompt MTEB's own wrapper for the released
# Jasper sends (task metadata `prompt`, else the abstask default prompt). On the mteb path it is read from mteb's
# metadata; this table mirrors it for the local tasks so the built-in path needs no mteb import (a test checks it).
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


def standard_prompts() -> dict[str, str]:
    """The prompts an export stores when the model has none of its own: the instructions below under the names mteb
    resolves (task, task-side, task type, `query` / `document`), each as TextTokenizer.format puts it in front."""
    p: dict[str, str] = {}
    for task, pr in ORIGINAL_PROMPTS.items():
        if isinstance(pr, dict):  # per side: "SciFact-query"
            p.update({f"{task}-{side}": instruction_prompt(i) for side, i in pr.items()})
        else:
            p[task] = instruction_prompt(pr)
    for task_type, i in TYPE_DEFAULT_PROMPTS.items():  # symmetric types get it on every text; retrieval on queries
        p[f"{task_type}-query" if task_type == "Retrieval" else task_type] = instruction_prompt(i)
    p["query"] = instruction_prompt(TYPE_DEFAULT_PROMPTS["Retrieval"])
    p["document"] = ""  # documents are encoded as they are
    return p


def instruction_prompt(instruction: str) -> str:
    """The text TextTokenizer.format puts in front of a query, as a sentence-transformers prompt."""
    return f"Instruct: {instruction}\nQuery: "


def body_config(text_hf: dict, jasper: dict, dtype: torch.dtype) -> dict:
    """config.json: the body's transformers config (AutoModel builds Qwen2Model from it) + our `jasper` block.

    `is_causal: false` makes transformers (>= 5.2) run the decoder bidirectionally, as model.py does; without it the
    body is causal and the vectors are wrong by ~0.16. The `jasper` block (heads, image tokens, vision config) is
    ignored by transformers and read by JasperConfig.from_hf. A BERT body's config is written as it is (BERT is
    bidirectional by construction)."""
    cfg = {k: v for k, v in text_hf.items() if k != "causal"}  # `causal` becomes `is_causal` below
    if cfg.get("model_type") != "bert":
        cfg["is_causal"] = bool(text_hf.get("causal", text_hf.get("is_causal", False)))  # default: bidirectional
    cfg["dtype"] = str(dtype).removeprefix("torch.")  # 'bfloat16', not 'torch.bfloat16'
    cfg["jasper"] = jasper
    return cfg


def _json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def write_st_modules(out: Path, hidden: int, heads: dict[int, tuple[Tensor, Tensor | None]], default_head: int,
                     max_seq_length: int, prompts: dict[str, str], tokenizer_type: str | None = None,
                     pad_token: str | None = None, pooling: str = "mean", do_lower_case: bool | None = None) -> None:
    """The sentence-transformers files of the folder `out` (config.json, weights and tokenizer.json are the caller's).

    modules.json: Transformer (the folder itself) -> mean pooling over every real token, prompt included (as
    JasperModel.pool) -> the default head's Dense -> Normalize. One `2_Dense_{D}` per head, with an explicit Identity
    activation (a Dense config without one gets Tanh). `tokenizer_type` "bert" for a WordPiece tokenizer.json:
    transformers 5 builds a Qwen2Tokenizer for any qwen2 config unless told (sentence_bert_config.json's
    tokenizer_args is passed to AutoTokenizer). `pooling` "cls" for a BERT student that pools [CLS];
    `do_lower_case`: the WordPiece normaliser's own setting, stated in tokenizer_config.json so transformers' BERT
    tokenizer does not apply its own default (lowercase) over a cased vocabulary."""
    if default_head not in heads:
        raise CheckpointError(f"default head {default_head} is not one of the model's heads {sorted(heads)}")
    for D, (w, b) in heads.items():
        d = out / dense_dir(D)
        d.mkdir(parents=True, exist_ok=True)
        _json(d / "config.json", {"in_features": int(w.shape[1]), "out_features": int(w.shape[0]),
                                  "bias": b is not None, "activation_function": IDENTITY})
        state = {"linear.weight": w.detach().to("cpu").contiguous()}  # (D, hidden): nn.Linear's layout
        if b is not None:
            state["linear.bias"] = b.detach().to("cpu").contiguous()
        # s=state binds this head's dict at definition time
        atomic_write(d / "model.safetensors", lambda p, s=state: save_file(s, str(p), metadata={"format": "pt"}))
    (out / POOLING_DIR).mkdir(exist_ok=True)
    # mean over every real token, instruction included (include_prompt), as JasperModel.pool; or the first ([CLS])
    _json(out / POOLING_DIR / "config.json", {
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
    (out / NORMALIZE_DIR).mkdir(exist_ok=True)
    write_modules_json(out, default_head)
    sbert = {"max_seq_length": int(max_seq_length), "do_lower_case": False}
    if tokenizer_type:
        sbert["tokenizer_args"] = {"tokenizer_type": tokenizer_type}
    _json(out / "sentence_bert_config.json", sbert)
    # prompts: name -> instruction_prompt text; none is applied unless asked for
    _json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": dict(prompts), "default_prompt_name": None,
        "similarity_fn_name": "cosine"})
    tok_cfg = {"model_max_length": int(max_seq_length), "padding_side": "right"}
    if pad_token:
        tok_cfg["pad_token"] = pad_token
    if do_lower_case is not None:
        tok_cfg["do_lower_case"] = do_lower_case
    _json(out / "tokenizer_config.json", tok_cfg)


def save_export(out_dir: str | os.PathLike, config: dict, state: dict[str, Tensor], tokenizer, head_dims: Sequence[int],
                hidden: int, max_length: int, prompts: dict[str, str] | None, default_head: int | None = None,
                max_shard_bytes: int = 5 * 1024**3, pooling: str = "mean") -> Path:
    """The export folder of a student (JasperModel.save_pretrained's files; docs/checkpoints.md "The export folder"):
    the Hugging Face layout of `config` + `state` (keys `vector_linear_{D}.*` hold the heads) and, with a tokenizer,
    the sentence-transformers modules and the README.md model card (model_card.py) beside it, all published at once
    by atomic_dir.

    `default_head` (default: the largest, FC1) is checked before anything is written; so is `out_dir`, which must be
    absent, empty or a previous export (check_out_dir). Without a tokenizer the folder is still ours (from_pretrained
    reads it) but not a sentence-transformers model, and a warning says so."""
    default_head = max(head_dims) if default_head is None else int(default_head)
    if default_head not in head_dims:  # refused before anything is written
        raise CheckpointError(f"default head {default_head} is not one of the model's heads {sorted(head_dims)}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if tokenizer is None:
        warnings.warn(f"{out_dir}: saved without a tokenizer: JasperModel.from_pretrained reads it, "
                      f"sentence-transformers cannot (no tokenizer.json, no modules.json)")
        return save_hf_checkpoint(out_dir, config, state, None, max_shard_bytes=max_shard_bytes)
    # {D: (weight (D, hidden), bias (D,))}: every head gets its own 2_Dense_{D}; the default one is in modules.json
    heads = {D: (state[f"vector_linear_{D}.weight"], state.get(f"vector_linear_{D}.bias")) for D in head_dims}
    # a WordPiece tokenizer.json (a BERT-vocabulary student) must say so, or transformers builds a Qwen2 one for it
    wordpiece = type(tokenizer.tok.model).__name__ == "WordPiece"
    pad_token = tokenizer.tok.id_to_token(tokenizer.pad_id)
    norm = json.loads(tokenizer.tok.to_str()).get("normalizer") or {}
    lower = bool(norm.get("lowercase")) if norm.get("type") == "BertNormalizer" else None

    def st_modules(tmp: Path) -> None:  # runs inside atomic_dir's temporary folder, before it is published
        write_st_modules(tmp, hidden, heads, default_head, max_length, prompts,
                         tokenizer_type="bert" if wordpiece else None, pad_token=pad_token, pooling=pooling,
                         do_lower_case=lower if wordpiece else None)
        from model_card import write_card  # the card reads the files above (and the run folder beside out_dir)
        write_card(tmp, origin=out_dir)
    return save_hf_checkpoint(out_dir, config, state, tokenizer, max_shard_bytes=max_shard_bytes, extra=st_modules)


def write_modules_json(out: Path, default_head: int) -> None:
    _json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": ST_TYPES["Transformer"]},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": ST_TYPES["Pooling"]},
        {"idx": 2, "name": "2", "path": dense_dir(default_head), "type": ST_TYPES["Dense"]},
        {"idx": 3, "name": "3", "path": NORMALIZE_DIR, "type": ST_TYPES["Normalize"]}])


def set_default_head(folder: str | os.PathLike, D: int) -> Path:
    """Make head D the one sentence-transformers returns (rewrites modules.json; the weights are untouched)."""
    folder = Path(folder)
    check_standard_folder(folder)  # only a complete export is edited
    heads = standard_heads(folder)
    if D not in heads:
        raise CheckpointError(f"{folder / dense_dir(D)}: no such head folder; this export has heads {sorted(heads)}")
    write_modules_json(folder, D)
    from model_card import write_card  # the card names the default head; its scores were another head's: rerun
    write_card(folder)                 # eval.py --update-card for the new one
    make_readable(folder)
    return folder


def standard_heads(folder: Path) -> list[int]:
    # largest D first; a bare `2_Dense` (stella's) is skipped
    return sorted((int(p.name.rsplit("_", 1)[1]) for p in folder.glob("2_Dense_*")
                   if p.is_dir() and p.name.rsplit("_", 1)[1].isdigit()), reverse=True)


def check_standard_folder(folder: str | os.PathLike, weights: bool = False) -> int:
    """Verify the sentence-transformers / transformers side of an export; returns the default head.

    Catches the silent traps: no modules.json (sentence-transformers would mean-pool with no head and no
    normalisation), a Dense config without activation_function (it would apply Tanh), a causal or missing
    is_causal body config (transformers would run the decoder causally), a WordPiece tokenizer in a decoder folder
    without tokenizer_type "bert" (transformers would tokenize by characters). `weights`: also every head of the
    `jasper` block has its `2_Dense_{D}`, equal to `vector_linear_{D}` of model.safetensors."""
    folder = Path(folder)
    for name in ("config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", f"{POOLING_DIR}/config.json"):
        if not (folder / name).is_file():
            why = {"modules.json": " (without it sentence-transformers silently mean-pools with no head and no "
                                   "normalisation)"}.get(name, "")
            raise CheckpointError(f"{folder / name}: file not found{why}")
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") not in ("qwen2", "qwen3", "mistral", "bert"):
        raise CheckpointError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r}: transformers' "
                              f"AutoModel needs the body's own type (qwen2, qwen3, mistral or bert)")
    if cfg.get("model_type") != "bert" and cfg.get("is_causal") is not False:
        raise CheckpointError(f"{folder / 'config.json'}: 'is_causal' must be false (transformers would run the "
                              f"body causally)")
    if cfg.get("model_type") != "bert" and (read_json(folder / "tokenizer.json").get("model") or {}).get(
            "type") == "WordPiece":  # a BERT vocabulary on a decoder body (the demo's student)
        sbert = read_json(folder / "sentence_bert_config.json")
        if (sbert.get("tokenizer_args") or {}).get("tokenizer_type") != "bert":
            raise CheckpointError(
                f"{folder / 'sentence_bert_config.json'}: a WordPiece tokenizer.json in a {cfg.get('model_type')} "
                f"folder needs \"tokenizer_args\": {{\"tokenizer_type\": \"bert\"}} (without it transformers >= 5 "
                f"builds a {cfg.get('model_type')} tokenizer that splits words into characters; "
                f"sentence-transformers' own save() drops the setting)")
    mods = read_json(folder / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in mods]  # class name only: old and new module paths both match
    if kinds != ["Transformer", "Pooling", "Dense", "Normalize"] or mods[0].get("path") != "":
        raise CheckpointError(f"{folder / 'modules.json'}: expected Transformer (path '') -> Pooling -> Dense -> "
                              f"Normalize, found {kinds}")
    pool = read_json(folder / POOLING_DIR / "config.json")
    want = (cfg.get("jasper") or {}).get("pooling", "mean")  # the student's own: mean, or cls (a BERT student)
    modes, include_prompt, _ = read_pooling_config(folder / POOLING_DIR / "config.json")
    if modes != (want,) or include_prompt is not True:
        raise CheckpointError(f"{folder / POOLING_DIR / 'config.json'}: expected {want} pooling over all tokens "
                              f"(include_prompt true) as config.json's jasper block says, found {pool}")
    hidden = cfg.get("hidden_size")
    default = None
    for D in standard_heads(folder):
        d = folder / dense_dir(D)
        dc = read_json(d / "config.json")
        if dc.get("activation_function") != IDENTITY:
            raise CheckpointError(f"{d / 'config.json'}: activation_function is {dc.get('activation_function')!r}, "
                                  f"expected {IDENTITY!r} (a Dense config without one gets Tanh)")
        if (dc.get("in_features"), dc.get("out_features")) != (hidden, D):  # (hidden,) -> (D,)
            raise CheckpointError(f"{d / 'config.json'}: in/out_features {dc.get('in_features')}/"
                                  f"{dc.get('out_features')}, expected {hidden}/{D}")
        if not (d / "model.safetensors").is_file():
            raise CheckpointError(f"{d / 'model.safetensors'}: file not found")
        if mods[2].get("path") == d.name:  # the head modules.json points at
            default = D
    if default is None:
        raise CheckpointError(f"{folder / 'modules.json'}: Dense path {mods[2].get('path')!r} is not a 2_Dense_{{D}} "
                              f"folder of this export")
    if weights:
        state = read_safetensors(folder, prefix_filter="vector_linear_")  # only the head tensors are read
        for D in (cfg.get("jasper") or {}).get("head_dims", []):  # heads of the jasper block only
            w, b = read_dense_folder(folder / dense_dir(D))
            if not (torch.equal(w, state[f"vector_linear_{D}.weight"]) and  # bit-equal: both copies of one tensor
                    torch.equal(b, state[f"vector_linear_{D}.bias"])):
                raise CheckpointError(f"{folder / dense_dir(D) / 'model.safetensors'}: differs from "
                                      f"vector_linear_{D} in model.safetensors")
    return default


def is_export(folder: Path) -> bool:
    """A folder this project wrote: config.json with our `jasper` block (this layout) or model_type jasper (before)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("jasper" in cfg or cfg.get("model_type") == "jasper")


def check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty folder that is not a previous export (a typo must not delete a user's files)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        first = sorted(p.name for p in out.iterdir())[:5]
        raise CheckpointError(f"{out}: not empty and not a previous export (no config.json of this project; "
                              f"found {first}); refusing to replace it")


def make_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 (minus the umask): mkdtemp makes 0700 folders and safetensors 0600 files."""
    umask = os.umask(0)  # umask() sets as it reads: set 0, then restore
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):  # chmod would follow the link out of the folder
                os.chmod(p, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------------------------------
# Reading any sentence-transformers folder (the teachers' side of the layout written above): modules.json ->
# Transformer (the body folder) -> Pooling -> Dense* -> Normalize, with the prompts and sentence_bert_config.json, read
# from the files sentence-transformers itself writes so a teacher's vectors equal that library's (docs/teachers.md).
# JSON only, no weights: teachers.py builds the modules from an STLayout. Errors name the file and the module.
# ---------------------------------------------------------------------------------------------------------------------
# Pooling as sentence-transformers' Pooling module defines it (the `pooling_mode` of a `1_Pooling/config.json`); the
# pooling itself is model.pool_tokens, which imports these names from here.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
_LEGACY_POOLING_KEYS = {  # 1_Pooling/config.json written before sentence-transformers 5.x, in the library's order
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class STLayout:
    """What a sentence-transformers folder asks for, read from its JSON files (no weights)."""
    body_dir: Path                                  # the Transformer module's folder (path "" = the folder itself)
    pooling: tuple[str, ...] = ("mean",)            # POOLING_MODES, concatenated in order
    include_prompt: bool = True                     # False: prompt tokens are left out of the pooling
    pool_dim: int | None = None                     # Pooling `embedding_dimension` (= the body's hidden size)
    steps: list = field(default_factory=list)       # after pooling, in order: ("dense", dir) | ("normalize",)
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    do_lower_case: bool = False
    # sentence-transformers >= 6 `message` modality: texts go through the chat template (chat_template.py)
    message_format: str | None = None               # None: plain text; else "flat" | "structured" | "auto"
    chat_template_kwargs: dict = field(default_factory=dict)  # processing_kwargs' chat_template bucket
    modules: list = field(default_factory=list)     # the module types, for the spec


def read_pooling_config(file: Path,
                        error: type[Exception] = CheckpointError) -> tuple[tuple[str, ...], bool, int | None]:
    """(modes, include_prompt, embedding_dimension) of a `1_Pooling/config.json`, new (`pooling_mode`) or legacy
    (`pooling_mode_*` booleans; none set means mean, as sentence-transformers reads it) format."""
    pc = read_json(file, "sentence-transformers Pooling config", error=error)
    if "pooling_mode" in pc:
        modes = pc["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for k, mode in _LEGACY_POOLING_KEYS.items() if pc.get(k)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise error(f"{file}: pooling mode(s) {bad} not supported ({list(POOLING_MODES)})")
    dim = pc.get("embedding_dimension", pc.get("word_embedding_dimension"))  # either name of the field
    return modes, bool(pc.get("include_prompt", True)), dim


def _read_message_modality(lay: STLayout, s: dict, sbc: Path, error: type[Exception]) -> None:
    """The `message` entry of modality_config (sentence-transformers >= 6) and the processing_kwargs that shape the
    chat-template path; a processing setting this reader does not apply is refused, naming the key."""
    msg = (s.get("modality_config") or {}).get("message")
    if msg is None:
        return
    lay.message_format = str(msg.get("format", "auto")) if isinstance(msg, dict) else "auto"
    pk = s.get("processing_kwargs") or {}
    lay.chat_template_kwargs = dict(pk.get("chat_template") or {})
    for bucket in ("text", "common"):  # max_length may ride in any bucket (sentence-transformers: chat wins)
        if "max_length" in (pk.get(bucket) or {}):
            lay.chat_template_kwargs.setdefault("max_length", pk[bucket]["max_length"])
    other = {f"{b}.{k}" for b, kw in pk.items() if b != "chat_template" for k in (kw or {}) if k != "max_length"}
    if other:
        raise error(f"{sbc}: processing_kwargs {sorted(other)} not supported for the message modality (supported: "
                    "the chat_template bucket, max_length)")


def read_st_layout(ckpt: Path, error: type[Exception] = CheckpointError) -> STLayout:
    """Parse modules.json (+ sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/config.json).

    A folder without modules.json is read as sentence-transformers reads it: the Transformer alone + mean pooling,
    no Dense, no Normalize. A module type other than Transformer / Pooling / Dense / Normalize is refused, naming
    the module and the file. `error`: the exception class raised (teachers.py passes its TeacherError).
    """
    mf = ckpt / "modules.json"
    lay = STLayout(body_dir=ckpt)
    if not mf.is_file():
        lay.modules = ["Transformer (no modules.json: sentence-transformers' fallback)", "Pooling(mean)"]
    else:
        mods = read_json(mf, "sentence-transformers modules", error=error)
        if not isinstance(mods, list) or not mods:
            raise error(f"{mf}: expected a non-empty list of modules")
        seen_pool = False
        for i, m in enumerate(mods):
            typ = str(m.get("type", ""))
            kind = typ.rsplit(".", 1)[-1]
            where = f"{mf}: module {m.get('idx', i)} {m.get('name', '')!r} ({typ}, path {m.get('path', '')!r})"
            if kind not in ST_MODULES:
                raise error(f"{where}: module type not supported (supported: {', '.join(ST_MODULES)})")
            folder = ckpt / m.get("path", "")
            if (i == 0) != (kind == "Transformer"):
                raise error(f"{where}: the Transformer must be the first module and appear once")
            if kind == "Transformer":
                lay.body_dir = folder
            elif kind == "Pooling":
                if seen_pool:
                    raise error(f"{where}: a second Pooling module is not supported")
                seen_pool = True
                lay.pooling, lay.include_prompt, lay.pool_dim = read_pooling_config(folder / "config.json", error)
            elif not seen_pool:
                raise error(f"{where}: {kind} before any Pooling module (token-level heads are not supported)")
            else:
                lay.steps.append(("dense", folder) if kind == "Dense" else ("normalize",))
            lay.modules.append(kind)
        if not seen_pool:
            raise error(f"{mf}: no Pooling module (a token-level model, not a sentence embedder)")
    sbc = lay.body_dir / "sentence_bert_config.json"
    if not sbc.is_file():
        sbc = ckpt / "sentence_bert_config.json"
    if sbc.is_file():
        s = read_json(sbc, error=error)
        lay.max_seq_length, lay.do_lower_case = s.get("max_seq_length"), bool(s.get("do_lower_case", False))
        _read_message_modality(lay, s, sbc, error)
    cst = ckpt / "config_sentence_transformers.json"
    if cst.is_file():
        c = read_json(cst, error=error)
        lay.prompts = {k: v for k, v in (c.get("prompts") or {}).items() if isinstance(v, str)}
        lay.default_prompt_name = c.get("default_prompt_name")
        if lay.default_prompt_name and lay.default_prompt_name not in lay.prompts:
            raise error(f"{cst}: default_prompt_name {lay.default_prompt_name!r} is not among the prompts "
                        f"{sorted(lay.prompts)}")
    return lay


# ---------------------------------------------------------------------------------------------------------------------
# Console helpers. They sit in this bottom module only because every stage (data build, teacher cache, encoding,
# training, the demo) needs them and any other home would make an import circle.
# ---------------------------------------------------------------------------------------------------------------------
LOG_FILE_INTERVAL_S = 30.0  # a progress line every 30 s when stderr is a log file, not a terminal


class _LineWriter:
    """stderr for tqdm when it is not a terminal: each refresh becomes one newline-terminated line (tqdm redraws
    with carriage returns, which turn a log file into one endless line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.strip("\r\n ")  # tqdm's \r redraws and padding
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr with count, rate and ETA: `for x in progress(xs, desc=...)` or `bar = progress(total=n)`
    then `bar.update(k)` and `bar.close()`. On a terminal it redraws in place; in a log file it writes one line
    every LOG_FILE_INTERVAL_S seconds (and a last one when done)."""
    from tqdm import tqdm  # requirements.txt; imported on first use, `import checkpoints` stays light

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, unit_scale=False,
                file=sys.stderr if tty else _LineWriter(sys.stderr), mininterval=0.1 if tty else LOG_FILE_INTERVAL_S,
                maxinterval=LOG_FILE_INTERVAL_S * 2, dynamic_ncols=tty, ncols=None if tty else 100)


def fmt_duration(s: float) -> str:
    """12s, 3m05s, 1h02m."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")
