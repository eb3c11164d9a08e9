"""The latency model (per-layer sum + residual) and its check against end-to-end latency of the
model composed from the same kernels."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from autoquant.hw.latency_model import (
    ValidationRow,
    fit_latency_model,
    kendall_tau,
    summarize,
)
from autoquant.hw.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

A = LayerInfo("a", "linear", (8, 4), (1, 4), (1, 8), 32, 40, True)
B = LayerInfo("b", "linear", (2, 8), (1, 8), (1, 2), 16, 18, True, index=1)
W8 = QuantChoice(8, 8, "per_channel")


def t(us: float) -> KernelTiming:
    return KernelTiming.from_samples("k", [us * 1e-6] * 3)


def tvm_or_skip():
    """Skip without TVM; size TVM's thread pool first (it can shrink later, never grow)."""
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    return pytest.importorskip("tvm")


def test_predict_is_sum_plus_residual():
    per_layer = {("a", "f32-a32"): t(10), ("b", "f32-a32"): t(5), ("a", W8.label): t(4)}
    model = fit_latency_model((A, B), per_layer, fp32_e2e_us=20)
    assert model.residual_us == pytest.approx(5)
    fp32 = model.predict(QuantConfig.uniform((A, B), QuantChoice()))
    assert fp32.source == "predicted" and fp32.value == pytest.approx(0.020)
    mixed = model.predict(QuantConfig.from_mapping({"a": W8, "b": QuantChoice()}))
    assert mixed.value == pytest.approx(0.014)
    missing = model.predict(QuantConfig.from_mapping({"a": QuantChoice(), "b": W8}))
    assert missing.source == "failed" and "b w8cs-a8" in missing.reason


def test_failed_timing_fails_prediction_and_fit():
    per_layer = {("a", "f32-a32"): t(10), ("b", "f32-a32"): KernelTiming.failed("timeout: x")}
    with pytest.raises(ValueError, match="layer b"):
        fit_latency_model((A, B), per_layer, 20)
    per_layer[("b", "f32-a32")] = t(1)
    per_layer[("a", W8.label)] = KernelTiming.failed("build error: y")
    model = fit_latency_model((A, B), per_layer, 20)
    bad = model.predict(QuantConfig.from_mapping({"a": W8, "b": QuantChoice()}))
    assert bad.source == "failed" and "build error" in bad.reason


def test_summary_statistics():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(kendall_tau([1], [1]))
    cfg = QuantConfig.uniform((A,), QuantChoice())
    rows = [
        ValidationRow(cfg, 1.1, 1.0, 0.1),
        ValidationRow(cfg, 0.8, 1.0, 0.1),
        ValidationRow(cfg, math.nan, math.nan, math.nan, "build error"),
    ]
    s = summarize(rows)
    assert s["configs"] == 3 and s["measured"] == 2
    assert s["mean_abs_rel_error"] == pytest.approx(0.15) and s[
        "max_abs_rel_error"
    ] == pytest.approx(0.2)
    assert summarize(rows[2:]) == {"configs": 1, "measured": 0}


@pytest.fixture(scope="module")
def cpu():
    tvm = tvm_or_skip()
    import tvm.target.codegen as codegen

    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2}
    )


@pytest.mark.requires_tvm
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_composed_model_matches_torch(cpu, name):
    import torch

    from autoquant.hw.tvm_model import build_model, time_model
    from autoquant.space.discovery import discover_layers
    from autoquant.tasks.digits import DigitsCNN, DigitsMLP

    torch.manual_seed(0)
    model = (DigitsMLP if name == "mlp" else DigitsCNN)().eval()
    layers = discover_layers(model, (1, 1, 8, 8))
    fp32 = QuantConfig.uniform(layers, QuantChoice())
    ex = build_model(
        model,
        (1, 1, 8, 8),
        layers,
        fp32,
        batch=3,
        target=cpu,
        threads=2,
        vnni=False,
        model_weights=True,
    )
    samples, out = time_model(
        ex, (1, 1, 8, 8), batch=3, warmup=0, number=1, repeat=3, min_repeat_ms=1
    )
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype("float32"))
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert len(samples) == 3 and min(samples) > 0
    # quantized configs compose and run (random weights: finite outputs of the right shape)
    mixed = {layers[0].name: QuantChoice(8, 8, "per_channel"), layers[-1].name: QuantChoice(16, 16)}
    for layer in layers[1:-1]:
        mixed[layer.name] = QuantChoice(4, 32, "per_channel", None, False)
    ex = build_model(
        model,
        (1, 1, 8, 8),
        layers,
        QuantConfig.from_mapping(mixed),
        batch=2,
        target=cpu,
        threads=2,
        vnni=False,
    )
    _, out = time_model(ex, (1, 1, 8, 8), batch=2, warmup=0, number=1, repeat=3, min_repeat_ms=1)
    assert out.shape == (2, 10) and np.isfinite(out).all()


@pytest.mark.requires_tvm
def test_validate_latency_model_on_digits_mlp(cpu, tmp_path):
    import yaml

    from autoquant.hw.backend import backend_for
    from autoquant.hw.profile import load_profile
    from autoquant.hw.profiling import parse_label, profile_layers
    from autoquant.hw.table import LatencyTable
    from autoquant.hw.validation import validate_latency_model
    from autoquant.space.discovery import discover_layers
    from autoquant.tasks.digits import DigitsMLP

    path = tmp_path / "fast.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "fast",
                "target": {"kind": "llvm", "mcpu": "auto"},
                "threads": 2,
                "measure": {"warmup": 0, "repeat": 3, "min_repeat_ms": 2, "timeout_s": 60},
            }
        )
    )
    model = DigitsMLP().eval()
    layers = discover_layers(model, (1, 1, 8, 8))
    choices = [parse_label(x) for x in ("f32-a32", "w4g32s-a32")]
    with backend_for(load_profile(path)) as backend, LatencyTable(tmp_path / "t.sqlite") as table:
        profiled = profile_layers(backend, [(layer, choices) for layer in layers], table)
        result = validate_latency_model(backend, model, (1, 1, 8, 8), layers, profiled, n=2, seed=1)
    assert result.model.fp32_e2e_us > 0 and len(result.rows) == 2
    for row in result.rows:
        assert row.error is None and row.measured_ms > 0 and row.predicted_ms > 0
    data = result.to_dict()
    assert data["summary"]["measured"] == 2 and "kendall_tau" in data["summary"]
