"""Workers sharing one study on a real PostgreSQL server (started on loopback by tests/pg.py):
killed at will, nothing lost, nothing measured twice, the budget met exactly; bad storages are
one line and exit 2; no password ever reaches a file or the output."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, write
from pg import PgServer, start_server

SPACE = """\
version: 1
rules:
  - match: {}
    weight_bits: [2, 3, 4, 8, 32]
    act_bits: [8, 32]
    granularity: [per_channel]
"""


@pytest.fixture(scope="module")
def pg():
    root = Path(tempfile.mkdtemp(prefix="aq-pg-"))
    server = start_server(root)
    yield server
    try:
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def spec(tmp: Path, *, trials: int, name: str = "shared", extra: str = "") -> Path:
    write(tmp / "space.yaml", SPACE)
    return write(
        tmp / "spec.yaml",
        f"version: 1\nname: {name}\ntask: digits-mlp\nspace: space.yaml\n"
        f"search: {{sampler: random, trials: {trials}, seed: 0}}\n"
        "workers: {heartbeat_interval_s: 1, grace_period_s: 3, retry_s: 4}\n"
        "evaluation: {eval_samples: 450}\n" + extra,
    )


def cli(args: list, env: dict, **kw) -> subprocess.Popen:
    env = {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "autoquant.cli", *map(str, args)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def ledger(url: str, name: str, password: str):
    import optuna

    from autoquant.search.ledger import entries
    from autoquant.storage import check_url

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", password)
        study = optuna.load_study(study_name=name, storage=check_url(url, file=None, key="t"))
        return entries(study)


def states(url: str, name: str, password: str, conn=None) -> tuple[set[int], dict[int, str]]:
    """(numbers of COMPLETE trials, running trial number -> worker) straight from SQL (on
    ``conn``, an autocommit connection, when given: polling without a connection per call)."""
    import psycopg

    if conn is None:
        with psycopg.connect(f"{url}?password={password}", connect_timeout=5, autocommit=True) as own:
            return states(url, name, password, own)
    if conn.execute("select to_regclass('trials')").fetchone()[0] is None:
        return set(), {}  # no worker has created the study yet
    rows = conn.execute(
        "select t.number, t.state, a.value_json from trials t join studies s using (study_id) "
        "left join trial_user_attributes a on a.trial_id = t.trial_id and a.key = 'worker' "
        "where s.study_name = %s",
        (name,),
    ).fetchall()
    complete = {n for n, s, _ in rows if s == "COMPLETE"}
    running = {n: (w or "") for n, s, w in rows if s == "RUNNING"}
    return complete, running


def kill_workers(pg: PgServer, tmp: Path, *, workers: int, kills: int, trials: int, seed: int):
    url = pg.create_db(f"kills{workers}x{kills}")
    spec_path = spec(tmp, trials=trials)
    env = pg.env()
    rng = random.Random(seed)
    import psycopg

    conn = psycopg.connect(f"{url}?password={pg.password}", connect_timeout=5, autocommit=True)
    procs = [cli(["worker", spec_path, "--storage", url, "--index", i, "--quiet"], env) for i in range(workers)]
    seen_complete: set[int] = set()
    killed = mid_trial = 0
    early = ""
    deadline = time.monotonic() + 600

    def exited(proc) -> str:
        """Why a worker stopped before its kill: its exit code, last words and the budget."""
        _, err = proc.communicate(timeout=60)
        done = len(states(url, "shared", pg.password)[0])
        return f"worker exit {proc.returncode} with {done}/{trials} complete: {err.decode()[-1500:]}"

    while killed < kills and time.monotonic() < deadline:
        i = rng.randrange(workers)
        proc = procs[i]
        if proc.poll() is not None:
            early = exited(proc)  # the budget ran out before every kill, or the worker failed
            break
        complete, _ = states(url, "shared", pg.password, conn)
        seen_complete |= complete
        if killed % 2:  # every other kill waits until this worker is inside a trial
            until = time.monotonic() + 60
            while time.monotonic() < until and proc.poll() is None:
                _, running = states(url, "shared", pg.password, conn)
                if any(w.endswith(f':{proc.pid}"') for w in running.values()):
                    break  # kill at once: a digits-mlp trial lasts a fraction of a second
                time.sleep(0.01)
        else:
            time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            early = exited(proc)
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed += 1
        _, running = states(url, "shared", pg.password)
        mid_trial += any(w.endswith(f':{proc.pid}"') for w in running.values())
        procs[i] = cli(["worker", spec_path, "--storage", url, "--index", i, "--quiet"], env)
    conn.close()
    assert killed == kills, f"{killed} of {kills} kills: {early or 'out of time'}"
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    seen_complete |= states(url, "shared", pg.password)[0]

    run_dir = tmp / "run"
    run_dir.mkdir()
    # the run directory of this search, on "another machine": spec.yaml from the spec
    from autoquant.search.run import prepare
    from autoquant.spec import dump_yaml

    (run_dir / "spec.yaml").write_text(dump_yaml(prepare(spec_path, with_evaluator=False).resolved_spec()))
    proc = cli(["collect", run_dir, "--storage", url], env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]

    from autoquant.search.ledger import is_measured

    entries_ = ledger(url, "shared", pg.password)
    by_number = {e.number: e for e in entries_}
    # 0 completed trials lost
    assert all(by_number[n].state == "COMPLETE" for n in seen_complete)
    # 0 configs measured twice, the budget met exactly
    measured = [e for e in entries_ if is_measured(e)]
    hashes = [e.config_hash for e in measured]
    assert len(hashes) == len(set(hashes))
    assert len(measured) == trials
    # 0 trials left running
    assert not [e for e in entries_ if e.state == "RUNNING"]
    frame = pd.read_parquet(run_dir / "trials.parquet")
    # interrupted trials keep their rows (their config measured again later by another trial)
    assert len(frame) >= trials and frame.loc[frame["state"] == "COMPLETE", "config_hash"].is_unique
    done = set(frame.loc[frame["state"] == "COMPLETE", "trial"])
    assert {n for n in seen_complete if by_number[n].reused_from is None} <= done
    interrupted = [e for e in entries_ if e.fail_reason and e.fail_reason.startswith("interrupted")]
    return mid_trial, interrupted


def test_two_workers_five_kills_lose_nothing(pg, tmp_path):
    mid_trial, interrupted = kill_workers(pg, tmp_path, workers=2, kills=5, trials=100, seed=1)
    # the kills reached inside trials, and the heartbeat freed them
    assert mid_trial >= 1 and interrupted


@pytest.mark.slow
def test_four_workers_thirty_kills_lose_nothing(pg, tmp_path):
    mid_trial, interrupted = kill_workers(pg, tmp_path, workers=4, kills=30, trials=600, seed=2)
    assert mid_trial >= 5 and interrupted


def _files_and_output_hold(root: Path, text: str, output: str) -> list[str]:
    found = [str(p) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]
    return found + (["<output>"] if text in output else [])


def test_no_password_in_any_file_or_output(pg, tmp_path):
    url = pg.create_db("secret")
    spec_path = spec(tmp_path, trials=6, name="secret")
    out_dir = tmp_path / "run"
    proc = cli(["search", spec_path, "--out", out_dir, "--workers", 2, "--storage", url], pg.env())
    out, err = proc.communicate(timeout=300)
    output = out.decode() + err.decode()
    assert proc.returncode == 0, output[-2000:]
    assert "aq@127.0.0.1" in output  # the URL is shown, redacted
    frame = pd.read_parquet(out_dir / "trials.parquet")
    assert len(frame) == 6
    # a wrong password: one line, exit 2, neither password shown
    wrong = "wrong-" + pg.password
    proc = cli(["worker", spec_path, "--storage", url], pg.env(wrong))
    out, err = proc.communicate(timeout=120)
    output += out.decode() + err.decode()
    assert proc.returncode == 2 and len(err.decode().strip().splitlines()) == 1, err.decode()
    assert "password authentication failed" in err.decode()
    assert wrong not in output
    # a password in the URL is refused and not repeated
    with_pw = url.replace("aq@", f"aq:{pg.password}@")
    proc = cli(["collect", out_dir, "--storage", with_pw], pg.env())
    out, err = proc.communicate(timeout=120)
    output += out.decode() + err.decode()
    assert proc.returncode == 2 and "carries a password" in err.decode(), err.decode()
    assert _files_and_output_hold(tmp_path, pg.password, output) == []
    assert _files_and_output_hold(tmp_path, "aq@127.0.0.1", output)  # the grep can find things


def test_bad_storages_are_one_line_exit_2(pg, tmp_path):
    url = pg.create_db("other")
    first = spec(tmp_path / "a", trials=4, name="same")
    proc = cli(["worker", first, "--storage", url, "--quiet"], pg.env())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    other = spec(tmp_path / "b", trials=4, name="same", extra="objectives: [accuracy, size]\nconstraints: {max_size_bytes: 90000}\n")
    cases = {
        "another spec": (["worker", other, "--storage", url], "made by another spec"),
        "unreachable": (
            ["worker", first, "--storage", f"postgresql://aq@127.0.0.1:{_closed_port()}/x"],
            "cannot open the storage",
        ),
        "no such database": (["worker", first, "--storage", url + "nope"], "cannot open the storage"),
        "unknown scheme": (["worker", first, "--storage", "mysql://aq@h/db"], "unknown database"),
    }
    for what, (args, message) in cases.items():
        proc = cli(args, pg.env())
        _, err = proc.communicate(timeout=120)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 2, (what, err.decode()[-2000:])
        assert len(lines) == 1 and message in lines[0], (what, lines)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_storage_lost_mid_run_exits_1_with_finished_trials_safe(pg, tmp_path):
    url = pg.create_db("lost")
    spec_path = spec(tmp_path, trials=200, name="lost")
    proc = cli(["worker", spec_path, "--storage", url, "--quiet"], pg.env())
    try:
        until = time.monotonic() + 120
        while time.monotonic() < until and len(states(url, "lost", pg.password)[0]) < 3:
            time.sleep(0.1)
        before = states(url, "lost", pg.password)[0]
        assert len(before) >= 3
        pg.stop()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        pg.start()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, err.decode()[-2000:]
    assert "lost for" in lines[-1] and "safe" in lines[-1]
    assert pg.password not in err.decode()
    assert before <= states(url, "lost", pg.password)[0]


def test_workers_opening_a_new_database_at_once_all_get_it(pg):
    """Workers started together on a new database all create Optuna's tables at once;
    PostgreSQL refuses all but one CREATE TABLE (a unique violation in its catalog): each must
    still open the storage, not exit 2 as if the URL were wrong."""
    import threading

    from autoquant.storage import StorageSettings, check_url, open_storage

    url = check_url(pg.create_db("fresh"), file=None, key="t")
    barrier = threading.Barrier(6)
    failures: list[str] = []

    def start() -> None:
        barrier.wait()
        try:
            open_storage(url, StorageSettings())
        except Exception as exc:  # noqa: BLE001 - the test reports whatever a worker hit
            failures.append(f"{type(exc).__name__}: {exc}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", pg.password)
        threads = [threading.Thread(target=start) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert failures == []
