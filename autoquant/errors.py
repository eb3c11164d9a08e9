"""The one exception root. Anything a user can cause by their input is a ``UserError``.

The CLI turns a ``UserError`` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import reprlib


class AutoquantError(Exception):
    """Root of every error autoquant raises on purpose."""


class UserError(AutoquantError):
    """Bad input: a spec, a path, a value. The message is the whole story, on one line."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.file = file
        self.key = key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


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
