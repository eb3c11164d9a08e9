"""A run directory has one owner at a time, and its files are replaced whole or not at all.

``owner_lock`` is an OS file lock (``flock``) on ``RUN/.autoquant.lock``, held for the life of
a command that writes into the run (search, report, export into the run). The kernel releases
it when the process ends, however it ends, so a lock left by a killed process is simply taken
over; the file itself only tells a second command who holds it (pid, host, command), and is
removed when the owner finishes. Read-only commands (compare) take no lock.

``atomic_write`` writes ``.<name>.tmp<pid>`` beside the target and renames it over the target:
a reader sees the old file or the new one, never half of one. A kill between the two leaves the
temp file; the next owner of the run directory removes every such leftover.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from autoquant.errors import UserError, machine_failure

LOCK_FILE = ".autoquant.lock"
_TEMP_NAME = re.compile(r"^\..+\.tmp\d+$")


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(temp)`` then rename the temp file over ``path``; the temp file never outlives a
    failed ``write`` (a full disk, a size limit) of a process that goes on."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the ``atomic_write`` leftovers under ``run_dir``. Only the owner calls this: no
    other autoquant writes there while it holds the lock, so every temp file is a leftover of a
    process that died between writing and renaming."""
    removed = []
    for root, _, names in os.walk(run_dir):
        for name in names:
            if _TEMP_NAME.match(name):
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _holder_text(command: str) -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )


def _describe_holder(fd: int) -> str:
    """Who holds the lock, from the lock file. The holder writes it right after taking the
    lock, so an empty file is read again for a moment before giving up."""
    for _ in range(20):
        raw = os.pread(fd, 4096, 0)
        if raw:
            break
        time.sleep(0.01)
    try:
        info = json.loads(raw)
        return (
            f"{info['command']} (pid {int(info['pid'])} on host {info['host']}, "
            f"since {info['since']})"
        )
    except (ValueError, KeyError, TypeError):
        return "another autoquant process (its pid and host are not recorded yet)"


class _Busy(Exception):
    """Another process holds the lock; the message says which."""


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _take_lock(run_dir: Path) -> tuple[int, list[Path]]:
    """(an fd holding the lock on ``run_dir``'s lock file, the directories this call created,
    deepest first); ``_Busy`` when another process holds it."""
    import fcntl

    lock_path = run_dir / LOCK_FILE
    while True:
        created = _missing_dirs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # an owner removed the empty directory it had created
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                raise _Busy(_describe_holder(fd)) from None
            finally:
                os.close(fd)
        except BaseException:
            os.close(fd)
            raise
        # The lock file may have been removed (an owner cleaning up a directory it created)
        # between our open and our lock: a lock on a removed file guards nothing, so start over.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


@contextmanager
def owner_lock(
    run_dir: Path, command: str, *, key: str = "RUN", create: bool = True
) -> Iterator[Path]:
    """Own ``run_dir`` for the ``with`` block, or raise ``UserError`` naming the process that
    owns it. Leftover temp files are removed once owned. With ``create`` a missing directory is
    made, and removed again on the way out if nothing was written into it; without, a missing
    directory is refused."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"bad value {str(run_dir)!r}: exists and is not a directory; allowed: a directory path",
            key=key,
        )
    if not create and not run_dir.exists():
        raise UserError(
            f"bad value {str(run_dir)!r}: no such run directory; allowed: a directory made by "
            "autoquant search",
            key=key,
        )
    try:
        fd, created = _take_lock(run_dir)
    except OSError as exc:
        # A full or read-only disk is the machine's failure (exit 1, one line); other refusals
        # (a path through a file, a name too long) are the user's.
        failure = machine_failure(exc, file=run_dir / LOCK_FILE)
        if failure is not None:
            raise failure from None
        raise UserError(
            f"bad value {str(run_dir)!r}: cannot write into it ({type(exc).__name__}: "
            f"{exc.strerror or exc}); allowed: a directory this user can write",
            key=key,
        ) from None
    except _Busy as busy:
        raise UserError(
            f"bad value {str(run_dir)!r}: the run directory is in use by {busy}; allowed: wait "
            "for it to finish, or another run directory",
            key=key,
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text(command).encode(), 0)
        remove_stale_temp_files(run_dir)
        yield run_dir
    finally:
        # Removed while still held: a process that opened the old file meanwhile sees it gone
        # once it gets the lock, and starts over (``_take_lock``).
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        for directory in created:  # a failed command leaves no empty directories behind
            try:
                directory.rmdir()
            except OSError:  # not empty: something was written there
                break
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
