"""Export one front point (or all of them): pick → graph → validate → manifest.

``export_run`` is what the ``autoquant export`` command calls. Bad input raises ``UserError``
before anything is written; an export that fails validation still writes its files (for
inspection) and comes back with ``ok=False`` and the failed checks.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoquant import formats
from autoquant.errors import UserError
from autoquant.export.pick import Pick, RunFront, check_in_ledger, choose, load_front
from autoquant.export.validate import Tolerances, Validation, session_threads
from autoquant.rundir import atomic_write

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.csv"


@dataclass(frozen=True)
class ExportOptions:
    threads: int = 1
    latency_repeats: int = 200
    int4_kernel: str = "matmulnbits"
    kernel_weights: str = "auto"
    weight_only: str = "fold"
    nbits_accuracy_level: int = 0
    tolerances: Tolerances = field(default_factory=Tolerances)


@dataclass
class ExportResult:
    out_dir: Path
    trial: int
    config_hash: str
    manifest: dict[str, Any]
    validation: Validation

    @property
    def ok(self) -> bool:
        return self.validation.ok

    def failure_message(self) -> str:
        return "; ".join(c.message for c in self.validation.failures)


class ExportContext:
    """What every export of one run shares: the task, its calibration, the fp32 graph and the
    unit of output agreement. Built once for ``--all``."""

    def __init__(self, front: RunFront, work_dir: Path) -> None:
        import onnx
        import torch

        from autoquant.model_inputs import is_named, run_model, take, to_feeds
        from autoquant.onnxgraph.graph import INPUT_NAME, float_graph
        from autoquant.quant.fake import ActivationParams
        from autoquant.search.run import prepare

        self.front = front
        self.spec_path = front.run_dir / "spec.yaml"
        run = prepare(self.spec_path)
        self.run = run
        self.task = run.task
        self.calibration = run.evaluator.calibration
        self.layers = run.evaluator.layers
        self.batch_size = run.evaluator.batch_size
        # The probe batch the graph is exported with (its input names, dtypes, dynamic axes).
        self.example = self.task.example_inputs()
        # ORT feeds: float inputs as float32, token ids as int64 (never cast to float). One
        # array for a one-tensor task, named arrays otherwise.
        feeds = to_feeds(self.task.eval_inputs)
        self.eval_inputs = feeds if is_named(self.task.eval_inputs) else feeds[INPUT_NAME]
        self.fp32_path = work_dir / "fp32.onnx"
        onnx.save(float_graph(self.task.model, self.example), str(self.fp32_path))
        calib = take(self.task.calibration_inputs, run.spec.evaluation.calibration_samples)
        with torch.no_grad():
            ref = run_model(self.task.model.eval(), calib)
        # The agreement unit: one step of the output's uint8 grid over its calibrated range.
        self.output_step = ActivationParams.from_range(float(ref.min()), float(ref.max())).scale
        self.fp32_outputs = self.simulate(None)

    def simulate(self, config) -> np.ndarray:
        import torch

        from autoquant.model_inputs import batches, run_model
        from autoquant.quant import apply

        model = self.task.model if config is None else apply(self.task.model, config, self.calibration)
        with torch.no_grad():
            outs = [run_model(model, b) for b in batches(self.task.eval_inputs, self.batch_size)]
        return torch.cat(outs).numpy()


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(
            f"bad value {str(out)!r}: exists and is not a directory; allowed: a directory path",
            key="--out",
        )


def export_point(
    row: Any, out_dir: Path, ctx: ExportContext, options: ExportOptions, *, pick: str
) -> ExportResult:
    """Export, validate and describe one front row into ``out_dir``."""
    import onnx

    from autoquant.export.manifest import write_manifest
    from autoquant.onnxgraph.graph import export_graph

    config = _row_config(row, ctx)
    check_out_dir(out_dir)
    graph = export_graph(
        ctx.task.model,
        ctx.example,
        config,
        ctx.calibration,
        int4_kernel=options.int4_kernel,
        kernel_weights=options.kernel_weights,
        weight_only=options.weight_only,
        nbits_accuracy_level=options.nbits_accuracy_level,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = atomic_write(out_dir / MODEL_FILE, lambda p: onnx.save(graph.model, str(p), format="protobuf"))
    validation = _validate(
        model_path, ctx, options, config, graph, promised_accuracy=float(row["accuracy"])
    )
    manifest = _manifest(
        ctx, options, row=row, pick=pick, config=config, graph=graph, model_path=model_path,
        validation=validation,
    )
    write_manifest(out_dir / MANIFEST_FILE, manifest)
    return ExportResult(out_dir, int(row["trial"]), config.hash, manifest, validation)


def _row_config(row: Any, ctx: ExportContext):
    """The row's ``QuantConfig``, refused when it is not the one its hash in pareto.csv names."""
    from autoquant.space.values import QuantConfig

    config = QuantConfig.from_json(row["config"])
    if config.hash != row["config_hash"]:
        raise UserError(
            f"trial {int(row['trial'])}: config hash {config.hash} does not match pareto.csv's {row['config_hash']}",
            file=str(ctx.front.run_dir / "pareto.csv"),
        )
    return config


def _validate(
    model_path: Path, ctx: ExportContext, options: ExportOptions, config, graph, *,
    promised_accuracy: float,
) -> Validation:
    """``validate_export`` of the written graph against this config's simulation."""
    from autoquant.export.validate import feed_slice, validate_export
    from autoquant.quant.fake import runs_integer_kernel

    return validate_export(
        model_path,
        ctx.fp32_path,
        eval_inputs=ctx.eval_inputs,
        eval_targets=ctx.task.eval_targets,
        metric=ctx.task.metric,
        sim_outputs=ctx.simulate(config),
        output_step=ctx.output_step,
        fp32_outputs=ctx.fp32_outputs,
        promised_accuracy=promised_accuracy,
        expected_int_kernels=sum(runs_integer_kernel(c) for _, c in config.choices)
        + sum(e.form == "int8-dynamic" for e in graph.layers),
        weight_dq_allowed=options.weight_only == "dq",
        format_weight_dq=sum(
            formats.weight_format(c).export_form == "dequantize" for _, c in config.choices
        ),
        tolerances=options.tolerances,
        threads=options.threads,
        latency_repeats=options.latency_repeats,
        sample=feed_slice(ctx.eval_inputs, 0, 1),
        # dynamic activations take their range per call, which the simulation takes per sample
        batch_size=1 if any(getattr(c, "act_dynamic", False) for _, c in config.choices) else 512,
    )


def _measured(validation: Validation, file_bytes: int, fp32_bytes: int) -> dict[str, Any]:
    """The manifest's re-measured figures: ORT accuracy per level, file sizes, latency."""
    measured: dict[str, Any] = {
        f"accuracy_ort_{level}": {"value": acc, "source": "measured"}
        for level, acc in validation.accuracy.items()
    }
    measured["file_bytes"] = {"value": file_bytes, "source": "measured"}
    measured["fp32_file_bytes"] = {"value": fp32_bytes, "source": "measured"}
    measured["file_ratio_vs_fp32"] = {"value": file_bytes / fp32_bytes, "source": "measured"}
    if validation.latency:
        measured["latency_ms"] = {
            **validation.latency["export"],
            "value": validation.latency["export"]["median_ms"],
        }
        measured["fp32_latency_ms"] = {
            **validation.latency["fp32"],
            "value": validation.latency["fp32"]["median_ms"],
        }
        measured["speedup_vs_fp32"] = {
            "value": validation.latency["speedup_vs_fp32"],
            "source": "measured",
        }
        measured["slower_than_fp32"] = {
            "value": validation.latency["slower_than_fp32"],
            "source": "measured",
            "rule": "slower than the fp32 graph in every interleaved round",
        }
    return measured


def _manifest(
    ctx: ExportContext,
    options: ExportOptions,
    *,
    row: Any,
    pick: str,
    config,
    graph,
    model_path: Path,
    validation: Validation,
) -> dict[str, Any]:
    """manifest.json of one export: what was promised, what was written, what was re-measured."""
    from autoquant.export.manifest import build_manifest, promised_figures, sha256_file
    from autoquant.export.validate import feed_count

    file_bytes = model_path.stat().st_size
    return build_manifest(
        ok=validation.ok,
        failures=[c.message for c in validation.failures],
        run=str(ctx.front.run_dir.resolve()),
        run_name=ctx.front.spec.get("name"),
        task=ctx.task.name,
        trial=int(row["trial"]),
        pick=pick,
        config_hash=config.hash,
        config=config.to_dict(),
        layers=[layer.to_dict() for layer in graph.layers],
        float_layers=graph.float_layers,
        promised=promised_figures(row),
        measured=_measured(validation, file_bytes, ctx.fp32_path.stat().st_size),
        agreement={
            "unit": "output steps: the output's calibrated float32 range / 255",
            "step": ctx.output_step,
            "eval_samples": feed_count(ctx.eval_inputs),
            **validation.agreement,
        },
        checks=[c.to_dict() for c in validation.checks],
        tolerances={
            "output_steps": options.tolerances.output_steps,
            "relative_rms": options.tolerances.relative_rms,
            "accuracy": options.tolerances.accuracy,
            "file_overhead_bytes": options.tolerances.file_overhead_bytes,
        },
        ort={
            "provider": "CPUExecutionProvider",
            "levels_checked": ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"],
            "intra_op_threads": session_threads(options.threads),
            "quantized_kernels": validation.kernels,
            "optimized_ops": validation.optimized_ops,
            "optimized_op_counts": validation.optimized_op_counts,
            "weight_dequantize_per_call": validation.weight_dequantize,
            "session_config": {},
        },
        export_options={
            "int4_kernel": options.int4_kernel,
            "kernel_weights": graph.options.kernel_weights,  # "auto" resolved on this CPU
            "kernel_weights_asked": options.kernel_weights,
            "weight_only": options.weight_only,
            "nbits_accuracy_level": options.nbits_accuracy_level,
        },
        files={MODEL_FILE: {"bytes": file_bytes, "sha256": sha256_file(model_path)}},
    )


def export_run(
    run_dir: Path,
    *,
    pick: str = "knee",
    out: Path | None = None,
    all_: bool = False,
    options: ExportOptions = ExportOptions(),
) -> list[ExportResult]:
    """Pick (or take all front points), export, validate. Input errors raise ``UserError``
    before anything is written. An export into the run directory (the default) owns it for its
    duration (``autoquant.rundir.owner_lock``)."""
    from contextlib import nullcontext

    from autoquant.rundir import owner_lock

    run_dir = Path(run_dir)
    into_run = out is None or Path(out).resolve().is_relative_to(run_dir.resolve())
    owning = into_run and run_dir.is_dir()
    with owner_lock(run_dir, "autoquant export", create=False) if owning else nullcontext():
        return _export_run(run_dir, pick=pick, out=out, all_=all_, options=options)


def _export_run(
    run_dir: Path, *, pick: str, out: Path | None, all_: bool, options: ExportOptions
) -> list[ExportResult]:
    front = load_front(run_dir)
    if all_:
        rows = [front.frame.iloc[i] for i in range(len(front.frame))]
        base = out if out is not None else front.run_dir / "exports"
        targets = [
            (row, base / f"trial-{int(row['trial'])}", f"trial={int(row['trial'])}") for row in rows
        ]
        check_out_dir(base)
    else:
        parsed = Pick.parse(pick)
        row = choose(front, parsed)
        base = out if out is not None else front.run_dir / "exports" / parsed.slug
        targets = [(row, base, parsed.text)]
    for _, target, _ in targets:
        check_out_dir(target)
    check_in_ledger(front, [row for row, _, _ in targets])
    results = []
    with tempfile.TemporaryDirectory(prefix="autoquant-export-") as tmp:
        ctx = ExportContext(front, Path(tmp))
        for row, target, label in targets:
            results.append(export_point(row, target, ctx, options, pick=label))
    if all_:
        write_summary(base / SUMMARY_FILE, results)
    return results


SUMMARY_COLUMNS = (
    "trial",
    "ok",
    "config_hash",
    "promised_accuracy",
    "ort_accuracy",
    "accuracy_delta_points",
    "max_output_steps",
    "promised_size_bytes",
    "file_bytes",
    "file_ratio_vs_fp32",
    "promised_latency_ms",
    "latency_ms",
    "fp32_latency_ms",
    "speedup_vs_fp32",
    "quantized_kernels",
    "failures",
)


def summary_rows(results: list[ExportResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        m = r.manifest
        promised, measured = m["promised"], m["measured"]
        acc = measured.get("accuracy_ort_enable_all", {}).get("value")
        p_acc = promised.get("accuracy", {}).get("value")
        steps = [a["max_steps"] for k, a in m["agreement"].items() if isinstance(a, dict)]
        rows.append(
            {
                "trial": r.trial,
                "ok": r.ok,
                "config_hash": r.config_hash,
                "promised_accuracy": p_acc,
                "ort_accuracy": acc,
                "accuracy_delta_points": None
                if acc is None or p_acc is None
                else 100 * (acc - p_acc),
                "max_output_steps": max(steps) if steps else None,
                "promised_size_bytes": promised.get("size_bytes", {}).get("value"),
                "file_bytes": measured["file_bytes"]["value"],
                "file_ratio_vs_fp32": measured["file_ratio_vs_fp32"]["value"],
                "promised_latency_ms": _promised_latency(promised),
                "latency_ms": measured.get("latency_ms", {}).get("value"),
                "fp32_latency_ms": measured.get("fp32_latency_ms", {}).get("value"),
                "speedup_vs_fp32": measured.get("speedup_vs_fp32", {}).get("value"),
                "quantized_kernels": " ".join(m["ort"]["quantized_kernels"]),
                "failures": " | ".join(m["failures"]),
            }
        )
    return rows


def _promised_latency(promised: dict[str, Any]) -> float | None:
    """The search's latency figure for the point (predicted), when it had one profile."""
    figures = [v.get("value") for k, v in promised.items() if k.startswith("latency_ms@")]
    return figures[0] if len(figures) == 1 else None


def write_summary(path: Path, results: list[ExportResult]) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(summary_rows(results), columns=list(SUMMARY_COLUMNS))
    atomic_write(path, lambda p: frame.to_csv(p, index=False))
