"""Exported front points vs the fp32 graph vs ONNX Runtime's own ``quantize_static``.

For each built-in task: a small search (or an existing run with ``--run``), every front point
exported and validated by ``autoquant export``'s pipeline, the fp32 graph, and ORT's
``quantize_static`` of the same fp32 graph (QDQ, per-channel int8 weights, uint8 activations,
MinMax calibration on the same calibration samples; once plain and once with ``reduce_range``,
ORT's setting for CPUs without VNNI). All graphs are timed in one interleaved loop in the same
process, so the latencies are comparable; accuracy is measured in ORT (ORT_ENABLE_ALL) on the
task's eval data; file size is the ``.onnx`` size. Every figure here is measured.

    python benchmarks/export_vs_ort.py                     # both tasks, 40-trial searches
    python benchmarks/export_vs_ort.py --tasks digits-cnn --trials 30 --out results/bench-export
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def spec_for(task: str, work: Path) -> Path:
    if task == "digits-cnn":
        return ROOT / "examples" / "digits-cnn.yaml"
    text = (ROOT / "examples" / "digits-cnn.yaml").read_text()
    text = text.replace("name: digits-cnn", f"name: {task}").replace(
        "task: digits-cnn", f"task: {task}"
    )
    text = text.replace(
        "space: ../search_spaces/default.yaml", f"space: {ROOT / 'search_spaces' / 'default.yaml'}"
    )
    path = work / f"{task}.yaml"
    path.write_text(text)
    return path


def ort_static(fp32_path: Path, out_path: Path, calib: np.ndarray, *, reduce_range: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calib[i : i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
        calibrate_method=CalibrationMethod.MinMax,
    )


def bench_task(task: str, args, work: Path) -> list[dict]:
    import onnx

    from autoquant.export.pick import load_front
    from autoquant.export.pipeline import ExportContext, ExportOptions, export_point
    from autoquant.export.validate import INTEGER_KERNELS, open_session, run_batched, time_sessions
    from autoquant.tasks.base import top1_accuracy

    run_dir = Path(args.run) if args.run else Path(args.out) / task
    if not (run_dir / "pareto.csv").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autoquant.cli",
                "search",
                str(spec_for(task, work)),
                "--out",
                str(run_dir),
                "--trials",
                str(args.trials),
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    front = load_front(run_dir)
    ctx = ExportContext(front, work)
    graphs: dict[str, dict] = {"fp32": {"path": ctx.fp32_path, "kind": "fp32", "promised": None}}
    calib = ctx.task.calibration_inputs[: ctx.run.spec.evaluation.calibration_samples].numpy()
    for rr in (False, True):
        name = "ort-static-qdq" + ("-reduce-range" if rr else "")
        path = work / f"{task}-{name}.onnx"
        ort_static(ctx.fp32_path, path, calib, reduce_range=rr)
        graphs[name] = {"path": path, "kind": "ort quantize_static", "promised": None}
    for weight_only in ("dq", "fold"):
        options = ExportOptions(latency_repeats=0, threads=args.threads, weight_only=weight_only)
        suffix = "" if weight_only == "dq" else "-fold"
        for i in range(len(front.frame)):
            row = front.frame.iloc[i]
            name = f"trial-{int(row['trial'])}{suffix}"
            out = Path(args.out) / task / "exports" / name
            result = export_point(row, out, ctx, options, pick=f"trial={int(row['trial'])}")
            labels = "/".join(str(row[c]) for c in front.frame.columns if c.startswith("layer:"))
            graphs[name] = {
                "path": out / "model.onnx",
                "kind": f"front ({weight_only}): {labels}",
                "promised": float(row["accuracy"]),
                "valid": result.ok,
                "steps": max(a["max_steps"] for a in result.validation.agreement.values()),
            }
    sessions = {}
    rows = []
    for name, g in graphs.items():
        opt = work / f".{task}-{name}-opt.onnx"
        sessions[name] = open_session(
            g["path"], "enable_all", threads=args.threads, optimized_path=opt
        )
        ops = sorted({n.op_type for n in onnx.load(str(opt)).graph.node})
        out = run_batched(sessions[name], ctx.eval_inputs)
        import torch

        acc = float(top1_accuracy(torch.from_numpy(out), ctx.task.eval_targets))
        rows.append(
            {
                "task": task,
                "graph": name,
                "what": g["kind"],
                "accuracy_ort": acc,
                "accuracy_promised": g["promised"],
                "valid": g.get("valid"),
                "max_output_steps": g.get("steps"),
                "file_bytes": g["path"].stat().st_size,
                "integer_kernels": " ".join(
                    o for o in ops if o in INTEGER_KERNELS + ("MatMulNBits",)
                ),
            }
        )
    for batch in args.batches:
        sample = ctx.eval_inputs[:batch]
        timing = time_sessions(sessions, sample, repeats=args.repeats, threads=args.threads)
        for row in rows:
            t = timing[row["graph"]]
            row[f"ms_b{batch}"] = t.median_ms
            row[f"p10_p90_b{batch}"] = f"{t.p10_ms:.3f}-{t.p90_ms:.3f}"
    fp32 = next(r for r in rows if r["graph"] == "fp32")
    for row in rows:
        row["file_ratio"] = row["file_bytes"] / fp32["file_bytes"]
        for batch in args.batches:
            row[f"speedup_b{batch}"] = fp32[f"ms_b{batch}"] / row[f"ms_b{batch}"]
    return rows


def markdown(frame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["digits-cnn", "digits-mlp"])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--run", help="use this existing run directory (one task only)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench-export"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    if args.run and len(args.tasks) != 1:
        parser.error("--run needs exactly one --tasks")

    import logging

    import onnxruntime
    import pandas as pd

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice

    rows = []
    with tempfile.TemporaryDirectory(prefix="aq-bench-") as tmp:
        for task in args.tasks:
            rows += bench_task(task, args, Path(tmp))
    frame = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    frame.to_csv(Path(args.out) / "export_vs_ort.csv", index=False)
    cols = [
        "task",
        "graph",
        "what",
        "accuracy_promised",
        "accuracy_ort",
        "max_output_steps",
        "file_bytes",
        "file_ratio",
    ]
    cols += [c for b in args.batches for c in (f"ms_b{b}", f"speedup_b{b}")] + ["integer_kernels"]
    print(
        f"# exported front points vs fp32 vs ORT quantize_static "
        f"(onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), median of {args.repeats} runs, all measured in this run)"
    )
    print(markdown(frame[cols]))
    print(f"\nwritten: {Path(args.out) / 'export_vs_ort.csv'}")


if __name__ == "__main__":
    main()
