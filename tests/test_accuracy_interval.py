"""Accuracy intervals: a seeded bootstrap over the evaluation samples, the paired drop against
fp32 and its "within noise" mark, eval_samples in the spec, and runs recorded without them."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, small_spec

from autoquant.errors import UserError
from autoquant.measurement import Figure, Interval
from autoquant.space import QuantChoice, QuantConfig
from autoquant.tasks.base import (
    Task,
    bootstrap_indices,
    percentile_interval,
    resampled_metric,
    top1_accuracy,
)


def _logits_task(n: int, correct: float, *, metric=top1_accuracy) -> tuple[Task, torch.Tensor]:
    """A task whose outputs are given: ``correct`` of ``n`` samples right, in a seeded order."""
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 3, (n,), generator=generator)
    right = torch.randperm(n, generator=generator) < round(correct * n)
    predicted = torch.where(right, targets, (targets + 1) % 3)
    outputs = torch.nn.functional.one_hot(predicted, 3).float()
    task = Task(
        name="given",
        model=torch.nn.Identity(),
        calibration_inputs=outputs,
        eval_inputs=outputs,
        eval_targets=targets,
        metric=metric,
        input_shape=(1, 3),
    )
    return task, outputs


def _interval(task: Task, outputs: torch.Tensor) -> Interval:
    indices = bootstrap_indices(len(outputs))
    interval = percentile_interval(resampled_metric(task, outputs, indices), samples=len(outputs))
    assert interval is not None
    return interval


def test_interval_brackets_the_value_and_narrows_with_more_samples():
    widths = []
    for n in (100, 400, 1600):
        task, outputs = _logits_task(n, 0.8)
        value = top1_accuracy(outputs, task.eval_targets)
        interval = _interval(task, outputs)
        assert interval.lo < value < interval.hi
        assert interval.samples == n and interval.resamples == 200 and interval.level == 0.95
        widths.append(interval.hi - interval.lo)
    assert widths[0] > widths[1] > widths[2]
    # binomial standard error sqrt(p(1-p)/n): the 95% interval is about 4 of them wide
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 400), rel=0.25)


def test_generic_metric_resampling_matches_the_per_sample_form():
    """A metric without per-sample scores is recomputed per resample: same indices, same
    figures as the per-sample path of top-1 accuracy."""
    task, outputs = _logits_task(300, 0.9)
    opaque = _logits_task(300, 0.9, metric=lambda o, t: top1_accuracy(o, t))[0]
    indices = bootstrap_indices(300, resamples=50)
    fast = resampled_metric(task, outputs, indices)
    slow = resampled_metric(opaque, outputs, indices)
    assert np.allclose(fast, slow)
    # seeded: the same indices every time, so every config of a run is resampled alike
    assert torch.equal(indices, bootstrap_indices(300, resamples=50))


def test_a_task_with_per_sample_scores_is_resampled_on_them():
    """A metric over the whole set (nearest neighbours) gives its per-query terms: a resample
    then averages those terms and never recomputes the metric on a collection with duplicates."""
    task, outputs = _logits_task(200, 0.7, metric=lambda o, t: float("nan"))
    scores = torch.linspace(0, 1, 200, dtype=torch.float64)
    task = dataclasses.replace(task, sample_scores=lambda o, t: scores)
    indices = bootstrap_indices(200, resamples=20)
    assert np.allclose(
        resampled_metric(task, outputs, indices), scores[indices].mean(dim=1).numpy()
    )


def test_figure_interval_round_trips_and_old_records_load():
    figure = Figure(0.97, "measured", interval=Interval(0.95, 0.99, 0.95, 450, 200))
    assert Figure.from_dict(json.loads(json.dumps(figure.to_dict()))) == figure
    old = Figure.from_dict({"value": 0.97, "source": "measured"})  # written before intervals
    assert old == Figure(0.97, "measured") and old.interval is None
    assert "interval" not in Figure(1.0, "exact").to_dict()
    assert Figure.from_dict(Figure.failed("boom").to_dict()).interval is None


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    from autoquant.search.run import prepare

    return prepare(small_spec(tmp_path_factory.mktemp("spec")))


def _uniform(run, choice: QuantChoice) -> QuantConfig:
    return QuantConfig(tuple((ls.layer.name, choice) for ls in run.space.layers))


def test_fp32_is_within_noise_of_fp32(mlp_run):
    m = mlp_run.evaluator.measure(_uniform(mlp_run, QuantChoice()))
    accuracy, drop = m["accuracy"], m["accuracy_drop"]
    assert accuracy.interval.lo <= accuracy.value <= accuracy.interval.hi
    assert accuracy.interval.samples == 450  # digits: every held-out sample
    assert drop.value == 0.0 and (drop.interval.lo, drop.interval.hi) == (0.0, 0.0)
    assert drop.interval.contains(0.0)


def test_a_badly_broken_config_is_not_within_noise(mlp_run):
    broken = _uniform(mlp_run, QuantChoice(2, 32, "per_tensor", None, True))
    m = mlp_run.evaluator.measure(broken)
    drop = m["accuracy_drop"]
    assert drop.source == "measured" and drop.value > 0.2, drop
    assert drop.interval.lo > 0 and not drop.interval.contains(0.0)
    fp32 = mlp_run.evaluator.fp32_reference().value
    assert drop.value == pytest.approx(fp32 - m.value("accuracy"))


def test_eval_samples_limits_the_evaluation(tmp_path):
    from autoquant.search.run import prepare

    spec = small_spec(tmp_path, extra="evaluation: {eval_samples: 100}\n")
    run = prepare(spec)
    assert len(run.task.eval_inputs) == 100 and len(run.task.eval_targets) == 100
    m = run.evaluator.measure(_uniform(run, QuantChoice()))
    assert m["accuracy"].interval.samples == 100
    assert round(m.value("accuracy") * 100) == pytest.approx(m.value("accuracy") * 100)
    resolved = run.resolved_spec()
    assert resolved["evaluation"]["eval_samples"] == 100
    # the default (all of them) is left out of the resolved spec: older run dirs still resume
    assert (
        "eval_samples"
        not in prepare(small_spec(tmp_path / "all"), with_evaluator=False).resolved_spec()[
            "evaluation"
        ]
    )


def test_eval_samples_more_than_the_task_has_is_one_line(tmp_path, capsys):
    spec = small_spec(tmp_path, extra="evaluation: {eval_samples: 100000}\n")
    from autoquant.search.run import prepare

    with pytest.raises(
        UserError,
        match=r"evaluation.eval_samples: bad value 100000: .* has 450 evaluation samples; allowed: 1 to 450",
    ):
        prepare(spec, with_evaluator=False)
    code, _, err = run_cli(["search", spec, "--out", tmp_path / "run", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "eval_samples" in err
    zero = small_spec(tmp_path / "zero", extra="evaluation: {eval_samples: 0}\n")
    code, _, err = run_cli(["search", zero, "--out", tmp_path / "run0", "--quiet"], capsys)
    assert code == 2 and "evaluation.eval_samples" in err


def _strip_intervals(db) -> int:
    """Rewrite the study as a run recorded before intervals: figures without ``interval`` and
    without ``accuracy_drop``."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select trial_user_attribute_id, value_json from trial_user_attributes where key = 'figures'"
        ).fetchall()
        for row_id, value_json in rows:
            figures = json.loads(json.loads(value_json))
            figures.pop("accuracy_drop", None)
            for figure in figures.values():
                figure.pop("interval", None)
            conn.execute(
                "update trial_user_attributes set value_json = ? where trial_user_attribute_id = ?",
                (json.dumps(json.dumps(figures)), row_id),
            )
    return len(rows)


def test_a_run_recorded_without_intervals_loads_resumes_and_reports(tmp_path, capsys):
    spec = small_spec(tmp_path, trials=4)
    run_dir = tmp_path / "run"
    assert (
        run_cli(["search", spec, "--out", run_dir, "--quiet", "--sampler", "random"], capsys)[0]
        == 0
    )
    assert _strip_intervals(run_dir / "study.db") == 4
    code, out, err = run_cli(
        ["search", spec, "--out", run_dir, "--quiet", "--sampler", "random"], capsys
    )
    assert code == 0 and "0 new this time" in out, err
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert "accuracy_lo" not in trials.columns and trials["within_noise_of_fp32"].isna().all()
    code, out, _ = run_cli(["report", run_dir], capsys)
    assert (
        code == 0 and "recorded without accuracy intervals" in (run_dir / "report.html").read_text()
    )
    # measuring more adds intervals to the new rows only; the old ones stay unknown
    code, out, err = run_cli(
        ["search", spec, "--out", run_dir, "--quiet", "--sampler", "random", "--trials", "6"],
        capsys,
    )
    assert code == 0, err
    trials = pd.read_parquet(run_dir / "trials.parquet").sort_values("trial")
    assert trials["accuracy_lo"].isna().tolist() == [True] * 4 + [False] * 2
    assert trials["within_noise_of_fp32"].head(4).isna().all()
    assert run_cli(["report", run_dir], capsys)[0] == 0
