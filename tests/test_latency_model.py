"""The latency model (intercept + per-kernel-class scales of the kernel sum, calibrated end to
end) and its check against end-to-end latency of held-out configs of the model composed from
the same kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tvm_or_skip

from autoquant.latency.model import (
    ValidationRow,
    calibrate_latency_model,
    fit_latency_model,
    kendall_tau,
    kernel_class,
    summarize,
)
from autoquant.latency.validation import draw_configs
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

A = LayerInfo("a", "linear", (8, 4), (1, 4), (1, 8), 32, 40, True)
B = LayerInfo("b", "linear", (2, 8), (1, 8), (1, 2), 16, 18, True, index=1)
W8 = QuantChoice(8, 8, "per_channel")


def t(us: float) -> KernelTiming:
    return KernelTiming.from_samples("k", [us * 1e-6] * 3)


def timed(medians: list[float], batch: int = 0) -> KernelTiming:
    """A whole-model timing with these round medians, taken in device session ``batch``."""
    details = {"round_medians_us": medians, "batch": batch}
    return KernelTiming.from_samples("model", [1e-4] * 3, details=details)


def test_one_calibration_point_gives_sum_plus_intercept():
    """With the float32 model alone, the ridge keeps every scale at 1: sum + intercept."""
    per_layer = {("a", "f32-a32"): t(10), ("b", "f32-a32"): t(5), ("a", W8.label): t(4)}
    fp32 = QuantConfig.uniform((A, B), QuantChoice())
    model = fit_latency_model((A, B), per_layer, [(fp32, 20.0)])
    assert model.intercept_us == pytest.approx(5, abs=0.05)
    assert all(v == pytest.approx(1, abs=0.01) for v in model.class_scale.values())
    assert model.predict(fp32).source == "predicted"
    assert model.predict(fp32).value == pytest.approx(0.020, rel=1e-3)
    mixed = QuantConfig.from_mapping({"a": W8, "b": QuantChoice()})
    assert model.predict(mixed).value == pytest.approx(0.014, rel=5e-3)
    assert model.plain_sum_ms(mixed) == pytest.approx(0.009)
    missing = model.predict(QuantConfig.from_mapping({"a": QuantChoice(), "b": W8}))
    assert missing.source == "failed" and "b w8cs-a8" in missing.reason


def test_calibration_recovers_a_kernel_class_that_runs_slower_in_context():
    """End-to-end truth: 3 µs overhead, integer kernels take 1.5x their solo time in the model
    (in either layer), the others run as timed alone. Enough calibration points move the integer
    scale there and keep the float and weight-only ones at 1; the fit then predicts a config it
    never saw, where the plain sum is far off."""
    choices = [QuantChoice(), W8, QuantChoice(4, 32, "per_channel"), QuantChoice(16, 32)]
    solo = {"a": [40.0, 10.0, 25.0, 30.0], "b": [8.0, 30.0, 5.0, 6.0]}
    per_layer = {
        (name, c.label): t(us) for name, times in solo.items() for c, us in zip(choices, times)
    }

    def truth(i: int, j: int) -> float:
        return 3.0 + sum(
            (1.5 if choices[k] == W8 else 1.0) * solo[name][k]
            for name, k in (("a", i), ("b", j))
        )

    measured = [
        (QuantConfig.from_mapping({"a": choices[i], "b": choices[j]}), truth(i, j))
        for i, j in [(0, 0), (1, 0), (2, 0), (3, 2), (0, 3), (0, 2)]
    ]
    # kernel corrections held at 0: the class scales alone must explain it
    model = fit_latency_model((A, B), per_layer, measured, ridge=1e-4, kernel_ridge=1e6)
    assert model.class_scale["integer"] == pytest.approx(1.5, rel=0.02)
    assert model.class_scale["float"] == pytest.approx(1.0, rel=0.05)
    assert model.class_scale["weight_only"] == pytest.approx(1.0, rel=0.05)
    unseen = QuantConfig.from_mapping({"a": choices[2], "b": choices[1]})
    assert model.predict(unseen).value * 1000 == pytest.approx(truth(2, 1), rel=0.01)
    assert abs(model.plain_sum_ms(unseen) * 1000 - truth(2, 1)) / truth(2, 1) > 0.2


def test_whole_model_timings_correct_a_mismeasured_kernel():
    """b's int8 kernel was timed 1.5x too slow alone (a noisy spell), a's is right. With the
    class scales alone the fit can only slow down every integer kernel; with per-kernel
    corrections it blames b's, and predicts an unseen config with a's int8 kernel closer (a
    loose kernel ridge; the default, stiff for kernels timed in interleaved visits, still
    leans the same way)."""
    choices = [QuantChoice(), W8, QuantChoice(4, 32, "per_channel")]
    truth_us = {"a": [40.0, 10.0, 25.0], "b": [30.0, 20.0, 25.0]}
    per_layer = {
        (name, c.label): t(us * (1.5 if (name, c) == ("b", W8) else 1.0))
        for name, times in truth_us.items()
        for c, us in zip(choices, times)
    }

    def truth(i: int, j: int) -> float:
        return 2.0 + truth_us["a"][i] + truth_us["b"][j]

    measured = [
        (QuantConfig.from_mapping({"a": choices[i], "b": choices[j]}), truth(i, j))
        for i, j in [(0, 0), (0, 1), (2, 1), (0, 2), (2, 0), (1, 2)]
    ]
    default = fit_latency_model((A, B), per_layer, measured)
    assert default.kernel_correction[("b", W8.label)] < default.kernel_correction[("a", W8.label)]
    model = fit_latency_model((A, B), per_layer, measured, kernel_ridge=0.3)
    assert model.kernel_correction[("b", W8.label)] < model.kernel_correction[("a", W8.label)]
    classes_only = fit_latency_model((A, B), per_layer, measured, kernel_ridge=1e6)
    unseen = QuantConfig.from_mapping({"a": W8, "b": QuantChoice()})
    error = abs(model.predict(unseen).value * 1000 - truth(1, 0))
    assert error < 0.7 * abs(classes_only.predict(unseen).value * 1000 - truth(1, 0))
    assert f"b|{W8.label}" in model.to_dict()["kernel_correction"]


def _two_layer_case(integer_factor: float, noise: float):
    """Kernel timings and end-to-end truths of every (a, b) config of four choices: 2 µs
    overhead, integer kernels ``integer_factor`` x their solo time in context, and a fixed
    pseudo-random relative error of up to ``noise`` on each end-to-end figure."""
    choices = [QuantChoice(), W8, QuantChoice(4, 32, "per_channel"), QuantChoice(16, 32)]
    solo = {"a": [40.0, 12.0, 25.0, 33.0], "b": [20.0, 9.0, 14.0, 17.0]}
    per_layer = {
        (name, c.label): t(us) for name, times in solo.items() for c, us in zip(choices, times)
    }
    wobble = np.random.default_rng(7).uniform(-noise, noise, size=(4, 4))
    measured = []
    for i in range(4):
        for j in range(4):
            us = 2.0 + sum(
                (integer_factor if choices[k] == W8 else 1.0) * solo[name][k]
                for name, k in (("a", i), ("b", j))
            )
            config = QuantConfig.from_mapping({"a": choices[i], "b": choices[j]})
            measured.append((config, us * (1 + wobble[i, j])))
    return per_layer, measured


def test_calibration_keeps_class_scales_only_when_they_predict_better():
    """Leave-one-out on the calibration configs picks the form: with integer kernels 1.4x
    slower in context the class scales; with no class effect, only noise, one scale, which ranks
    configs exactly as the plain kernel sum does (it cannot fit the noise into a ranking)."""
    per_layer, measured = _two_layer_case(1.4, 0.005)
    model = calibrate_latency_model((A, B), per_layer, measured[:10])
    assert model.form == "class scales"
    assert model.loo_mape["class scales"] < model.loo_mape["one scale"]
    assert model.class_scale["integer"] > 1.05 * model.class_scale["float"]
    held_out = [ValidationRow(c, model.predict(c).value, us / 1000, 0.0, None,
                              model.plain_sum_ms(c)) for c, us in measured[10:]]
    figures = summarize(held_out)
    assert figures["mape"] < 0.02 < figures["plain_sum"]["mape"]

    per_layer, measured = _two_layer_case(1.0, 0.02)
    model = calibrate_latency_model((A, B), per_layer, measured[:10])
    assert model.form == "one scale" and not model.kernel_correction
    assert len(set(model.class_scale.values())) == 1
    predicted = [model.predict(c).value for c, _ in measured]
    plain = [model.plain_sum_ms(c) for c, _ in measured]
    assert np.argsort(predicted).tolist() == np.argsort(plain).tolist()
    assert model.to_dict()["form"] == "one scale" and model.to_dict()["kernel_ridge"] is None


F32, W4 = QuantChoice(), QuantChoice(4, 32, "per_channel")
FOUR = (
    LayerInfo("l0", "linear", (64, 16), (1, 16), (1, 64), 1024, 1088, True, index=0),
    LayerInfo("l1", "linear", (32, 64), (1, 64), (1, 32), 2048, 2080, True, index=1),
    LayerInfo("l2", "linear", (16, 32), (1, 32), (1, 16), 512, 528, True, index=2),
    LayerInfo("l3", "linear", (4, 16), (1, 16), (1, 4), 64, 68, True, index=3),
)
FOUR_CHOICES = [F32, W8, W4]
FOUR_SOLO = {"l0": [6.0, 4.0, 5.0], "l1": [9.0, 5.0, 8.0], "l2": [5.0, 3.0, 4.5], "l3": [2.0, 1.5, 2.0]}


def _four_layer_case(extra) -> tuple[dict, list[tuple[QuantConfig, float]]]:
    """Kernel timings of four layers and 30 configs (the three uniform ones first) measured as
    4 µs + their kernels + ``extra(config)``, with up to 0.3% noise."""
    per_layer = {
        (n, c.label): t(us) for n, ts in FOUR_SOLO.items() for c, us in zip(FOUR_CHOICES, ts)
    }

    def truth(config: QuantConfig) -> float:
        chosen = config.as_mapping()
        kernels = sum(FOUR_SOLO[la.name][FOUR_CHOICES.index(chosen[la.name])] for la in FOUR)
        return 4.0 + kernels + extra(config)

    rng = np.random.default_rng(3)
    configs = [QuantConfig.uniform(FOUR, c) for c in FOUR_CHOICES]
    while len(configs) < 30:
        picked = {la.name: FOUR_CHOICES[int(rng.integers(3))] for la in FOUR}
        config = QuantConfig.from_mapping(picked)
        if config.hash not in {c.hash for c in configs}:
            configs.append(config)
    wobble = rng.uniform(-0.003, 0.003, size=len(configs))
    return per_layer, [(c, truth(c) * (1 + w)) for c, w in zip(configs, wobble)]


def _held_out_errors(model, measured) -> dict[str, list[float]]:
    without = fit_latency_model(FOUR, model.per_layer, measured[:10], shared_scale=True, kernel_ridge=None)
    errors = {"model": [], "without": [], "plain": []}
    for config, us in measured[10:]:
        errors["model"].append(abs(model.predict(config).value * 1000 - us) / us)
        errors["without"].append(abs(without.predict(config).value * 1000 - us) / us)
        errors["plain"].append(abs(model.plain_sum_ms(config) * 1000 - us) / us)
    return errors


def test_layout_changes_between_integer_and_float_kernels_are_fitted():
    """A runtime that converts the activation layout where a chain of integer kernels meets a
    float one (ONNX Runtime: NHWC QLinearConv vs NCHWc Conv) pays per element crossing each
    change, which no kernel timed alone shows. Truth: 4 µs + the kernels + 0.05 µs per element
    crossing a change. The calibration picks a form with the term, recovers the cost, and
    predicts held-out configs the kernel sum and the transition-free forms get wrong."""
    from autoquant.latency.model import transition_elements

    alternating = QuantConfig.from_mapping({"l0": W8, "l1": F32, "l2": W8, "l3": W4})
    # changes after l0 (64 elements), l1 (32) and l2 (16); none between float and weight-only
    assert transition_elements(FOUR, alternating) == 64 + 32 + 16
    assert transition_elements(FOUR, QuantConfig.uniform(FOUR, W8)) == 0
    per_layer, measured = _four_layer_case(lambda c: 0.05 * transition_elements(FOUR, c))
    model = calibrate_latency_model(FOUR, per_layer, measured[:10])
    assert "transitions" in model.form, model.loo_mape
    assert model.transition_us_per_element == pytest.approx(0.05, rel=0.15)
    assert model.to_dict()["transition_us_per_element"] == model.transition_us_per_element
    errors = _held_out_errors(model, measured)
    assert max(errors["model"]) < 0.02
    others = min(np.mean(errors["without"]), np.mean(errors["plain"]))
    assert np.mean(errors["model"]) < 0.5 * others


def test_conversion_nodes_are_fitted_at_the_measured_kernel_times():
    """A runtime whose conversions cost per node, not per element: 3 µs at each change between
    integer and float kernels, and 1 µs less per pair of consecutive integer layers (the one-layer
    graphs each paid conversions in and out that a stretch of integer layers pays once). The
    calibration keeps the kernels at their measured times and fits the two costs."""
    from autoquant.latency.model import integer_pairs, kind_changes

    alternating = QuantConfig.from_mapping({"l0": W8, "l1": F32, "l2": W8, "l3": W4})
    assert kind_changes(FOUR, alternating) == 3 and integer_pairs(FOUR, alternating) == 0
    all_int = QuantConfig.uniform(FOUR, W8)
    assert kind_changes(FOUR, all_int) == 0 and integer_pairs(FOUR, all_int) == 3

    def conversions(config: QuantConfig) -> float:
        return 3.0 * kind_changes(FOUR, config) - 1.0 * integer_pairs(FOUR, config)

    per_layer, measured = _four_layer_case(conversions)
    model = calibrate_latency_model(FOUR, per_layer, measured[:10])
    assert model.form == "kernel sum + conversions", model.loo_mape
    assert not model.class_scale and not model.kernel_correction
    assert model.term_us["changes"] == pytest.approx(3.0, rel=0.1)
    assert model.term_us["integer_pairs"] == pytest.approx(-1.0, rel=0.25)
    assert model.to_dict()["term_us"] == model.term_us
    errors = _held_out_errors(model, measured)
    assert max(errors["model"]) < 0.02
    assert np.mean(errors["model"]) < 0.5 * min(np.mean(errors["without"]), np.mean(errors["plain"]))


def test_a_busy_host_is_said_beside_the_figures():
    from autoquant.latency.fidelity import fidelity_line
    from autoquant.latency.validation import busy

    summary = {"measured": 3, "within_10pct": 0.1, "mape": 0.3, "max_abs_rel_error": 0.5,
               "spearman": 0.2, "load_average": 9.5, "cpus": 2}  # fmt: skip
    assert busy(summary) and "WARNING: this host was busy" in fidelity_line(summary)
    assert "load average 9.5 on 2 CPUs" in fidelity_line(summary)
    for quiet in ({"load_average": 2.4}, {"load_average": math.nan}, {"load_average": None}):
        assert not busy({**summary, **quiet})
        assert "busy" not in fidelity_line({**summary, **quiet})


def test_round_noise_separates_configs_from_the_machine():
    """A round where every config ran 10% slower is the machine (drift), not noise between
    configs (spread); configs moving against each other are; batches have their own rounds."""
    from autoquant.latency.fidelity import fidelity_line
    from autoquant.latency.validation import round_noise

    together = [timed([100.0, 110.0]), timed([200.0, 220.0]), timed([50.0, 55.0])]
    spread, drift = round_noise(together)
    assert spread == pytest.approx(0.0) and drift == pytest.approx(0.05 / 1.05)
    apart = [timed([90.0, 110.0]), timed([100.0, 100.0]), timed([95.0, 105.0])]
    spread, drift = round_noise(apart)
    assert spread == pytest.approx(0.05, rel=0.02) and drift == pytest.approx(0.05)
    # a second session whose rounds ran the other way round is not mixed with the first
    spread, _ = round_noise([*together, timed([110.0, 100.0], 1), timed([220.0, 200.0], 1)])
    assert spread == pytest.approx(0.0)
    assert all(math.isnan(x) for x in round_noise([t(5.0), KernelTiming.failed("timeout: x")]))
    summary = {"measured": 3, "within_10pct": 1.0, "mape": 0.01, "max_abs_rel_error": 0.02,
               "spearman": 0.9, "end_to_end_round_spread": 0.012, "end_to_end_round_drift": 0.04}
    line = fidelity_line(summary)
    assert "speed moved 4.0% between rounds" in line and "1.2% against the others" in line
    assert "between rounds" not in fidelity_line({**summary, "end_to_end_round_spread": None})


def test_repeatability_is_how_well_the_rounds_agree():
    """Configs that keep their order in every round, whatever the machine's speed did, agree
    with themselves perfectly; configs whose rounds cross rank less well against themselves,
    and the ceiling (Spearman-Brown over the two halves) sits between that and 1."""
    from autoquant.latency.fidelity import fidelity_line
    from autoquant.latency.validation import repeatability

    drift = [1.0, 1.3, 0.9, 1.1]  # the machine: every config with it
    steady = [timed([base * d for d in drift]) for base in (100.0, 105.0, 110.0, 120.0, 130.0)]
    assert repeatability(steady) == pytest.approx((1.0, 1.0))
    rng = np.random.default_rng(0)
    crossing = [timed([base * d * (1 + 0.05 * rng.standard_normal()) for d in drift])
                for base in (100.0, 102.0, 104.0, 106.0, 108.0, 110.0)]
    rho, ceiling = repeatability(crossing)
    assert rho < 0.95 and rho < ceiling < 1.0
    assert ceiling == pytest.approx(math.sqrt(2 * rho / (1 + rho)))
    assert all(math.isnan(x) for x in repeatability(steady[:2]))  # two configs: no ranking
    assert all(math.isnan(x) for x in repeatability([t(5.0)] * 4))  # one round each

    summary = {"measured": 3, "within_10pct": 1.0, "mape": 0.01, "max_abs_rel_error": 0.02,
               "spearman": 0.9, "end_to_end_repeat_spearman": 0.98, "spearman_ceiling": 0.995}
    assert "rank with Spearman 0.980, so an exact predictor would reach about 0.995" in (
        fidelity_line(summary))
    assert "measured twice" not in fidelity_line({**summary, "end_to_end_repeat_spearman": None})


def test_kernel_classes():
    assert kernel_class(QuantChoice()) == kernel_class(QuantChoice(16, 32)) == "float"
    assert kernel_class(QuantChoice(4, 32, "per_group", 32)) == "weight_only"
    assert kernel_class(W8) == kernel_class(QuantChoice(4, 8, "per_channel")) == "integer"
    # float16 activations are float arithmetic, whatever the weights
    assert kernel_class(QuantChoice(16, 16)) == "float"
    assert kernel_class(QuantChoice(4, 16, "per_channel")) == "weight_only"


def test_failed_timing_fails_prediction_and_fit():
    per_layer = {("a", "f32-a32"): t(10), ("b", "f32-a32"): KernelTiming.failed("timeout: x")}
    fp32 = QuantConfig.uniform((A, B), QuantChoice())
    with pytest.raises(ValueError, match="b f32-a32"):
        fit_latency_model((A, B), per_layer, [(fp32, 20.0)])
    with pytest.raises(ValueError, match="no end-to-end"):
        fit_latency_model((A, B), per_layer, [])
    per_layer[("b", "f32-a32")] = t(1)
    per_layer[("a", W8.label)] = KernelTiming.failed("build error: y")
    model = fit_latency_model((A, B), per_layer, [(fp32, 20.0)])
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
    assert s["configs"] == 3 and s["measured"] == 2 and "plain_sum" not in s
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

    from autoquant.backends.tvm.model import build_model, time_model
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
    for avx2 in (False, True):  # uint8 kernels between quantize/dequantize ops, or madd16
        ex = build_model(
            model,
            (1, 1, 8, 8),
            layers,
            QuantConfig.from_mapping(mixed),
            batch=2,
            target=cpu,
            threads=2,
            vnni=False,
            avx2=avx2,
        )
        _, out = time_model(
            ex, (1, 1, 8, 8), batch=2, warmup=0, number=1, repeat=3, min_repeat_ms=1
        )
        assert out.shape == (2, 10) and np.isfinite(out).all()


@pytest.mark.requires_tvm
def test_composed_residual_model_matches_torch(cpu):
    # a ResNet's pieces: BatchNorm folded away (Identity), residual adds (layouts met in NHWC),
    # a 1x1 strided shortcut, adaptive average pooling to 1x1; on 4x4 inputs conv1's shapes
    # (3x3, 4x4 -> 2x2) also fit stride 1 unpadded: the module's own stride 2, padding 1 is used
    import torch

    from autoquant.backends.tvm.model import build_model, time_model
    from autoquant.quant.fold import fold_batchnorm
    from autoquant.space.discovery import discover_layers

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.conv1 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(32)
            self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.down = torch.nn.Conv2d(16, 32, 1, stride=2)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            out = self.conv2(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(self.pool(torch.relu(out + self.down(x))), 1))

    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    model = fold_batchnorm(model).model
    layers = discover_layers(model, (1, 1, 4, 4))
    ex = build_model(
        model,
        (1, 1, 4, 4),
        layers,
        QuantConfig.uniform(layers, QuantChoice()),
        batch=2,
        target=cpu,
        threads=2,
        vnni=False,
        model_weights=True,
    )
    _, out = time_model(ex, (1, 1, 4, 4), batch=2, warmup=0, number=1, repeat=3, min_repeat_ms=1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype("float32"))
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.requires_tvm
def test_composer_refusals_are_excluded_timings(tmp_path, mlp_layers):
    # what the TVM composer cannot build is an excluded whole-model timing with the reason
    from dataclasses import replace

    import torch
    from conftest import fast_profile

    from autoquant.backends.registry import backend_for
    from autoquant.tasks.digits import DigitsMLP

    tvm_or_skip()
    fp32 = QuantConfig.uniform(mlp_layers, QuantChoice())
    named = {"input_ids": torch.zeros(2, 64, dtype=torch.int64)}

    class Sigmoid(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DigitsMLP()

        def forward(self, x):
            return torch.sigmoid(self.inner(x))

    wrapped = [replace(layer, name=f"inner.{layer.name}") for layer in mlp_layers]
    with backend_for(fast_profile(tmp_path)) as b:
        timing = b.measure_model(DigitsMLP(), named, mlp_layers, fp32)
        assert timing.status == "excluded" and "named inputs (input_ids)" in timing.error
        config = QuantConfig.uniform(wrapped, QuantChoice())
        timing = b.measure_model(Sigmoid(), (1, 1, 8, 8), wrapped, config)
        assert timing.status == "excluded" and "sigmoid" in timing.error


@pytest.mark.requires_tvm
def test_check_latency_model_on_digits_mlp(cpu, tmp_path):
    import yaml

    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile
    from autoquant.latency.profiling import parse_label, profile_layers
    from autoquant.latency.table import LatencyTable
    from autoquant.latency.validation import check_latency_model
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
                "end_to_end": {"calibration_configs": 3, "rounds": 2},
            }
        )
    )
    model = DigitsMLP().eval()
    layers = discover_layers(model, (1, 1, 8, 8))
    choices = [parse_label(x) for x in ("f32-a32", "w4g32s-a32")]
    options = {layer.name: choices for layer in layers}
    with backend_for(load_profile(path)) as backend, LatencyTable(tmp_path / "t.sqlite") as table:
        profiled = profile_layers(backend, [(layer, choices) for layer in layers], table)
        kwargs = dict(n_validate=2, seed=1, table=table, model_key="mlp")
        result = check_latency_model(
            backend, model, (1, 1, 8, 8), layers, profiled.lookup(), options=options, **kwargs
        )
        again = check_latency_model(
            backend, model, (1, 1, 8, 8), layers, profiled.lookup(), options=options, **kwargs
        )
    assert result.fp32_e2e_us > 0 and len(result.calibration) == 3 and len(result.rows) == 2
    assert result.measured_now == 5 and result.reused == 0
    assert again.measured_now == 0 and again.reused == 5  # the table keeps end-to-end timings
    held_out = {r.config.hash for r in result.rows}
    assert not held_out & {r.config.hash for r in result.calibration}
    for row in result.rows:
        assert row.error is None and row.measured_ms > 0 and row.predicted_ms > 0
        assert row.plain_sum_ms > 0
    data = result.to_dict()
    summary = data["validation"]["summary"]
    assert summary["measured"] == 2 and "kendall_tau" in summary and "plain_sum" in summary
    assert data["model"]["calibration_configs"] == 3
    # the end-to-end timings in the table went through both interleaved rounds
    with LatencyTable(tmp_path / "t.sqlite") as table:
        stored = table.get_model(backend.fingerprint_hash(), "mlp", result.rows[0].config.hash)
    assert stored.hit and len(stored.timing.details["round_medians_us"]) == 2


def test_draw_configs_keeps_validation_out_of_calibration():
    options = {"a": [QuantChoice(), W8], "b": [QuantChoice(), W8]}
    cal, val = draw_configs((A, B), options, n_calibrate=2, n_validate=5, seed=0)
    assert cal[0] == QuantConfig.uniform((A, B), QuantChoice()) and len(cal) == 2
    assert len(val) == 2  # only 4 configs exist: 2 for calibration, 2 left to validate
    assert not {c.hash for c in cal} & {c.hash for c in val}


def test_calibration_spans_the_kernel_classes():
    """After float32, one config per other kernel class: each layer its first choice of that
    class (float32 where it has none), then random ones."""
    w4 = QuantChoice(4, 32, "per_channel")
    options = {"a": [QuantChoice(), W8, w4], "b": [QuantChoice(), w4]}
    cal, val = draw_configs((A, B), options, n_calibrate=4, n_validate=3, seed=1)
    assert cal[1] == QuantConfig.from_mapping({"a": w4, "b": w4})
    assert cal[2] == QuantConfig.from_mapping({"a": W8, "b": QuantChoice()})
    assert len(cal) == 4 and len(val) == 2  # 6 configs exist
    assert not {c.hash for c in cal} & {c.hash for c in val}
    few, _ = draw_configs((A, B), options, n_calibrate=2, n_validate=0, seed=1)
    assert few == cal[:2]


def test_session_batches_are_scaled_by_their_anchors(tmp_path):
    """Nine configs, four in the first device session: the later batches re-time the first
    configs as anchors and are scaled by how those moved, so a session where the whole device
    ran 1.3x slower, or 0.8x, leaves every config at its first-session speed."""
    from conftest import fast_profile

    from autoquant.backends.contract import LatencyBackend, PreparedModel
    from autoquant.latency.validation import measure_configs

    class Model(PreparedModel):
        def __init__(self, backend, us):
            self.backend, self.us = backend, us

        def time(self):
            return [self.visit(0.01)]

        def visit(self, seconds):
            return self.us * self.backend.speed[self.backend.sessions - 1] * 1e-6

    class Sessions(LatencyBackend):
        def __init__(self, profile):
            self.profile, self.sessions, self.speed = profile, 0, [1.0, 1.3, 0.8, 1.1]

        def fingerprint(self):
            return {"fake": 1}

        def exclusion(self, layer, choice):
            return None

        def measure(self, layer, choice):
            raise AssertionError("not used")

        def prepare_model(self, model, input_shape, layers, config):
            return Model(self, 100.0 + 10 * configs.index(config))

        def models_per_session(self):
            return 4

        def renew_session(self):
            self.sessions += 1

    configs = [
        QuantConfig.from_mapping({"a": QuantChoice(bits, 32, "per_channel"), "b": QuantChoice()})
        for bits in (2, 3, 4, 8, 16)
    ] + [
        QuantConfig.from_mapping({"a": QuantChoice(), "b": QuantChoice(bits, 32, "per_channel")})
        for bits in (2, 3, 4, 8)
    ]
    def sessions(seconds: float) -> Sessions:
        return Sessions(fast_profile(tmp_path, device={"session_timeout_s": seconds}))

    backend = sessions(1e-6)  # too short for any batch to look roomier than planned
    timed = measure_configs(backend, None, (1, 4), (A, B), configs, rounds=2)
    assert backend.sessions == 3  # 4 configs, then 3 new + 1 anchor, twice
    for k, (timing, reused) in enumerate(timed):
        assert not reused and timing.median_us == pytest.approx(100.0 + 10 * k)
    assert timed[4][0].details["session_factor"] == pytest.approx(1 / 1.3)
    assert timed[8][0].details["session_factor"] == pytest.approx(1 / 0.8)
    # A device that timed its first four models in a sliver of its session takes all the
    # rest in the next one: later batches are sized by the pace the earlier ones really had.
    roomy = sessions(600.0)
    again = measure_configs(roomy, None, (1, 4), (A, B), configs, rounds=2)
    assert roomy.sessions == 2
    assert [t.median_us for t, _ in again] == pytest.approx([t.median_us for t, _ in timed])
    assert again[8][0].details["session_factor"] == pytest.approx(1 / 1.3)
