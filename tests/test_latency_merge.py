"""``profile-merge``: latency tables of several machines merged by target fingerprint."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autoquant.cli import app
from autoquant.errors import MachineError
from autoquant.latency.table import LatencyTable
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice

LAYER = LayerInfo("fc", "linear", (16, 32), (1, 32), (1, 16), 512, 528, True)
OTHER = LayerInfo("fc2", "linear", (16, 64), (1, 64), (1, 16), 1024, 1040, True)
FP32 = QuantChoice()
W8 = QuantChoice(8, 8, "per_channel")
FAST = KernelTiming.from_samples("dense-fp32", [1e-5, 1.2e-5, 1.1e-5])
SLOW = KernelTiming.from_samples("dense-fp32", [3e-5, 3.2e-5, 3.1e-5])


def _fingerprint(host: str) -> tuple[str, dict]:
    body = {"host": host, "runtime": "onnxruntime", "threads": 2}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20], body


FP_A, BODY_A = _fingerprint("machine-a")
FP_B, BODY_B = _fingerprint("machine-b")


def _table(path, fp, body, rows):
    with LatencyTable(path) as t:
        t.remember_fingerprint(fp, body)
        for layer, choice, timing in rows:
            t.put(fp, layer, choice, timing, measure={"repeat": 3})
    return path


def _merge(into, *sources):
    result = CliRunner().invoke(app, ["profile-merge", str(into), *map(str, sources)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_two_machines_merge_by_fingerprint(tmp_path):
    a = _table(tmp_path / "a.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST), (OTHER, W8, SLOW)])
    # the second machine's table: A's rows copied under another fingerprint, through the API
    with LatencyTable(a, read_only=True) as src, LatencyTable(tmp_path / "b.sqlite") as b:
        b.remember_fingerprint(FP_B, BODY_B)
        for rec in src.stored():
            data = json.loads(rec.record)
            b._put((FP_B, *rec.key[1:]), KernelTiming.from_dict(data["_data"]), data["measure"])
    into = tmp_path / "merged.sqlite"
    out = _merge(into, a, tmp_path / "b.sqlite")
    lines = [ln for ln in out.splitlines() if "fingerprint" in ln]
    assert len(lines) == 2 and all("2 added" in ln for ln in lines), out
    assert f"{into}: 4 records" in out
    with LatencyTable(into) as t:
        assert t.get(FP_A, LAYER, FP32).timing == FAST
        assert t.get(FP_B, OTHER, W8).timing == SLOW
        assert t.fingerprint_bodies().keys() == {FP_A, FP_B}
        assert json.loads(t.fingerprint_bodies()[FP_B]) == BODY_B
    again = _merge(into, a)  # merging twice adds nothing
    assert "0 added" in again and "2 kept (equal)" in again


def test_corrupt_record_skipped_and_counted(tmp_path):
    a = _table(tmp_path / "a.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST), (OTHER, W8, SLOW)])
    with sqlite3.connect(a) as db:  # a flipped bit: the checksum no longer matches
        db.execute("UPDATE timings SET record = replace(record, 'dense', 'Dense') WHERE layer LIKE '%w16x64%'")
    db.close()
    into = tmp_path / "merged.sqlite"
    out = _merge(into, a)
    assert "1 added" in out and "1 skipped" in out, out
    with LatencyTable(into) as t:
        assert len(t) == 1 and not t.get(FP_A, OTHER, W8).hit


def test_conflict_keeps_the_measurement_and_a_newer_record_replaces_a_failure(tmp_path):
    into = _table(tmp_path / "into.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST), (OTHER, W8, KernelTiming.failed("timeout"))])
    source = _table(tmp_path / "src.sqlite", FP_A, BODY_A, [(LAYER, FP32, SLOW), (OTHER, W8, SLOW)])
    out = _merge(into, source)
    assert "1 conflicts" in out and "1 failures replaced" in out, out
    with LatencyTable(into) as t:
        assert t.get(FP_A, LAYER, FP32).timing == FAST  # measured values never overwritten
        assert t.get(FP_A, OTHER, W8).timing == SLOW
    # an older source record does not replace a newer failure
    old = _table(tmp_path / "old.sqlite", FP_A, BODY_A, [(OTHER, FP32, SLOW)])
    _table(into, FP_A, BODY_A, [(OTHER, FP32, KernelTiming.failed("timeout"))])
    out = _merge(into, old)
    assert "1 conflicts" in out and "0 failures replaced" in out, out


def test_source_files_are_never_modified(tmp_path):
    a = _table(tmp_path / "a.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST), (OTHER, W8, SLOW)])
    with sqlite3.connect(a) as db:  # a corrupt record in it is skipped, not deleted
        db.execute("UPDATE timings SET checksum = 'x' WHERE layer LIKE '%w16x64%'")
    db.close()
    before = a.read_bytes()
    _merge(tmp_path / "merged.sqlite", a)
    assert a.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sqlite", "merged.sqlite"]
    with LatencyTable(a, read_only=True) as src, pytest.raises(MachineError, match="readonly"):
        src.remember_fingerprint(FP_B, BODY_B)  # SQLite itself refuses every write
    assert a.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (b"not a database at all " * 200, 2, "not a latency table"),
        (None, 2, "not a latency table"),  # a SQLite file of another program
    ],
)
def test_a_bad_source_is_one_line(tmp_path, content, code, words):
    bad = tmp_path / "bad.sqlite"
    if content is None:
        with sqlite3.connect(bad) as db:
            db.execute("CREATE TABLE notes (x TEXT)")
        db.close()
    else:
        bad.write_bytes(content)
    before = bad.read_bytes()
    into = _table(tmp_path / "into.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST)])
    done = subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "profile-merge", str(into), str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and words in lines[0], done.stderr
    assert bad.read_bytes() == before


def test_a_damaged_page_is_one_machine_failure(tmp_path):
    a = _table(tmp_path / "a.sqlite", FP_A, BODY_A, [(LAYER, FP32, FAST)])
    with sqlite3.connect(a) as db:
        db.execute("PRAGMA page_size")
        db.executemany(
            "INSERT INTO timings VALUES (?, ?, ?, ?, ?, 0)", [(FP_A, f"l{i}", "c", "x" * 500, "y") for i in range(200)]
        )
    db.close()
    data = bytearray(a.read_bytes())
    data[4096 * 3 : 4096 * 3 + 200] = b"\xff" * 200  # a page in the middle of the timings
    a.write_bytes(bytes(data))
    done = subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "profile-merge", str(tmp_path / "into.sqlite"), str(a)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged latency table" in lines[0], done.stderr


def test_a_merged_table_answers_a_profile_without_measuring(tmp_path):
    pytest.importorskip("onnxruntime")
    a, b = tmp_path / "A.sqlite", tmp_path / "B.sqlite"
    args = ["profile", "cpu-local-ort", "--task", "digits-mlp", "--choices", "f32-a32,w8cs-a8",
            "--repeat", "3", "--min-repeat-ms", "0", "--quiet"]
    env = {"COLUMNS": "250"}
    first = CliRunner().invoke(app, [*args, "--table", str(a)], env=env)
    assert first.exit_code == 0, (first.output, first.exception)
    assert "0 kernels measured now" not in first.output
    _merge(b, a)
    second = CliRunner().invoke(app, [*args, "--table", str(b)], env=env)
    assert second.exit_code == 0, (second.output, second.exception)
    assert "0 kernels measured now" in second.output and "0 reused" not in second.output, second.output
