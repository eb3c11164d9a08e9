"""The one exception root. Anything a user can cause by their input is a ``UserError``.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class AutoquantError(Exception):
    """Root of every error autoquant raises on purpose."""


class UserError(AutoquantError):
    """Bad input: a spec, a path, a value. The message is the whole story, on one line."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class MachineError(AutoquantError):
    """A machine or a dependency failed (a storage lost for too long): one line, exit code 1."""
