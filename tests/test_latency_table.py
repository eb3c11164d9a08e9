"""The latency table: hits, misses, keys, and corrupt or stale records never used."""

from __future__ import annotations

import json
import sqlite3

import pytest

from autoquant.errors import UserError
from autoquant.latency.table import LatencyTable, default_table_path, layer_signature
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice

LAYER = LayerInfo("fc", "linear", (16, 32), (1, 32), (1, 16), 512, 528, True)
TWIN = LayerInfo("other_name", "linear", (16, 32), (1, 32), (1, 16), 512, 528, True, index=3)
OTHER = LayerInfo("fc2", "linear", (16, 64), (1, 64), (1, 16), 1024, 1040, True)
W8 = QuantChoice(8, 8, "per_channel")
FP = QuantChoice()
TIMING = KernelTiming.from_samples("dense-fp32-a32", [1e-5, 1.2e-5, 1.1e-5], build_s=0.1)


@pytest.fixture
def table(tmp_path):
    with LatencyTable(tmp_path / "lat.sqlite") as t:
        yield t


def test_default_path_follows_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path))
    assert default_table_path() == tmp_path / "latency.sqlite"


def test_miss_then_hit(table):
    assert table.get("fp", LAYER, FP).reason == "missing"
    table.put("fp", LAYER, FP, TIMING)
    found = table.get("fp", LAYER, FP)
    assert found.hit and found.timing == TIMING
    assert found.timing.median_us == pytest.approx(11.0)
    assert len(table) == 1


def test_key_parts_separate(table):
    table.put("fp", LAYER, FP, TIMING)
    assert table.get("fp", TWIN, FP).hit  # same shapes, other name: shared
    assert not table.get("other-fingerprint", LAYER, FP).hit
    assert not table.get("fp", OTHER, FP).hit
    assert not table.get("fp", LAYER, W8).hit
    assert layer_signature(LAYER) == layer_signature(TWIN) != layer_signature(OTHER)


def test_failed_timings_round_trip(table):
    failed = KernelTiming.failed("timeout: too slow", "dense-w8a8")
    table.put("fp", LAYER, W8, failed)
    got = table.get("fp", LAYER, W8).timing
    assert got.status == "failed" and got.error == "timeout: too slow" and not got.ok
    assert got.figure().source == "failed"


def _tamper(path, sql, *params):
    db = sqlite3.connect(path)
    with db:
        db.execute(sql, params)
    db.close()


@pytest.mark.parametrize("how", ["bytes", "checksum", "version", "type", "key", "json"])
def test_corrupt_or_stale_records_are_dropped(tmp_path, how):
    path = tmp_path / "lat.sqlite"
    with LatencyTable(path) as table:
        table.put("fp", LAYER, FP, TIMING)
    record = sqlite3.connect(path).execute("SELECT record FROM timings").fetchone()[0]
    data = json.loads(record)
    if how == "bytes":
        _tamper(
            path,
            "UPDATE timings SET record = replace(record, '\"median_us\":11', '\"median_us\":1')",
        )
    elif how == "checksum":
        _tamper(path, "UPDATE timings SET checksum = ?", "0" * 64)
    else:
        if how == "version":
            data["_version"] = 0
        elif how == "type":
            data["_type"] = "Pickle"
        elif how == "key":
            data["choice"] = "w8cs-a8"
        new = (
            json.dumps(data, sort_keys=True, separators=(",", ":"))
            if how != "json"
            else "{not json"
        )
        import hashlib

        _tamper(
            path,
            "UPDATE timings SET record = ?, checksum = ?",
            new,
            hashlib.sha256(new.encode()).hexdigest(),
        )
    with LatencyTable(path) as table:
        found = table.get("fp", LAYER, FP)
        assert not found.hit
        assert found.reason.startswith("stale" if how == "version" else "corrupt"), found.reason
        assert table.invalidated == 1 and len(table) == 0  # deleted: re-measured next time
        assert table.rows() == []


def test_not_a_table(tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a latency table"):
        LatencyTable(path)


def test_rows_and_fingerprints(table):
    table.put("fp", LAYER, FP, TIMING)
    table.put("fp", LAYER, W8, TIMING)
    table.put("fp2", LAYER, W8, TIMING)
    table.remember_fingerprint("fp", {"target": {"kind": "llvm"}})
    assert len(table.rows("fp")) == 2 and len(table.rows()) == 3
    assert {r["choice"] for r in table.rows("fp")} == {"f32-a32", "w8cs-a8"}


def test_timing_dict_roundtrip_and_figure():
    back = KernelTiming.from_dict(json.loads(json.dumps(TIMING.to_dict())))
    assert back == TIMING
    assert TIMING.figure().value == pytest.approx(0.011) and TIMING.figure().source == "measured"
    excluded = KernelTiming.excluded("no kernel")
    assert excluded.figure().reason == "excluded: no kernel"
    assert KernelTiming.from_dict(excluded.to_dict()) == excluded
    with pytest.raises(ValueError):
        KernelTiming.from_dict({**TIMING.to_dict(), "status": "guessed"})
