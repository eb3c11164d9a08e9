"""One search loop behind every sampler, one registry of sampler names, and the guided proposer on
workers sharing a study (SQLite in WAL mode here: the same claims as on PostgreSQL)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing

import pytest
from conftest import ROOT, small_spec

from autoquant.search.samplers import SAMPLERS


def test_spec_cli_and_readme_read_the_one_registry():
    from autoquant.commands.workers import SamplerOption
    from autoquant.spec import SamplerName as SpecName
    from autoquant.spec import SearchSettings

    names = list(SAMPLERS)
    assert "guided" in names and SearchSettings().sampler == "guided"
    assert list(typing.get_args(SpecName)) == names
    from autoquant.search.samplers import SamplerName

    assert [m.value for m in SamplerName] == names
    assert typing.get_args(typing.get_args(SamplerOption)[0])[0] is SamplerName  # worker's option
    readme = (ROOT / "README.md").read_text()
    synopsis = re.findall(r"--sampler ([\w|]+)\]", readme)
    assert synopsis and all(s.split("|") == names for s in synopsis), synopsis
    out = subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "search", "--help"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    for name, kind in SAMPLERS.items():
        assert f"{name}: {kind.description}" in " ".join(out.split()).replace("│ ", "")


def _prepare(tmp_path, trials, sampler="guided"):
    from autoquant.search.run import prepare

    spec = small_spec(tmp_path, trials=trials)
    return prepare(spec, overrides={"sampler": sampler, "trials": trials})


def test_guided_passes_over_a_config_another_worker_claimed(tmp_path):
    """The guided proposer's batch, with its first pick claimed elsewhere, goes on with the
    next best pick rather than proposing the claimed config."""
    pytest.importorskip("xgboost")
    import time

    from autoquant.search.driver import LocalLedger, TrialRecorder, run_search
    from autoquant.search.guided import GuidedProposer, GuidedSettings
    from autoquant.search.ledger import entries, open_study, sqlite_url
    from autoquant.search.objectives import objectives_for
    from autoquant.search.proposer import LoopContext, Proposal

    run = _prepare(tmp_path, 8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = GuidedSettings(initial=4, batch=3, n_members=2)
    run_search(run, run_dir, proposer=lambda a: GuidedProposer(seed=a.seed, settings=settings))
    objectives = objectives_for(run.spec.objectives)
    study = open_study(sqlite_url(run_dir), [o.direction for o in objectives], None)
    recorder = TrialRecorder(run, study, objectives, entries(study))
    assert LocalLedger(run, study, recorder).taken() == set()

    def first(n: int, taken: set[str]) -> list[Proposal]:
        proposer = GuidedProposer(seed=5, settings=settings)
        ctx = LoopContext(
            run, tuple(objectives), recorder, study, run_dir, time.monotonic(), taken=lambda: taken
        )
        proposer.start(ctx)
        return [proposer.propose(ctx, 3) for _ in range(n)]

    free = first(3, set())
    assert all(isinstance(p, Proposal) for p in free)
    assert all(p.config.hash not in recorder.measured for p in free)
    claimed = first(2, {free[0].config.hash})
    assert claimed[0].config.hash == free[1].config.hash  # the next best, as predicted before
    assert json.loads(claimed[0].attrs["predicted"]) == json.loads(free[1].attrs["predicted"])
    # a whole batch claimed elsewhere: the next fit leaves those configs out of its pool
    batch = {p.config.hash for p in free}
    (other,) = first(1, batch)
    assert isinstance(other, Proposal) and other.config.hash not in batch


def test_guided_workers_refit_on_every_workers_trials_and_share_the_sensitivity(tmp_path):
    """A second worker fits its first predictor on the trials the first one measured, and takes
    the sensitivity the first one stored in the study instead of computing it again."""
    pytest.importorskip("xgboost")
    import optuna

    from autoquant.search.guided import SENSITIVITY_ATTR
    from autoquant.search.ledger import entries
    from autoquant.search.workers import run_worker
    from autoquant.storage import check_url

    url = check_url(f"sqlite:///{tmp_path / 'shared.db'}", file=None, key="t")
    first = run_worker(_prepare(tmp_path, 14), url, "shared", index=0)
    assert first.measured == 14 and first.stopped_because == "trial budget reached"
    study = optuna.load_study(study_name="shared", storage=url)
    stored = study._storage.get_study_system_attrs(study._study_id)[SENSITIVITY_ATTR]
    assert json.loads(stored)["_data"]["complete"]
    mine = {e.number for e in entries(study)}

    second = run_worker(_prepare(tmp_path, 20), url, "shared", index=1)
    assert second.new_measurements == 6 and second.stopped_because == "trial budget reached"
    study = optuna.load_study(study_name="shared", storage=url)
    assert study._storage.get_study_system_attrs(study._study_id)[SENSITIVITY_ATTR] == stored  # loaded, not computed again
    done = [e for e in entries(study) if e.state == "COMPLETE"]
    assert len(done) == 20 and len({e.config_hash for e in done}) == 20
    theirs = [e for e in done if e.number not in mine]
    fits = [json.loads(e.predicted)["n_train"] for e in theirs if e.predicted]
    assert fits and min(fits) >= 14  # every one of the first worker's measurements


def test_guided_workers_measure_disjoint_configs(tmp_path):
    """``autoquant search --workers 2`` with the guided sampler (refused before): two worker
    processes, the budget met exactly, no config measured twice, both workers' predictions."""
    pytest.importorskip("xgboost")
    import os

    import pandas as pd

    spec = small_spec(tmp_path, trials=16)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "search", str(spec), "--sampler", "guided",
         "--workers", "2", "--out", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_parquet(run_dir / "trials.parquet")
    done = frame[frame["state"] == "COMPLETE"]
    assert len(done) == 16 and done["config_hash"].is_unique
    # the predictor proposed at least one batch (how many of the 16 it gets, after references
    # and prior picks, depends on how the two workers interleave)
    assert done["accuracy_predicted"].notna().sum() >= 1
