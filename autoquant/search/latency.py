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


def prepare_run_latency(
    profile_path: Path,
    task: Any,
    space: SearchSpace,
    *,
    n_validate: int,
    seed: int = 0,
    file: str,
    key: str,
    table_path: str | Path | None = None,
    status: Callable[[str], None] | None = None,
) -> tuple[RunLatency, SearchSpace]:
    """Profile, restrict the space, fit and validate for one profile (see the module text).

    Raises ``UserError`` (naming ``file`` and ``key``) when the profile can't give a latency
    model for this task: no float32 kernel for a layer, a layer left with no choice that has a
    kernel, or a float32 model that does not run end to end on the profile's device."""
    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile
    from autoquant.latency.profiling import profile_layers
    from autoquant.latency.table import LatencyTable, model_signature

    def say(text: str) -> None:
        if status is not None:
            status(text)

    start = time.monotonic()
    prof = load_profile(profile_path)
    layers = space.layer_infos
    fp32 = QuantChoice()
    work = [
        (ls.layer, [*ls.choices, *([] if fp32 in ls.choices else [fp32])]) for ls in space.layers
    ]
    with backend_for(prof) as backend, LatencyTable(table_path) as table:
        result = profile_layers(
            backend,
            work,
            table,
            on_result=lambda e: say(f"{prof.name}: profiling {e.layer.name} {e.choice.label}"),
            status=lambda text: say(f"{prof.name}: {text}"),
        )
        lookup = result.lookup()
        for layer in layers:
            timing = lookup[(layer.name, fp32.label)]
            if not timing.ok:
                raise UserError(
                    f"bad value {prof.name!r}: no float32 kernel timing for layer {layer.name} "
                    f"({timing.status}: {timing.error}), so the latency model has no "
                    "calibration anchor; allowed: a profile with fp32 kernels for every layer",
                    file=file,
                    key=key,
                )
        restricted, dropped, empty = restrict_space(space, lookup, prof.name)
        if empty:
            reasons = "; ".join(sorted({d.reason for d in dropped if d.layer in empty}))
            raise UserError(
                f"bad value {prof.name!r}: layer(s) {', '.join(empty)} have no choice with a "
                f"kernel on this device ({reasons}); allowed: a space with a choice this "
                "profile can run on every layer",
                file=file,
                key=key,
            )
        inputs = task_inputs(task, prof.spec.batch_size)
        try:
            checked = check_latency_model(
                backend,
                task.model,
                inputs,
                layers,
                lookup,
                {ls.layer.name: ls.choices for ls in restricted.layers},
                n_validate=n_validate,
                seed=seed,
                table=table,
                model_key=model_signature(task.model, inputs, layers),
                status=lambda text: say(f"{prof.name}: {text}"),
            )
        except RuntimeError as exc:
            raise UserError(
                f"bad value {prof.name!r}: {exc}; allowed: a profile whose runtime runs this "
                "model end to end",
                file=file,
                key=key,
            ) from None
        fingerprint = backend.fingerprint()
        fp_hash = backend.fingerprint_hash()
        table_file = str(table.path)
    fidelity = {
        "profile": prof.name,
        "profile_file": str(profile_path),
        "objective": latency_objective(prof.name).name,
        "figure": latency_figure(prof.name),
        "figure_source": "predicted",
        "fingerprint_hash": fp_hash,
        "fingerprint": fingerprint,
        "table": table_file,
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
        "seed": seed,
        "elapsed_s": time.monotonic() - start,
    }
    return RunLatency(prof.name, checked.model, strict_json(fidelity)), restricted


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
    layers: tuple,
    front: Any,
    frame: Any,
    *,
    status: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per profile: the front's fastest point (by predicted latency) and the float32 config,
    timed end to end side by side now (fresh, interleaved rounds; the table is not used), so
    the run states whether its fastest point is really faster. Written into
    ``latency_fidelity.json`` under ``front_check``; a failure is recorded, never raised."""
    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile
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
            prof = load_profile(Path(lat.fidelity["profile_file"]))
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
