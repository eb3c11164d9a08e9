"""The latency model: a config's latency from per-layer table entries, calibrated end to end.

    predicted(config) = intercept + sum over layers of
                        (scale[class(choice)] + correction[layer, choice]) * kernel(layer, choice)
                        + sum over the form's terms of cost[term] * term(config)

A kernel timed alone is not the same kernel inside the whole model: the runtime's per-call
overhead, the operators between layers (activations, pooling, reshapes), and the cache and
thread-pool state a layer finds (its weights evicted by the other layers, its input still hot)
all differ. ``fit_latency_model`` learns those corrections from a few whole-model measurements
(the calibration configs, float32 among them): the intercept carries what every config pays,
and one scale per *kernel class* carries how that class's kernels run in context. The classes
are the kinds of arithmetic a kernel does (``KERNEL_CLASSES``): float multiply-adds (fp32, fp16
weights), weights dequantized to float inside the loop (weight-only), integer dot products with
a requantize epilogue (w8a8, wNa8). A class shares its memory-access pattern and its sensitivity
to the rest of the model across layers, so a few calibration configs pin it down, where a scale
per layer (tried first) spread the same few measurements over as many unknowns as layers and
ranked held-out configs worse than the plain sum on digits-wide. Beyond that, each kernel a
calibration config ran gets a relative correction, pulled toward 0 by ``KERNEL_RIDGE``: the
whole-model timings are further evidence about the kernels they ran, but ten of them cannot
pin down forty kernels, so the ridge is stiff and only a kernel far off in context moves. The fit
minimises the *relative* error of the calibration configs plus ridge penalties pulling each
scale toward 1 and each correction toward 0, so a class or kernel that the calibration configs
barely use stays at its isolated time. Scales are kept non-negative. Every prediction is
labelled ``predicted``; ``plain_sum_ms`` is the uncalibrated kernel sum, reported beside the
model so the calibration has to earn its place.

Layout changes (``transition_elements``): a runtime runs a chain of integer-kernel layers in one
activation layout and a chain of float ones in another (ONNX Runtime: QLinearConv on NHWC, float
Conv on blocked NCHWc), converting only where the chain changes kind. A one-layer graph pays
both conversions around its kernel, whatever the neighbours; inside the model a layer whose
neighbours run the same kind pays none. So the kernel sum over-counts conversions in uniform
stretches and the model pays them at each change (ONNX Runtime's optimized graph of an
alternating float/int8 config holds a Transpose or Reorder at each change; a uniform one holds
almost none). The terms (``TERMS``) count, between consecutive layers in execution order: the changes of
kernel kind (``kind_changes``: each a conversion node with its fixed cost), the pairs that both
run integer kernels (``integer_pairs``: conversions the one-layer graphs paid and the model does
not), or the elements of the earlier layer's output at each change (``transition_elements``:
a cost by size). Each cost is fitted like the scales (non-negative, applied with its sign);
forms with terms must beat the forms without by more than the calibration's scatter. On a
small residual CNN in ONNX Runtime the per-node cost dominates: the fixed count predicts
held-out mixed configs the kernel sum misses by 10-15%, where the per-element one overfits
(``benchmarks/README.md``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from autoquant import formats
from autoquant.measure.timing import KernelTiming
from autoquant.measurement import Figure
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

RIDGE = 0.1  # weight of sum((scale - 1)^2) against the sum of squared relative errors
# weight of sum(correction^2). Kernels timed in interleaved visits are trusted to well under
# 1%, and ten calibration configs cannot pin down the ~40 kernels they run: a loose ridge fits
# noise and ranks held-out configs worse than the class scales alone, so it is stiff and only a
# kernel far off in context moves (``benchmarks/latency_fidelity.py`` measures the effect).
KERNEL_RIDGE = 3.0
KERNEL_CLASSES = ("float", "weight_only", "integer")


def kernel_class(choice: QuantChoice) -> str:
    """Which ``KERNEL_CLASSES`` entry a choice's kernel belongs to (its weight format says)."""
    return formats.weight_format(choice).kernel_class(choice)


def _kinds_in_order(layers: Sequence[LayerInfo], config: QuantConfig) -> list[tuple[bool, LayerInfo]]:
    """(runs an integer kernel, layer) in execution order (a layer the config leaves out is
    float32)."""
    chosen = config.as_mapping()
    return [
        (kernel_class(chosen.get(layer.name, QuantChoice())) == "integer", layer)
        for layer in sorted(layers, key=lambda la: la.index)
    ]


def transition_elements(layers: Sequence[LayerInfo], config: QuantConfig) -> int:
    """Activation elements (per sample) crossing a change of kernel kind: for consecutive
    layers in execution order of which one runs an integer kernel and the other not, the
    elements of the earlier one's output (a layer the config leaves out is float32)."""
    kinds = _kinds_in_order(layers, config)
    return sum(
        math.prod(earlier.output_shape[1:])
        for (was, earlier), (now, _) in zip(kinds, kinds[1:])
        if was != now
    )


def kind_changes(layers: Sequence[LayerInfo], config: QuantConfig) -> int:
    """Consecutive layers (execution order) of which one runs an integer kernel and the other
    not: each is a conversion the runtime inserts (quantize or dequantize, a layout change)."""
    kinds = _kinds_in_order(layers, config)
    return sum(was != now for (was, _), (now, _) in zip(kinds, kinds[1:]))


def integer_pairs(layers: Sequence[LayerInfo], config: QuantConfig) -> int:
    """Consecutive layers that both run integer kernels: each one-layer graph paid the
    conversions in and out of its kernel, the model pays none between the two."""
    kinds = _kinds_in_order(layers, config)
    return sum(was and now for (was, _), (now, _) in zip(kinds, kinds[1:]))


# The terms a form may add to the kernel sum: (count per config, sign of its cost). Each is
# fitted non-negative and applied with its sign (``LatencyModel.term_us`` holds it signed).
TERMS: dict[str, tuple[Any, int]] = {
    "transitions": (transition_elements, 1),  # µs per element crossing a change
    "changes": (kind_changes, 1),  # µs per conversion node
    "integer_pairs": (integer_pairs, -1),  # µs saved per conversion pair not paid
}


@dataclass(frozen=True)
class LatencyModel:
    layers: tuple[LayerInfo, ...]
    per_layer: dict[tuple[str, str], KernelTiming]  # (layer name, choice label) -> timing
    intercept_us: float = 0.0
    class_scale: dict[str, float] = field(default_factory=dict)  # absent class: scale 1
    # (layer name, choice label) -> relative correction of that kernel's time in context
    kernel_correction: dict[tuple[str, str], float] = field(default_factory=dict)
    calibration_configs: int = 0
    statistic: str = "median"  # which repeat of each timing: "min" or "median"
    # Set when the fit had something to say about itself (one line); None otherwise.
    note: str | None = None
    form: str = "class scales"  # a ``MODEL_FORMS`` key
    # leave-one-out MAPE of each form on the calibration configs, when they were compared
    loo_mape: dict[str, float] = field(default_factory=dict)
    # µs per unit of each ``TERMS`` entry the form fitted, signed (integer_pairs saves)
    term_us: dict[str, float] = field(default_factory=dict)

    @property
    def transition_us_per_element(self) -> float:
        return self.term_us.get("transitions", 0.0)

    def kernel_times_us(self, config: QuantConfig) -> dict[str, tuple[str, str, float]] | Figure:
        """Each layer's (kernel class, choice label, kernel time in µs by the model's
        statistic), or a failed ``Figure`` naming the missing one."""
        out = {}
        mapping = config.as_mapping()
        for layer in self.layers:
            choice = mapping.get(layer.name, QuantChoice())
            timing = self.per_layer.get((layer.name, choice.label))
            if timing is None:
                return Figure.failed(f"{layer.name} {choice.label}: not in the latency table")
            if not timing.ok:
                return Figure.failed(
                    f"{layer.name} {choice.label}: {timing.status}: {timing.error}"
                )
            out[layer.name] = (
                kernel_class(choice),
                choice.label,
                timing.stat_us(self.statistic),
            )
        return out

    def predict(self, config: QuantConfig) -> Figure:
        """Milliseconds, ``predicted``; ``failed`` with the reason when a layer has no timing."""
        kernels = self.kernel_times_us(config)
        if isinstance(kernels, Figure):
            return kernels
        total = self.intercept_us + sum(
            self.in_context(name, cls, label) * us for name, (cls, label, us) in kernels.items()
        )
        for term, us in self.term_us.items():
            total += us * TERMS[term][0](self.layers, config)
        return Figure(total / 1000.0, "predicted")

    def plain_sum_ms(self, config: QuantConfig) -> float:
        """The uncalibrated per-layer kernel sum (NaN when a layer has no timing)."""
        kernels = self.kernel_times_us(config)
        if isinstance(kernels, Figure):
            return math.nan
        return sum(us for _, _, us in kernels.values()) / 1000.0

    def in_context(self, layer: str, cls: str, label: str) -> float:
        """The factor from a kernel's isolated time to its time inside the model."""
        return self.class_scale.get(cls, 1.0) + self.kernel_correction.get((layer, label), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "formula": "intercept_us + sum((class_scale[kernel_class(choice)] + "
            f"kernel_correction[layer|choice]) * kernel_{self.statistic}_us(layer, choice)) + "
            "sum(term_us[term] * term(config))",
            "statistic": self.statistic,
            "intercept_us": self.intercept_us,
            "class_scale": dict(self.class_scale),
            "term_us": dict(self.term_us),
            "transition_us_per_element": self.transition_us_per_element,
            "kernel_correction": {
                f"{layer}|{label}": v for (layer, label), v in self.kernel_correction.items()
            },
            "form": self.form,
            "leave_one_out_mape": dict(self.loo_mape),
            "kernel_ridge": MODEL_FORMS.get(self.form, {}).get("kernel_ridge"),
            "calibration_configs": self.calibration_configs,
            "ridge": RIDGE,
            "note": self.note,
        }


def model_state(model: LatencyModel) -> dict[str, Any]:
    """Everything ``model`` predicts from, as JSON (the kernels by their statistic only, failed
    ones left out): what a shared study holds so that every worker predicts with one model.
    ``to_dict``'s figures, and the kernels they multiply."""
    return {
        **model.to_dict(),
        "kernels_us": {
            f"{n}|{c}": [t.impl, t.stat_us(model.statistic)]
            for (n, c), t in model.per_layer.items()
            if t.ok
        },
    }


def model_from_state(layers: tuple[LayerInfo, ...], state: dict[str, Any]) -> LatencyModel:
    """The model ``model_state`` wrote, for the same layers. ValueError for a state that is not
    one (an unknown term, a non-finite figure): a study is input like any other."""

    def number(value: Any) -> float:
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(f"non-finite figure {value!r}")
        return out

    def key(text: str) -> tuple[str, str]:
        name, _, label = str(text).rpartition("|")
        return name, label

    statistic = str(state["statistic"])
    if statistic not in ("min", "median") or set(state["term_us"]) - set(TERMS):
        raise ValueError(f"unknown statistic or term in {sorted(state)}")
    per_layer = {
        key(k): KernelTiming("measured", str(impl), median_us=number(us), min_us=number(us))
        for k, (impl, us) in state["kernels_us"].items()
    }
    return LatencyModel(
        layers,
        per_layer,
        number(state["intercept_us"]),
        {str(c): number(v) for c, v in state["class_scale"].items()},
        {key(k): number(v) for k, v in state["kernel_correction"].items()},
        int(state["calibration_configs"]),
        statistic,
        None if state.get("note") is None else str(state["note"]),
        str(state["form"]),
        {str(f): float(v) for f, v in state.get("leave_one_out_mape", {}).items()},
        {str(t): number(v) for t, v in state["term_us"].items()},
    )


def fit_latency_model(
    layers: tuple[LayerInfo, ...],
    per_layer: dict[tuple[str, str], KernelTiming],
    measured: Sequence[tuple[QuantConfig, float]],
    *,
    ridge: float = RIDGE,
    kernel_ridge: float | None = KERNEL_RIDGE,
    statistic: str = "median",
    shared_scale: bool = False,
    fixed_scale: bool = False,
    terms: Sequence[str] = (),
    plain: bool = False,
) -> LatencyModel:
    """Fit intercept, per-kernel-class scales and per-kernel corrections on ``measured``
    (config, end-to-end µs) pairs, the kernel times and the measurements taken with the same
    ``statistic`` (min or median). ``shared_scale``: one scale for every class;
    ``fixed_scale``: the kernel sum as it is (no scale, no corrections); ``kernel_ridge``
    None: no kernel corrections; ``terms``: also the cost of each named ``TERMS`` entry (the
    conversions between integer and float kernels); ``plain``: fit nothing, the per-layer
    kernel sum as it is.

    Raises ValueError when there is no measurement or a measured config has a layer without a
    usable kernel timing (its row would be meaningless)."""
    import numpy as np
    from scipy.optimize import nnls

    if not measured:
        raise ValueError("no end-to-end measurement to calibrate on")
    kernel_sum = LatencyModel(
        layers, dict(per_layer), calibration_configs=len(measured), statistic=statistic
    )
    observed = _observations(kernel_sum, layers, measured, terms)
    if plain:
        return kernel_sum
    # Only the kernels some calibration config ran can be corrected (none: kernel_ridge None).
    used = sorted(
        {(name, label) for kernels, _, _ in observed for name, (_, label, _) in kernels.items()}
        if kernel_ridge is not None and not fixed_scale
        else ()
    )
    # one scale for all classes: the same ranking as the plain sum, with its offset and slope
    scale_groups = (
        [] if fixed_scale else [KERNEL_CLASSES] if shared_scale else [(c,) for c in KERNEL_CLASSES]
    )
    n_class, n_kernel = len(scale_groups), len(used)
    rows = [_design_row(obs, used, scale_groups, terms) for obs in observed]
    # with the scale fixed, the kernel sum is known: the fit explains what is left of 1
    targets = [
        1.0 - (sum(us for _, _, us in kernels.values()) / measured_us if fixed_scale else 0.0)
        for kernels, measured_us, _ in observed
    ]
    penalty, prior = _ridge_rows(n_class, n_kernel, ridge, kernel_ridge, n_terms=len(terms))
    k0 = 2 + n_class
    a = np.vstack([np.asarray(rows), penalty])
    b = np.concatenate([np.asarray(targets), prior])
    solution, _ = nnls(a, b)
    intercept = float(solution[0] - solution[1])
    scales = {
        c: float(v) for group, v in zip(scale_groups, solution[2 : 2 + n_class]) for c in group
    }
    plus = solution[k0 : k0 + n_kernel]
    minus = solution[k0 + n_kernel : k0 + 2 * n_kernel]
    corrections = {k: float(p - m) for k, p, m in zip(used, plus, minus)}
    fitted_terms = solution[k0 + 2 * n_kernel :]
    model = LatencyModel(
        layers,
        dict(per_layer),
        intercept,
        scales,
        corrections,
        len(measured),
        statistic,
        term_us={t: TERMS[t][1] * float(v) for t, v in zip(terms, fitted_terms)},
    )
    return _positive_or_plain(model, kernel_sum)


def _positive_or_plain(model: LatencyModel, kernel_sum: LatencyModel) -> LatencyModel:
    """``model``, or the plain kernel sum (with a note) when the config of the fastest kernels
    the table allows would be predicted at or below zero."""
    fastest = model.predict(_fastest_config(model))
    if fastest.source == "failed" or fastest.value > 0:
        return model
    return replace(
        kernel_sum,
        note="the calibrated model predicted a non-positive latency; fell back to the plain "
        "per-layer kernel sum",
    )


# The forms ``calibrate_latency_model`` chooses between, simplest first (it wins ties): the
# plain kernel sum fits nothing, so its leave-one-out error is its error on the calibration
# configs, and every fitted form has to beat it by more than the scatter (when the calibration
# configs span a narrow latency range, intercept and scale trade off and a fit extrapolates
# worse than the sum it starts from). One scale for all kernels ranks configs exactly as the
# plain sum does; class scales and kernel corrections can rank them better, when the
# calibration configs show a difference between the classes, and worse when what they fit is
# noise; how much the classes differ follows the machine's state, so each calibration decides
# afresh.
# The conversion forms count what a runtime inserts where integer and float kernels meet
# (``kind_changes``: a fixed cost per conversion node) and the conversions a one-layer graph
# paid that a stretch of integer layers does not (``integer_pairs``); "kernel sum +
# conversions" keeps the kernels at their measured times, with two counts and an intercept to
# fit where a scale would trade against the intercept over a narrow latency range. The
# transition forms cost the converted elements instead, for runtimes where a conversion costs
# by its size more than by its node. A form with a term has to predict the left-out configs
# better by more than the scatter (a runtime that converts nothing between kernel kinds, like
# the TVM composition, gains nothing from it).
CONVERSIONS = ("changes", "integer_pairs")
MODEL_FORMS: dict[str, dict[str, Any]] = {
    "plain sum": {"plain": True},
    "one scale": {"shared_scale": True, "kernel_ridge": None},
    "kernel sum + conversions": {"fixed_scale": True, "kernel_ridge": None, "terms": CONVERSIONS},
    "class scales": {"shared_scale": False, "kernel_ridge": KERNEL_RIDGE},
    "one scale + conversions": {"shared_scale": True, "kernel_ridge": None, "terms": CONVERSIONS},
    "one scale + transitions": {
        "shared_scale": True,
        "kernel_ridge": None,
        "terms": ("transitions",),
    },
    "class scales + transitions": {
        "shared_scale": False,
        "kernel_ridge": KERNEL_RIDGE,
        "terms": ("transitions",),
    },
}


def _observations(
    kernel_sum: LatencyModel,
    layers: tuple[LayerInfo, ...],
    measured: Sequence[tuple[QuantConfig, float]],
    terms: Sequence[str],
) -> list[tuple[dict, float, list[float]]]:
    """(kernel times, measured µs, each term's signed count) per calibration config;
    ValueError for a config with a layer without a usable kernel timing or a non-positive
    measurement."""
    observed = []
    for config, us in measured:
        kernels = kernel_sum.kernel_times_us(config)
        if isinstance(kernels, Figure):
            raise ValueError(f"calibration config {config.hash}: {kernels.reason}")
        if not us > 0:
            raise ValueError(f"calibration config {config.hash}: measured {us} µs")
        counts = [TERMS[t][1] * TERMS[t][0](layers, config) for t in terms]
        observed.append((kernels, us, counts))
    return observed


def _design_row(
    observation: tuple[dict, float, list[float]],
    used: list[tuple[str, str]],
    scale_groups: list[tuple[str, ...]],
    terms: Sequence[str],
) -> list[float]:
    """One calibration config's row, divided by its measurement (relative errors). Unknowns,
    all non-negative: intercept as (plus - minus), the class scales, then each kernel
    correction as (plus - minus), then each term's cost."""
    kernels, us, counts = observation
    per_class = dict.fromkeys(KERNEL_CLASSES, 0.0)
    per_kernel = dict.fromkeys(used, 0.0)
    for name, (cls, label, kernel_us) in kernels.items():
        per_class[cls] += kernel_us
        if (name, label) in per_kernel:
            per_kernel[(name, label)] += kernel_us
    kernel_cols = [per_kernel[k] / us for k in used]
    return [
        1.0 / us,
        -1.0 / us,
        *(sum(per_class[c] for c in group) / us for group in scale_groups),
        *kernel_cols,
        *(-v for v in kernel_cols),
        *(count / us for count in counts),
    ]


def _ridge_rows(
    n_class: int, n_kernel: int, ridge: float, kernel_ridge: float | None, *, n_terms: int
) -> tuple[Any, Any]:
    """(penalty rows, their targets): class scales pulled towards 1, kernel corrections
    towards 0, the intercept and the term costs free but unique."""
    import numpy as np

    n = 2 + n_class + 2 * n_kernel + n_terms
    penalty = np.zeros((n, n))
    penalty[0, 0] = penalty[1, 1] = 1e-9  # a unique intercept split
    penalty[2 : 2 + n_class, 2 : 2 + n_class] = np.sqrt(ridge) * np.eye(n_class)
    k0 = 2 + n_class
    kernel_block = slice(k0, k0 + 2 * n_kernel)
    penalty[kernel_block, kernel_block] = np.sqrt(kernel_ridge or 0.0) * np.eye(2 * n_kernel)
    for i in range(n - n_terms, n):
        penalty[i, i] = 1e-9  # like the intercept: free, but unique
    prior = np.zeros(n)
    prior[2 : 2 + n_class] = np.sqrt(ridge)
    return penalty, prior


def _fastest_config(model: LatencyModel) -> QuantConfig:
    """Per layer, the choice whose kernel is fastest in context by ``model``."""
    fastest: dict[str, tuple[float, str]] = {}
    for (name, label), timing in model.per_layer.items():
        if timing.ok:
            cls = kernel_class(QuantChoice.from_label(label))
            us = model.in_context(name, cls, label) * timing.stat_us(model.statistic)
            if name not in fastest or us < fastest[name][0]:
                fastest[name] = (us, label)
    return QuantConfig.from_mapping(
        {name: QuantChoice.from_label(label) for name, (_, label) in fastest.items()}
    )


def calibrate_latency_model(
    layers: tuple[LayerInfo, ...],
    per_layer: dict[tuple[str, str], KernelTiming],
    measured: Sequence[tuple[QuantConfig, float]],
    *,
    statistic: str = "median",
) -> LatencyModel:
    """The simplest ``MODEL_FORMS`` form whose leave-one-out MAPE on ``measured`` is within
    one standard error of the lowest (the one-standard-error rule: a richer form has to beat
    the simpler one by more than the calibration's own scatter), fitted on all of it. With
    fewer than 4 configs there is nothing to compare on: class scales. The model records the
    form and every form's leave-one-out MAPE."""
    if len(measured) < 4:
        return fit_latency_model(layers, per_layer, measured, statistic=statistic)
    loo: dict[str, float] = {}
    scatter: dict[str, float] = {}  # standard error of each form's mean
    for form, settings in MODEL_FORMS.items():
        errors = []
        for k, (config, us) in enumerate(measured):
            rest = [*measured[:k], *measured[k + 1 :]]
            predicted = fit_latency_model(
                layers, per_layer, rest, statistic=statistic, **settings
            ).predict(config)
            if predicted.source != "failed":
                errors.append(abs(predicted.value * 1000.0 - us) / us)
        loo[form] = statistics.fmean(errors) if len(errors) >= 2 else math.inf
        scatter[form] = (
            statistics.stdev(errors) / math.sqrt(len(errors)) if len(errors) >= 2 else 0.0
        )
    lowest = min(loo, key=lambda form: loo[form])
    best = next(form for form in MODEL_FORMS if loo[form] <= loo[lowest] + scatter[lowest])
    model = fit_latency_model(layers, per_layer, measured, statistic=statistic, **MODEL_FORMS[best])
    return replace(model, form=best, loo_mape=loo)


@dataclass(frozen=True)
class ValidationRow:
    config: QuantConfig
    predicted_ms: float
    measured_ms: float
    measured_spread: float
    error: str | None = None
    plain_sum_ms: float = math.nan  # the uncalibrated kernel sum, for comparison

    @property
    def rel_error(self) -> float:
        if self.error or not self.measured_ms > 0:
            return math.nan
        return (self.predicted_ms - self.measured_ms) / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "config_hash": self.config.hash,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_spread": self.measured_spread,
            "rel_error": self.rel_error,
            "plain_sum_ms": self.plain_sum_ms,
            "error": self.error,
        }


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two equally long lists (NaN with fewer than two pairs)."""
    n = len(a)
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (a[i] - a[j]) * (b[i] - b[j])
            concordant += s > 0
            discordant += s < 0
    pairs = n * (n - 1) // 2
    return (concordant - discordant) / pairs if pairs else math.nan


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks; NaN with fewer than two values or a
    constant list)."""
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def fidelity(predicted_ms: list[float], measured_ms: list[float]) -> dict[str, float]:
    """How well predictions match measurements: share within ±10 %, MAPE, max error, rank
    correlations."""
    rel = [abs(p - m) / m for p, m in zip(predicted_ms, measured_ms)]
    return {
        "within_10pct": sum(r <= 0.10 for r in rel) / len(rel),
        "mape": statistics.fmean(rel),
        "max_abs_rel_error": max(rel),
        "spearman": spearman_rho(predicted_ms, measured_ms),
        "kendall_tau": kendall_tau(predicted_ms, measured_ms),
    }


def summarize(rows: Sequence[ValidationRow]) -> dict[str, Any]:
    """Error figures of the model's predictions, and under ``plain_sum`` the same figures of
    the uncalibrated per-layer kernel sum on the same rows."""
    good = [r for r in rows if r.error is None and not math.isnan(r.rel_error)]
    if not good:
        return {"configs": len(rows), "measured": 0}
    rel = [abs(r.rel_error) for r in good]
    predicted = [r.predicted_ms for r in good]
    measured = [r.measured_ms for r in good]
    out: dict[str, Any] = {
        "configs": len(rows),
        "measured": len(good),
        "mean_abs_rel_error": statistics.fmean(rel),
        "max_abs_rel_error": max(rel),
        "mean_abs_error_ms": statistics.fmean(abs(r.predicted_ms - r.measured_ms) for r in good),
        "kendall_tau": kendall_tau(predicted, measured),
        "within_10pct": sum(r <= 0.10 for r in rel) / len(rel),
        "mape": statistics.fmean(rel),
        "spearman": spearman_rho(predicted, measured),
    }
    plain = [r.plain_sum_ms for r in good]
    if not any(math.isnan(v) for v in plain):
        out["plain_sum"] = fidelity(plain, measured)
    return out
