"""Failures of the machine or a dependency, and damaged files autoquant wrote: one line on
stderr naming the file and what to do, exit code 1, never a traceback. Real files, real SQLite,
real subprocesses with a file-size limit standing in for a full disk."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, small_spec

from autoquant.errors import MachineError, machine_failure


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _cli(args: list[str], *, fsize: int | None = None, timeout: float = 180):
    """``autoquant ARGS`` in a child process; ``fsize`` limits the bytes of any file it writes
    (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG, as on a full disk)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "autoquant.cli", *map(str, args)],
        preexec_fn=limit if fsize is not None else None,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    spec = small_spec(tmp, trials=6)
    from autoquant.cli import main

    old, sys.argv = sys.argv, ["autoquant", "search", str(spec), "--out", str(tmp / "run"), "--quiet"]
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        sys.argv = old
    return tmp / "run"


@pytest.mark.parametrize("name", ["pareto.csv", "trials.parquet", "run.json"])
@pytest.mark.parametrize("command", ["report", "compare"])
def test_truncated_run_file_is_one_line(finished_run, tmp_path, capsys, name, command):
    run = tmp_path / "cut"
    shutil.copytree(finished_run, run)
    size = (run / name).stat().st_size
    os.truncate(run / name, size // 2)
    args = [command, run] if command == "report" else [command, finished_run, run]
    code, _, err = run_cli([*args, "--out", tmp_path / "cmp"] if command == "compare" else args, capsys)
    line = one_line(err)
    assert code == 1, err
    assert str(run / name) in line and "damaged" in line and "autoquant search" in line


def test_pareto_row_cut_short_is_damaged(finished_run, tmp_path, capsys):
    """A cut at a line end parses: the row's blank figures give it away."""
    run = tmp_path / "cut"
    shutil.copytree(finished_run, run)
    text = (run / "pareto.csv").read_text().splitlines()
    (run / "pareto.csv").write_text("\n".join([*text[:-1], text[-1][:12]]) + "\n")
    code, _, err = run_cli(["report", run], capsys)
    assert code == 1 and "pareto.csv" in one_line(err)


def test_truncated_ledger_on_resume_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "cut"
    shutil.copytree(finished_run, run)
    os.truncate(run / "study.db", (run / "study.db").stat().st_size // 2)
    code, _, err = run_cli(
        ["search", run / "spec.yaml", "--out", run, "--quiet", "--trials", "8"], capsys
    )
    line = one_line(err)
    # an unreadable ledger is refused before anything is rewritten from it (exit 2, the
    # "refuse, never overwrite" rule), naming the file
    assert code == 2 and str(run) in line and "study.db is not a readable" in line


def test_full_disk_during_search_is_one_line(tmp_path):
    spec = small_spec(tmp_path, trials=6)
    done = _cli(["search", spec, "--out", tmp_path / "run", "--quiet"], fsize=40_000)
    line = one_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert str(tmp_path / "run" / "study.db") in line


def _make_read_only(path: Path) -> str:
    """A directory no write goes into, for this user; the technique, or skip."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return "chmod"
    # root writes through permission bits; the immutable attribute stops root too
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i is not available here: {done.stderr.strip()}")
    return "chattr"


def _undo_read_only(path: Path, how: str) -> None:
    if how == "chattr":
        subprocess.run(["chattr", "-i", str(path)], check=False)
    path.chmod(0o755)


def test_read_only_run_directory_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "ro"
    shutil.copytree(finished_run, run)
    (run / "report.html").unlink()
    how = _make_read_only(run)
    try:
        code, _, err = run_cli(["report", run], capsys)
    finally:
        _undo_read_only(run, how)
    line = one_line(err)
    assert code == 1 and str(run) in line and ("read-only" in line or "permission" in line)


def _damaged_table(path: Path) -> bytes:
    from autoquant.latency.table import LatencyTable
    from autoquant.measure.timing import KernelTiming
    from autoquant.space.values import LayerInfo, QuantChoice

    with LatencyTable(path) as table:
        for i in range(300):
            layer = LayerInfo(f"l{i}", "linear", (i + 1, 64), (1, 64), (1, i + 1), 64, 64, True)
            table.put("f" * 20, layer, QuantChoice(), KernelTiming.from_samples("x", [1e-5] * 3))
    data = bytearray(path.read_bytes())
    page = 4096
    middle = len(data) // page // 2
    data[middle * page : (middle + 1) * page] = b"\xa5" * page
    path.write_bytes(bytes(data))
    return bytes(data)


def test_latency_table_with_a_damaged_page_is_refused(tmp_path, capsys):
    from autoquant.latency.table import LatencyTable

    path = tmp_path / "latency.sqlite"
    before = _damaged_table(path)
    with pytest.raises(MachineError, match="damaged latency table") as info:
        LatencyTable(path)
    assert str(path) in str(info.value) and "move it aside" in str(info.value)
    pytest.importorskip("onnxruntime")
    code, _, err = run_cli(
        ["profile", "cpu-local-ort", "--task", "digits-mlp", "--choices", "f32-a32", "--table",
         path, "--quiet"], capsys,
    )
    line = one_line(err)
    assert code == 1 and str(path) in line
    assert path.read_bytes() == before  # kept as it was: its timings are not thrown away


def test_dependency_failures_map_to_one_line(tmp_path):
    """Real exceptions from the libraries, not stand-ins."""
    xgb = pytest.importorskip("xgboost")
    try:
        xgb.Booster().save_model(str(tmp_path / "no" / "such" / "dir" / "m.ubj"))
    except xgb.core.XGBoostError as exc:
        found = machine_failure(exc)
        assert found is not None and "XGBoost" in str(found) and "\n" not in str(found)
    else:
        pytest.fail("XGBoost saved into a missing directory")
    db = tmp_path / "bad.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 4000)
    with pytest.raises(sqlite3.DatabaseError) as info:
        sqlite3.connect(db).execute("SELECT * FROM sqlite_master").fetchall()
    found = machine_failure(info.value, file=db)
    assert found is not None and str(db) in str(found)
    bug = machine_failure(sqlite3.ProgrammingError("Incorrect number of bindings"))
    assert bug is None and machine_failure(KeyError("x")) is None  # bugs keep their traceback
