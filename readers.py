"""Readers of raw training text (arXiv 2412.19048, sec. 3.2's sources) and the one jsonl line parser of the project.

Texts stream out of jsonl / jsonl.gz / parquet / txt files, folders, globs and hub datasets as `Record`s (text,
source, file, line), never holding a corpus in memory. Bad input follows one policy everywhere (`on_error`): "skip"
counts it by kind (malformed_json, missing_field, empty_text, invalid_utf8, too_long), "raise" raises `DataError`
naming file:line. Every jsonl file the project reads (texts, captions, eval tasks, the teacher cache input) goes
through `parse_jsonl_line`: `read_jsonl` for files whose every row must be good, `scan_jsonl` for the byte-offset
index of data.TrainLoader and ImageCaptionDataset.

data.py re-exports the public names (`data.read_texts`, `data.read_jsonl`, `data.DataError`, ...): this file was its
first section until data.py outgrew one reading (docs/data.md).
"""
from __future__ import annotations

import glob as globlib
import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from errors import UserError



class DataError(UserError, ValueError):
    """Bad input under on_error="raise", or an unusable source; the message names the file and line (or row)."""


ON_ERROR = ("skip", "raise")  # bad-input policy of every reader: count and go on, or stop at file:line
DEFAULT_MAX_CHARS = 100_000  # a "huge document" cap: fineweb-edu documents above it are rare, and only the first
                             # 512 tokens (~2-3k chars) of any text are used; it also bounds the memory of one line.
# what a folder spec picks up (expand_paths); .json.gz is read as JSON lines
TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".txt", ".txt.gz")

# Hub datasets of the paper (sec. 3.2) -> (default file glob inside the repo, field). field "*" = every string in a
# row is a text (embedding-training-data rows are lists like [query, positive] or dicts of lists).
HUB_PRESETS = {
    "HuggingFaceFW/fineweb-edu": ("sample/10BT/*.parquet", "text"),
    "sentence-transformers/embedding-training-data": ("*.jsonl.gz", "*"),
}


@dataclass
class Record:
    """One text out of a reader, with where it came from (file and 1-based line / row) for error messages."""
    text: str
    source: str
    file: str
    line: int


def check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR:  # a programming error (ValueError), not bad data (DataError)
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _bad(kind: str, where: str, detail: str, on_error: str, skips: Counter | None) -> None:
    """Apply the bad-input policy: raise DataError naming file:line, or count the skip under `kind`."""
    if on_error == "raise":
        raise DataError(f"{where}: {kind.replace('_', ' ')}: {detail}")
    if skips is not None:
        skips[kind] += 1


def _is_hub_spec(spec: str) -> bool:
    # a local folder named like a preset id (ORG/NAME) wins over the hub
    return spec.startswith("hf://") or (spec in HUB_PRESETS and not os.path.exists(spec))


def _hub_files(spec: str) -> tuple[list[str], str | None]:
    """hf://[datasets/]ORG/NAME[/GLOB] or a preset id -> (HfFileSystem paths, preset field or None)."""
    rest = spec[len("hf://"):] if spec.startswith("hf://") else spec
    rest = rest[len("datasets/"):] if rest.startswith("datasets/") else rest
    parts = rest.split("/")
    if len(parts) < 2:
        raise DataError(f"hub dataset spec {spec!r}: expected hf://ORG/NAME[/GLOB]")
    repo, pattern = "/".join(parts[:2]), "/".join(parts[2:])  # ORG/NAME, rest = glob in the repo
    preset_glob, preset_field = HUB_PRESETS.get(repo, ("**/*.parquet", None))  # unknown repo: every parquet file
    pattern = pattern or preset_glob
    hint = ("download the files (e.g. `huggingface-cli download --repo-type dataset "
            f"{repo} --include '{pattern}'`) and pass the local folder or glob instead")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):  # fail fast, no network timeout
        raise DataError(f"hub dataset {repo} ({pattern}): HF_HUB_OFFLINE is set (offline), the hub cannot be reached; {hint}")
    try:
        from huggingface_hub import HfFileSystem  # hub datasets only (online)
        files = sorted(HfFileSystem().glob(f"datasets/{repo}/{pattern}"))  # sorted: a fixed read order
    except Exception as exc:  # network errors come in many types (requests, httpx, OSError, hub errors)
        raise DataError(f"hub dataset {repo} ({pattern}): cannot list files ({type(exc).__name__}: {exc}); "
                        f"this machine may be offline: {hint}") from exc
    if not files:
        raise DataError(f"hub dataset {repo}: no file matches {pattern!r}")
    return files, preset_field


def expand_paths(spec: str | Path) -> list[str]:
    """A file, a folder (recursively, files with a known text suffix, sorted) or a glob -> sorted list of files."""
    spec = str(spec)
    if os.path.isdir(spec):
        out = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not out:
            raise DataError(f"{spec}: folder holds no {'/'.join(TEXT_SUFFIXES)} file")
        return out
    if os.path.isfile(spec):
        return [spec]
    if any(ch in spec for ch in "*?["):  # glob metacharacters: only after real paths
        out = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))  # recursive: ** spans folders
        if not out:
            raise DataError(f"{spec}: glob matches no file")
        return out
    raise DataError(f"{spec}: no such file, folder or glob (hub datasets: hf://ORG/NAME[/GLOB])")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value (lists and dict values flattened), for field="*"."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):  # keys are field names, not texts: values only
        for v in value.values():
            yield from _strings(v)


def text_problem(text: Any, field: str, max_chars: int) -> tuple[str | None, str]:
    """The text checks every reader applies: present and a string, not blank, not above max_chars.
    -> (None, "") or (skip kind, detail)."""
    if text is None:
        return "missing_field", f"no {field!r} field"  # JSON null counts as missing
    if not isinstance(text, str):
        return "missing_field", f"field {field!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty_text", f"field {field!r} is empty or whitespace"
    if len(text) > max_chars:  # characters, not bytes or tokens
        return "too_long", f"{len(text):,} chars > max_chars={max_chars:,}"
    return None, ""


def _check_text(text: Any, where: str, max_chars: int, on_error: str, skips: Counter | None,
                field: str) -> str | None:
    """text_problem under the bad-input policy: returns the text, or None after counting (or raising)."""
    kind, detail = text_problem(text, field, max_chars)
    if kind is not None:
        _bad(kind, where, detail, on_error, skips)
        return None
    return text


def bounded_lines(fobj, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, raw bytes) per line; a line over max_bytes yields None and is drained in pieces, so a
    single huge line never sits in memory."""
    lineno = 0
    while True:
        raw = fobj.readline(max_bytes + 1)  # +1: room for the newline of a max_bytes line
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):  # cut short: the line goes on
            while raw and not raw.endswith(b"\n"):  # drain the rest of the oversized line
                raw = fobj.readline(1 << 20)
            yield lineno, None
        else:
            yield lineno, raw


def line_bytes(max_chars: int) -> int:
    """The longest jsonl line worth parsing for texts of at most max_chars characters (4 bytes per UTF-8 char, plus
    room for the other fields): a longer line is a skip of kind too_long, drained without holding it in memory."""
    return 4 * max_chars + 4096  # bytes; ASCII-escaped JSON (\uXXXX, 6 bytes/char) can exceed it


def parse_jsonl_line(raw: bytes | None, max_bytes: int) -> tuple[Any, str | None, str]:
    """One line of a jsonl file (from bounded_lines) -> (row, None, "") or (None, kind, detail), where kind is one of
    the counted skip kinds: too_long (raw None: over max_bytes), empty_text (blank line), invalid_utf8,
    malformed_json. The one parser behind every jsonl reader of the project."""
    if raw is None:
        return None, "too_long", f"line longer than {max_bytes:,} bytes"
    if not raw.strip():  # read_jsonl skips it silently; the readers count it
        return None, "empty_text", "blank line"
    try:
        line = raw.decode("utf-8")  # strict: a bad byte is a skip, never a silent U+FFFD
    except UnicodeDecodeError as exc:
        return None, "invalid_utf8", str(exc)
    try:
        return json.loads(line), None, ""  # any JSON value: callers check it is an object
    except json.JSONDecodeError as exc:
        return None, "malformed_json", f"{exc.msg} at column {exc.colno}"


STRICT_MAX_LINE_BYTES = 1 << 28  # read_jsonl's sanity bound: 256 MiB on one line is a broken file, not a row


def read_jsonl(path: str | Path, error: type[Exception] = DataError, where: str = "",
               max_bytes: int = STRICT_MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """(1-based line number, row) for every non-blank line of a jsonl file whose rows must all be JSON objects (eval
    task files, the teacher cache input): any other line raises `error` (the caller's exception type) as
    "{where}{path}:{line}: ...". Blank lines are skipped, as a text editor's trailing newline is not a row."""
    with open(path, "rb") as f:
        for lineno, raw in bounded_lines(f, max_bytes):
            row, kind, detail = parse_jsonl_line(raw, max_bytes)
            if kind == "empty_text":  # only a blank line gives this kind here
                continue
            if kind == "malformed_json":
                raise error(f"{where}{path}:{lineno}: malformed JSON ({detail})")
            if kind is not None:  # too_long or invalid_utf8
                raise error(f"{where}{path}:{lineno}: {kind.replace('_', ' ')}: {detail}")
            if not isinstance(row, dict):
                raise error(f"{where}{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def scan_jsonl(path: Path, check_row: Callable[[Any], tuple[str | None, str]], max_bytes: int,
               on_error: str) -> dict:
    """One pass over a jsonl file for random access: the byte offset of every line (offsets[i]..offsets[i+1] is
    line i, 0-based) and which lines are usable (`check_row(row)` -> (None, "") or (kind, detail)). A bad line
    raises DataError naming file:line (on_error="raise") or is left out and counted in `skips` (the first 100 kept
    in `bad` as (line, reason))."""
    skips: Counter = Counter()
    bad: list[tuple[int, str]] = []
    starts: list[int] = []
    valid: list[bool] = []
    with open(path, "rb") as f:
        pos = 0
        for lineno, raw in bounded_lines(f, max_bytes):
            starts.append(pos)  # byte offset where this line starts
            pos = f.tell()  # after the drained rest of a too_long line too
            row, kind, detail = parse_jsonl_line(raw, max_bytes)
            if kind is None:
                kind, detail = check_row(row)
            if kind is not None:
                if on_error == "raise":
                    raise DataError(f"{path}:{lineno}: {kind.replace('_', ' ')}: {detail}")
                skips[kind] += 1
                if len(bad) < 100:  # bounded: a broken file must not grow the index
                    bad.append((lineno, f"{kind}: {detail}"))
            valid.append(kind is None)  # one flag per line, bad ones too: offsets stay aligned
        starts.append(pos)  # end of the last line: len(offsets) == n_lines + 1
    return {"offsets": np.asarray(starts, dtype=np.int64), "valid": np.asarray(valid, dtype=bool),
            "skips": dict(skips), "bad": bad}


def _iter_jsonl(fobj, name: str, field: str, max_chars: int, on_error: str, skips: Counter | None,
                default_source: str) -> Iterator[Record]:
    max_bytes = line_bytes(max_chars)
    for lineno, raw in bounded_lines(fobj, max_bytes):
        where = f"{name}:{lineno}"
        row, kind, detail = parse_jsonl_line(raw, max_bytes)
        if kind is not None:
            _bad(kind, where, detail, on_error, skips)
            continue
        source = row.get("source", default_source) if isinstance(row, dict) else default_source
        source = source if isinstance(source, str) else default_source  # a non-string source is ignored
        if field == "*":  # every string of the row is a text (HUB_PRESETS)
            texts = list(_strings(row))
            if not texts:
                _bad("missing_field", where, "row holds no string", on_error, skips)
            for t in texts:
                t = _check_text(t, where, max_chars, on_error, skips, field)
                if t is not None:
                    yield Record(t, source, name, lineno)
            continue
        if not isinstance(row, dict):
            _bad("missing_field", where, f"row is a JSON {type(row).__name__}, not an object with {field!r}",
                 on_error, skips)
            continue
        t = _check_text(row.get(field), where, max_chars, on_error, skips, field)
        if t is not None:
            yield Record(t, source, name, lineno)


def _iter_txt(fobj, name: str, max_chars: int, on_error: str, skips: Counter | None,
              default_source: str) -> Iterator[Record]:
    """Plain text: one text per non-blank line (blank lines separate, they are not counted as bad input)."""
    for lineno, raw in bounded_lines(fobj, line_bytes(max_chars)):
        where = f"{name}:{lineno}"
        if raw is None:
            _bad("too_long", where, f"line over max_chars={max_chars:,}", on_error, skips)
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r\n")  # Windows line ends too
        except UnicodeDecodeError as exc:
            _bad("invalid_utf8", where, str(exc), on_error, skips)
            continue
        if not line.strip():  # a separator, not bad input
            continue
        t = _check_text(line, where, max_chars, on_error, skips, "line")
        if t is not None:
            yield Record(t, default_source, name, lineno)


def _iter_parquet(src, name: str, field: str, max_chars: int, on_error: str, skips: Counter | None,
                  default_source: str) -> Iterator[Record]:
    """Parquet, streamed batch by batch (pyarrow iter_batches): never the whole file in memory."""
    import pyarrow.parquet as pq  # optional (parquet inputs only) and slow to import
    try:
        pf = pq.ParquetFile(src)
    except Exception as exc:
        raise DataError(f"{name}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    names = pf.schema_arrow.names
    if field == "*":
        field = "text" if "text" in names else None  # columnar: '*' means the text column
    if field not in names:
        raise DataError(f"{name}: parquet file has no column {field!r} (columns: {names})")
    cols = [field] + (["source"] if "source" in names and field != "source" else [])
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        texts = batch.column(0).to_pylist()
        sources = batch.column(1).to_pylist() if len(cols) > 1 else [None] * len(texts)
        for t, s in zip(texts, sources):
            row += 1  # 1-based row over the whole file, for messages
            t = _check_text(t, f"{name}:row {row}", max_chars, on_error, skips, field)
            if t is not None:
                yield Record(t, s if isinstance(s, str) else default_source, name, row)


def _open_binary(path: str, opener=open):
    f = opener(path, "rb")  # opener: open, or HfFileSystem.open for hub files
    return gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f


def _iter_file(path: str, field: str, max_chars: int, on_error: str, skips: Counter | None,
               opener=open) -> Iterator[Record]:
    default_source = Path(path).name.split(".")[0]  # 'short.jsonl.gz' -> 'short'
    if path.endswith(".parquet"):  # compressed inside: never wrapped in gzip
        with opener(path, "rb") as f:
            yield from _iter_parquet(f, path, field, max_chars, on_error, skips, default_source)
        return
    with _open_binary(path, opener) as f:
        if path.endswith((".txt", ".txt.gz")):
            yield from _iter_txt(f, path, max_chars, on_error, skips, default_source)
        else:  # .jsonl, .jsonl.gz, .json.gz (JSON lines)
            yield from _iter_jsonl(f, path, field, max_chars, on_error, skips, default_source)


def iter_records(spec: str | Path, field: str = "text", *, on_error: str = "skip", max_chars: int = DEFAULT_MAX_CHARS,
                 skips: Counter | None = None) -> Iterator[Record]:
    """Stream Records (text, source, file, line) out of a file, folder, glob, or hub dataset (hf://ORG/NAME[/GLOB]
    or a HUB_PRESETS id). Bad lines: on_error="skip" counts them in `skips` (a Counter) by kind, "raise" raises
    DataError naming file:line. Kinds: malformed_json, missing_field, empty_text, invalid_utf8, too_long."""
    check_policy(on_error)
    spec = str(spec)
    if _is_hub_spec(spec):
        files, preset_field = _hub_files(spec)
        from huggingface_hub import HfFileSystem  # hub datasets only (online)
        fs = HfFileSystem()
        # a preset's field (e.g. "*") replaces the default "text"; any other field given wins
        use_field = preset_field if (preset_field and field == "text") else field
        for path in files:
            yield from _iter_file(path, use_field, max_chars, on_error, skips, opener=fs.open)
        return
    for path in expand_paths(spec):
        yield from _iter_file(path, field, max_chars, on_error, skips)


def read_texts(path: str | Path, field: str = "text", *, on_error: str = "skip", max_chars: int = DEFAULT_MAX_CHARS,
               skips: Counter | None = None) -> Iterator[str]:
    """Stream texts (see iter_records). For a texts.jsonl made by `build`, text i is row i."""
    for rec in iter_records(path, field, on_error=on_error, max_chars=max_chars, skips=skips):
        yield rec.text
