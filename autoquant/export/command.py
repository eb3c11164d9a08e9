"""The ``autoquant export`` command (registered in ``autoquant.cli``)."""

from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import Annotated

import typer

from autoquant.export.pick import PICK_HELP


class Int4Kernel(str, enum.Enum):
    matmulnbits = "matmulnbits"
    dq = "dq"


class WeightOnly(str, enum.Enum):
    fold = "fold"
    dq = "dq"


class KernelWeights(str, enum.Enum):
    auto = "auto"
    uint8 = "uint8"
    int8 = "int8"


class NbitsAccuracy(str, enum.Enum):
    exact = "0"
    int8 = "4"


def export(
    *,  # typer passes every parameter by name
    run: Annotated[
        Path, typer.Argument(help="run directory made by autoquant search, e.g. results/digits-cnn")
    ],
    pick: Annotated[str, typer.Option(help=f"which front point: {PICK_HELP}")] = "knee",
    out: Annotated[
        Path | None,
        typer.Option(
            help="output directory (default: RUN/exports/<pick>; with --all: RUN/exports)"
        ),
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="export and validate every front point")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="ORT intra-op threads (latency and checks) [default: the run's "
                     "ONNX Runtime profile's, as the search predicted; else 1]"),
    ] = None,  # fmt: skip
    latency_repeats: Annotated[
        int, typer.Option(min=0, help="timed runs per graph (0: skip latency)")
    ] = 200,
    int4_kernel: Annotated[
        Int4Kernel,
        typer.Option(help="weight-only Linear per-group 3/4-bit: MatMulNBits, or never"),
    ] = Int4Kernel.matmulnbits,
    kernel_weights: Annotated[
        KernelWeights,
        typer.Option(
            help="int8 weights of integer-kernel layers: int8 (U8S8, exact and fast with VNNI), "
            "uint8 (+128: U8U8, exact on any CPU), auto: int8 if this CPU has VNNI"
        ),
    ] = KernelWeights.auto,
    weight_only: Annotated[
        WeightOnly,
        typer.Option(
            help="other weight-only integer layers: Cast/Sub/Mul that ORT folds into a float "
            "weight once at load (same numbers and file size, float speed), or "
            "DequantizeLinear (standard QDQ, re-run on every call)"
        ),
    ] = WeightOnly.fold,
    nbits_accuracy_level: Annotated[
        NbitsAccuracy,
        typer.Option(
            help="MatMulNBits accuracy_level: 0 = exact (what the search measured), "
            "4 = int8 activations inside the kernel (faster, not what the search measured: "
            "validation may fail)"
        ),
    ] = NbitsAccuracy.exact,
    tolerance_steps: Annotated[
        float, typer.Option(min=0, help="max |ORT - simulation| in output steps")
    ] = 3.0,
    tolerance_accuracy: Annotated[
        float, typer.Option(min=0, help="max |ORT accuracy - promised| (fraction)")
    ] = 0.005,
) -> None:
    """Export a front point as ONNX (model.onnx + manifest.json), validated in ONNX Runtime."""
    from rich.console import Console

    from autoquant.export.pipeline import ExportOptions, export_run
    from autoquant.export.validate import Tolerances

    console = Console(markup=False)  # names come from run directories: never markup
    options = ExportOptions(
        threads=_session_pool(run, threads),
        latency_repeats=latency_repeats,
        int4_kernel=int4_kernel.value,
        kernel_weights=kernel_weights.value,
        weight_only=weight_only.value,
        nbits_accuracy_level=int(nbits_accuracy_level.value),
        tolerances=Tolerances(output_steps=tolerance_steps, accuracy=tolerance_accuracy),
    )
    with console.status("exporting and validating in ONNX Runtime"):
        results = export_run(run, pick=pick, out=out, all_=all_, options=options)
    _print_results(console, results, all_=all_)
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def _session_pool(run: Path, threads: int | None) -> int:
    """The threads the export's sessions run on (``--threads``, else the run's ONNX Runtime
    profile's), made this process's one thread pool: as the profile's timings ran and as one
    deployed session runs (the export and the fp32 graph timed in turn, each with a pool of its
    own, had the idle one's spinning workers take the CPU from the one being timed)."""
    from autoquant.backends.ort.session import share_thread_pool
    from autoquant.export.pick import run_ort_threads

    if threads is None:
        threads, _ = run_ort_threads(run)
    with contextlib.suppress(RuntimeError):  # a pool made earlier in this process: the
        share_thread_pool(threads)  # sessions run on it, and the manifest says its threads
    return threads


def _print_results(console, results, *, all_: bool) -> None:
    """The promised-vs-measured table, the files written, warnings and failures (on stderr)."""
    console.print(render_table(results))
    for r in results:
        status = "ok" if r.ok else "FAILED"
        console.print(
            f"trial {r.trial}: {status}: {r.out_dir / 'model.onnx'}, {r.out_dir / 'manifest.json'}"
        )
    for line in slower_than_fp32_warnings(results):
        typer.echo(line, err=True)
    if all_ and results:
        console.print(f"summary: {results[0].out_dir.parent / 'summary.csv'}")
    for r in results:
        if not r.ok:
            typer.echo(
                f"error: export of trial {r.trial} failed validation: {r.failure_message()}",
                err=True,
            )


def slower_than_fp32_warnings(results) -> list[str]:
    """One line per export measured slower than the fp32 graph: slower in every round of the
    validation's timing, where the two were timed interleaved (batch 1)."""
    lines = []
    for r in results:
        lat = r.validation.latency
        if lat and lat.get("slower_than_fp32"):
            export, fp32 = lat["export"], lat["fp32"]
            lines.append(
                f"warning: trial {r.trial} runs slower than the fp32 graph in ONNX Runtime: "
                f"{export['median_ms']:.3f} ms vs {fp32['median_ms']:.3f} ms median "
                f"({lat['speedup_vs_fp32']:.2f}x; slower in all {len(export['round_medians_ms'])} "
                f"interleaved rounds; batch {export['batch']}, {export['threads']} thread(s)); "
                f"kernels: {', '.join(r.validation.kernels) or 'none quantized'}"
            )
    return lines


def render_table(results):
    from rich.table import Table

    from autoquant.export.pipeline import summary_rows

    table = Table(title="exports: promised (search) vs re-measured (ONNX Runtime)")
    for col in (
        "trial",
        "ok",
        "acc",
        "acc ORT",
        "steps",
        "KiB",
        "xfp32",
        "ms",
        "fp32 ms",
        "kernels",
    ):
        table.add_column(col, justify="left" if col in ("ok", "kernels") else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for row in summary_rows(results):
        table.add_row(
            str(row["trial"]),
            "yes" if row["ok"] else "NO",
            f(row["promised_accuracy"], ".4f"),
            f(row["ort_accuracy"], ".4f"),
            f(row["max_output_steps"], ".2f"),
            f(row["file_bytes"] / 1024, ".1f"),
            f(row["file_ratio_vs_fp32"], ".3f"),
            f(row["latency_ms"], ".3f"),
            f(row["fp32_latency_ms"], ".3f"),
            row["quantized_kernels"] or "-",
        )
    table.caption = (
        "acc: measured by the search (torch simulation). Measured now in ONNX Runtime: acc ORT "
        "(ORT_ENABLE_ALL), steps (max |ORT - simulation| in output steps, both levels), file KiB "
        "and ratio to the fp32 graph, ms (median at batch 1, beside the fp32 graph)"
    )
    return table


def export_dry_run_lines(run, spec: Path) -> list[str]:
    """``autoquant space``'s dry run of the export: the (BatchNorm-folded) model's fp32 ONNX
    graph, and per layer the node ``autoquant export`` will rewrite or why the layer can only
    stay float (with a warning when the space still gives it quantized choices).

    Raises:
        UserError: the fp32 export fails (the cause, on one line).
    """
    from autoquant.errors import UserError
    from autoquant.onnxgraph.mapping import LayerNode, dry_run

    try:
        nodes, mapped = dry_run(
            run.task.model, run.task.example_inputs(), [ls.layer.name for ls in run.space.layers]
        )
    except UserError as exc:
        raise UserError(str(exc).removeprefix("task: "), file=str(spec), key="task") from None
    mapped_count = sum(isinstance(v, LayerNode) for v in mapped.values())
    lines = [
        f"ONNX export (dry run): fp32 graph of {nodes} nodes; "
        f"{mapped_count} of {len(mapped)} layers map to their node"
    ]
    choices = {ls.layer.name: ls.choices for ls in run.space.layers}
    for name, where in mapped.items():
        if isinstance(where, LayerNode):
            lines.append(f"  {name}: {where.describe()}")
            continue
        quantized = sum(not c.is_fp32 for c in choices[name])
        lines.append(
            f"  {name}: stays float: {where.reason}"
            + (
                f"; warning: the space gives it {quantized} quantized choice(s), which "
                "autoquant export refuses: restrict it to weight_bits [32], act_bits [32]"
                if quantized
                else ""
            )
        )
    return lines
