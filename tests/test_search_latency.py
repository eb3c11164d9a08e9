"""Latency as a search objective: spec keys, objective names, predicted figures, the example run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import ROOT, SMALL_SPACE, run_cli, write

from autoquant.errors import UserError
from autoquant.latency.model import LatencyModel, fidelity, spearman_rho
from autoquant.measure.timing import KernelTiming
from autoquant.search.latency import RunLatency, restrict_space
from autoquant.search.objectives import expand_objectives, objective_named, objectives_for
from autoquant.space.values import QuantChoice, QuantConfig

EXAMPLE = ROOT / "examples" / "digits-cnn-latency.yaml"


def latency_spec(tmp: Path, extra: str, *, objectives: str = "[accuracy, latency, size]") -> Path:
    write(tmp / "space.yaml", SMALL_SPACE)
    return write(
        tmp / "spec.yaml",
        f"version: 1\nname: lat\ntask: digits-mlp\nspace: space.yaml\nobjectives: {objectives}\n"
        f"search: {{sampler: nsga2, trials: 4, population_size: 4}}\n{extra}",
    )


# --- spec ----------------------------------------------------------------------------------------


def test_unknown_profile_is_one_line_exit_2(tmp_path, capsys):
    spec = latency_spec(tmp_path, "hardware: [cpu-lokal]\n")
    code, out, err = run_cli(["search", spec, "--out", tmp_path / "run"], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line
    assert str(spec) in line and "hardware[0]" in line and "'cpu-lokal'" in line
    assert "cpu-local" in line and "arm64-rpc" in line  # the allowed names
    assert not (tmp_path / "run").exists()


def test_profile_path_is_relative_to_the_spec(tmp_path):
    from autoquant.spec import load_spec

    with pytest.raises(UserError) as info:
        load_spec(latency_spec(tmp_path, "hardware: [profiles/mine.yaml]\n"))
    assert "hardware[0]" in str(info.value) and "mine.yaml" in str(info.value)
    write(
        tmp_path / "profiles" / "mine.yaml",
        (ROOT / "hw_profiles" / "cpu-local.yaml").read_text().replace("cpu-local", "mine"),
    )
    spec, _ = load_spec(tmp_path / "spec.yaml")
    assert spec.hardware == ["profiles/mine.yaml"]


@pytest.mark.parametrize(
    ("extra", "objectives", "key"),
    [
        ("", "[accuracy, latency]", "objectives[1]"),
        ("constraints: {max_latency_ms: 1}\n", "[accuracy, size]", "constraints.max_latency_ms"),
        ("hardware: [cpu-local, cpu-local]\n", "[accuracy, latency]", "hardware"),
        ("hardware: [cpu-local]\nhardware_validation: -1\n", "[accuracy, latency]", "hardware_validation"),
    ],
)
def test_latency_spec_errors(tmp_path, extra, objectives, key):
    from autoquant.spec import load_spec

    with pytest.raises(UserError) as info:
        load_spec(latency_spec(tmp_path, extra, objectives=objectives))
    assert info.value.key == key and "\n" not in str(info.value)


def test_prepare_without_evaluator_expands_latency_per_profile(tmp_path):
    from autoquant.search.run import prepare

    run = prepare(latency_spec(tmp_path, "hardware: [cpu-local]\n"), with_evaluator=False)
    assert run.spec.objectives == ["accuracy", "latency@cpu-local", "size"]
    resolved = run.resolved_spec()
    assert resolved["objectives"] == ["accuracy", "latency@cpu-local", "size"]
    assert resolved["hardware"] == ["cpu-local"]
    # The resolved spec (what a run directory's spec.yaml holds, which export reloads) prepares
    # again to the same objectives.
    from autoquant.spec import dump_yaml

    again = prepare(write(tmp_path / "run" / "spec.yaml", dump_yaml(resolved)), with_evaluator=False)
    assert again.spec.objectives == run.spec.objectives


def test_latency_objective_must_name_a_given_profile(tmp_path):
    from autoquant.search.run import prepare

    spec = latency_spec(tmp_path, "hardware: [cpu-local]\n", objectives="[accuracy, latency@other]")
    with pytest.raises(UserError) as info:
        prepare(spec, with_evaluator=False)
    assert info.value.key == "objectives" and "latency@other" in str(info.value)


# --- objectives, figures, space ------------------------------------------------------------------


def test_latency_objective_names():
    assert expand_objectives(["accuracy", "latency", "size"], ["a", "b"]) == [
        "accuracy",
        "latency@a",
        "latency@b",
        "size",
    ]
    o = objective_named("latency@cpu-local")
    assert o.figure == "latency_ms@cpu-local" and o.direction == "minimize" and "ms" in o.unit
    assert objective_named("latency") is None and objective_named("latency@") is None
    assert [o.name for o in objectives_for(["accuracy", "latency@x"])] == ["accuracy", "latency@x"]


def _timing(us: float) -> KernelTiming:
    return KernelTiming("measured", "k", us, us, us, 0.0, (us,))


def test_evaluator_costs_carry_predicted_latency(cnn_layers):
    from autoquant.search.evaluator import Evaluator

    fp32, w8 = QuantChoice(), QuantChoice(8, 8, "per_channel", None, True)
    per_layer = {(la.name, c.label): _timing(10.0 if c == fp32 else 4.0) for la in cnn_layers for c in (fp32, w8)}
    model = LatencyModel(
        tuple(cnn_layers), per_layer, intercept_us=2.0, class_scale={"integer": 1.5}
    )
    ev = Evaluator(task=None, layers=tuple(cnn_layers), calibration=None, other_param_bytes=0,
                   latency=(RunLatency("dev", model, {}),))
    costs = dict(ev.costs(QuantConfig.uniform(tuple(cnn_layers), w8)))
    fig = costs["latency_ms@dev"]
    expected = 1.5 * 4.0 * len(cnn_layers) + 2.0  # every kernel is an integer one (scale 1.5)
    assert fig.source == "predicted" and fig.value == pytest.approx(expected / 1000)


def test_excluded_choices_leave_the_space_with_the_reason(tmp_path, cnn_task, cnn_layers):
    from autoquant.space import build_space
    from autoquant.spec import load_space

    space = build_space(cnn_layers, load_space(write(tmp_path / "s.yaml", SMALL_SPACE)))
    first = space.layers[0]
    lookup = {(ls.layer.name, c.label): _timing(5.0) for ls in space.layers for c in ls.choices}
    gone = first.choices[-1]
    lookup[(first.layer.name, gone.label)] = KernelTiming.excluded("no kernel for this")
    restricted, dropped, empty = restrict_space(space, lookup, "dev")
    assert not empty and gone not in restricted.layers[0].choices
    assert restricted.size == space.size // len(first.choices) * (len(first.choices) - 1)
    assert [(d.layer, d.choice) for d in dropped] == [(first.layer.name, gone.label)]
    assert "hardware dev" in dropped[0].reason and "no kernel for this" in dropped[0].reason
    assert dropped[0] in restricted.exclusions


def test_latency_constraint_applies_to_every_profile():
    from types import SimpleNamespace

    from autoquant.search.driver import _constraints
    from autoquant.spec import ConstraintsSpec

    run = SimpleNamespace(spec=SimpleNamespace(constraints=ConstraintsSpec(max_latency_ms=1.0)))
    figures = {"accuracy": 0.9, "size_bytes": 10.0, "latency_ms@a": 0.5, "latency_ms@b": 1.5}
    assert _constraints(run, figures, 0.95) == [-0.5, 0.5]


def test_fidelity_figures():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman_rho([1], [1]))
    f = fidelity([1.05, 1.5, 2.0], [1.0, 1.0, 2.0])
    assert f["within_10pct"] == pytest.approx(2 / 3)
    assert f["mape"] == pytest.approx((0.05 + 0.5 + 0) / 3)


# --- the example, end to end (TVM) ---------------------------------------------------------------


@pytest.mark.slow
def test_example_trades_accuracy_against_predicted_latency(tmp_path, capsys):
    pytest.importorskip("tvm")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import pandas as pd

    from autoquant.pareto import non_dominated_mask

    out = tmp_path / "run"
    code, stdout, err = run_cli(["search", EXAMPLE, "--out", out, "--quiet", "--trials", "24"], capsys)
    assert code == 0, err
    trials = pd.read_parquet(out / "trials.parquet")
    col = "latency_ms@cpu-local"
    done = trials[trials["state"] == "COMPLETE"]
    assert set(done[f"{col}_source"]) == {"predicted"}
    assert done[col].map(math.isfinite).all()
    # The accuracy / latency projection of the front: more than one point, and the faster points
    # give up accuracy.
    values = done[["accuracy", col]].to_numpy(dtype=float)
    on = non_dominated_mask(values, ["maximize", "minimize"])
    front2 = done[on].sort_values(col)
    assert len(front2) >= 2
    assert front2["accuracy"].is_monotonic_increasing
    fp32 = done[done["reference"] == "fp32"].iloc[0]
    front = pd.read_csv(out / "pareto.csv")
    fastest = front.sort_values(col).iloc[0]
    assert fastest[col] < fp32[col]

    fidelity_data = json.loads((out / "latency_fidelity.json").read_text())
    prof = fidelity_data["profiles"]["cpu-local"]
    assert prof["figure_source"] == "predicted" and prof["fp32_e2e_us"] > 0
    summary = prof["validation"]["summary"]
    for key in ("within_10pct", "mape", "spearman", "kendall_tau"):
        assert key in summary and key in summary["plain_sum"]
    assert prof["model"]["calibration_configs"] >= 2 and prof["calibration"]["configs"] >= 2
    report = (out / "report.html").read_text()
    assert "accuracy against latency@cpu-local" in report and "Latency model" in report

    # A second run measures no kernel and no end-to-end latency: everything is in the table.
    code, _, err = run_cli(["search", EXAMPLE, "--out", tmp_path / "again", "--quiet", "--trials", "2"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "latency_fidelity.json").read_text())["profiles"]["cpu-local"]
    assert again["kernels"]["measured_now"] == 0
    assert again["end_to_end_measured_now"] == 0
    assert again["end_to_end_reused"] == again["calibration"]["configs"] + again["validation"]["configs"]


# --- digits-wide ---------------------------------------------------------------------------------


def test_digits_wide_is_a_builtin_task_with_real_work():
    from autoquant.space.discovery import discover_layers
    from autoquant.tasks import BUILTIN_TASKS
    from autoquant.tasks.digits import DigitsWide

    assert BUILTIN_TASKS["digits-wide"].target == "autoquant.tasks.digits:digits_wide"
    layers = discover_layers(DigitsWide(), (1, 1, 8, 8))
    assert [la.name for la in layers] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"
    ]
    assert sum(la.macs for la in layers) > 70_000_000
    # Compute, not memory, dominates: the float32 weights fit the L3 of the CPU it was sized on.
    assert sum(la.params for la in layers) * 4 < 16 * 2**20


@pytest.mark.slow
def test_digits_wide_trains_to_95_percent():
    """Trains once (a few minutes on 2 cores), then loads from the cache."""
    from autoquant.tasks import evaluate, load_task

    task = load_task("digits-wide")
    assert evaluate(task, task.model) >= 0.95


def test_a_fit_that_predicts_below_zero_falls_back_to_the_plain_sum():
    from autoquant.latency.model import fit_latency_model
    from autoquant.space.values import LayerInfo

    layer = LayerInfo("a", "linear", (8, 4), (1, 4), (1, 8), 32, 40, True)
    fp32, w8 = QuantChoice(), QuantChoice(8, 32, "per_channel", None, True)
    per_layer = {("a", fp32.label): _timing(30.0), ("a", w8.label): _timing(5.0)}
    # Kernels far slower than the whole model: only a large negative intercept fits that.
    measured = [(QuantConfig.uniform((layer,), fp32), 2.0)]
    model = fit_latency_model((layer,), per_layer, measured, ridge=100.0)
    assert model.intercept_us == 0 and "plain per-layer kernel sum" in model.note
    fig = model.predict(QuantConfig.uniform((layer,), w8))
    assert fig.value == pytest.approx(0.005) and fig.source == "predicted"
    sane = [(QuantConfig.uniform((layer,), fp32), 40.0)]
    assert fit_latency_model((layer,), per_layer, sane).note is None
