"""The accuracy predictor: sensitivity, features, XGBoost ensemble persistence, quality."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("xgboost", reason="the predictor needs the predict extra (xgboost)")
from conftest import small_spec

from autoquant.predict import AccuracyPredictor, FeatureEncoder, quality
from autoquant.predict.model import MANIFEST
from autoquant.predict.sensitivity import LayerSensitivity, load_or_compute


def _data(n: int, seed: int = 0, features: int = 6):
    rng = np.random.default_rng(seed)
    X = rng.random((n, features))
    y = 0.9 - 0.3 * X[:, 0] ** 2 - 0.1 * X[:, 1] + 0.01 * rng.standard_normal(n)
    names = tuple(f"f{i}" for i in range(features - 1)) + ("sum_kl",)
    return X, y, names


def test_save_load_gives_identical_predictions(tmp_path):
    X, y, names = _data(40)
    model = AccuracyPredictor(feature_names=names, n_members=3, rounds=30, seed=4)
    model.fit(X[:30], y[:30], [f"c{i}" for i in range(30)])
    model.save(tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert manifest["_type"] == "AccuracyPredictor" and manifest["_version"] == 1
    names_on_disk = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names_on_disk[-1] == MANIFEST and len(names_on_disk) == 4
    assert all(re.fullmatch(rf"member_{i}_[0-9a-f]{{16}}\.ubj", n) for i, n in enumerate(names_on_disk[:3]))
    loaded = AccuracyPredictor.load(tmp_path / "p")
    before, after = model.predict(X[30:]), loaded.predict(X[30:])
    assert np.array_equal(before.mean, after.mean) and np.array_equal(before.std, after.std)
    assert np.array_equal(loaded.X, model.X) and np.array_equal(loaded.y, model.y)
    assert loaded.keys == model.keys and loaded.feature_names == names
    assert (
        (after.std > 0).any()
        and np.all(after.q10 <= after.mean)
        and np.all(after.mean <= after.q90)
    )


def test_reloaded_predictor_keeps_learning(tmp_path):
    """Training data travel with the boosters: refitting a reloaded predictor with new rows
    equals fitting a fresh one on old and new rows together."""
    X, y, names = _data(40, seed=1)
    first = AccuracyPredictor(feature_names=names, n_members=2, rounds=20, seed=0).fit(
        X[:20], y[:20]
    )
    first.save(tmp_path / "p")
    resumed = AccuracyPredictor.load(tmp_path / "p").fit(X[20:35], y[20:35])
    fresh = AccuracyPredictor(feature_names=names, n_members=2, rounds=20, seed=0).fit(
        X[:35], y[:35]
    )
    assert resumed.n_train == 35
    assert np.array_equal(resumed.predict(X[35:]).mean, fresh.predict(X[35:]).mean)


def test_load_refuses_unknown_records(tmp_path):
    X, y, names = _data(10)
    AccuracyPredictor(feature_names=names, n_members=1, rounds=5).fit(X, y).save(tmp_path / "p")
    path = tmp_path / "p" / MANIFEST
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "_version": 99}))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        AccuracyPredictor.load(tmp_path / "p")
    path.write_text(json.dumps({**data, "_type": "Pickle"}))
    with pytest.raises(ValueError, match="not an AccuracyPredictor"):
        AccuracyPredictor.load(tmp_path / "p")


def test_predictor_validates_arguments():
    with pytest.raises(ValueError, match="n_members"):
        AccuracyPredictor(feature_names=("a",), n_members=0)
    model = AccuracyPredictor(feature_names=("a", "b"))
    with pytest.raises(ValueError, match="not fitted"):
        model.predict(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="finite"):
        model.fit(np.zeros((3, 2)), np.array([0.5, np.nan, 0.4]))


def test_quality_figures():
    measured = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    costs = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])  # every row on the true front
    q = quality(measured, measured, costs)
    assert q.kendall_tau == pytest.approx(1.0) and q.mae == 0 and q.front_recall == 1.0
    reversed_ = quality(measured[::-1].copy(), measured, costs)
    assert reversed_.kendall_tau == pytest.approx(-1.0) and reversed_.front_recall == pytest.approx(
        0.2
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from autoquant.search.run import prepare

    return prepare(small_spec(tmp_path_factory.mktemp("spec")))


def test_sensitivity_is_cached_and_features_match_exact_costs(prepared, tmp_path):
    from autoquant.space import config_cost

    run = prepared
    sens = load_or_compute(tmp_path, run.task, run.space, run.evaluator.calibration)
    cached = json.loads((tmp_path / "sensitivity.json").read_text())
    assert cached["_type"] == "LayerSensitivity"
    again = load_or_compute(tmp_path, run.task, run.space, run.evaluator.calibration)
    assert again == LayerSensitivity.from_dict(cached) and again.fingerprint == sens.fingerprint
    for ls in run.space.layers:
        by_label = sens.choices[ls.layer.name]
        assert set(by_label) == {c.label for c in ls.choices}
        assert by_label["f32-a32"].kl == 0 and by_label["f32-a32"].weight_error == 0
        # fewer weight bits, more weight error
        assert by_label["w4cs-a32"].weight_error > by_label["w8cs-a32"].weight_error > 0
        assert sens.trace_per_param[ls.layer.name] > 0

    enc = FeatureEncoder(run.space, sens, other_param_bytes=run.evaluator.other_param_bytes)
    idx = enc.all_indices()
    assert len(idx) == run.space.size
    configs = [enc.config(row) for row in idx]
    assert [c.hash for c in configs] == [c.hash for c in run.space.all_configs()]
    assert np.array_equal(enc.indices(configs), idx)
    X = enc.encode_indices(idx)
    assert X.shape == (run.space.size, len(enc.feature_names)) and np.isfinite(X).all()
    exact = enc.exact(idx)
    for i in (0, 7, len(idx) - 1):
        cost = config_cost(
            run.evaluator.layers, configs[i], other_param_bytes=run.evaluator.other_param_bytes
        )
        assert exact["size_bytes"][i] == cost.size_bytes and exact["bops"][i] == cost.bops
        assert exact["mean_weight_bits"][i] == pytest.approx(cost.mean_weight_bits)
    col = enc.feature_names.index("sum_kl")
    per_layer = [enc.feature_names.index(f"{ls.layer.name}:kl") for ls in run.space.layers]
    assert np.allclose(X[:, col], X[:, per_layer].sum(axis=1))
