"""Merge latency tables measured on several machines, keyed by target fingerprint.

Each machine profiles its own device into its own table; ``merge_tables`` copies every valid
record of other tables into one, so a search on any machine finds the timings measured for its
fingerprint wherever they were measured. The rules:

- The source tables are opened read-only and never modified: they may come from another machine
  and are treated as hostile (a record whose checksum, type, version or key does not check is
  skipped and counted, never copied).
- A key only the source has is added, with its write time.
- Measured values are never overwritten by other measurements: a key both tables have keeps the
  target's record, unless the target's is a failure and the source's is newer (then the newer
  record replaces it). Two differing records for one key are a *conflict*: counted, reported,
  the target's kept. Equal records are *kept*.
- Fingerprint bodies travel with their timings (only a body that hashes to its key is copied).
- Every write goes through the table's put path, one SQLite transaction per record: a merge
  stopped midway leaves a consistent table, and running it again merges the rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from autoquant.latency.table import LatencyTable, StoredRecord
from autoquant.measure.timing import KernelTiming


@dataclass
class FingerprintCount:
    """What merging did to one fingerprint's records."""

    fingerprint: str
    added: int = 0
    replaced: int = 0  # a failure in the target, replaced by a newer source record
    kept: int = 0  # equal in both
    conflicts: int = 0  # differing in both: the target's kept
    skipped: int = 0  # failed their check in the source: not copied
    body: str = ""  # a note on the fingerprint's body, when it was not copied

    def line(self, source: Path) -> str:
        return (
            f"{source}: fingerprint {self.fingerprint}: {self.added} added, {self.replaced} "
            f"failures replaced by newer records, {self.kept} kept (equal), {self.conflicts} "
            f"conflicts (target's kept), {self.skipped} skipped (failed their check)"
            + (f"; {self.body}" if self.body else "")
        )


def _canonical(record: str) -> str:
    """A record's timing and settings as one comparable text (NaN included)."""
    data = json.loads(record)
    timing = KernelTiming.from_dict(data["_data"]).to_dict()
    return json.dumps({"measure": data.get("measure") or {}, "timing": timing}, sort_keys=True)


def _merge_one(into: LatencyTable, rec: StoredRecord, count: FingerprintCount) -> None:
    if rec.problem is not None:
        count.skipped += 1
        return
    have = into.stored_at(rec.key)
    if have is None or have.problem is not None:  # a corrupt record is no record (as ``get``)
        into.copy_record(rec)
        count.added += 1
    elif _canonical(have.record) == _canonical(rec.record):
        count.kept += 1
    elif have.failure and rec.created > have.created:
        into.copy_record(rec)
        count.replaced += 1
    else:
        count.conflicts += 1


def _body_hash(body: str) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    text = json.dumps(parsed, sort_keys=True, separators=(",", ":"))  # as ``fingerprint_hash``
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def merge_table(into: LatencyTable, source: LatencyTable) -> list[FingerprintCount]:
    """Copy ``source``'s valid records into ``into``; one count per fingerprint, in order."""
    counts: dict[str, FingerprintCount] = {}
    for rec in source.stored():
        count = counts.setdefault(rec.key[0], FingerprintCount(rec.key[0]))
        _merge_one(into, rec, count)
    known = into.fingerprint_bodies()
    for fp, body in source.fingerprint_bodies().items():
        if fp not in counts or fp in known:
            continue
        if _body_hash(body) == fp:
            into.remember_fingerprint(fp, json.loads(body))
        else:
            counts[fp].body = "its fingerprint body does not hash to its key: not copied"
    return list(counts.values())
