"""One owner per run directory, and nothing a search wrote is lost or rebuilt from an unchecked
ledger: real processes, real file locks, real SQLite ledgers edited the way a user could."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, run_cli, small_spec

from autoquant.search.ledger import INTERRUPTED, entries, open_study, sqlite_url

RESULTS = ("trials.parquet", "pareto.csv", "report.html")
LOCK_FILE = ".autoquant.lock"


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "autoquant.cli", *map(str, args)]


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / n).read_bytes() for n in RESULTS}


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select state, count(*) from trials group by state").fetchall())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    spec = small_spec(tmp, trials=8)
    done = subprocess.run(
        _cli("search", spec, "--out", tmp / "run", "--quiet"), capture_output=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return tmp / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    shutil.copy(finished_run.parent / "space.yaml", tmp_path / "space.yaml")
    shutil.copy(finished_run.parent / "spec.yaml", tmp_path / "spec.yaml")
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# --- one owner -----------------------------------------------------------------------------


def _reap(p: subprocess.Popen, *, block: bool) -> float | None:
    """The CPU seconds an ended process used (its exit code goes to ``p.returncode``); None
    while it runs."""
    pid, status, usage = os.wait4(p.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _startup_cpu_seconds(n: int, tmp: Path) -> float:
    """The most CPU one of ``n`` concurrent searches of a spec that does not exist uses: what
    starting the command and reading a spec costs."""
    procs = [_popen(_cli("search", tmp / "no-such-spec.yaml")) for _ in range(n)]
    cpu = [_reap(p, block=True) for p in procs]
    assert all(p.returncode == 2 for p in procs)
    return max(c for c in cpu if c is not None)


def test_four_searches_on_one_run_directory_one_owner_then_a_killed_owner_is_taken_over(tmp_path):
    spec = small_spec(tmp_path, trials=10)
    run_dir = tmp_path / "run"
    db = run_dir / "study.db"
    startup = _startup_cpu_seconds(4, tmp_path)

    start = time.monotonic()
    procs = [_popen(_cli("search", spec, "--out", run_dir, "--trials", 10, "--quiet")) for _ in range(4)]
    ended: dict[int, tuple[float, float]] = {}  # pid: (wall, cpu) seconds
    while time.monotonic() - start < 120 and len(ended) < 3:
        for p in procs:
            if p.pid not in ended and (cpu := _reap(p, block=False)) is not None:
                ended[p.pid] = (time.monotonic() - start, cpu)
        time.sleep(0.01)
    losers = [p for p in procs if p.pid in ended]
    owners = [p for p in procs if p.pid not in ended]
    assert len(losers) == 3 and len(owners) == 1, {p.pid: p.returncode for p in procs}
    owner = owners[0]
    for p in losers:
        err = p.stderr.read().decode()
        lines = [line for line in err.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1, err
        assert f"in use by autoquant search (pid {owner.pid} on host {socket.gethostname()}" in err
        # Refused before the task loads: within a second of what starting the command and
        # reading the spec costs. Counted in CPU seconds, which other processes on a busy
        # machine do not stretch as they stretch the wall clock.
        wall, cpu = ended[p.pid]
        assert cpu < startup + 1.0, (wall, cpu, startup)

    # the owner is killed inside a trial; the lock dies with it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and owner.poll() is None:
        try:
            states = _states(db) if db.exists() else {}
        except sqlite3.OperationalError:
            states = {}
        if states.get("COMPLETE", 0) >= 2 and states.get("RUNNING", 0) == 1:
            os.kill(owner.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    owner.wait(timeout=60)
    assert owner.returncode == -signal.SIGKILL, owner.stderr.read().decode()[-2000:]
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == owner.pid  # the dead holder

    again = _popen(_cli("search", spec, "--out", run_dir, "--trials", 10, "--quiet"))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    assert b"interrupted trial(s) marked failed" in out
    assert not (run_dir / LOCK_FILE).exists()
    done = entries(open_study(sqlite_url(run_dir), ["maximize", "minimize"], None, create=False))
    assert "RUNNING" not in {e.state for e in done}
    measured = [e.config_hash for e in done if e.state == "COMPLETE" and e.reused_from is None]
    failed = [e for e in done if e.state == "FAIL" and e.fail_reason != INTERRUPTED]
    assert len(measured) == len(set(measured)), "a config was measured twice"
    assert len(measured) + len(failed) == 10, "the trial budget was overrun"
    assert any(e.fail_reason == INTERRUPTED for e in done)


_HOLD = """\
import sys, time
from pathlib import Path
from autoquant.rundir import owner_lock
with owner_lock(Path(sys.argv[1]), "autoquant search"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_report_and_export_refuse_an_owned_run_compare_reads_it_and_a_dead_owner_is_taken_over(
    run_copy, tmp_path, capsys
):
    holder = _popen([sys.executable, "-c", _HOLD, str(run_copy)])
    try:
        assert holder.stdout.readline().strip() == b"held"
        before = _snapshot(run_copy)
        for args in (["report", run_copy], ["export", run_copy, "--latency-repeats", 0]):
            code, _, err = run_cli(args, capsys)
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1, err
            assert f"in use by autoquant search (pid {holder.pid} on host" in err
        assert _snapshot(run_copy) == before and not (run_copy / "exports").exists()
        other = shutil.copytree(run_copy, tmp_path / "other")
        code, _, err = run_cli(["compare", run_copy, other, "--out", tmp_path / "cmp"], capsys)
        assert code == 0, err  # read-only: no lock needed
    finally:
        holder.kill()
        holder.wait()
    code, out, err = run_cli(["report", run_copy], capsys)
    assert code == 0 and "report:" in out, err
    assert not (run_copy / LOCK_FILE).exists()


def test_a_search_that_cannot_load_its_task_leaves_no_run_directory(tmp_path, capsys):
    spec = small_spec(tmp_path, extra="")
    spec.write_text(spec.read_text().replace("task: digits-mlp", "task: {function: nosuchmod_x:make}"))
    code, _, err = run_cli(["search", spec, "--out", tmp_path / "out" / "run", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_temp_files_left_by_a_killed_process_are_removed_by_the_next_owner(run_copy, capsys):
    planted = [
        run_copy / ".trials.parquet.tmp4194999",
        run_copy / "predictor" / ".quality.json.tmp12",
        run_copy / "exports" / "knee" / ".model.onnx.tmp77",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    keep = run_copy / "exports" / "knee" / "notes.tmp"
    keep.write_text("mine")
    code, _, err = run_cli(["report", run_copy], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in planted) and keep.read_text() == "mine"


# --- refuse, never overwrite ---------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("delete", "study.db is missing"),
        ("empty", "study.db is empty"),
        ("garbage", "not a readable autoquant ledger"),
        ("truncate", "not a readable autoquant ledger"),
    ],
)
def test_results_whose_ledger_is_gone_are_never_overwritten(run_copy, capsys, damage, needle):
    db = run_copy / "study.db"
    if damage == "delete":
        db.unlink()
    elif damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        db.write_bytes(b"not sqlite at all\n" * 100)
    else:
        db.write_bytes(db.read_bytes()[:8192])
    ledger = db.read_bytes() if db.exists() else None
    before = _snapshot(run_copy)
    code, _, err = run_cli(["search", run_copy.parent / "spec.yaml", "--out", run_copy, "--quiet"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in err, err
    assert _snapshot(run_copy) == before
    assert (db.read_bytes() if db.exists() else None) == ledger


def _edit_config(db: Path, number: int, *, rehash: bool) -> None:
    """Change one layer's choice in a trial's stored config, as a user with sqlite3 could."""
    from autoquant.space import QuantConfig

    with sqlite3.connect(db) as conn:
        (trial_id,) = conn.execute("select trial_id from trials where number = ?", (number,)).fetchone()
        attrs = dict(
            conn.execute(
                "select key, value_json from trial_user_attributes where trial_id = ?", (trial_id,)
            ).fetchall()
        )
        data = json.loads(json.loads(attrs["config"]))
        layer = sorted(data["_data"])[0]
        bits = data["_data"][layer]["weight_bits"]
        data["_data"][layer].update(weight_bits=8 if bits != 8 else 4, granularity="per_channel")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        updates = {"config": text}
        if rehash:
            updates["config_hash"] = QuantConfig.from_json(text).hash
        for key, value in updates.items():
            conn.execute(
                "update trial_user_attributes set value_json = ? where trial_id = ? and key = ?",
                (json.dumps(value), trial_id, key),
            )


@pytest.mark.parametrize(
    "rehash, needle", [(False, "the ledger records"), (True, "disagrees with the trial's params")]
)
def test_a_config_edited_in_the_ledger_is_refused_before_any_table_is_rewritten(
    run_copy, capsys, rehash, needle
):
    _edit_config(run_copy / "study.db", 3, rehash=rehash)
    before = _snapshot(run_copy)
    code, _, err = run_cli(
        ["search", run_copy.parent / "spec.yaml", "--out", run_copy, "--trials", 10, "--quiet"],
        capsys,
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "study.db: trial 3:" in err and needle in err
    assert _snapshot(run_copy) == before


def test_a_ledger_missing_trials_the_tables_hold_is_refused(run_copy, capsys):
    last = int(pd.read_parquet(run_copy / "trials.parquet")["trial"].max())
    with sqlite3.connect(run_copy / "study.db") as conn:
        conn.execute("pragma foreign_keys = on")
        (trial_id,) = conn.execute("select trial_id from trials where number = ?", (last,)).fetchone()
        for table in ("trial_user_attributes", "trial_system_attributes", "trial_params",
                      "trial_values", "trial_intermediate_values", "trial_heartbeats"):
            conn.execute(f"delete from {table} where trial_id = ?", (trial_id,))
        conn.execute("delete from trials where trial_id = ?", (trial_id,))
    before = _snapshot(run_copy)
    code, _, err = run_cli(["search", run_copy.parent / "spec.yaml", "--out", run_copy, "--quiet"], capsys)
    assert code == 2 and f"trials.parquet holds trial(s) {last}" in err, err
    assert _snapshot(run_copy) == before


def test_export_refuses_a_pareto_trial_the_ledger_does_not_have(run_copy, capsys):
    front = pd.read_csv(run_copy / "pareto.csv")
    front.loc[0, "trial"] = 999
    front.to_csv(run_copy / "pareto.csv", index=False)
    code, _, err = run_cli(["export", run_copy, "--pick", "trial=999", "--latency-repeats", 0], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "pareto.csv: trial: bad value 999: trial 999 is not in the ledger study.db" in err
    assert not (run_copy / "exports").exists()


# --- the predictor's save ------------------------------------------------------------------

_SAVE_UNDER_LIMIT = """\
import resource, signal, sys
import numpy as np
from autoquant.predict import AccuracyPredictor
directory, limit = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(1)
X = rng.random((3000, 8))
model = AccuracyPredictor(feature_names=tuple(f"f{i}" for i in range(8)), n_members=2, rounds=5, seed=1)
model.fit(X, 1.0 - X[:, 0])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    model.save(directory)
except OSError as exc:
    print("cut short:", exc.errno)
"""


def test_a_predictor_save_cut_short_leaves_the_previous_predictor_whole(tmp_path):
    """A file-size limit (a disk that fills) stops the save between the members and the
    manifest: the directory must still load as the previous predictor, not a mix of both."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("xgboost")
    from autoquant.predict import AccuracyPredictor
    from autoquant.predict.model import MANIFEST

    directory = tmp_path / "model"
    rng = np.random.default_rng(0)
    X = rng.random((3000, 8))
    first = AccuracyPredictor(
        feature_names=tuple(f"f{i}" for i in range(8)), n_members=2, rounds=5, seed=0
    ).fit(X, X[:, 0])
    first.save(directory)
    members = max(p.stat().st_size for p in directory.glob("member_*.ubj"))
    manifest = (directory / MANIFEST).stat().st_size
    assert members < manifest // 2  # the limit below lets members through, not the manifest
    cut = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SAVE_UNDER_LIMIT), str(directory), str(manifest // 2)],
        capture_output=True,
        cwd=ROOT,
    )
    assert b"cut short" in cut.stdout, cut.stderr.decode()[-2000:]
    loaded = AccuracyPredictor.load(directory)
    probe = rng.random((50, 8))
    assert np.array_equal(loaded.predict(probe).mean, first.predict(probe).mean)
    assert not list(directory.glob(".*.tmp*"))
