"""Exported front points vs the fp32 graph vs ONNX Runtime's own quantization tools.

For each built-in task: a search (or an existing run with ``--run``), every front point exported
and validated by ``autoquant export``'s pipeline, the fp32 graph, ORT's ``quantize_static`` of the
same fp32 graph (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the same
calibration samples; once plain and once with ``reduce_range``, ORT's setting for CPUs without
VNNI) and ORT's ``quantize_dynamic`` (int8 weights, activations quantized at run time: the path
ORT recommends for transformers). All graphs are timed in one interleaved loop in the same
process, at batch 1 and at the batches ``--batches`` names, on the threads of the ``cpu-local-ort``
profile (``--threads`` overrides), so the latencies are comparable; quality is the task metric
measured in ORT (ORT_ENABLE_ALL) on the task's eval data one sample at a time, as deployed; file size is the ``.onnx`` size. Every
figure here is measured.

The verdict lines at the end compare, per task, the fastest front point whose ORT quality is
within 1 point of fp32 (``--within 0.01``) and the fastest at quality equal to or better than
each ORT baseline, against fp32 and those baselines; and list front points slower than fp32.

    python benchmarks/export_vs_ort.py                     # digits-cnn, digits-resnet, minilm-embed
    python benchmarks/export_vs_ort.py --tasks digits-resnet --run results/digits-resnet
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


def spec_for(task: str, work: Path, trials: int | None) -> Path:
    """The task's example spec (``examples/<name>.yaml``), or digits-cnn's with the task
    swapped in; ``trials`` overrides the budget."""
    examples = {"digits-cnn": "digits-cnn", "digits-resnet": "digits-resnet", "minilm-embed": "minilm"}
    source = ROOT / "examples" / f"{examples.get(task, 'digits-cnn')}.yaml"
    text = source.read_text().replace("space: ../", f"space: {ROOT}/")
    if task not in examples:
        text = text.replace("name: digits-cnn", f"name: {task}").replace(
            "task: digits-cnn", f"task: {task}"
        )
    path = work / f"{task}.yaml"
    path.write_text(text)
    return path


class _Reader:
    """Calibration feeds in batches of 64 for ORT's quantize_static."""

    def __init__(self, calib) -> None:
        from autoquant.export.validate import feed_count, feed_slice

        n = feed_count(calib)
        self.items = iter([feed_slice(calib, i, i + 64) for i in range(0, n, 64)])

    def get_next(self):
        item = next(self.items, None)
        if item is None or isinstance(item, dict):
            return item
        return {"input": item}


def ort_static(fp32_path: Path, out_path: Path, calib, *, reduce_range: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    quantize_static(
        str(fp32_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
        calibrate_method=CalibrationMethod.MinMax,
    )


def quantize_elsewhere(kind: str, fp32_path: Path, out_path: Path, calib_path: Path) -> None:
    """ORT's quantization tools in a process of their own: they open ORT sessions with their
    own thread pools, which this process's shared pool (every autoquant session) forbids."""
    subprocess.run(
        [sys.executable, __file__, "--quantize-worker", kind, str(fp32_path), str(out_path), str(calib_path)],
        check=True,
        cwd=ROOT,
    )


def quantize_worker(kind: str, fp32_path: str, out_path: str, calib_path: str) -> None:
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    data = dict(np.load(calib_path))
    calib = data if len(data) > 1 else data["input"]
    if kind == "dynamic":
        ort_dynamic(Path(fp32_path), Path(out_path))
    else:
        ort_static(Path(fp32_path), Path(out_path), calib, reduce_range=kind == "static-rr")


def ort_dynamic(fp32_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)


def picked_rows(frame, points: int | None) -> list[int]:
    """Row positions of the front points to export: all, or the ``points`` with the lowest
    latency (predicted by the run's latency model) where the run has one, else the smallest."""
    if points is None or points >= len(frame):
        return list(range(len(frame)))
    lat = [c for c in frame.columns if c.startswith("latency_ms@") and not c.endswith("_source")]
    order = frame.reset_index(drop=True).sort_values(lat[0] if lat else "size_bytes")
    return sorted(order.index[:points].tolist())


def profile_threads() -> int:
    """The intra-op threads of the cpu-local-ort profile (``auto``: this machine's cores)."""
    from autoquant.hardware.profile import load_profile

    return int(load_profile(ROOT / "hw_profiles" / "cpu-local-ort.yaml").threads)


def bench_task(task: str, args, work: Path) -> list[dict]:
    import onnx

    from autoquant.export.pick import load_front
    from autoquant.export.pipeline import ExportContext, ExportOptions, export_point
    from autoquant.export.validate import INTEGER_KERNELS, open_session, run_batched, time_sessions

    run_dir = Path(args.run) if args.run else Path(args.out) / task
    if not (run_dir / "pareto.csv").exists():
        trials = ["--trials", str(args.trials)] if args.trials else []
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autoquant.cli",
                "search",
                str(spec_for(task, work, args.trials)),
                "--out",
                str(run_dir),
                *trials,
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    front = load_front(run_dir)
    ctx = ExportContext(front, work)
    graphs: dict[str, dict] = {"fp32": {"path": ctx.fp32_path, "kind": "fp32", "promised": None}}
    from autoquant.model_inputs import take, to_feeds

    calib = to_feeds(take(ctx.task.calibration_inputs, ctx.run.spec.evaluation.calibration_samples))
    if len(calib) == 1:
        calib = next(iter(calib.values()))
    calib_path = work / f"{task}-calib.npz"
    np.savez(calib_path, **(calib if isinstance(calib, dict) else {"input": calib}))
    for rr in (False, True):
        name = "ort-static-qdq" + ("-reduce-range" if rr else "")
        path = work / f"{task}-{name}.onnx"
        quantize_elsewhere("static-rr" if rr else "static", ctx.fp32_path, path, calib_path)
        graphs[name] = {"path": path, "kind": "ort quantize_static", "promised": None}
    path = work / f"{task}-ort-dynamic.onnx"
    quantize_elsewhere("dynamic", ctx.fp32_path, path, calib_path)
    graphs["ort-dynamic"] = {"path": path, "kind": "ort quantize_dynamic", "promised": None}
    for weight_only in args.weight_only:
        options = ExportOptions(latency_repeats=0, threads=args.threads, weight_only=weight_only)
        suffix = "" if weight_only == "fold" else f"-{weight_only}"
        for i in picked_rows(front.frame, args.points):
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
        # batch 1, as deployed: a dynamically quantized graph (ours or quantize_dynamic's) takes
        # its activation ranges over whatever batch it is fed
        out = run_batched(sessions[name], ctx.eval_inputs, batch_size=1)
        import torch

        acc = float(ctx.task.metric(torch.from_numpy(out), ctx.task.eval_targets))
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
    from autoquant.export.validate import feed_slice

    for batch in args.batches:
        sample = feed_slice(ctx.eval_inputs, 0, batch)
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


def verdicts(frame, batches: list[int], within: float) -> list[str]:
    """Per task: the fastest front point within ``within`` of fp32's quality and the fastest at
    quality >= each ORT baseline, as ratios to fp32 and to that baseline (measured here)."""
    lines = []
    for task, rows in frame.groupby("task", sort=False):
        get = {r["graph"]: r for _, r in rows.iterrows()}
        fp32 = get["fp32"]
        front = rows[rows["what"].str.startswith("front")]
        for batch in batches:
            ms = f"ms_b{batch}"

            def fastest(min_quality: float, front=front, ms=ms):
                ok = front[front["accuracy_ort"] >= min_quality - 1e-12]
                return None if ok.empty else ok.loc[ok[ms].idxmin()]

            best = fastest(fp32["accuracy_ort"] - within)
            if best is None:
                lines.append(f"{task} b{batch}: no front point within {within:g} of fp32")
            else:
                lines.append(
                    f"{task} b{batch}: fastest front point within {within:g} of fp32 "
                    f"({best['graph']}, {best['accuracy_ort']:.4f} vs {fp32['accuracy_ort']:.4f}): "
                    f"{best[ms]:.3f} ms, {fp32[ms] / best[ms]:.2f}x fp32"
                    + "".join(
                        f", {get[b][ms] / best[ms]:.2f}x {b}"
                        for b in ("ort-static-qdq", "ort-dynamic")
                        if b in get
                    )
                )
            for base in ("ort-static-qdq", "ort-dynamic"):
                if base not in get:
                    continue
                ref = get[base]
                best = fastest(ref["accuracy_ort"])
                if best is None:
                    lines.append(f"{task} b{batch}: no front point at quality >= {base} ({ref['accuracy_ort']:.4f})")
                    continue
                lines.append(
                    f"{task} b{batch}: fastest front point at quality >= {base} "
                    f"({ref['accuracy_ort']:.4f}): {best['graph']} {best['accuracy_ort']:.4f}, "
                    f"{best[ms]:.3f} ms = {ref[ms] / best[ms]:.2f}x {base}, {fp32[ms] / best[ms]:.2f}x fp32"
                )
            slow = front[front[ms] > fp32[ms]]
            lines.append(
                f"{task} b{batch}: front points slower than fp32: "
                + (", ".join(slow["graph"]) if len(slow) else "none")
            )
    return lines


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
    if len(sys.argv) == 6 and sys.argv[1] == "--quantize-worker":
        quantize_worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["digits-cnn", "digits-resnet", "minilm-embed"])
    parser.add_argument("--trials", type=int, help="search budget (default: the example's)")
    parser.add_argument("--run", help="use this existing run directory (one task only)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench-export"))
    parser.add_argument("--threads", type=int, help="default: the cpu-local-ort profile's")
    parser.add_argument("--within", type=float, default=0.01, help="quality margin to fp32")
    parser.add_argument(
        "--points", type=int, help="export only this many front points (the fastest by the run's "
        "predicted latency, else the smallest); default: all"
    )
    parser.add_argument(
        "--weight-only", nargs="+", default=["fold"], choices=["fold", "dq"],
        help="export forms of weight-only layers to compare (default: the export's default)",
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    if args.threads is None:
        args.threads = profile_threads()
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
        f"# exported front points vs fp32 vs ORT quantize_static / quantize_dynamic "
        f"(onnxruntime {onnxruntime.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), median of {args.repeats} runs, all measured in this run)"
    )
    print(markdown(frame[cols]))
    print()
    print("\n".join(verdicts(frame, args.batches, args.within)))
    print(f"\nwritten: {Path(args.out) / 'export_vs_ort.csv'}")


if __name__ == "__main__":
    main()
