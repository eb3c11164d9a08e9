"""The predictor-guided sampler: the Optuna study as its ledger, resume, recorded predictions."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("xgboost", reason="the predictor needs the predict extra (xgboost)")
from conftest import small_spec

from autoquant.predict.record import predicted_columns
from autoquant.search.guided import (
    GuidedSettings,
    hypervolume_improvement,
    run_guided,
    select_batch,
)
from autoquant.search.ledger import entries, open_study, sqlite_url


def _prepare(tmp_path, trials):
    from autoquant.search.run import prepare

    spec = small_spec(tmp_path, trials=trials)
    return prepare(spec, overrides={"sampler": "guided", "trials": trials})


def _trials(run_dir):
    study = open_study(sqlite_url(run_dir), ["maximize", "minimize"], None, create=False)
    return study, sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def test_guided_records_trials_like_the_driver_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = _prepare(tmp_path, 12)
    small = GuidedSettings(initial=5, batch=3, n_members=2)
    out = run_guided(run, run_dir, guided=small)
    assert (out.measured, out.new_measurements, out.failed) == (12, 12, 0)
    study, trials = _trials(run_dir)
    assert [t.user_attrs.get("reference") for t in trials[:2]] == ["fp32", "int8"]
    hashes = [t.user_attrs["config_hash"] for t in trials]
    assert len(set(hashes)) == 12 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        assert set(t.params) == {ls.layer.name for ls in run.space.layers}
        assert {"config", "figures", "config_hash"} <= set(t.user_attrs)
        figures = json.loads(t.user_attrs["figures"])
        assert t.values == [figures["accuracy"]["value"], figures["size_bytes"]["value"]]
    guided = [json.loads(t.user_attrs["predicted"]) for t in trials[5:]]
    assert all(g["accuracy"]["source"] == "predicted" and g["n_train"] >= 5 for g in guided)
    assert all(g["acquisition"] in ("optimistic_hvi", "epsilon_gap") for g in guided)
    assert {"model", "sensitivity.json", "quality.json"} <= {
        p.name for p in (run_dir / "predictor").iterdir()
    }
    figures = json.loads((run_dir / "predictor" / "quality.json").read_text())
    assert figures["n"] == 7 and -1 <= figures["kendall_tau"] <= 1
    import pandas as pd

    table = pd.read_csv(run_dir / "predictor" / "predictions.csv")
    assert sorted(table["config_hash"]) == sorted(hashes)  # predicted beside every measured
    assert table["accuracy_predicted_5fold"].notna().all()
    assert table["accuracy_predicted"].notna().sum() == 7
    assert table.loc[table["trial"] == 6, "accuracy_predicted"].item() == pytest.approx(
        guided[1]["accuracy"]["mean"]
    )
    assert predicted_columns(trials[6].user_attrs["predicted"])["acquisition"] in (
        "optimistic_hvi",
        "epsilon_gap",
    )
    assert predicted_columns(None)["accuracy_predicted"] is None

    # a trial killed mid-measurement and one queued but never asked
    study.enqueue_trial({ls.layer.name: ls.choices[-1].label for ls in run.space.layers})
    stale = study.ask()
    for ls in run.space.layers:
        stale.suggest_categorical(ls.layer.name, [c.label for c in ls.choices])
    fresh = next(c for c in run.space.all_configs() if c.hash not in hashes)
    queued = {name: choice.label for name, choice in fresh.choices}
    study.enqueue_trial(queued)

    resumed = run_guided(_prepare(tmp_path, 18), run_dir, guided=small)
    assert resumed.interrupted_before == 1
    assert resumed.measured == 18 and resumed.new_measurements == 6
    study, trials = _trials(run_dir)
    done = [e for e in entries(study) if e.state == "COMPLETE"]
    assert len(done) == 18 and len({e.config_hash for e in done}) == 18
    assert [e.reference for e in done].count("fp32") == 1  # references are not measured twice
    assert trials[12].state.name == "FAIL" and "interrupted" in trials[12].user_attrs["fail_reason"]
    assert trials[13].state.name == "COMPLETE" and trials[13].params == queued
    assert [t.number for t in trials] == list(range(19))


def test_driver_dispatches_to_guided(tmp_path):
    from autoquant.search.driver import run_search

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run_search(_prepare(tmp_path, 10), run_dir)
    assert out.measured == 10 and out.stopped_because == "trial budget reached"
    _, trials = _trials(run_dir)
    assert sum("predicted" in t.user_attrs for t in trials) >= 2


def test_settings_are_validated():
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        GuidedSettings(batch=0)
    with pytest.raises(ValueError, match="kappa"):
        GuidedSettings(kappa=-1.0)
    with pytest.raises(ValueError, match=r"sensitivity_share must be in \(0, 1\], got 0"):
        GuidedSettings(sensitivity_share=0)


def test_sensitivity_pass_keeps_to_its_share_of_the_time_budget(tmp_path):
    """The sensitivity pass gets a deadline from timeout_s; out of time, the layers it did not
    probe get estimated figures, the search goes on, and the status callback hears it all. The
    next invocation completes the cached record."""
    from autoquant.predict.sensitivity import FILE_NAME, LayerSensitivity

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines: list[str] = []
    run = _prepare(tmp_path, 8)
    search = run.spec.search.model_copy(update={"timeout_s": 600.0})
    run = dataclasses.replace(run, spec=run.spec.model_copy(update={"search": search}))
    tiny = GuidedSettings(initial=4, batch=2, n_members=2, sensitivity_share=1e-6)
    out = run_guided(run, run_dir, guided=tiny, on_status=lines.append)
    assert out.measured == 8 and out.stopped_because == "trial budget reached"
    record = LayerSensitivity.from_dict(json.loads((run_dir / "predictor" / FILE_NAME).read_text()))
    assert not record.complete and record.probe_passes == 0
    assert record.sources()["estimated"] > 0 and record.sources()["measured"] == 0
    assert lines[0].startswith("layer sensitivity:") and lines[-1] == "measuring configs"

    lines.clear()
    again = _prepare(tmp_path, 10)  # no timeout_s: no deadline
    assert run_guided(again, run_dir, guided=tiny, on_status=lines.append).measured == 10
    record = LayerSensitivity.from_dict(json.loads((run_dir / "predictor" / FILE_NAME).read_text()))
    assert record.complete and record.passes["weight_probe"] == len(again.space.layers)
    assert any("probing layer" in line for line in lines)


def test_hypervolume_improvement_matches_optuna():
    from autoquant.pareto import hypervolume

    rng = np.random.default_rng(0)
    front = np.array([[0.1, 0.9], [0.4, 0.5], [0.8, 0.2]])
    ref = np.array([1.0, 1.0])
    cands = rng.random((50, 2))
    got = hypervolume_improvement(cands, front, ref)
    dirs = ["minimize", "minimize"]
    base = hypervolume(front, dirs, ref)
    want = [hypervolume(np.vstack([front, c]), dirs, ref) - base for c in cands]
    assert np.allclose(got, want)
    got3 = hypervolume_improvement(
        np.column_stack([cands, np.full(50, 0.5)]),
        np.column_stack([front, np.zeros(3)]),
        np.ones(3),
    )
    assert np.allclose(got3, np.array(want) * 0.5)


def test_select_batch_spreads_and_falls_back():
    front = np.array([[0.0, 1.0], [1.0, 0.0]])
    cands = np.array([[0.5, 0.5], [0.49, 0.51], [2.0, 2.0]])
    picks = select_batch(cands, cands, front, np.array([3.0, 3.0]), 3)
    assert [p[0] for p in picks[:2]] in ([0, 1], [1, 0]) and picks[0][1] == "optimistic_hvi"
    # to leave the box of the fantasy (0.5, 0.5), (2, 2) must move 1.5, scaled by the range 3
    assert picks[2] == (2, "epsilon_gap", pytest.approx(-0.5))


def test_cli_search_with_guided_sampler_and_resume(tmp_path, capsys):
    import pandas as pd
    from conftest import run_cli

    spec = small_spec(tmp_path, trials=13)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        ["search", spec, "--sampler", "guided", "--out", run_dir, "--quiet"], capsys
    )
    assert code == 0, err
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 13 and trials["config_hash"].is_unique
    assert (run_dir / "predictor" / "model" / "predictor.json").exists()
    code, out, err = run_cli(
        ["search", spec, "--sampler", "guided", "--trials", "15", "--out", run_dir, "--quiet"],
        capsys,
    )
    assert code == 0, err
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 15 and trials["config_hash"].is_unique


def test_guided_takes_other_objectives_from_the_evaluator(tmp_path):
    """A figure that is not computed from the encoder's tables (a latency model's prediction)
    comes from ``evaluator.costs``; candidates whose figure failed are never proposed."""
    import dataclasses

    from autoquant.measurement import Figure, Measurement
    from autoquant.search import objectives

    if not hasattr(objectives, "latency_objective"):
        pytest.skip("latency objectives are not in autoquant.search.objectives yet")
    run = _prepare(tmp_path, 14)
    real = run.evaluator

    def fake_latency(config):
        bits = [c.weight_bits for _, c in config.choices]
        if bits.count(4) == 3:  # as if no kernel: a failed prediction
            return Figure.failed("no kernel")
        return Figure(0.01 * sum(bits), "predicted")

    class WithLatency:
        def __getattr__(self, name):
            return getattr(real, name)

        def costs(self, config):
            return (*real.costs(config), ("latency_ms@fake", fake_latency(config)))

        def measure(self, config):
            m = real.measure(config)
            return Measurement(
                m.config_hash, (*m.figures, ("latency_ms@fake", fake_latency(config)))
            )

    spec = run.spec.model_copy(update={"objectives": ["accuracy", "latency@fake"]})
    run = dataclasses.replace(run, spec=spec, evaluator=WithLatency())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run_guided(run, run_dir, guided=GuidedSettings(initial=4, batch=4, n_members=2))
    assert out.measured == 14
    _, trials = _trials(run_dir)
    for t in trials:
        figures = json.loads(t.user_attrs["figures"])
        assert t.values == [figures["accuracy"]["value"], figures["latency_ms@fake"]["value"]]
        assert figures["latency_ms@fake"]["source"] == "predicted"


def test_guided_samples_a_pool_when_the_space_is_not_enumerated(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = GuidedSettings(initial=4, batch=3, n_members=2, enumerate_limit=1, pool=32)
    out = run_guided(_prepare(tmp_path, 10), run_dir, guided=settings)
    assert out.measured == 10 and out.new_measurements == 10
    _, trials = _trials(run_dir)
    assert len({t.user_attrs["config_hash"] for t in trials}) == 10
    assert all("predicted" in t.user_attrs for t in trials[4:])
