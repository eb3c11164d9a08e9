"""The latency table: every per-layer timing ever measured, in one SQLite file.

Key: (target fingerprint, layer signature, choice label). The fingerprint is a hash of the
backend's ``fingerprint()`` (target dict, host CPU or RPC key, runtime and version, threads,
batch, kernel template version), so a timing is reused only where it was measured. The layer
signature is the layer's kind and shapes (not its name): equal layers share timings.

Every record is ``{"_type": "KernelTiming", "_version": N, ...}`` JSON with a SHA-256 checksum
beside it. A record whose checksum does not match, whose version or type is unknown, or whose
body names another key is *corrupt or stale*: it is deleted and reported as a miss, never used.

Default location: ``$AUTOQUANT_CACHE_DIR/latency.sqlite`` (else ``~/.cache/autoquant``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from autoquant.errors import MachineError, naming
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice

T = TypeVar("T")
RECORD_TYPE = "KernelTiming"
RECORD_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS timings (
    fingerprint TEXT NOT NULL,
    layer TEXT NOT NULL,
    choice TEXT NOT NULL,
    record TEXT NOT NULL,
    checksum TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (fingerprint, layer, choice)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    hash TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


def default_table_path() -> Path:
    root = os.environ.get("AUTOQUANT_CACHE_DIR") or Path.home() / ".cache" / "autoquant"
    return Path(root) / "latency.sqlite"


def layer_signature(layer: LayerInfo) -> str:
    def dims(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))

    return (
        f"{layer.kind}|w{dims(layer.weight_shape)}|in{dims(layer.input_shape)}"
        f"|out{dims(layer.output_shape)}|{'bias' if layer.has_bias else 'nobias'}"
    )


def model_signature(model: Any, inputs: Any, layers: tuple[LayerInfo, ...]) -> str:
    """A hash of what a whole model's latency depends on besides the config: its module tree
    (``repr``: every layer's type and shape), its inputs (``inputs``: a batch-1 shape or the
    task's example inputs, ``backends.inputs``: the batch-1 shape of one float input, as this hash
    always had it, or each named input's per-sample shape and dtype) and the quantizable
    layers."""
    from autoquant.backends.inputs import ModelInputs

    text = json.dumps(
        [repr(model), ModelInputs.of(inputs).signature(), [layer_signature(la) for la in layers]],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _names_the_file(method: Callable[..., T]) -> Callable[..., T]:
    """A failing SQLite call (disk full, damaged page, read-only) names the table's file."""

    @functools.wraps(method)
    def wrapper(self: LatencyTable, *args: Any, **kwargs: Any) -> T:
        with naming(self.path):
            return method(self, *args, **kwargs)

    return wrapper


def _checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Lookup:
    """What ``get`` found: a timing, or a miss and why (``missing``, ``corrupt: ...``, ``stale``)."""

    timing: KernelTiming | None
    reason: str = "missing"

    @property
    def hit(self) -> bool:
        return self.timing is not None


@dataclass(frozen=True)
class StoredRecord:
    """One row as stored, for copying between tables: its key, JSON text, checksum, when it was
    written, and why it must not be used (``problem``, as ``_check`` says), or None."""

    key: tuple[str, str, str]
    record: str
    checksum: str
    created: float
    problem: str | None

    @property
    def failure(self) -> bool:
        """A stored failed measurement (not a timing: a newer record may replace it)."""
        return json.loads(self.record)["_data"].get("status") != "measured"


def _not_a_table(path: Path, why: object) -> Exception:
    from autoquant.errors import UserError

    return UserError(
        f"not a latency table ({str(why)[:120]}); allowed: an autoquant latency.sqlite "
        "file or a new path",
        file=str(path),
    )


class LatencyTable:
    """Open (creating) the table at ``path``; use as a context manager or call ``close()``.

    ``read_only``: open an existing table without ever writing to it (another machine's table,
    to merge from): no schema is created, and SQLite refuses every write."""

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False) -> None:
        self.path = Path(path) if path is not None else default_table_path()
        self.invalidated = 0
        if read_only:
            self._open_read_only()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(self.path, timeout=30)
                self._db.executescript(SCHEMA)
            except sqlite3.DatabaseError as exc:
                raise _not_a_table(self.path, exc) from None
        self._check_pages()

    def _open_read_only(self) -> None:
        from autoquant.errors import UserError

        if not self.path.is_file():
            raise UserError(
                "no such file; allowed: an existing autoquant latency table", file=str(self.path)
            )
        self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _not_a_table(self.path, exc) from None
        if not {"timings", "fingerprints"} <= tables:
            self._db.close()
            raise _not_a_table(self.path, f"it has tables {sorted(tables)[:6]}")

    def _check_pages(self) -> None:
        """Refuse a table with a damaged page. A damaged page fails only the queries that reach
        it, possibly long after: a traceback mid-profile, or writes into a broken file. The
        file is kept as it is: its timings took hours of device time to measure, so it is not
        rebuilt from scratch behind the user's back (``quick_check`` reads every page once)."""
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.DatabaseError as exc:
            problems = [str(exc)]
        if problems != ["ok"]:
            self._db.close()
            raise MachineError(
                f"damaged latency table ({problems[0][:120]}); move it aside (it is kept: a "
                "tool such as sqlite3's .recover can save its timings) and run again to start "
                "a new table, or give another --table",
                file=str(self.path),
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_names_the_file
    def remember_fingerprint(self, fingerprint_hash: str, body: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO fingerprints VALUES (?, ?)",
                (fingerprint_hash, json.dumps(body, sort_keys=True)),
            )

    def get(self, fingerprint_hash: str, layer: LayerInfo, choice: QuantChoice) -> Lookup:
        return self._get((fingerprint_hash, layer_signature(layer), choice.label))

    def get_model(self, fingerprint_hash: str, model_key: str, config_hash: str) -> Lookup:
        """A whole model's end-to-end timing (``model_key`` from ``model_signature``) for one
        config, stored beside the kernels under the layer key ``model|<model_key>``."""
        return self._get((fingerprint_hash, f"model|{model_key}", config_hash))

    def put_model(
        self,
        fingerprint_hash: str,
        model_key: str,
        config_hash: str,
        timing: KernelTiming,
        *,
        measure: dict[str, Any] | None = None,
    ) -> None:
        self._put((fingerprint_hash, f"model|{model_key}", config_hash), timing, measure)

    @_names_the_file
    def _get(self, key: tuple[str, str, str]) -> Lookup:
        row = self._db.execute(
            "SELECT record, checksum FROM timings WHERE fingerprint=? AND layer=? AND choice=?", key
        ).fetchone()
        if row is None:
            return Lookup(None, "missing")
        record, checksum = row
        problem = self._check(record, checksum, key)
        if problem is not None:
            with self._db:
                self._db.execute(
                    "DELETE FROM timings WHERE fingerprint=? AND layer=? AND choice=?", key
                )
            self.invalidated += 1
            return Lookup(None, problem)
        return Lookup(KernelTiming.from_dict(json.loads(record)["_data"]), "hit")

    @staticmethod
    def _check(record: str, checksum: str, key: tuple[str, str, str]) -> str | None:
        if _checksum(record) != checksum:
            return "corrupt: checksum mismatch"
        try:
            data = json.loads(record)
        except ValueError:
            return "corrupt: not JSON"
        if not isinstance(data, dict) or data.get("_type") != RECORD_TYPE:
            return f"corrupt: unknown record type {data.get('_type') if isinstance(data, dict) else None!r}"
        if data.get("_version") != RECORD_VERSION:
            return f"stale: record version {data.get('_version')!r}, this autoquant writes {RECORD_VERSION}"
        if (data.get("fingerprint"), data.get("layer"), data.get("choice")) != key:
            return "corrupt: record body names another key"
        try:
            KernelTiming.from_dict(data["_data"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"corrupt: {type(exc).__name__}: {exc}"
        return None

    def put(
        self,
        fingerprint_hash: str,
        layer: LayerInfo,
        choice: QuantChoice,
        timing: KernelTiming,
        *,
        measure: dict[str, Any] | None = None,
    ) -> None:
        self._put((fingerprint_hash, layer_signature(layer), choice.label), timing, measure)

    @_names_the_file
    def stored(self) -> Iterator[StoredRecord]:
        """Every row as stored, each checked (a hostile file's rows too: a column of another
        type is a problem, not a crash), in key order."""
        cursor = self._db.execute(
            "SELECT fingerprint, layer, choice, record, checksum, created FROM timings "
            "ORDER BY fingerprint, layer, choice"
        )
        for fp, layer, choice, record, checksum, created in cursor:
            key = (fp, layer, choice)
            if not all(isinstance(v, str) for v in (*key, record, checksum)):
                yield StoredRecord(tuple(map(str, key)), "", "", 0.0, "corrupt: a column is not text")  # type: ignore[arg-type]
            elif not isinstance(created, int | float):
                yield StoredRecord(key, record, checksum, 0.0, "corrupt: write time is not a number")
            else:
                yield StoredRecord(key, record, checksum, float(created), self._check(record, checksum, key))

    @_names_the_file
    def stored_at(self, key: tuple[str, str, str]) -> StoredRecord | None:
        """The row at ``key`` as stored (checked), or None."""
        row = self._db.execute(
            "SELECT record, checksum, created FROM timings WHERE fingerprint=? AND layer=? AND choice=?",
            key,
        ).fetchone()
        if row is None:
            return None
        record, checksum, created = row
        return StoredRecord(key, record, checksum, float(created), self._check(record, checksum, key))

    def copy_record(self, source: StoredRecord) -> None:
        """Write a checked record of another table through ``_put``, keeping its write time."""
        data = json.loads(source.record)
        timing = KernelTiming.from_dict(data["_data"])
        self._put(source.key, timing, data.get("measure") or {}, created=source.created)

    @_names_the_file
    def fingerprint_bodies(self) -> dict[str, str]:
        """Every remembered fingerprint: hash -> body (JSON text, as stored, unchecked)."""
        return {
            h: body
            for h, body in self._db.execute("SELECT hash, body FROM fingerprints")
            if isinstance(h, str) and isinstance(body, str)
        }

    @_names_the_file
    def _put(
        self,
        key: tuple[str, str, str],
        timing: KernelTiming,
        measure: dict[str, Any] | None,
        *,
        created: float | None = None,
    ) -> None:
        record = json.dumps(
            {
                "_type": RECORD_TYPE,
                "_version": RECORD_VERSION,
                "fingerprint": key[0],
                "layer": key[1],
                "choice": key[2],
                "measure": measure or {},
                "_data": timing.to_dict(),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO timings VALUES (?, ?, ?, ?, ?, ?)",
                (*key, record, _checksum(record), time.time() if created is None else created),
            )

    @_names_the_file
    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM timings").fetchone()[0])

    @_names_the_file
    def rows(self, fingerprint_hash: str | None = None) -> list[dict[str, Any]]:
        """Every valid record (for a fingerprint), as dicts: for run directories and reports."""
        query = "SELECT fingerprint, layer, choice, record, checksum FROM timings"
        params: tuple[str, ...] = ()
        if fingerprint_hash is not None:
            query += " WHERE fingerprint=?"
            params = (fingerprint_hash,)
        out = []
        for fp, layer, choice, record, checksum in self._db.execute(query, params).fetchall():
            if self._check(record, checksum, (fp, layer, choice)) is None:
                data = json.loads(record)
                out.append({"fingerprint": fp, "layer": layer, "choice": choice, **data["_data"]})
        return out
