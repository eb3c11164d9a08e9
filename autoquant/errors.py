"""The one exception root, and which failures are the user's and which the machine's.

Anything a user can cause by their input is a ``UserError``: one line on stderr, exit code 2.
A failure of the machine or of a dependency (a full disk, a read-only directory, a damaged file
that autoquant wrote, a database or XGBoost that fails, an unreachable device) is a
``MachineError``: one line naming the file and what to do, exit code 1. ``machine_failure``
recognises those among the exceptions the libraries raise; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import reprlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class AutoquantError(Exception):
    """Root of every error autoquant raises on purpose."""


def _where(message: str, file: str | None, key: str | None) -> str:
    where = ": ".join(p for p in (file, key) if p)
    return f"{where}: {message}" if where else message


class UserError(AutoquantError):
    """Bad input: a spec, a path, a value. The message is the whole story, on one line."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        super().__init__(_where(message, file, key))


class MachineError(AutoquantError):
    """The machine or a dependency failed; the message names the file and what to do."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        self.file = file
        super().__init__(_where(message, file, None))


# errno values that say the disk or the directory refused, not that autoquant is wrong
_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for this file system or limit"}
_DENIED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted"}
_BROKEN = {errno.EIO: "input/output error", errno.EISDIR: "is a directory",
           errno.ENOTDIR: "a path component is not a directory"}
_FULL_HINT = "free some space (or raise the file size limit) and run the command again"
_DENIED_HINT = "the directory is read-only for this user: use a writable directory or fix its permissions"
_DAMAGED_HINT = (
    "the file is damaged: move it aside (autoquant keeps it for you to inspect) and run again"
)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def _os_failure(exc: OSError, file: str | None) -> MachineError | None:
    known = _FULL.get(exc.errno) or _DENIED.get(exc.errno) or _BROKEN.get(exc.errno)  # type: ignore[arg-type]
    if known is None:
        return None
    hint = (
        _FULL_HINT if exc.errno in _FULL
        else _DENIED_HINT if exc.errno in _DENIED
        else "check the path and the disk"
    )
    name = errno.errorcode.get(exc.errno, str(exc.errno))  # type: ignore[arg-type]
    target = exc.filename if exc.filename is not None else file
    return MachineError(f"{known} ({name}); {hint}", file=str(target) if target else None)


def _sqlite_failure(exc: sqlite3.Error, file: str | None) -> MachineError | None:
    # ProgrammingError, IntegrityError, InterfaceError: autoquant's own SQL is wrong, a bug
    if not (type(exc) is sqlite3.DatabaseError or isinstance(exc, sqlite3.OperationalError)):
        return None
    text = str(exc).lower()
    if "full" in text:
        hint = _FULL_HINT
    elif "readonly" in text or "read-only" in text:
        hint = _DENIED_HINT
    elif "locked" in text or "busy" in text:
        hint = "another process holds the database: wait for it or stop it, then run again"
    elif "i/o" in text:
        hint = "the disk failed to read or write it (or is full): check the disk and run again"
    else:
        hint = _DAMAGED_HINT
    return MachineError(f"SQLite: {exc}; {hint}", file=file)


# A dependency's own failure types, checked by name: the libraries need not be imported (an
# exception of a type from a module never imported cannot be raised).
_DEPENDENCY_FAILURES = {
    "optuna.exceptions.StorageInternalError": "the Optuna study storage failed",
    "xgboost.core.XGBoostError": "XGBoost failed",
}


def _dependency_failure(exc: BaseException) -> str | None:
    for cls in type(exc).__mro__:
        what = _DEPENDENCY_FAILURES.get(f"{cls.__module__}.{cls.__qualname__}")
        if what is not None:
            return what
    return None


def machine_failure(exc: BaseException, *, file: str | Path | None = None) -> MachineError | None:
    """The one-line ``MachineError`` for a failure of the machine or a dependency, or None when
    ``exc`` is something else (a bug, whose traceback must stay). ``file`` names the file the
    failing work was about when the exception does not say (SQLite errors never do)."""
    where = str(file) if file is not None else None
    seen: set[int] = set()
    current: BaseException | None = exc
    wrapper: str | None = None
    while current is not None and id(current) not in seen:  # the cause says most
        seen.add(id(current))
        if isinstance(current, MachineError):
            return current
        if isinstance(current, OSError):
            found = _os_failure(current, where)
            if found is not None:
                return found
        if isinstance(current, sqlite3.Error):
            found = _sqlite_failure(current, where)
            if found is not None:
                return found
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps sqlite3's
        if isinstance(orig, sqlite3.Error):
            found = _sqlite_failure(orig, where)
            if found is not None:
                return found
        wrapper = wrapper or _dependency_failure(current)
        current = current.__cause__ or current.__context__
    if wrapper is not None:
        return MachineError(f"{wrapper}: {_first_line(exc)}", file=where)
    return None


@contextmanager
def naming(database: str | Path) -> Iterator[None]:
    """Failures of the SQLite ``database`` used inside the block (SQLite, SQLAlchemy and
    Optuna storage errors never name their file) become a ``MachineError`` naming it, the
    innermost ``naming`` first; anything else passes unchanged, to be reported where it is
    caught (an ``OSError`` names its own file)."""
    try:
        yield
    except AutoquantError:
        raise
    except Exception as exc:
        if not _is_database_failure(exc):
            raise
        failure = machine_failure(exc, file=database)
        if failure is None:
            raise
        raise failure from exc


def _is_database_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlite3.Error) or isinstance(getattr(current, "orig", None), sqlite3.Error):
            return True
        if _dependency_failure(current) == _DEPENDENCY_FAILURES["optuna.exceptions.StorageInternalError"]:
            return True
        current = current.__cause__ or current.__context__
    return False


def exit_code_for(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an exception the command line reports without a traceback."""
    if isinstance(exc, UserError):
        return 2, str(exc)
    failure = machine_failure(exc)
    if failure is not None:
        return 1, str(failure)
    return None


__all__ = [
    "AutoquantError", "MachineError", "SHOWN_CHARS", "UserError", "exit_code_for",
    "machine_failure", "naming", "show",
]


SHOWN_CHARS = 60


class _Prefix(reprlib.Repr):
    """reprlib bounds the work as well as the text: a value read from YAML can be a list of
    lists billions of items long once its aliases are followed, and repr() would build it all."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6
        self.maxother = self.maxlong = SHOWN_CHARS + 1

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: SHOWN_CHARS + 1])


_PREFIX = _Prefix()


def show(value: object) -> str:
    """``repr(value)`` cut to a short prefix: how an error message quotes a value it was given."""
    text = _PREFIX.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
