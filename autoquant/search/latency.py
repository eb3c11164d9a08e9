"""Latency as a search objective: one ``RunLatency`` per hardware profile of a run.

``prepare_run_latency`` does, for one profile and one run's search space:

1. profile every (layer, choice) of the space, plus every layer's float32 kernel (the float32
   config anchors the calibration), reusing the latency table: a second run measures no kernel;
2. drop from the space the choices the device has no kernel for (``excluded``) or whose kernel
   failed, each with its reason (the search can't pick them);
3. fit the latency model (intercept + per-kernel-class scales of the kernel sum,
   ``latency.model``) on calibration configs timed end to end, float32 among them;
4. check it on ``n_validate`` other random configs of the restricted space, timed end to end
   in the same interleaved rounds, with the fidelity figures of the model and of the plain
   per-layer sum (``validation.check_latency_model``; timings cached in the table).

The search then gives every config the figure ``latency_ms@<profile>`` with source
``predicted`` (``RunLatency.predict``); only the validation rows are ``measured``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autoquant.backends.inputs import task_inputs
from autoquant.errors import UserError
from autoquant.hardware import ResolvedProfile
from autoquant.hardware.profile import HardwareProfile
from autoquant.latency.model import LatencyModel
from autoquant.latency.validation import check_latency_model, strict_json
from autoquant.measure.timing import KernelTiming
from autoquant.measurement import Figure
from autoquant.rundir import atomic_write_text
from autoquant.search.objectives import latency_figure, latency_objective
from autoquant.space.searchspace import Exclusion, SearchSpace
from autoquant.space.values import QuantChoice, QuantConfig

FIDELITY_FILE = "latency_fidelity.json"


@dataclass(frozen=True)
class RunLatency:
    """A profile's latency model for one run, and how well it matched measurements."""

    profile: str
    model: LatencyModel
    fidelity: dict[str, Any]  # JSON-able: written to latency_fidelity.json
    hardware: HardwareProfile | None = None  # what the front check measures on again

    @property
    def figure(self) -> str:
        return latency_figure(self.profile)

    @property
    def objective_name(self) -> str:
        return latency_objective(self.profile).name

    def predict(self, config: QuantConfig) -> Figure:
        """Milliseconds, source ``predicted``; a failed figure with the reason otherwise."""
        return self.model.predict(config)


def restrict_space(
    space: SearchSpace, lookup: dict[tuple[str, str], KernelTiming], profile: str
) -> tuple[SearchSpace, list[Exclusion], list[str]]:
    """(space without the choices that have no usable timing, those exclusions, layers left
    with no choice)."""
    layers, dropped, empty = [], [], []
    for ls in space.layers:
        keep = []
        for choice in ls.choices:
            timing = lookup.get((ls.layer.name, choice.label))
            if timing is not None and timing.ok:
                keep.append(choice)
                continue
            why = "not profiled" if timing is None else f"{timing.status}: {timing.error}"
            dropped.append(Exclusion(ls.layer.name, choice.label, f"hardware {profile}: {why}"))
        if not keep:
            empty.append(ls.layer.name)
            keep = list(ls.choices)
        layers.append(replace(ls, choices=tuple(keep), pinned=ls.pinned or len(keep) == 1))
    return SearchSpace(tuple(layers), (*space.exclusions, *dropped)), dropped, empty


@dataclass(frozen=True)
class _ProfileRun:
    """What every step of ``prepare_run_latency`` shares: the profile, the task, and where a
    refusal is reported."""

    resolved: ResolvedProfile
    prof: HardwareProfile
    task: Any
    file: str
    key: str
    status: Callable[[str], None] | None

    def say(self, text: str) -> None:
        if self.status is not None:
            self.status(f"{self.prof.name}: {text}")

    def refuse(self, why: str, allowed: str) -> UserError:
        return UserError(
            f"bad value {self.prof.name!r}: {why}; allowed: {allowed}", file=self.file, key=self.key
        )


def prepare_run_latency(
    profile: ResolvedProfile,
    task: Any,
    space: SearchSpace,
    *,
    n_validate: int,
    seed: int = 0,
    file: str,
    key: str,
    table_path: str | Path | None = None,
    status: Callable[[str], None] | None = None,
    recorded: dict[str, Any] | None = None,
) -> tuple[RunLatency, SearchSpace]:
    """Profile, restrict the space, fit and validate for one profile (see the module text).
    ``recorded``: what a shared study holds for this profile (``autoquant.search.targets``):
    its model is taken instead, nothing profiled or timed (``_from_study``).

    Raises ``UserError`` (naming ``file`` and ``key``) when the profile can't give a latency
    model for this task: no float32 kernel for a layer, a layer left with no choice that has a
    kernel, or a float32 model that does not run end to end on the profile's device."""
    from autoquant.backends.registry import backend_for
    from autoquant.latency.table import LatencyTable

    start = time.monotonic()
    run = _ProfileRun(profile, profile.hardware(), task, file, key, status)
    with backend_for(run.prof) as backend, LatencyTable(table_path) as table:
        measured_on = {
            "fingerprint_hash": backend.fingerprint_hash(),
            "fingerprint": backend.fingerprint(),
            "table": str(table.path),
        }
        if recorded is not None:
            return _from_study(run, space, measured_on, recorded)
        result = _profile_kernels(run, backend, table, space)
        lookup = result.lookup()
        _require_fp32_kernels(run, space, lookup)
        restricted, dropped = _restrict_or_refuse(run, space, lookup)
        checked = _check_model(run, backend, table, restricted, lookup, n_validate=n_validate, seed=seed)
    fidelity = _fidelity(run, measured_on, result, dropped, checked)
    fidelity |= {"seed": seed, "elapsed_s": time.monotonic() - start}
    latency = RunLatency(run.prof.name, checked.model, strict_json(fidelity), run.prof)
    return latency, restricted


def _from_study(
    run: _ProfileRun, space: SearchSpace, measured_on: dict[str, Any], recorded: dict[str, Any]
) -> tuple[RunLatency, SearchSpace]:
    """A worker joining a study that holds this profile's target and latency model: the same
    target takes the model and the space restricted to its kernels, with nothing profiled or
    timed; another target gets an empty model (the study's target check refuses the worker
    before it measures anything: there is nothing to fit for it)."""
    from autoquant.latency.model import model_from_state

    layers = space.layer_infos
    restricted, model = space, LatencyModel(layers, {})
    if isinstance(recorded, dict) and recorded.get("fingerprint_hash") == measured_on["fingerprint_hash"]:
        try:
            model = model_from_state(layers, recorded["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise run.refuse(
                f"the shared study's latency model cannot be read ({type(exc).__name__})",
                "a study written by autoquant",
            ) from None
        restricted, _ = _restrict_or_refuse(run, space, model.per_layer)
        run.say("latency model taken from the shared study: nothing profiled")
    fidelity = {
        "profile": run.prof.name,
        "objective": latency_objective(run.prof.name).name,
        **measured_on,
        "model": model.to_dict(),
        "model_source": "the shared study",
    }
    return RunLatency(run.prof.name, model, strict_json(fidelity), run.prof), restricted


def _profile_kernels(run: _ProfileRun, backend: Any, table: Any, space: SearchSpace) -> Any:
    """Every (layer, choice) of the space plus every layer's float32 kernel (the float32 config
    anchors the calibration), reusing the table's timings."""
    from autoquant.latency.profiling import profile_layers

    fp32 = QuantChoice()
    work = [
        (ls.layer, [*ls.choices, *([] if fp32 in ls.choices else [fp32])]) for ls in space.layers
    ]
    return profile_layers(
        backend,
        work,
        table,
        on_result=lambda e: run.say(f"profiling {e.layer.name} {e.choice.label}"),
        status=run.say,
    )


def _require_fp32_kernels(
    run: _ProfileRun, space: SearchSpace, lookup: dict[tuple[str, str], KernelTiming]
) -> None:
    for layer in space.layer_infos:
        timing = lookup[(layer.name, QuantChoice().label)]
        if not timing.ok:
            raise run.refuse(
                f"no float32 kernel timing for layer {layer.name} ({timing.status}: "
                f"{timing.error}), so the latency model has no calibration anchor",
                "a profile with fp32 kernels for every layer",
            )


def _restrict_or_refuse(
    run: _ProfileRun, space: SearchSpace, lookup: dict[tuple[str, str], KernelTiming]
) -> tuple[SearchSpace, list[Exclusion]]:
    restricted, dropped, empty = restrict_space(space, lookup, run.prof.name)
    if empty:
        reasons = "; ".join(sorted({d.reason for d in dropped if d.layer in empty}))
        raise run.refuse(
            f"layer(s) {', '.join(empty)} have no choice with a kernel on this device ({reasons})",
            "a space with a choice this profile can run on every layer",
        )
    return restricted, dropped


def _check_model(
    run: _ProfileRun,
    backend: Any,
    table: Any,
    restricted: SearchSpace,
    lookup: dict[tuple[str, str], KernelTiming],
    *,
    n_validate: int,
    seed: int,
) -> Any:
    """The latency model fitted and checked end to end (``validation.check_latency_model``)."""
    from autoquant.latency.table import model_signature

    layers = restricted.layer_infos
    inputs = task_inputs(run.task, run.prof.spec.batch_size)
    try:
        return check_latency_model(
            backend,
            run.task.model,
            inputs,
            layers,
            lookup,
            options={ls.layer.name: ls.choices for ls in restricted.layers},
            n_validate=n_validate,
            seed=seed,
            table=table,
            model_key=model_signature(run.task.model, inputs, layers),
            status=run.say,
        )
    except RuntimeError as exc:
        raise run.refuse(str(exc), "a profile whose runtime runs this model end to end") from None


def _fidelity(
    run: _ProfileRun, measured_on: dict[str, Any], result: Any, dropped: list[Exclusion], checked: Any
) -> dict[str, Any]:
    """What ``latency_fidelity.json`` records for the profile (before seed and elapsed time)."""
    prof = run.prof
    return {
        "profile": prof.name,
        "profile_file": str(run.resolved.path),
        "objective": latency_objective(prof.name).name,
        "figure": latency_figure(prof.name),
        "figure_source": "predicted",
        **measured_on,
        "batch_size": prof.spec.batch_size,
        "threads": prof.threads,
        "kernels": {
            "measured_now": result.measured_now,
            "reused": result.count(reused=True),
            "failed": result.count(status="failed"),
            "excluded": result.count(status="excluded"),
        },
        "excluded_from_space": [
            {"layer": d.layer, "choice": d.choice, "reason": d.reason} for d in dropped
        ],
        **checked.to_dict(),
    }


def write_fidelity(run_dir: Path, latencies: tuple[RunLatency, ...]) -> Path:
    """``latency_fidelity.json``: one entry per profile, keyed by profile name."""
    path = run_dir / FIDELITY_FILE
    data = {
        "latency_source": "predicted by the latency model; validation rows measured end to end",
        "profiles": {r.profile: r.fidelity for r in latencies},
    }
    atomic_write_text(path, json.dumps(data, indent=1))
    return path


def summary_line(lat: RunLatency) -> str:
    """One line for the terminal: what the latency figure is and how well it was checked."""
    f = lat.fidelity
    model = f.get("model", {})
    s = f.get("validation", {}).get("summary", {})
    head = (
        f"{lat.objective_name}: predicted (per-layer kernels calibrated on "
        f"{model.get('calibration_configs', 0)} configs timed end to end; float32 "
        f"{(f.get('fp32_e2e_us') or math.nan) / 1000:.4f} ms measured)"
    )
    if model.get("note"):
        head += f" (WARNING: {model['note']})"
    if not s.get("measured"):
        return head + "; not checked on held-out configs (hardware_validation: 0)"
    from autoquant.latency.fidelity import fidelity_line

    return head + "; " + fidelity_line(s)


def check_front(
    run_dir: Path,
    latencies: tuple[RunLatency, ...],
    task: Any,
    *,
    layers: tuple,
    front: Any,
    frame: Any,
    status: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per profile: the front's fastest point (by predicted latency) and the float32 config,
    timed end to end side by side now (fresh, interleaved rounds; the table is not used), so
    the run states whether its fastest point is really faster. Written into
    ``latency_fidelity.json`` under ``front_check``; a failure is recorded, never raised."""
    from autoquant.backends.registry import backend_for
    from autoquant.latency.validation import measure_configs

    path = run_dir / FIDELITY_FILE
    data = json.loads(path.read_text()) if path.exists() else {"profiles": {}}
    checks = []
    for lat in latencies:
        col = lat.figure
        if front.empty or col not in front.columns:
            continue
        fastest = front.sort_values(col).iloc[0]
        config = QuantConfig.from_json(fastest["config"])
        fp32 = QuantConfig.uniform(layers, QuantChoice())
        fp32_rows = frame[frame["config_hash"] == fp32.hash]
        check: dict[str, Any] = {
            "profile": lat.profile,
            "fastest_trial": int(fastest["trial"]),
            "fastest_config_hash": config.hash,
            "fastest_predicted_ms": float(fastest[col]),
            "fp32_predicted_ms": float(fp32_rows.iloc[0][col]) if len(fp32_rows) else None,
            "source": "measured end to end now, the two configs side by side",
        }
        try:
            prof = lat.hardware
            if prof is None:
                raise RuntimeError("the run's latency model carries no hardware profile")
            with backend_for(prof) as backend:
                (fast_t, _), (fp32_t, _) = measure_configs(
                    backend,
                    task.model,
                    task_inputs(task, prof.spec.batch_size),
                    layers,
                    [config, fp32],
                    rounds=max(3, prof.spec.end_to_end.rounds),
                    status=status,
                )
        except Exception as exc:  # a profile that can't be reached now: say so, keep the run
            fast_t = fp32_t = KernelTiming.failed(f"{type(exc).__name__}: {exc}")
        if fast_t.ok and fp32_t.ok:
            check |= {
                "fastest_measured_ms": fast_t.median_us / 1000.0,
                "fastest_spread": fast_t.spread,
                "fp32_measured_ms": fp32_t.median_us / 1000.0,
                "fp32_spread": fp32_t.spread,
                "speedup_vs_fp32": fp32_t.median_us / fast_t.median_us,
                # "measurably": faster in every round; the two were visited in turn, so a
                # round compares them at the same moments of the machine
                "measurably_faster": _faster_every_round(fast_t, fp32_t),
            }
        else:
            check["error"] = fast_t.error if not fast_t.ok else fp32_t.error
        data["profiles"].setdefault(lat.profile, {})["front_check"] = strict_json(check)
        checks.append(check)
    atomic_write_text(path, json.dumps(data, indent=1))
    return checks


def front_check_line(check: dict[str, Any]) -> str:
    """One terminal line for a ``check_front`` result."""
    head = f"latency@{check['profile']}: fastest front point (trial {check['fastest_trial']})"
    if "error" in check:
        return f"{head} could not be timed end to end: {check['error']}"
    verdict = "measurably faster" if check["measurably_faster"] else "NOT measurably faster"
    return (
        f"{head} measured end to end (median) {check['fastest_measured_ms']:.4f} ms vs float32 "
        f"{check['fp32_measured_ms']:.4f} ms: {check['speedup_vs_fp32']:.2f}x, {verdict} "
        "(faster in every round)"
    )


def _faster_every_round(fast: KernelTiming, slow: KernelTiming) -> bool:
    """Whether ``fast``'s median beat ``slow``'s in each of their common rounds (at least 2)."""
    a = fast.details.get("round_medians_us") or []
    b = slow.details.get("round_medians_us") or []
    return min(len(a), len(b)) >= 2 and all(x < y for x, y in zip(a, b))
