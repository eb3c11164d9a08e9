"""Where a study lives: the embedded SQLite file of a run directory, or a shared RDB (PostgreSQL)
that workers on several machines measure into.

A storage URL never carries a password: libpq takes it from ``PGPASSWORD`` or a pgpass file, so
it is never in a spec, a command line, a log or a file a run writes. Every URL shown anywhere goes
through ``redact`` first, and every message of the driver is passed through ``scrub``, which also
hides the password from the environment should a driver ever echo it.

A shared study remembers the spec it was made for (``FINGERPRINT_ATTR``, a hash of the task,
space, objectives, constraints and evaluation): a worker of another spec is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from autoquant.errors import MachineError, UserError

FINGERPRINT_ATTR = "autoquant_fingerprint"
FINGERPRINT_KEYS = ("task", "space", "objectives", "constraints", "evaluation")
SCHEMES = ("sqlite", "postgresql")
ALLOWED = "sqlite:///PATH or postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or ~/.pgpass)"
T = TypeVar("T")


def redact(url: str) -> str:
    """The URL with any password shown as ``***``; an unparsable URL is cut to its scheme."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split(":", 1)[0] + ":(unparsable)"


def scrub(text: str, url: str | None = None) -> str:
    """``text`` with the URL's password and the environment's ``PGPASSWORD`` replaced by ***."""
    secrets = [os.environ.get("PGPASSWORD") or ""]
    if url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            secrets.append(make_url(url).password or "")
        except ArgumentError:
            pass
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def check_url(url: str, *, file: str | None, key: str) -> str:
    """The URL SQLAlchemy will open (``postgresql`` gets the psycopg driver); raises
    ``UserError`` for an unknown scheme, a password in the URL or a missing driver."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = redact(url)[:120]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(
            f"bad value {shown!r}: not a database URL; allowed: {ALLOWED}", file=file, key=key
        ) from None
    backend = parsed.get_backend_name()
    if backend not in SCHEMES:
        raise UserError(
            f"bad value {shown!r}: unknown database {backend!r}; allowed: {ALLOWED}",
            file=file,
            key=key,
        )
    if parsed.password is not None:
        raise UserError(
            f"bad value {shown!r}: the URL carries a password; allowed: {ALLOWED}",
            file=file,
            key=key,
        )
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise UserError(
                f"bad value {shown!r}: PostgreSQL needs the psycopg driver; allowed: "
                "pip install 'autoquant[postgres]', or a sqlite:/// URL",
                file=file,
                key=key,
            ) from None
    return parsed.render_as_string(hide_password=False)


def spec_fingerprint(resolved: dict) -> str:
    """What makes two specs one study. A user task's folder differs between machines; its
    source hash does not."""
    picked = {k: resolved.get(k) for k in FINGERPRINT_KEYS}
    task = picked.get("task")
    if isinstance(task, dict) and isinstance(task.get("origin"), dict):
        task = {**task, "origin": {"sha256": task["origin"].get("sha256")}}
        picked["task"] = task
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StorageSettings:
    """How a shared study is opened: Optuna's heartbeat (seconds), and how long a worker keeps
    retrying a storage that went away before giving up."""

    heartbeat_interval_s: int = 10
    grace_period_s: int = 30
    retry_s: float = 120.0


def open_storage(
    url: str,
    settings: StorageSettings,
    *,
    on_stale: Callable[[Any, Any], None] | None = None,
    file: str | None = None,
    key: str = "storage",
):
    """An ``optuna.storages.RDBStorage`` with heartbeats. A URL that cannot be opened
    (unreachable, wrong password, no such database) is bad input: ``UserError``, redacted."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # several local processes share the file: wait for the writer instead of failing
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    import inspect
    import warnings

    # heartbeats are "experimental" since Optuna 2.9 and the callback was renamed in 4.9
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # workers ask and tell, and beat themselves (autoquant.search.workers._Heartbeat)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    renamed = "heartbeat_stale_trial_callback" in inspect.signature(
        optuna.storages.RDBStorage.__init__
    ).parameters
    callback = {
        "heartbeat_stale_trial_callback" if renamed else "failed_trial_callback": on_stale
    }
    try:
        storage = _rdb_storage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=settings.heartbeat_interval_s,
            grace_period=settings.grace_period_s,
            **callback,
        )
        if url.startswith("sqlite"):
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            _sync_at_checkpoints(storage.engine)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError) as exc:
        reason = scrub(_first_line(exc), url)
        raise UserError(
            f"bad value {redact(url)!r}: cannot open the storage ({reason[:300]}); allowed: "
            f"a reachable database and its password in PGPASSWORD or ~/.pgpass",
            file=file,
            key=key,
        ) from None
    return storage


def _rdb_storage(url: str, **kwargs: Any) -> Any:
    """``optuna.storages.RDBStorage(url, **kwargs)``. Workers started together on a new
    database all create Optuna's tables at once, and PostgreSQL refuses all but one of the
    concurrent ``CREATE TABLE``s (a unique violation in its catalog): the others try again and
    find the tables made."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError) as exc:
            concurrent = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if not concurrent or attempt == 5:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def _sync_at_checkpoints(engine: Any) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL`` on every connection: a commit is not
    flushed to disk on its own, the WAL is at each checkpoint. A killed worker loses nothing
    (the OS holds what it committed); a power loss may lose the last commits, whose configs are
    then measured again. Workers commit a dozen times per trial, and a flush per commit was
    most of a worker's time on a small task (``benchmarks/workers.py``)."""
    from sqlalchemy import event

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # pooled connections were opened before the listener


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def open_shared_study(
    storage: Any, name: str, directions: list[str], sampler: Any, fingerprint: str, *, shown: str
):
    """Create or load the study ``name``; refuse one made for another spec."""
    import optuna

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=directions,
        sampler=sampler,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    elif stored != fingerprint:
        raise UserError(
            f"bad value {shown!r}: its study {name!r} was made by another spec (fingerprint "
            f"{stored}, this spec {fingerprint}: task, space, objectives, constraints or "
            "evaluation differ); allowed: the same spec, or another database or spec name",
            key="storage",
        )
    if [d.name.lower() for d in study.directions] != list(directions):
        raise UserError(
            f"bad value {shown!r}: study {name!r} has other objectives; allowed: the same spec",
            key="storage",
        )
    return study


def transient_errors() -> tuple[type[BaseException], ...]:
    import optuna
    from sqlalchemy.exc import DBAPIError, OperationalError

    return (OperationalError, DBAPIError, optuna.exceptions.StorageInternalError, ConnectionError)


def retrying(step: Callable[[], T], *, url: str, retry_s: float, on_retry=None) -> T:
    """Run ``step``; while the storage is unreachable, retry with doubling pauses (0.5 s to
    8 s) for at most ``retry_s`` seconds, then raise ``MachineError`` (exit 1)."""
    errors = transient_errors()
    start = time.monotonic()
    pause = 0.5
    while True:
        try:
            return step()
        except errors as exc:
            waited = time.monotonic() - start
            if waited >= retry_s:
                raise MachineError(
                    f"storage {redact(url)}: lost for {waited:.0f} s "
                    f"({scrub(_first_line(exc), url)[:200]}); the trials finished so far are "
                    "safe in it, run the worker again when it is back"
                ) from None
            if on_retry:
                on_retry(scrub(_first_line(exc), url))
            time.sleep(min(pause, max(0.0, retry_s - waited)))
            pause = min(pause * 2, 8.0)
