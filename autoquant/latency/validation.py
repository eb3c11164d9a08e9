"""Calibrate the latency model on whole-model measurements, then check it on held-out ones.

``check_latency_model`` draws the calibration configs (float32 first, then random configs of
the space) and, from another random stream, ``n_validate`` validation configs that are not
among them; it times all of them end to end on the profile's device (``measure_configs``),
fits the model on the calibration configs only, and compares its predictions, and the plain
per-layer kernel sum's, with the measured latency of the validation configs.

Whole-model timings are interleaved: every config is compiled and loaded first, then each
round cycles over all of them in short visits (``interleave``). The speed of a shared machine
moves within a second and drifts over minutes; configs visited in turn see the same moments,
so a busy spell slows all of them instead of the one that happened to be running, and the
model's statistic over all the visits (the median by default) is not moved by a spell that hit
a few. Timings are stored in the latency table (under the model's signature and the config's
hash) and reused.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from autoquant.backends.contract import SESSION_SHARE, short_error
from autoquant.latency.model import (
    KERNEL_CLASSES,
    LatencyModel,
    ValidationRow,
    calibrate_latency_model,
    kernel_class,
    summarize,
)
from autoquant.measure.interleave import visit_rounds, visits_per_round
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

# configs re-timed in every later session batch to scale it to the first (at most)
ANCHORS = 3


@dataclass(frozen=True)
class ModelCheck:
    model: LatencyModel
    calibration: tuple[ValidationRow, ...]  # in-sample: the configs the model was fitted on
    rows: tuple[ValidationRow, ...]  # held out
    measured_now: int  # configs timed end to end by this call
    reused: int  # configs whose end-to-end timing came from the table
    rounds: int
    elapsed_s: float
    # how far a config's round medians moved against the other configs' in the same rounds
    # (the noise a comparison of configs sits on), and how far the rounds' common level moved
    # (the machine's speed, every config with it); NaN with one round (``round_noise``)
    round_spread: float = float("nan")
    round_drift: float = float("nan")
    # Spearman between two halves of the held-out configs' rounds, and the Spearman an exact
    # predictor would reach against the full measurement (``repeatability``); NaN if unknown
    repeat_spearman: float = float("nan")
    spearman_ceiling: float = float("nan")
    # the host's highest 1-minute load average seen while configs were timed end to end here
    # (NaN when none was, or the device is remote): above BUSY_LOAD x its CPUs, other
    # processes' work is in the medians (``busy``)
    load_average: float = float("nan")
    cpus: int = 0

    @property
    def fp32_e2e_us(self) -> float:
        """The float32 config's measured latency (the model's statistic), µs."""
        return self.calibration[0].measured_ms * 1000.0 if self.calibration else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            **summarize(self.rows),
            "end_to_end_round_spread": self.round_spread,
            "end_to_end_round_drift": self.round_drift,
            "end_to_end_repeat_spearman": self.repeat_spearman,
            "spearman_ceiling": self.spearman_ceiling,
            "load_average": self.load_average,
            "cpus": self.cpus,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "fp32_e2e_us": self.fp32_e2e_us,
            "calibration": {
                "configs": len(self.calibration),
                "summary": summarize(self.calibration),
                "rows": [r.to_dict() for r in self.calibration],
            },
            "validation": {
                "configs": len(self.rows),
                "summary": self.summary(),
                "rows": [r.to_dict() for r in self.rows],
            },
            "measured_source": f"measured end to end: the {self.model.statistic} of the visits "
            f"of {self.rounds} rounds, interleaved over all configs",
            "end_to_end_measured_now": self.measured_now,
            "end_to_end_reused": self.reused,
            "elapsed_s": self.elapsed_s,
        }


def measure_configs(
    backend: Any,
    model: Any,
    inputs: Any,
    layers: tuple[LayerInfo, ...],
    configs: Sequence[QuantConfig],
    *,
    rounds: int,
    table: Any = None,
    model_key: str | None = None,
    status: Callable[[str], None] | None = None,
) -> list[tuple[KernelTiming, bool]]:
    """(timing, reused) per config, end to end, in rounds of interleaved visits; never raises
    for a device fault (a config that fails to build or run is a ``failed`` timing).
    ``inputs``: a batch-1 input shape or the task's example inputs (``backends.inputs.task_inputs``:
    named or integer inputs are fed as they are)."""
    fp_hash = backend.fingerprint_hash() if table is not None else ""
    results: dict[int, tuple[KernelTiming, bool]] = {}
    todo = []
    for i, config in enumerate(configs):
        if table is not None and model_key is not None:
            found = table.get_model(fp_hash, model_key, config.hash)
            if found.hit and found.timing.ok:
                results[i] = (found.timing, True)
                continue
        if any(config.hash == configs[j].hash for j in todo):
            continue  # timed once, copied below
        todo.append(i)
    sessions = _SessionBatches(
        backend=backend,
        model=model,
        inputs=inputs,
        layers=layers,
        configs=configs,
        todo=todo,
        rounds=rounds,
        status=status,
    )
    sessions.run(results)
    measure = backend.profile.spec.measure.model_dump()
    for i in todo:
        if i in results:
            continue
        timing = sessions.timing(i)
        results[i] = (timing, False)
        if table is not None and model_key is not None:
            table.put_model(fp_hash, model_key, configs[i].hash, timing, measure=measure)
    by_hash = {configs[i].hash: results[i] for i in results}
    return [results.get(i, by_hash[c.hash]) for i, c in enumerate(configs)]


@dataclass
class _SessionBatches:
    """The end-to-end timing of ``todo`` configs, batch by batch (one device session each).

    A remote session ends after session_timeout_s and takes its loaded models with it: the
    configs are timed in batches that fit one session, interleaved within each batch. Sessions
    differ (a fresh server process, another moment of the machine), and whole batches can run
    tens of percent apart. So every later batch times the first configs again as anchors
    (float32 and the class-uniform calibration configs come first: one of each kind of kernel,
    since a moment of the machine can slow one kind more than another), and its samples are
    scaled by the geometric mean of how the anchors moved. The first batch is sized by the
    backend's estimate; every later one by how long the batches before it really took per
    model, with the same ``SESSION_SHARE`` (the estimate is cautious, and fewer, fuller
    sessions need less anchor scaling)."""

    backend: Any
    model: Any
    inputs: Any
    layers: tuple[LayerInfo, ...]
    configs: Sequence[QuantConfig]
    todo: list[int]
    rounds: int
    status: Callable[[str], None] | None
    samples: dict[int, list[list[float]]] = field(default_factory=dict)
    session_factor: dict[int, float] = field(default_factory=dict)
    batch_of: dict[int, int] = field(default_factory=dict)  # config -> its batch (session)
    build_s: dict[int, float] = field(default_factory=dict)
    anchor_first_us: dict[int, float] = field(default_factory=dict)  # median in the first batch

    def __post_init__(self) -> None:
        spec = self.backend.profile.spec
        self.visits = visits_per_round(
            spec.end_to_end.repeat, spec.measure.min_repeat_ms, spec.measure.visit_ms
        )
        self.per_session = self.backend.models_per_session() or len(self.todo) or 1
        self.split = 2 <= self.per_session < len(self.todo)
        n_anchors = max(1, min(ANCHORS, self.per_session // 4))
        self.anchors = self.todo[:n_anchors] if self.split else []

    def say(self, text: str) -> None:
        if self.status is not None:
            self.status(text)

    def run(self, results: dict[int, tuple[KernelTiming, bool]]) -> None:
        """Time every batch; a config that fails goes into ``results`` as it failed."""
        session_s = self.backend.profile.spec.device.session_timeout_s
        rest, number, spent_s, spent_models = list(self.todo), 0, 0.0, 0
        while rest:
            room = self.per_session if not number else max(1, self.per_session - len(self.anchors))
            batch, rest = rest[:room], rest[room:]
            timed = [*self.anchors, *batch] if number else batch
            self.backend.renew_session()  # a full session for each batch
            started = time.monotonic()
            batch_samples, lost = self._time_batch(timed, batch, results)
            factor = self._anchor_factor(number, batch_samples)
            for i in batch:
                self.batch_of[i] = number
                if i in batch_samples:
                    self.samples[i] = [[x * factor for x in rnd] for rnd in batch_samples[i]]
                    if factor != 1.0:
                        self.session_factor[i] = factor
            if self.split and not lost:  # a batch cut short by a lost device says nothing of its pace
                spent_s += time.monotonic() - started
                spent_models += len(timed)
                pace = spent_models / max(spent_s, 1e-9)  # models per second
                self.per_session = max(self.per_session, int(SESSION_SHARE * session_s * pace))
            number += 1

    def _time_batch(
        self, timed: list[int], batch: list[int], results: dict[int, tuple[KernelTiming, bool]]
    ) -> tuple[dict[int, list[list[float]]], dict[int, str]]:
        """(samples per config, why a config's timing stopped) of one session's batch."""
        m = self.backend.profile.spec.measure
        prepared: dict[int, Any] = {}
        lost: dict[int, str] = {}  # config -> why its timing stopped

        def progress(r: int, v: int) -> None:
            self.say(
                f"end-to-end timing of {len(prepared)} configs: round {r + 1}/{self.rounds}, "
                f"visit {v + 1}/{self.visits}"
            )

        try:
            for i in timed:
                self.say(
                    f"compiling config {self.todo.index(i) + 1}/{len(self.todo)} for end-to-end "
                    "timing"
                )
                handle = self.backend.prepare_model(
                    self.model, self.inputs, self.layers, self.configs[i]
                )
                if isinstance(handle, KernelTiming):
                    if i in batch:  # a failed anchor leaves the scaling to the others
                        results[i] = (handle, False)
                    continue
                prepared[i] = handle
                if i in batch:
                    self.build_s[i] = handle.build_s
            batch_samples = visit_rounds(
                {i: partial(handle.visit, m.visit_ms / 1000.0) for i, handle in prepared.items()},
                rounds=self.rounds,
                visits=self.visits,
                on_failure=lambda i, exc: lost.setdefault(i, short_error(exc)),
                progress=progress,
            )
        finally:
            for handle in prepared.values():
                handle.close()
            prepared.clear()
        for i, why in lost.items():  # lost device, timeout: this config failed
            batch_samples.pop(i, None)
            if i in batch:
                results[i] = (KernelTiming.failed(f"run error: {why}", "model"), False)
        return batch_samples, lost

    def _anchor_factor(self, number: int, batch_samples: dict[int, list[list[float]]]) -> float:
        """How much to scale batch ``number`` to the first: the geometric mean of how its
        anchors moved (1 for the first batch, or with no anchor timed in both)."""
        moved = []
        for a in self.anchors:
            if a in batch_samples:
                us = statistics.median(x for rnd in batch_samples[a] for x in rnd)
                if number == 0:
                    self.anchor_first_us[a] = us
                elif a in self.anchor_first_us:
                    moved.append(math.log(self.anchor_first_us[a] / us))
        return math.exp(statistics.fmean(moved)) if moved else 1.0

    def timing(self, i: int) -> KernelTiming:
        per_round = self.samples[i]
        return KernelTiming.from_samples(
            "model",
            [s for rnd in per_round for s in rnd],
            build_s=self.build_s[i],
            details={
                "rounds": len(per_round),
                "visits_per_round": self.visits,
                "batch": self.batch_of[i],
                "round_medians_us": [statistics.median(s) * 1e6 for s in per_round],
                **({"session_factor": self.session_factor[i]} if i in self.session_factor else {}),
            },
        )


def draw_configs(
    layers: tuple[LayerInfo, ...],
    options: dict[str, Sequence[QuantChoice]],
    *,
    n_calibrate: int,
    n_validate: int,
    seed: int,
) -> tuple[list[QuantConfig], list[QuantConfig]]:
    """(calibration, validation) configs. Calibration: float32 first, then for each other
    kernel class (``latency.model.KERNEL_CLASSES``) the config that gives every layer its
    first choice of that class (float32 where a layer has none), then random configs; the
    validation configs are random from a separate stream, none of them a calibration config.

    The class-uniform configs are the calibration's designed experiments: the model has one
    scale per kernel class, and a config whose kernels are nearly all of one class pins that
    scale down, where random configs mix the classes and leave the scales to the ridge."""
    fp32 = QuantConfig.uniform(layers, QuantChoice())
    cal_rng, val_rng = random.Random(seed + 1_000_003), random.Random(seed)

    def draw(rng: random.Random) -> QuantConfig:
        return QuantConfig.from_mapping(
            {layer.name: rng.choice(list(options[layer.name])) for layer in layers}
        )

    def uniform_in(cls: str) -> QuantConfig:
        picked = {}
        for layer in layers:
            of_class = [c for c in options[layer.name] if kernel_class(c) == cls]
            picked[layer.name] = of_class[0] if of_class else QuantChoice()
        return QuantConfig.from_mapping(picked)

    total = 1
    for layer in layers:
        total *= max(1, len(options[layer.name]))
    calibration, seen = [fp32], {fp32.hash}
    for cls in KERNEL_CLASSES:
        config = uniform_in(cls)
        if len(calibration) < n_calibrate and config.hash not in seen:
            calibration.append(config)
            seen.add(config.hash)
    for _ in range(50 * n_calibrate):
        if len(calibration) >= min(n_calibrate, total):
            break
        config = draw(cal_rng)
        if config.hash not in seen:
            calibration.append(config)
            seen.add(config.hash)
    validation: list[QuantConfig] = []
    for _ in range(50 * max(n_validate, 1)):
        if len(validation) >= n_validate or len(seen) >= total:
            break
        config = draw(val_rng)
        if config.hash not in seen:
            validation.append(config)
            seen.add(config.hash)
    return calibration, validation


def check_latency_model(
    backend: Any,
    model: Any,
    inputs: Any,
    layers: tuple[LayerInfo, ...],
    per_layer: dict[tuple[str, str], KernelTiming],
    *,
    options: dict[str, Sequence[QuantChoice]],
    n_validate: int,
    n_calibrate: int | None = None,
    rounds: int | None = None,
    seed: int = 0,
    table: Any = None,
    model_key: str | None = None,
    status: Callable[[str], None] | None = None,
) -> ModelCheck:
    """Fit on the calibration configs, check on ``n_validate`` held-out ones (see the module
    text). ``options`` gives each layer's choices with a usable kernel timing; ``per_layer``
    must hold a float32 timing for every layer. Raises RuntimeError when the float32 model
    does not run end to end (there is nothing to calibrate on)."""
    start = time.monotonic()
    e2e = backend.profile.spec.end_to_end
    n_calibrate = e2e.calibration_configs if n_calibrate is None else n_calibrate
    rounds = e2e.rounds if rounds is None else rounds
    calibration, validation = draw_configs(
        layers, options, n_calibrate=n_calibrate, n_validate=n_validate, seed=seed
    )
    local = backend.profile.is_local
    load = [host_load()] if local else []
    timings = measure_configs(
        backend,
        model,
        inputs,
        layers,
        [*calibration, *validation],
        rounds=rounds,
        table=table,
        model_key=model_key,
        status=status,
    )
    fp32_timing = timings[0][0]
    if not fp32_timing.ok:
        raise RuntimeError(f"the float32 model did not run end to end: {fp32_timing.error}")
    statistic = backend.profile.spec.measure.statistic
    fitted = [
        (config, timing.stat_us(statistic))
        for config, (timing, _) in zip(calibration, timings)
        if timing.ok
    ]
    latency_model = calibrate_latency_model(layers, per_layer, fitted, statistic=statistic)
    cal_rows = tuple(
        _validation_row(latency_model, statistic, c, t) for c, (t, _) in zip(calibration, timings)
    )
    val_rows = tuple(
        _validation_row(latency_model, statistic, c, t)
        for c, (t, _) in zip(validation, timings[len(calibration) :])
    )
    reused = sum(1 for _, was_reused in timings if was_reused)
    if local:
        load.append(host_load())
    spread, drift, repeat, ceiling = _timing_noise(timings, len(calibration))
    return ModelCheck(
        latency_model,
        cal_rows,
        val_rows,
        measured_now=len(timings) - reused,
        reused=reused,
        rounds=rounds,
        elapsed_s=time.monotonic() - start,
        round_spread=spread,
        round_drift=drift,
        repeat_spearman=repeat,
        spearman_ceiling=ceiling,
        load_average=max(load) if load and len(timings) > reused else math.nan,
        cpus=os.cpu_count() or 0,
    )


def _validation_row(
    latency_model: LatencyModel, statistic: str, config: QuantConfig, timing: KernelTiming
) -> ValidationRow:
    predicted = latency_model.predict(config)
    return ValidationRow(
        config,
        predicted.value,
        timing.stat_us(statistic) / 1000.0 if timing.ok else float("nan"),
        timing.spread,
        (None if timing.ok else f"{timing.status}: {timing.error}") or predicted.reason,
        latency_model.plain_sum_ms(config),
    )


def _timing_noise(
    timings: Sequence[tuple[KernelTiming, bool]], n_calibration: int
) -> tuple[float, float, float, float]:
    """(round spread, round drift, held-out repeatability, its ceiling) of a check's timings."""
    # rounds are shared only by timings taken together: a timing reused from the table came
    # from another run, whose batch 0 is not this run's
    fresh = [t for t, was_reused in timings if not was_reused]
    spread, drift = round_noise(fresh or [t for t, _ in timings])
    held_out = [t for t, was_reused in timings[n_calibration:] if not was_reused]
    repeat, ceiling = repeatability(held_out)
    return spread, drift, repeat, ceiling


# A host whose 1-minute load average exceeds this many times its CPUs while timing is busy:
# the profiling process itself keeps about ``threads`` of them running.
BUSY_LOAD = 1.5


def host_load() -> float:
    """This host's 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return math.nan


def busy(summary: dict[str, Any]) -> bool:
    """Whether a fidelity summary's end-to-end timings ran on a busy host (``BUSY_LOAD``)."""
    load, cpus = summary.get("load_average"), summary.get("cpus") or 0
    return load is not None and load == load and cpus > 0 and load > BUSY_LOAD * cpus


def _rounds_by_batch(timings: Sequence[KernelTiming]) -> list[list[list[float]]]:
    """The round medians of the timings taken together, one list per ``batch`` detail."""
    groups: dict[Any, list[list[float]]] = {}
    for timing in timings:
        details = timing.details or {}
        medians = details.get("round_medians_us") if timing.ok else None
        if medians and len(medians) >= 2 and min(medians) > 0:
            groups.setdefault(details.get("batch", 0), []).append(medians)
    return list(groups.values())


def _own(group: list[list[float]], rounds: int) -> list[list[float]]:
    """Each config's first ``rounds`` round medians over its own median."""
    return [[x / statistics.median(m) for x in m[:rounds]] for m in group]


def _levels(own: list[list[float]]) -> list[float]:
    """Each round's level from ``_own``: the median over configs (how fast the machine ran
    that round, every config with it)."""
    return [statistics.median(o[r] for o in own) for r in range(len(own[0]))]


# split halves averaged in ``repeatability`` (all of them up to 7 rounds: 35)
MAX_SPLITS = 35


def repeatability(timings: Sequence[KernelTiming]) -> tuple[float, float]:
    """(split-half Spearman, ceiling) of configs timed in the same rounds: the rounds are cut
    into two halves, each config's median over each half (every round divided by its level,
    so the machine's drift moves no config against another), and the Spearman rank
    correlation of the two halves, averaged over the ways to cut them. That is how well the
    measurement agrees with itself: a predictor's Spearman against measured latency is
    bounded by it, not by the predictor. The ceiling is the Spearman an exact predictor
    would reach against the median over all the rounds, by the Spearman-Brown formula:
    sqrt(2r / (1 + r)). Over RPC the halves share each device session's offset, so the
    anchors' error in scaling sessions to each other is not in it. NaN with fewer than two
    rounds or three configs."""
    from itertools import combinations, islice

    from autoquant.latency.model import spearman_rho

    nan = (math.nan, math.nan)
    groups = _rounds_by_batch(timings)
    if not groups:
        return nan
    rounds = min(len(m) for group in groups for m in group)
    if rounds < 2 or sum(len(group) for group in groups) < 3:
        return nan
    scaled = []  # per config: its round medians over their rounds' levels
    for group in groups:
        levels = _levels(_own(group, rounds))
        scaled.extend([m[r] / levels[r] for r in range(rounds)] for m in group)
    rhos = []
    for half in islice(combinations(range(rounds), rounds // 2), MAX_SPLITS):
        rest = [r for r in range(rounds) if r not in half]
        rho = spearman_rho(
            [statistics.median(v[r] for r in half) for v in scaled],
            [statistics.median(v[r] for r in rest) for v in scaled],
        )
        if rho == rho:
            rhos.append(rho)
    if not rhos:
        return nan
    r = statistics.fmean(rhos)
    return r, math.sqrt(2 * r / (1 + r)) if r > 0 else math.nan


def round_noise(timings: Sequence[KernelTiming]) -> tuple[float, float]:
    """(spread, drift) of whole-model timings taken in the same rounds (grouped by their
    ``batch`` detail): each config's round medians over its own median; a round's *level* is
    the median of that over the configs; ``drift`` is the std of the levels (the machine's
    speed moving every config together: interleaved visits cancel it from any comparison),
    ``spread`` the median over configs of the relative std of a config's rounds divided by
    their levels (how far it moved against the others: the noise a ranking sits on). NaN
    where no group has two rounds (spread: and two configs)."""
    spreads, drifts = [], []
    for group in _rounds_by_batch(timings):
        rounds = min(len(m) for m in group)
        own = _own(group, rounds)
        levels = _levels(own)
        drifts.append(statistics.pstdev(levels) / statistics.fmean(levels))
        if len(group) >= 2:
            for o in own:
                against = [o[r] / levels[r] for r in range(rounds)]
                spreads.append(statistics.pstdev(against) / statistics.fmean(against))
    return (
        statistics.median(spreads) if spreads else float("nan"),
        statistics.fmean(drifts) if drifts else float("nan"),
    )


def strict_json(data: Any) -> Any:
    """NaN → None, recursively (``json.dumps`` would write the non-standard ``NaN``)."""
    if isinstance(data, float):
        return None if data != data else data
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data
