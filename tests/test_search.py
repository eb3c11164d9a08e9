"""The search end to end: run directory, Pareto consistency, failures, resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_cli, small_spec, write

from autoquant.pareto import dominates


def _check_front(run_dir):
    trials = pd.read_parquet(run_dir / "trials.parquet")
    front = pd.read_csv(run_dir / "pareto.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(front) >= 1
    for _, f in front.iterrows():
        for _, t in done.iterrows():
            assert not dominates(
                (t["accuracy"], t["size_bytes"]),
                (f["accuracy"], f["size_bytes"]),
                ["maximize", "minimize"],
            ), (t["trial"], f["trial"])
    # and every non-dominated feasible trial is on the front
    assert set(front["trial"]) == set(done[done["on_front"]]["trial"])
    return trials, front


def test_search_writes_run_directory(tmp_path, capsys):
    spec = small_spec(tmp_path, trials=10)
    code, out, err = run_cli(["search", spec, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    for name in ("spec.yaml", "study.db", "trials.parquet", "pareto.csv"):
        assert (run_dir / name).exists(), name
    trials, front = _check_front(run_dir)
    assert len(trials) == 10 and trials["config_hash"].is_unique
    first = trials.sort_values("trial").head(2)
    assert first["reference"].tolist() == ["fp32", "int8"]
    assert (trials["accuracy_source"] == "measured").all() and (
        trials["size_bytes_source"] == "exact"
    ).all()
    assert {"layer:hidden.0", "layer:hidden.1", "layer:out"} <= set(trials.columns)
    fp32 = trials[trials["reference"] == "fp32"].iloc[0]
    assert fp32["size_bytes"] == 4 * sum(
        p for p in (64 * 256 + 256, 256 * 128 + 128, 128 * 10 + 10)
    )
    assert "Pareto front" in out and "accuracy" not in err
    # every measured accuracy carries its interval on the 450 held-out digits; fp32 is within
    # noise of itself, and the mark is the paired drop interval containing 0
    done = trials[trials["state"] == "COMPLETE"]
    assert ((done["accuracy_lo"] <= done["accuracy"]) & (done["accuracy"] <= done["accuracy_hi"])).all()
    assert (done["eval_samples"] == 450).all()
    assert fp32["within_noise_of_fp32"] and fp32["accuracy_drop_lo"] == fp32["accuracy_drop_hi"] == 0
    contains_zero = (done["accuracy_drop_lo"] <= 0) & (done["accuracy_drop_hi"] >= 0)
    assert (done["within_noise_of_fp32"].astype(bool) == contains_zero).all()
    resolved = (run_dir / "spec.yaml").read_text()
    assert "rules:" in resolved  # the space is stored inline, as run


def test_resume_continues_and_more_trials_extend(tmp_path, capsys):
    spec = small_spec(tmp_path, trials=6)
    run_dir = tmp_path / "run"
    assert run_cli(["search", spec, "--out", run_dir, "--quiet"], capsys)[0] == 0
    code, out, _ = run_cli(["search", spec, "--out", run_dir, "--quiet"], capsys)
    assert code == 0 and "0 new this time" in out
    code, out, _ = run_cli(
        ["search", spec, "--out", run_dir, "--quiet", "--trials", "9", "--sampler", "random"],
        capsys,
    )
    assert code == 0 and "3 new this time" in out
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 9 and trials["config_hash"].is_unique


def test_resume_refuses_a_different_space(tmp_path, capsys):
    spec = small_spec(tmp_path, trials=3)
    run_dir = tmp_path / "run"
    assert run_cli(["search", spec, "--out", run_dir, "--quiet"], capsys)[0] == 0
    write(
        tmp_path / "space.yaml",
        (tmp_path / "space.yaml").read_text().replace("[4, 8, 32]", "[8, 32]"),
    )
    code, _, err = run_cli(["search", spec, "--out", run_dir, "--quiet"], capsys)
    assert code == 2 and "different 'space'" in err and len(err.strip().splitlines()) == 1


def test_constraints_mark_feasibility(tmp_path, capsys):
    spec = small_spec(tmp_path, trials=8, extra="constraints: {max_size_bytes: 60000}\n")
    assert run_cli(["search", spec, "--out", tmp_path / "run", "--quiet"], capsys)[0] == 0
    trials, front = _check_front(tmp_path / "run")
    assert (trials["feasible"] == (trials["size_bytes"] <= 60000)).all()
    assert (front["size_bytes"] <= 60000).all()


def test_space_exhausted_stops(tmp_path, capsys):
    write(
        tmp_path / "space.yaml",
        "version: 1\nrules:\n  - match: {name: out}\n    weight_bits: [8, 32]\n",
    )
    spec = write(
        tmp_path / "spec.yaml",
        "version: 1\nname: x\ntask: digits-mlp\nspace: space.yaml\n"
        "search: {trials: 50, sampler: random}\n",
    )
    code, out, _ = run_cli(["search", spec, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 0 and "every config of the space is measured" in out
    assert len(pd.read_parquet(tmp_path / "run" / "trials.parquet")) == 2


USER_TASK = '''
import torch
from autoquant.tasks import Task, top1_accuracy

class Ratio(torch.nn.Module):
    """Divides by its own output: when quantization zeroes the small weights, 0/0 gives NaN."""
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[100.0, 0.01, 0.01, 0.01], [100.0, 0.02, 0.01, 0.01]]))
    def forward(self, x):
        y = self.fc(x)
        return y / y.abs().sum(dim=1, keepdim=True)

def make(n=32):
    x = torch.zeros(n, 4)
    x[:, 1:] = 1.0
    return Task(name="ratio", model=Ratio(), calibration_inputs=x, eval_inputs=x,
                eval_targets=torch.ones(n, dtype=torch.long), metric=top1_accuracy, input_shape=(1, 4))
'''


def test_user_task_and_failed_trial_recorded(tmp_path, capsys):
    write(tmp_path / "ratio_task.py", USER_TASK)
    write(
        tmp_path / "space.yaml",
        "version: 1\nrules:\n  - match: {}\n    weight_bits: [2, 32]\n"
        "    granularity: [per_tensor]\n",
    )
    spec = write(
        tmp_path / "spec.yaml",
        "version: 1\nname: ratio\n"
        "task: {function: 'ratio_task:make', args: {n: 16}}\nspace: space.yaml\n"
        "search: {trials: 2, sampler: random}\n",
    )
    code, out, err = run_cli(["search", spec, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 0, err
    trials = pd.read_parquet(tmp_path / "run" / "trials.parquet")
    failed = trials[trials["state"] == "FAIL"]
    assert len(failed) == 1 and "non-finite" in failed.iloc[0]["fail_reason"]
    assert failed.iloc[0]["accuracy_source"] == "failed"
    assert np.isnan(failed.iloc[0]["accuracy_lo"]) and failed.iloc[0]["within_noise_of_fp32"] is None
    assert trials[trials["state"] == "COMPLETE"].iloc[0]["accuracy"] == 1.0
    assert "1 failed" in out


def _db_states(db):
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select state, count(*) from trials group by state").fetchall())


def _start(spec, run_dir, trials):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoquant.cli",
            "search",
            str(spec),
            "--out",
            str(run_dir),
            "--trials",
            str(trials),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def test_sigkill_mid_trial_loses_nothing_and_measures_nothing_twice(tmp_path):
    spec = small_spec(tmp_path, trials=30)
    run_dir = tmp_path / "run"
    db = run_dir / "study.db"
    killed_mid_trial = 0
    for attempt in range(3):
        proc = _start(spec, run_dir, 30)
        deadline = time.monotonic() + 120
        target = 4 * (attempt + 1)
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    states = _db_states(db)
                except sqlite3.OperationalError:
                    states = {}
                if states.get("COMPLETE", 0) >= target and states.get("RUNNING", 0) == 1:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        killed_mid_trial += _db_states(db).get("RUNNING", 0)
        if killed_mid_trial:
            break
    assert killed_mid_trial, "never caught the search inside a trial"

    proc = _start(spec, run_dir, 30)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"interrupted trial(s) marked failed" in out
    trials = pd.read_parquet(run_dir / "trials.parquet")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 30
    assert done["config_hash"].is_unique
    interrupted = trials[trials["fail_reason"].fillna("").str.startswith("interrupted")]
    assert len(interrupted) >= 1
    _check_front(run_dir)
    assert "RUNNING" not in _db_states(db)


@pytest.mark.slow
def test_default_example_meets_its_promise(tmp_path, capsys):
    """The README's main job: under 5 minutes, a >=4x smaller config within 1 point."""
    start = time.monotonic()
    code, out, err = run_cli(
        ["search", ROOT / "examples" / "digits-cnn.yaml", "--out", tmp_path / "run", "--quiet"],
        capsys,
    )
    elapsed = time.monotonic() - start
    assert code == 0, err
    assert elapsed < 300
    trials, front = _check_front(tmp_path / "run")
    assert "fp32" in set(trials["reference"].dropna())
    good = front[(front["size_ratio"] >= 4) & (front["accuracy_drop"] <= 0.01)]
    assert len(good) >= 1
    assert np.isfinite(front["accuracy"]).all()
