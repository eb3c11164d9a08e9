"""Layer-name patterns (``match.name``): regular expressions whose matching time is bounded.

Python's ``re`` backtracks, so a pattern such as ``(a+)+$`` takes time exponential in the
length of the name it is searched in, and no timeout can interrupt it. No linear-time engine is
a dependency, so a pattern is checked before it is used: the ways ``re`` can backtrack
exponentially are refused (a quantifier or an alternation inside a repeated quantifier,
backreferences), and so is a pattern with many places to backtrack at all, since each of them
multiplies the work by up to the name's length.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

try:  # the parser ``re`` itself uses, public as sre_parse before Python 3.11
    from re import _constants as _c
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 200
# Quantifiers of varying count and alternations, in all: with none nested in a repeat, the
# matching time grows at most as a power (this number plus one) of the name's length.
MAX_BACKTRACK_POINTS = 6
MATCH_SECONDS = 2.0  # for one pattern against all layer names

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | (
    {_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set()
)
ALLOWED = (
    f"a regular expression of at most {MAX_PATTERN_CHARS} characters, with at most "
    f"{MAX_BACKTRACK_POINTS} quantifiers (*, +, ?, {{m,n}}) and alternations (|) in all, none "
    r"of them inside a repeated group, and no backreferences, e.g. '^layer\d+\.' or 'attn|mlp'"
)


def why_refused(pattern: str) -> str | None:
    """None if ``pattern`` is an allowed layer-name pattern; otherwise why not."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"{len(pattern)} characters long"
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"not a valid regular expression ({str(exc)[:100]})"
    points = [0]
    problem = _walk(parsed, inside_repeat=False, points=points)
    if problem is None and points[0] > MAX_BACKTRACK_POINTS:
        problem = f"{points[0]} quantifiers and alternations"
    return problem


def _walk(items: Any, *, inside_repeat: bool, points: list[int]) -> str | None:
    for op, av in items:
        problem = None
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            return "a backreference, whose matching time has no bound"
        if op in _REPEATS:
            low, high, body = av
            if low != high:
                points[0] += 1
                if inside_repeat:
                    return "a quantifier inside a repeated group (catastrophic backtracking)"
            problem = _walk(body, inside_repeat=inside_repeat or high > 1, points=points)
        elif op == _c.BRANCH:
            points[0] += 1
            if inside_repeat:
                return "an alternation inside a repeated group (catastrophic backtracking)"
            for branch in av[1]:
                problem = problem or _walk(branch, inside_repeat=inside_repeat, points=points)
        elif op == _c.SUBPATTERN:
            problem = _walk(av[-1], inside_repeat=inside_repeat, points=points)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            problem = _walk(av[1], inside_repeat=inside_repeat, points=points)
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            problem = _walk(av, inside_repeat=inside_repeat, points=points)
        if problem is not None:
            return problem
    return None


@lru_cache(maxsize=256)
def name_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled pattern; ``ValueError`` saying why, for one that is not allowed."""
    problem = why_refused(pattern)
    if problem is not None:
        raise ValueError(f"{problem}; allowed: {ALLOWED}")
    return re.compile(pattern)


class _TooSlow(Exception):
    pass


def matching_names(pattern: str, names: Iterable[str]) -> frozenset[str]:
    """The names ``pattern`` is found in; ``ValueError`` for a pattern that is not allowed or that
    takes more than ``MATCH_SECONDS`` over all of them."""
    compiled = name_pattern(pattern)
    try:
        with _deadline(MATCH_SECONDS):
            return frozenset(name for name in names if compiled.search(name))
    except _TooSlow:
        raise ValueError(
            f"searching the layer names took more than {MATCH_SECONDS:g} s; allowed: {ALLOWED}"
        ) from None


@contextmanager
def _deadline(seconds: float):
    """Raise ``_TooSlow`` in the block after ``seconds``; no bound where signals cannot be used
    (another thread, no interval timers, a timer already running for someone else)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
