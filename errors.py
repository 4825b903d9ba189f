"""What a user sees when something goes wrong: the project's error class, value checks, and the one way every CLI
reports a failure.

Every root script raises a `UserError` subclass (data.DataError, TeacherError (defined here: bert.py and
teachers.py both raise it), the cache's CacheError, checkpoints.CheckpointError, eval.EvalError, train.ConfigError)
for anything the user can fix: a flag, a config key, a file, a line, a damaged cache or checkpoint, a full disk.
Its message names the file, line or key.
`run_cli(main)` is what each script's `__main__` runs: such an error, or an OS error (missing file, permission,
disk full), becomes ONE line `error: ...` on stderr and exit code 2; `JASPER_TRACEBACK=1` prints the traceback
too. Anything else is a bug and keeps its traceback (exit code 1). docs: README "When things go wrong".
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from typing import Any, Callable, Sequence


class UserError(Exception):
    """Bad input or a damaged file the user can act on; the message names the file, line or key."""


class TeacherError(UserError, ValueError):
    """A teacher that cannot be built as asked (unknown layout, unsupported config); the message names the file.
    Defined here rather than in teachers.py so that bert.py (a teacher body teachers.py imports) raises it too."""


class DiskFullError(UserError):
    """ENOSPC while writing `path`: that write was abandoned and its temporary files removed; earlier files (the
    previous checkpoint, finished cache shards, an earlier export) are intact."""

    def __init__(self, path, what: str = ""):
        self.path = str(path)
        super().__init__(f"disk full (no space left on device) while writing {path}" + (f"; {what}" if what else ""))


def is_disk_full(e: BaseException | None) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)  # EDQUOT: quota full, same fix


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, its cause/context chain, or a rank's failure inside
    torch.distributed.checkpoint's CheckpointException (a BaseException holding {rank: (exception, trace)})."""
    seen = set()  # ids of visited exceptions: a cause/context chain can loop
    todo = [e]  # depth-first over causes, contexts and rank failures
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        for fail in (getattr(x, "failures", None) or {}).values():
            # a failure is an (exception, trace) tuple or an object holding .exception
            todo.append(fail[0] if isinstance(fail, tuple) else getattr(fail, "exception", fail))
        todo += [x.__cause__, x.__context__]  # an OSError wrapped in another exception is still found
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Value checks: one reason string per bad value, so every caller names its own source (a flag, a JSON key, a file).
# ---------------------------------------------------------------------------------------------------------------------
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # bool is an int subclass: True must not pass as 1


def check_value(v: Any, kind: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, choices: Sequence | None = None, length: int | None = None) -> str | None:
    """None when `v` is a valid `kind` ('int', 'float', 'str', 'bool', 'list[int]', 'list[float]', 'list[str]')
    within [lo, hi] (open ends with lo_open / hi_open) and `choices`; else why not, in words."""
    if kind.startswith("list["):
        if not isinstance(v, (list, tuple)):
            return f"expected a list of {kind[5:-1]} values, got {v!r}"
        if length is not None and len(v) != length:
            return f"expected {length} values, got {len(v)} ({list(v)!r})"
        for x in v:
            why = check_value(x, kind[5:-1], lo, hi, lo_open, hi_open, choices)
            if why:
                return f"{why} (in {list(v)!r})"
        return None
    if kind == "bool":
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    if kind == "str":
        if not isinstance(v, str):
            return f"expected a string, got {v!r}"
    elif kind == "int":
        if not (_num(v) and float(v).is_integer()):  # 3.0 (a JSON number) counts as an integer
            return f"expected an integer, got {v!r}"
    elif kind == "float":
        if not _num(v):
            return f"expected a number, got {v!r}"
        if not math.isfinite(v):  # nan would pass every range test below (its comparisons are all False)
            return f"expected a finite number, got {v!r}"
    if choices is not None and v not in choices:
        return f"expected one of {list(choices)}, got {v!r}"
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return f"expected {'>' if lo_open else '>='} {lo:g}, got {v!r}"
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return f"expected {'<' if hi_open else '<='} {hi:g}, got {v!r}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The CLI wrapper
# ---------------------------------------------------------------------------------------------------------------------
def error_message(e: BaseException) -> str | None:
    """The one line for a failure the user can act on; None for a bug (which keeps its traceback)."""
    if isinstance(e, UserError):
        return str(e)
    ose = os_error_in(e)
    if ose is not None:
        where = f": {ose.filename}" if ose.filename else ""
        if is_disk_full(ose):
            return f"disk full (no space left on device){where}"
        return f"{ose.strerror or ose}{where}"
    return None


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a script's main(argv): 0 (or main's int), or 2 with one `error: ...` line for a UserError / OSError.
    Set JASPER_TRACEBACK=1 to see the traceback as well. Under torchrun every rank reports its own failure."""
    try:
        rc = main(argv)
        return rc if isinstance(rc, int) else 0  # main returning None means success
    except KeyboardInterrupt:
        print("interrupted (files being written were abandoned atomically; rerun, with --resume for train.py, "
              "to continue)", file=sys.stderr, flush=True)
        return 130
    except (Exception, BaseException) as e:  # torch.distributed.checkpoint raises BaseExceptions
        if isinstance(e, SystemExit):
            raise  # sys.exit / argparse keep their own exit code
        msg = error_message(e)
        if msg is None:
            raise  # a bug: its traceback is worth more than one line
        if os.environ.get("JASPER_TRACEBACK", "") not in ("", "0"):
            traceback.print_exc()
        # torchrun: tag the rank, as every rank prints its own failure and their lines interleave
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(("" if rank is None else f"[rank {rank}] ") + f"error: {msg}", file=sys.stderr, flush=True)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the same one-line errors: `error: PROG: argument --x: invalid ... (see PROG --help)`, exit 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)  # 2: argparse's own usage-error code, the same as run_cli's


def check_args(args, limits: dict[str, dict[str, Any]]) -> None:
    """Range checks of parsed flags (argparse checked the types): UserError `--flag-name: why` for the first bad one.
    `limits` maps a dest to check_value's keywords plus `kind` (default 'int'); None values (not given) pass."""
    for name, kw in limits.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        kw = dict(kw)  # a copy: pop below must not edit the caller's table
        why = check_value(v, kw.pop("kind", "int"), **kw)
        if why:
            raise UserError(f"--{name.replace('_', '-')}: {why}")
