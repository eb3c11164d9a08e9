"""``autoquant compare``: several runs on shared axes. ``compare_runs`` computes every figure;
``render_compare`` draws them; ``Comparison.to_json`` is the machine-readable form."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoquant.pareto import hypervolume, non_dominated_mask
from autoquant.report.escape import html_text
from autoquant.report.html import _points, axis_for, configs_payload, knee_trial
from autoquant.report.page import page, table
from autoquant.report.rundata import RunData
from autoquant.report.svg import PALETTE, Axis, Series, scatter
from autoquant.search.objectives import Objective

BUDGET_QUANTILES = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PairResult:
    """One objective pair (accuracy against one cost) across runs."""

    cost: Objective
    reference: tuple[float, float]  # (accuracy, cost) every run's hypervolume is measured from
    hypervolume: dict[str, float]
    front_points: dict[str, int]
    dominated_fraction: dict[str, float]  # share of a run's front dominated by the other runs' fronts
    budgets: list[dict[str, Any]]  # per budget: best accuracy per run and the winner


@dataclass(frozen=True)
class Comparison:
    runs: tuple[RunData, ...]
    pairs: tuple[PairResult, ...]
    notes: tuple[str, ...]
    knees: dict[str, int | None]
    layer_differences: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "_type": "autoquant.Comparison",
            "_version": 1,
            "runs": [{"name": r.name, "path": str(r.path), "task": r.task,
                      "objectives": [o.name for o in r.objectives],
                      "sampler": r.spec.get("search", {}).get("sampler"),
                      "measured": int((r.trials["state"] == "COMPLETE").sum()),
                      "knee_trial": self.knees[r.name]} for r in self.runs],
            "notes": list(self.notes),
            "pairs": [{
                "objectives": ["accuracy", p.cost.name],
                "reference_point": {"accuracy": p.reference[0], p.cost.figure: p.reference[1]},
                "hypervolume": p.hypervolume,
                "front_points": p.front_points,
                "dominated_fraction": p.dominated_fraction,
                "budgets": p.budgets,
                "sources": {"accuracy": "measured",
                            p.cost.figure: {r.name: r.source_of(p.cost.figure) for r in self.runs}},
            } for p in self.pairs],
            "knee_layer_differences": self.layer_differences,
        }


def _unique_names(runs: list[RunData]) -> list[RunData]:
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        if n:
            from dataclasses import replace

            r = replace(r, name=f"{r.name}~{n + 1}")
        out.append(r)
    return out


def compare_runs(runs: list[RunData]) -> Comparison:
    runs = _unique_names(runs)
    notes = []
    tasks = {r.task for r in runs}
    if len(tasks) > 1:
        notes.append(f"the runs are on different tasks ({', '.join(sorted(map(str, tasks)))}): "
                     "accuracies are compared as numbers, but they measure different things")
    shared = [o for o in runs[0].cost_objectives if all(o in r.cost_objectives for r in runs[1:])]
    for r in runs:
        extra = [o.name for o in r.cost_objectives if o not in shared]
        if extra:
            notes.append(f"run {r.name} also has objective(s) {', '.join(extra)}, not compared")
    pairs = []
    for cost in shared:
        fronts = {r.name: r.front[["accuracy", cost.figure]].to_numpy(dtype=float) for r in runs}
        everything = np.vstack([f for f in fronts.values() if len(f)]) if any(len(f) for f in fronts.values()) else np.zeros((0, 2))
        if len(everything) == 0:
            continue
        # A shared reference point: just below the worst front accuracy and just above the
        # largest front cost of any run, so every front point counts and the runs share a box.
        ref = (float(everything[:, 0].min()) - 1e-3, float(everything[:, 1].max()) * 1.01)
        dirs = ["maximize", "minimize"]
        hv = {n: hypervolume(f, dirs, ref) if len(f) else 0.0 for n, f in fronts.items()}
        dominated = {}
        for n, f in fronts.items():
            others = [g for m, g in fronts.items() if m != n and len(g)]
            if not len(f) or not others:
                dominated[n] = 0.0
                continue
            pool = np.vstack([f, *others])
            mask = non_dominated_mask(pool, dirs)[: len(f)]
            # a point tied with another run's point is not dominated by it
            dominated[n] = float(1 - mask.mean())
        fp32_costs = [float(r.reference("fp32")[cost.figure]) for r in runs if r.reference("fp32") is not None]
        fp32_cost = max(fp32_costs) if fp32_costs else None
        budgets = []
        # Budgets at the quartiles of the costs the fronts span, where the runs actually differ.
        for q in BUDGET_QUANTILES:
            limit = float(np.quantile(everything[:, 1], q))
            best = {}
            for n, f in fronts.items():
                inside = f[f[:, 1] <= limit] if len(f) else f
                best[n] = float(inside[:, 0].max()) if len(inside) else None
            valid = {n: v for n, v in best.items() if v is not None}
            top_acc = max(valid.values()) if valid else None
            winners = [n for n, v in valid.items() if top_acc is not None and math.isclose(v, top_acc)]
            budgets.append({
                "budget": {cost.figure: limit, "quantile_of_front_costs": q,
                           "fraction_of_fp32": None if fp32_cost is None else limit / fp32_cost},
                "best_accuracy": best, "winners": winners,
            })
        pairs.append(PairResult(cost, ref, hv, {n: len(f) for n, f in fronts.items()}, dominated, budgets))
    knees = {r.name: knee_trial(r) for r in runs}
    diffs = []
    layer_sets = [set(r.layer_columns) for r in runs]
    common_layers = sorted(set.intersection(*layer_sets)) if layer_sets else []
    base = runs[0]
    base_row = base.front[base.front["trial"] == knees[base.name]] if knees[base.name] is not None else None
    for r in runs[1:]:
        if knees[r.name] is None or base_row is None or base_row.empty:
            continue
        row = r.front[r.front["trial"] == knees[r.name]].iloc[0]
        brow = base_row.iloc[0]
        for col in common_layers:
            if brow[col] != row[col]:
                diffs.append({"layer": col.removeprefix("layer:"), base.name: brow[col], r.name: row[col]})
    if len(common_layers) < max((len(s) for s in layer_sets), default=0):
        notes.append("the runs' models have different layers: per-layer differences cover the shared ones")
    return Comparison(tuple(runs), tuple(pairs), tuple(notes), knees, diffs)


def render_compare(comp: Comparison) -> str:
    body = [f"<h1>autoquant compare: {html_text(', '.join(r.name for r in comp.runs))}</h1>"]
    if comp.notes:
        body.append("<ul>" + "".join(f"<li>{html_text(n)}</li>" for n in comp.notes) + "</ul>")
    body.append(table(["run", "path", "task", "sampler", "measured configs", "knee trial"], [
        [r.name, str(r.path), r.task, r.spec.get("search", {}).get("sampler"),
         int((r.trials["state"] == "COMPLETE").sum()), comp.knees[r.name]] for r in comp.runs], left=4))
    for i, p in enumerate(comp.pairs):
        series = [Series(f"{r.name} front", _points(r, r.front, p.cost), PALETTE[j % len(PALETTE)], kind="front")
                  for j, r in enumerate(comp.runs)]
        values = [v for r in comp.runs for v in r.front[p.cost.figure]]
        body.append(f"<h2>accuracy against {html_text(p.cost.name)}</h2>")
        body.append(scatter(series, axis_for(p.cost, values), Axis("accuracy (measured)"),
                            title=f"fronts: accuracy against {p.cost.name}", plot_id=f"compare-{i}"))
        body.append(f"<p class='note'>Hypervolume from the shared reference point accuracy "
                    f"{p.reference[0]:.4f}, {html_text(p.cost.figure)} {p.reference[1]:.4g} (higher is better).</p>")
        rows = [[r.name, f"{p.hypervolume[r.name]:.6g}", p.front_points[r.name],
                 f"{p.dominated_fraction[r.name] * 100:.0f}%"] for r in comp.runs]
        body.append(table(["run", "hypervolume", "front points", "front dominated by the others"], rows))
        head = ["budget"] + [r.name for r in comp.runs] + ["best"]
        brows = []
        for b in p.budgets:
            lim = b["budget"][p.cost.figure]
            frac = b["budget"]["fraction_of_fp32"]
            brows.append([f"{p.cost.figure} <= {lim:.4g}" + ("" if frac is None else f" ({frac:.3g} x fp32)")]
                         + ["-" if b["best_accuracy"][r.name] is None else f"{b['best_accuracy'][r.name]:.4f}" for r in comp.runs]
                         + [", ".join(b["winners"]) or "-"])
        body.append("<p>Best measured accuracy inside each budget:</p>" + table(head, brows))
    if comp.layer_differences:
        names = [r.name for r in comp.runs]
        body.append("<h2>Per-layer differences between the knee points</h2>")
        body.append(table(["layer", *names], [[d["layer"], *[d.get(n, "") for n in names]] for d in comp.layer_differences]))
    configs: dict[str, Any] = {}
    for r in comp.runs:
        configs.update(configs_payload(r))
    return page("autoquant compare", "\n".join(body), configs)


def write_compare(comp: Comparison, out_dir) -> tuple[Any, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "compare.html", out_dir / "compare.json"
    from autoquant.rundir import atomic_write_text

    atomic_write_text(html_path, render_compare(comp))
    atomic_write_text(json_path, json.dumps(comp.to_json(), indent=2, default=str))
    return html_path, json_path


__all__ = ["Comparison", "compare_runs", "render_compare", "write_compare"]
