"""The ``autoquant export`` command (registered in ``autoquant.cli``)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from autoquant.export.pick import PICK_HELP


class Int4Kernel(str, enum.Enum):
    matmulnbits = "matmulnbits"
    dq = "dq"


class WeightOnly(str, enum.Enum):
    dq = "dq"
    fold = "fold"


class KernelWeights(str, enum.Enum):
    uint8 = "uint8"
    int8 = "int8"


def export(
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
        int, typer.Option(min=1, help="ORT intra-op threads (latency and checks)")
    ] = 1,
    latency_repeats: Annotated[
        int, typer.Option(min=0, help="timed runs per graph (0: skip latency)")
    ] = 200,
    int4_kernel: Annotated[
        Int4Kernel,
        typer.Option(help="Linear per-group <=4-bit: MatMulNBits or standard blocked DQ"),
    ] = Int4Kernel.matmulnbits,
    kernel_weights: Annotated[
        KernelWeights,
        typer.Option(
            help="int8 weights of integer-kernel layers stored as uint8 (+128, exact on any CPU) or int8 (VNNI CPUs)"
        ),
    ] = KernelWeights.uint8,
    weight_only: Annotated[
        WeightOnly,
        typer.Option(
            help="weight-only integer layers: DequantizeLinear (standard QDQ, re-run every call) "
            "or Cast/Sub/Mul that ORT folds once at load (same numbers and file size)"
        ),
    ] = WeightOnly.dq,
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

    console = Console()
    options = ExportOptions(
        threads=threads,
        latency_repeats=latency_repeats,
        int4_kernel=int4_kernel.value,
        kernel_weights=kernel_weights.value,
        weight_only=weight_only.value,
        tolerances=Tolerances(output_steps=tolerance_steps, accuracy=tolerance_accuracy),
    )
    with console.status("exporting and validating in ONNX Runtime"):
        results = export_run(run, pick=pick, out=out, all_=all_, options=options)
    console.print(render_table(results))
    for r in results:
        status = "ok" if r.ok else "FAILED"
        console.print(
            f"trial {r.trial}: {status}: {r.out_dir / 'model.onnx'}, {r.out_dir / 'manifest.json'}"
        )
    if all_ and results:
        console.print(f"summary: {results[0].out_dir.parent / 'summary.csv'}")
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            typer.echo(
                f"error: export of trial {r.trial} failed validation: {r.failure_message()}",
                err=True,
            )
        raise typer.Exit(1)


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
