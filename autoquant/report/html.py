"""``report.html``: one self-contained page about one run. Compute first (``report_data``), render
second (``render_report``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoquant.pareto import knee_index
from autoquant.report.escape import html_text
from autoquant.report.page import page, table
from autoquant.report.rundata import RunData, interval_of, within_noise
from autoquant.report.svg import Axis, Point, Series, heatmap, scatter
from autoquant.search.objectives import Objective
from autoquant.space.values import QuantChoice

UNITS = {"size_bytes": ("weight size, KiB (exact)", 1 / 1024)}


@dataclass(frozen=True)
class ReportData:
    run: RunData
    knee_trial: int | None
    fp32: Any
    int8: Any
    predictor: dict[str, float] | None


def knee_trial(run: RunData) -> int | None:
    if run.front.empty:
        return None
    values = run.front[[o.figure for o in run.objectives]].to_numpy(dtype=float)
    return int(run.front.iloc[knee_index(values, [o.direction for o in run.objectives])]["trial"])


def predictor_quality(run: RunData) -> dict[str, float] | None:
    col = "accuracy_predicted"
    if col not in run.trials.columns:
        return None
    rows = run.complete[np.isfinite(run.complete[col].astype(float))]
    if len(rows) < 3:
        return None
    from scipy.stats import kendalltau, spearmanr

    pred, meas = rows[col].astype(float), rows["accuracy"].astype(float)
    # a constant side has no ranking: NaN, without scipy's warning
    ranked = pred.nunique() > 1 and meas.nunique() > 1
    return {
        "n": float(len(rows)),
        "mae": float(np.mean(np.abs(pred - meas))),
        "kendall_tau": float(kendalltau(pred, meas).statistic) if ranked else float("nan"),
        "spearman": float(spearmanr(pred, meas).statistic) if ranked else float("nan"),
    }


def report_data(run: RunData) -> ReportData:
    return ReportData(run, knee_trial(run), run.reference("fp32"), run.reference("int8"), predictor_quality(run))


def _key(run: RunData, trial: int) -> str:
    return f"{run.name}#{int(trial)}"


def _noise_word(row) -> str:
    return {True: "yes", False: "no", None: "-"}[within_noise(row)]


def _bounds(row, figure: str, scale: float = 1.0, fmt: str = ".4f") -> str:
    bounds = interval_of(row, figure)
    return "-" if bounds is None else f"[{bounds[0] * scale:{fmt}}, {bounds[1] * scale:{fmt}}]"


def _accuracy_text(row, *, drop: bool = True) -> str:
    """``accuracy 0.9822 [0.9689, 0.9911] (measured, 450 samples); drop +0.22 points
    [-0.44, +0.89], within noise of fp32``, as much of it as the row has (the drop only with
    ``drop``)."""
    text = f"accuracy {row['accuracy']:.4f}"
    if interval_of(row, "accuracy") is not None:
        text += " " + _bounds(row, "accuracy")
    samples = row.get("eval_samples")
    has_n = isinstance(samples, (int, float, np.integer, np.floating)) and math.isfinite(float(samples))
    text += f" (measured{f', {int(samples)} samples' if has_n else ''})"
    value = row.get("accuracy_drop")
    if drop and isinstance(value, (int, float, np.floating)) and math.isfinite(float(value)):
        text += f"; drop {float(value) * 100:+.2f} points"
        if interval_of(row, "accuracy_drop") is not None:
            text += " " + _bounds(row, "accuracy_drop", 100, "+.2f")
        noise = within_noise(row)
        if noise is not None:
            text += ", within noise of fp32" if noise else ", beyond noise of fp32"
    return text


def _tooltip(run: RunData, row) -> str:
    parts = [f"trial {int(row['trial'])}" + (f" ({row['reference']})" if isinstance(row.get("reference"), str) else "")]
    parts.append(_accuracy_text(row))
    for o in run.cost_objectives:
        label, scale = UNITS.get(o.figure, (o.figure, 1.0))
        parts.append(f"{o.figure} {row[o.figure] * scale:.4g} ({row.get(o.figure + '_source', 'measured')})")
    parts.append(" ".join(f"{c.removeprefix('layer:')}={row[c]}" for c in run.layer_columns if isinstance(row.get(c), str)))
    return "; ".join(parts)


def _points(run: RunData, frame, cost: Objective) -> tuple[Point, ...]:
    return tuple(
        Point(float(r[cost.figure]), float(r["accuracy"]), _tooltip(run, r), _key(run, r["trial"]))
        for _, r in frame.iterrows()
    )


def axis_for(objective: Objective, values) -> Axis:
    label, scale = UNITS.get(objective.figure, (f"{objective.figure} ({objective.unit})", 1.0))
    finite = [v for v in values if v and math.isfinite(v) and v > 0]
    log = bool(finite) and max(finite) / min(finite) > 8
    return Axis(label, log=log, scale=scale)


def front_plots(data: ReportData) -> list[str]:
    run = data.run
    plots = []
    for i, cost in enumerate(run.cost_objectives):
        complete = run.complete
        series = [
            Series("all measured configs", _points(run, complete, cost), "#9e9e9e", size=2.5),
            # A staircase only where the front is two-dimensional; with more objectives, a 2-D
            # projection of the front is not monotone and a staircase would mislead.
            Series("Pareto front", _points(run, run.front, cost), "#1f77b4",
                   kind="front" if len(run.objectives) == 2 else "dots", size=4.5),
        ]
        if data.fp32 is not None:
            series.append(Series("fp32 reference", _points(run, complete[complete["reference"] == "fp32"], cost), "#000", marker="square"))
        if data.int8 is not None:
            series.append(Series("uniform int8 reference", _points(run, complete[complete["reference"] == "int8"], cost), "#444", marker="triangle"))
        if data.knee_trial is not None:
            series.append(Series("knee", _points(run, run.front[run.front["trial"] == data.knee_trial], cost), "#d62728", marker="ring"))
        plots.append(scatter(series, axis_for(cost, complete[cost.figure]), Axis("accuracy (measured)"),
                             title=f"accuracy against {cost.name}", plot_id=f"front-{i}"))
    return plots


def precision_map(run: RunData) -> str:
    if run.front.empty or not run.layer_columns:
        return "<p class='note'>No front yet.</p>"
    layers = [c.removeprefix("layer:") for c in run.layer_columns]
    cols, cells = [], {}
    for _, row in run.front.iterrows():
        col = f"#{int(row['trial'])}"
        cols.append(col)
        for layer in layers:
            label = row.get(f"layer:{layer}")
            if isinstance(label, str):
                cells[(layer, col)] = (QuantChoice.from_label(label).weight_bits, label.split("-")[0].lstrip("w"))
    return heatmap(layers, cols, cells, title="per-layer precision of the front", plot_id="precision-map")


def _has_intervals(run: RunData) -> bool:
    return "accuracy_lo" in run.trials.columns


def interval_note(run: RunData) -> str:
    """What the intervals are, or that the run has none."""
    if not _has_intervals(run):
        return ("<p class='note'>This run was recorded without accuracy intervals: the accuracies "
                "carry no uncertainty on the evaluation set.</p>")
    samples = run.complete.get("eval_samples")
    counts = sorted({int(v) for v in samples.dropna()}) if samples is not None else []
    n = "/".join(str(c) for c in counts) or "?"
    return ("<p class='note'>Accuracy intervals: 95% percentile intervals of a seeded bootstrap over the "
            f"{n} evaluation samples (the same resamples for every config and for fp32). The drop's "
            "interval is paired against fp32; a drop is <b>within noise of fp32</b> when that interval "
            "contains 0: the evaluation set cannot tell the config from fp32.</p>")


def _front_table(data: ReportData) -> str:
    run = data.run
    noise = _has_intervals(run)
    headers = ["trial", "ref", "accuracy (measured)", *(["95% interval"] if noise else []), "drop, points",
               *(["drop 95% interval", "within noise of fp32"] if noise else []), *[
        UNITS.get(o.figure, (o.figure,))[0] for o in run.cost_objectives], "x smaller", "mean bits", *[
        c.removeprefix("layer:") for c in run.layer_columns]]
    rows, keys = [], []
    frame = run.front
    for _, r in frame.iterrows():
        ref = r["reference"] if isinstance(r.get("reference"), str) else ""
        if data.knee_trial is not None and int(r["trial"]) == data.knee_trial:
            ref = (ref + " knee").strip()
        costs = [f"{r[o.figure] * UNITS.get(o.figure, ('', 1.0))[1]:.4g}" for o in run.cost_objectives]
        drop = f"{r['accuracy_drop'] * 100:+.2f}"
        if noise:
            accuracy = [f"{r['accuracy']:.4f}", _bounds(r, "accuracy")]
            drop_cells = [drop, _bounds(r, "accuracy_drop", 100, "+.2f"), _noise_word(r)]
        else:
            accuracy, drop_cells = [f"{r['accuracy']:.4f}"], [drop]
        rows.append([int(r["trial"]), ref, *accuracy, *drop_cells, *costs,
                     f"{r['size_ratio']:.2f}", f"{r['mean_weight_bits']:.2f}", *[r[c] for c in run.layer_columns]])
        keys.append(_key(run, r["trial"]))
    return table(headers, rows, left=2, keys=keys)


def _predictor_section(data: ReportData) -> str:
    q = data.predictor
    if q is None:
        return ("<p class='note'>This run used no accuracy predictor: every accuracy shown was measured "
                "(sampler {}).</p>".format(html_text(data.run.spec.get("search", {}).get("sampler"))))
    run = data.run
    rows = run.complete[np.isfinite(run.complete["accuracy_predicted"].astype(float))]
    pts = tuple(Point(float(r["accuracy_predicted"]), float(r["accuracy"]), _tooltip(run, r), _key(run, r["trial"]))
                for _, r in rows.iterrows())
    plot = scatter([Series("measured configs", pts, "#9467bd")], Axis("predicted accuracy (before measuring)"),
                   Axis("measured accuracy"), title="predicted against measured", plot_id="predictor")
    return (f"<p>Over {int(q['n'])} measured configs: MAE {q['mae']:.4f}, Kendall tau {q['kendall_tau']:.3f}, "
            f"Spearman {q['spearman']:.3f} (predictions made before each config was measured).</p>" + plot)


def _json_file(run: RunData, name: str) -> Any:
    path = run.path / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sensitivity_section(run: RunData) -> str:
    """Per-layer sensitivity as the guided sampler measured it (``predictor/sensitivity.json``)."""
    record = _json_file(run, "predictor/sensitivity.json")
    data = record.get("_data") if isinstance(record, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
        return "<p class='note'>No per-layer sensitivity was computed for this run (the guided sampler computes it).</p>"
    traces = data.get("trace_per_param") or {}
    rows = []
    for layer, per_choice in data["choices"].items():
        kls = {label: float(v.get("kl", math.nan)) for label, v in per_choice.items() if isinstance(v, dict)}
        if not kls:
            continue
        worst = max(kls, key=lambda k: kls[k])
        rows.append([
            layer,
            f"{float(traces.get(layer, math.nan)):.4g}",
            f"{float(np.median(list(kls.values()))):.3g}",
            f"{kls[worst]:.3g}",
            worst,
            f"{float(per_choice[worst].get('disagreement', math.nan)) * 100:.1f}%",
        ])
    note = (f"<p class='note'>Measured on the calibration data, one layer quantized at a time "
            f"({html_text(data.get('forward_passes', '?'))} forward passes, {float(data.get('seconds', 0)):.1f} s); "
            "KL divergence of the outputs from the fp32 model; Hessian trace by Hutchinson's estimator.</p>")
    return note + table(
        ["layer", "Hessian trace / param", "median KL over choices", "largest KL", "at choice", "top-1 changed"],
        rows,
    )


def _latency_section(run: RunData) -> str:
    """Per profile: the latency model, and its predictions against end-to-end measurements."""
    fidelity = _json_file(run, "latency_fidelity.json")
    if not isinstance(fidelity, dict) or not isinstance(fidelity.get("profiles"), dict):
        return "<p class='note'>This run has no latency objective, so no latency model was used.</p>"
    parts = []
    for i, (name, prof) in enumerate(fidelity["profiles"].items()):
        validation = prof.get("validation") or {}
        summary = validation.get("summary") or {}
        plain = summary.get("plain_sum") or {}
        model = prof.get("model") if isinstance(prof.get("model"), dict) else {}
        fp32_us = prof.get("fp32_e2e_us")
        parts.append(f"<h3>{html_text(name)}</h3><p class='note'>latency (predicted) = "
                     f"{html_text(model.get('formula', ''))}, intercept "
                     f"{float(model.get('intercept_us') or 0):.1f} µs, fitted on "
                     f"{html_text(model.get('calibration_configs', '-'))} configs timed end to end; "
                     f"the figures below are on held-out configs. fp32 end to end "
                     f"{float(fp32_us if isinstance(fp32_us, (int, float)) else math.nan):.1f} µs "
                     f"({html_text(prof.get('measured_source', 'measured'))}).</p>")

        check = prof.get("front_check")
        if isinstance(check, dict):
            from autoquant.search.latency import front_check_line

            parts.append(f"<p class='note'>{html_text(front_check_line(check))}</p>")

        def pct(v: object) -> str:
            return f"{float(v) * 100:.0f}%" if isinstance(v, (int, float)) else "-"

        def num(v: object) -> str:
            return f"{float(v):.3f}" if isinstance(v, (int, float)) else "-"

        parts.append(table(["predictor", "configs", "within ±10%", "MAPE", "max error", "Spearman", "Kendall tau"], [
            ["latency model", summary.get("configs", "-"), pct(summary.get("within_10pct")), pct(summary.get("mape")),
             pct(summary.get("max_abs_rel_error")), num(summary.get("spearman")), num(summary.get("kendall_tau"))],
            ["plain per-layer sum", summary.get("configs", "-"), pct(plain.get("within_10pct")), pct(plain.get("mape")),
             pct(plain.get("max_abs_rel_error")), num(plain.get("spearman")), num(plain.get("kendall_tau"))],
        ]))
        pts = tuple(
            Point(float(r["predicted_ms"]), float(r["measured_ms"]),
                  f"config {r.get('config_hash')}: predicted {float(r['predicted_ms']):.4g} ms, "
                  f"measured {float(r['measured_ms']):.4g} ms", "")
            for r in validation.get("rows", [])
            if isinstance(r.get("predicted_ms"), (int, float)) and isinstance(r.get("measured_ms"), (int, float))
        )
        if pts:
            lo = min(min(p.x, p.y) for p in pts)
            hi = max(max(p.x, p.y) for p in pts)
            diagonal = (Point(lo, lo, "predicted = measured"), Point(hi, hi, "predicted = measured"))
            parts.append(scatter(
                [Series("configs measured end to end", pts, "#ff7f0e"),
                 Series("predicted = measured", diagonal, "#999", kind="line")],
                Axis("predicted latency, ms"), Axis("measured latency, ms (end to end)"),
                title=f"latency model on {name}", plot_id=f"latency-{i}",
            ))
    return "".join(parts)


def configs_payload(run: RunData) -> dict[str, Any]:
    out = {}
    for _, r in run.complete.iterrows():
        out[_key(run, r["trial"])] = {
            "run": run.name,
            "trial": int(r["trial"]),
            "accuracy (measured)": float(r["accuracy"]),
            **({"accuracy 95% interval": list(interval_of(r, "accuracy"))} if interval_of(r, "accuracy") else {}),
            **({"drop against fp32, 95% interval": list(interval_of(r, "accuracy_drop")),
                "within noise of fp32": within_noise(r)} if interval_of(r, "accuracy_drop") else {}),
            **{f"{o.figure} ({r.get(o.figure + '_source', '')})": float(r[o.figure]) for o in run.cost_objectives},
            "layers": {c.removeprefix("layer:"): r[c] for c in run.layer_columns if isinstance(r.get(c), str)},
        }
    return out


def render_report(data: ReportData) -> str:
    run = data.run
    info = run.info
    trials = run.trials
    n_done = int((trials["state"] == "COMPLETE").sum())
    n_fail = int((trials["state"] == "FAIL").sum())
    search = run.spec.get("search", {})
    refs = []
    for name, row in (("fp32", data.fp32), ("uniform int8", data.int8)):
        if row is not None:
            refs.append(f"{name}: {_accuracy_text(row, drop=name != 'fp32')}, "
                        f"{row['size_bytes'] / 1024:.1f} KiB (exact), {'on' if row['on_front'] else 'not on'} the front")
    body = [
        f"<h1>autoquant run <code>{html_text(run.name)}</code></h1>",
        f"<p>task <b>{html_text(run.task)}</b>; objectives "
        + html_text(", ".join(f"{o.name} ({o.direction})" for o in run.objectives))
        + f"; sampler {html_text(search.get('sampler'))}; budget {html_text(search.get('trials'))} configs"
        + (f" / {html_text(search.get('timeout_s'))} s" if search.get("timeout_s") else "")
        + f"; used: {n_done} measured, {n_fail} failed"
        + (f", {info['elapsed_s']:.1f} s in the last invocation" if "elapsed_s" in info else "") + ".</p>",
        "<p>" + "<br>".join(html_text(r) for r in refs) + "</p>",
        "<h2>Pareto fronts</h2><p class='note'>Grey: every measured config. Blue: the front. Black square: fp32. "
        "Black triangle: uniform int8. Red ring: the knee. Hover a point for its config, click for details.</p>",
        "<div class='plots'>" + "".join(front_plots(data)) + "</div>",
        f"<h2>Front points ({len(run.front)} of {n_done} measured configs)</h2>", interval_note(run),
        _front_table(data),
        "<h2>Per-layer precision of the front</h2>", precision_map(run),
        "<h2>Accuracy predictor</h2>", _predictor_section(data),
        "<h2>Latency model</h2>", _latency_section(run),
        "<h2>Layer sensitivity</h2>", _sensitivity_section(run),
        "<h2>Spec as run</h2><pre>" + html_text(_yaml(run.spec)) + "</pre>",
        "<h2>Versions</h2><pre>" + html_text(json.dumps(info.get("versions", {}), indent=2)) + "</pre>",
    ]
    return page(f"autoquant: {run.name}", "\n".join(body), configs_payload(run))


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def write_report(run: RunData) -> Any:
    """Write ``report.html`` into the run directory (atomically) and return its path."""
    from autoquant.rundir import atomic_write_text

    return atomic_write_text(run.path / "report.html", render_report(report_data(run)))
