"""Latency as a search objective: one ``RunLatency`` per hardware profile of a run.

``prepare_run_latency`` does, for one profile and one run's search space:

1. profile every (layer, choice) of the space, plus every layer's float32 kernel (the residual
   needs it), reusing the latency table: a second run measures no kernel;
2. drop from the space the choices the device has no kernel for (``excluded``) or whose kernel
   failed, each with its reason (the search can't pick them);
3. fit the latency model: per-layer kernel sum + residual, the residual from one float32
   end-to-end measurement (cached in the table under the model's signature);
4. check it on ``n_validate`` random configs of the restricted space, measured end to end
   (also cached), with the fidelity figures of the model and of the plain per-layer sum.

The search then gives every config the figure ``latency_ms@<profile>`` with source
``predicted`` (``RunLatency.predict``); only the validation rows are ``measured``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.hw.latency_model import LatencyModel, ValidationRow, fit_latency_model, summarize
from autoquant.hw.timing import KernelTiming
from autoquant.measurement import Figure
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


def cached_e2e(
    backend: Any, table: Any, model_key: str, task: Any, layers: tuple, config: QuantConfig
) -> tuple[KernelTiming, bool]:
    """(timing, reused): one config's end-to-end latency, from the table when it has it."""
    from autoquant.hw.validation import e2e_timing

    fp_hash = backend.fingerprint_hash()
    found = table.get_model(fp_hash, model_key, config.hash)
    if found.hit and found.timing.ok:
        return found.timing, True
    timing = e2e_timing(backend, task.model, task.input_shape, layers, config)
    if timing.ok:
        table.put_model(
            fp_hash, model_key, config.hash, timing, measure=backend.profile.spec.measure.model_dump()
        )
    return timing, False


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
    model for this task: not a local TVM profile, no float32 kernel for a layer, a layer left
    with no choice that has a kernel, or a float32 model that does not run end to end."""
    from autoquant.hw.backend import backend_for
    from autoquant.hw.profile import load_profile
    from autoquant.hw.profiling import profile_layers
    from autoquant.hw.table import LatencyTable, model_signature

    def say(text: str) -> None:
        if status is not None:
            status(text)

    start = time.monotonic()
    prof = load_profile(profile_path)
    if not (prof.is_local and prof.spec.runtime == "tvm"):
        raise UserError(
            f"bad value {prof.name!r}: latency as an objective needs the float32 model timed end "
            f"to end, which runs on local TVM profiles only so far ({prof.name} is "
            f"{prof.spec.device.where}, {prof.spec.runtime}); allowed: a local tvm profile such "
            "as cpu-local",
            file=file,
            key=key,
        )
    layers = space.layer_infos
    fp32 = QuantChoice()
    work = [(ls.layer, [*ls.choices, *([] if fp32 in ls.choices else [fp32])]) for ls in space.layers]
    with backend_for(prof) as backend, LatencyTable(table_path) as table:
        result = profile_layers(
            backend,
            work,
            table,
            on_result=lambda e: say(f"{prof.name}: profiling {e.layer.name} {e.choice.label}"),
        )
        lookup = result.lookup()
        for layer in layers:
            timing = lookup[(layer.name, fp32.label)]
            if not timing.ok:
                raise UserError(
                    f"bad value {prof.name!r}: no float32 kernel timing for layer {layer.name} "
                    f"({timing.status}: {timing.error}), so the latency model has no residual; "
                    "allowed: a profile with fp32 kernels for every layer",
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
        model_key = model_signature(task.model, task.input_shape, layers)
        fp32_config = QuantConfig.uniform(layers, fp32)
        say(f"{prof.name}: timing the float32 model end to end")
        fp32_timing, fp32_reused = cached_e2e(backend, table, model_key, task, layers, fp32_config)
        if not fp32_timing.ok:
            raise UserError(
                f"bad value {prof.name!r}: the float32 model did not run end to end "
                f"({fp32_timing.error}); allowed: a profile whose runtime runs this model",
                file=file,
                key=key,
            )
        model = fit_latency_model(layers, lookup, fp32_timing.median_us)
        rng = random.Random(seed)
        rows, reused_rows = [], 0
        for i in range(n_validate):
            config = QuantConfig(
                tuple((ls.layer.name, rng.choice(ls.choices)) for ls in restricted.layers)
            )
            say(f"{prof.name}: checking the latency model end to end ({i + 1}/{n_validate})")
            predicted = model.predict(config)
            timing, reused = cached_e2e(backend, table, model_key, task, layers, config)
            reused_rows += reused
            rows.append(
                ValidationRow(
                    config,
                    predicted.value,
                    timing.median_us / 1000.0 if timing.ok else math.nan,
                    timing.spread,
                    (None if timing.ok else timing.error) or predicted.reason,
                )
            )
        fingerprint = backend.fingerprint()
        fp_hash = backend.fingerprint_hash()
        table_file = str(table.path)
    summary = summarize(rows, residual_us=model.residual_us)
    fidelity = {
        "profile": prof.name,
        "profile_file": str(profile_path),
        "objective": latency_objective(prof.name).name,
        "figure": latency_figure(prof.name),
        "figure_source": "predicted",
        "model": "sum of per-layer kernel medians + residual (float32 end to end - float32 "
        "kernels); quantize/dequantize/cast operators between layers are not modelled",
        "fingerprint_hash": fp_hash,
        "fingerprint": fingerprint,
        "table": table_file,
        "batch_size": prof.spec.batch_size,
        "threads": prof.threads,
        "residual_us": model.residual_us,
        "residual_note": model.note,
        "fp32_e2e_us": model.fp32_e2e_us,
        "fp32_e2e_spread": fp32_timing.spread,
        "fp32_e2e_source": "measured (reused from the table)" if fp32_reused else "measured",
        "kernels": {
            "measured_now": result.measured_now,
            "reused": result.count(reused=True),
            "failed": result.count(status="failed"),
            "excluded": result.count(status="excluded"),
        },
        "excluded_from_space": [
            {"layer": d.layer, "choice": d.choice, "reason": d.reason} for d in dropped
        ],
        "validation": {
            "configs": n_validate,
            "seed": seed,
            "measured_source": "measured end to end (median of repeats)",
            "reused_from_table": reused_rows,
            "summary": summary,
            "rows": [r.to_dict() for r in rows],
        },
        "elapsed_s": time.monotonic() - start,
    }
    return RunLatency(prof.name, model, _jsonable(fidelity)), restricted


def _jsonable(data: Any) -> Any:
    """NaN → None, recursively (strict JSON)."""
    if isinstance(data, float):
        return None if math.isnan(data) else data
    if isinstance(data, dict):
        return {k: _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    return data


def write_fidelity(run_dir: Path, latencies: tuple[RunLatency, ...]) -> Path:
    """``latency_fidelity.json``: one entry per profile, keyed by profile name."""
    path = run_dir / FIDELITY_FILE
    data = {
        "latency_source": "predicted by the latency model; validation rows measured end to end",
        "profiles": {r.profile: r.fidelity for r in latencies},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def summary_line(lat: RunLatency) -> str:
    """One line for the terminal: what the latency figure is and how well it was checked."""
    f = lat.fidelity
    s = f.get("validation", {}).get("summary", {})
    head = (
        f"{lat.objective_name}: predicted (per-layer kernels + residual, float32 end to end "
        f"{f.get('fp32_e2e_us', math.nan) / 1000:.4f} ms measured)"
    )
    if f.get("residual_note"):
        head += f" (WARNING: {f['residual_note']})"
    if not s.get("measured"):
        return head + "; not checked end to end (hardware_validation: 0)"
    plain = s.get("plain_sum", {})
    return (
        head + f"; checked on {s['measured']} configs measured end to end: "
        f"{s['within_10pct']:.0%} within ±10%, MAPE {s['mape']:.1%}, Spearman "
        f"{s['spearman']:.2f}, Kendall {s['kendall_tau']:.2f} (plain kernel sum: MAPE "
        f"{plain.get('mape', math.nan):.1%}, Spearman {plain.get('spearman', math.nan):.2f})"
    )
