"""Validation of an exported graph: checker, ORT at two optimization levels, agreement with the
torch simulation, the task metric re-measured in ORT, latency beside the fp32 graph.

Every check is a ``Check`` value with the measured figure, the limit and a one-line message;
``Validation.failures`` are the ones beyond tolerance. Nothing here raises for a bad export:
a session that does not load is a failed check with its reason.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Levels every export is run at: no rewrites (what the graph says, literally) and everything ORT
# does in deployment (fused integer kernels, which ignore some QDQ attributes: both must agree).
LEVELS = ("disable_all", "enable_all")
# Kernels ORT runs on quantized data: integer arithmetic (int8 x int8) ...
INTEGER_KERNELS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
)
# ... and weight-only packed kernels (float activations).
WEIGHT_ONLY_KERNELS = ("MatMulNBits",)
QUANTIZED_KERNELS = INTEGER_KERNELS + WEIGHT_ONLY_KERNELS


@dataclass(frozen=True)
class Tolerances:
    """Limits an export must meet.

    ``output_steps``: max |ORT - simulation| over every output element of the eval data, in steps
    of the output's uint8 grid (the last layer's calibrated output range / 255). Rounding ties that
    ORT's integer kernels break differently from float math move one int8 activation by one step;
    the default leaves room for such a flip to propagate. ``accuracy``: |ORT metric - promised
    metric| (fraction: 0.005 = 0.5 points). ``file_overhead_bytes`` (+256 per node and
    initializer): how much larger than its initializers, as stored, the file may be.
    """

    output_steps: float = 3.0
    accuracy: float = 0.005
    file_overhead_bytes: int = 8192


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: float | None
    limit: float | None
    unit: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated single-batch runs, milliseconds (measured)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "source": "measured"}


@dataclass
class Validation:
    checks: list[Check] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)
    optimized_ops: list[str] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "accuracy_ort": self.accuracy,
            "agreement": self.agreement,
            "quantized_kernels": self.kernels,
            "optimized_ops": self.optimized_ops,
            "latency": self.latency,
        }


# The intra-op threads of ONNX Runtime's process-wide pool once ``share_thread_pool`` made it;
# None while every session has a pool of its own.
_shared_pool_threads: int | None = None


def share_thread_pool(threads: int) -> None:
    """Run every later ONNX Runtime session of this process on one pool of ``threads``
    intra-op threads (made on the first call).

    A session's own pool keeps its idle workers spinning long after a run (a 20 ms pause did
    not calm them). With many sessions open and visited in turn (``autoquant.hw.interleave``),
    the workers of the sessions not running took the CPU from the one being timed: one-layer
    timings came out 2.0-4.5x their value alone on this 2-vCPU machine (median 3.1x;
    ``benchmarks/ort_thread_pool.py``: 1.04x shared). One shared pool is
    what a single deployed session runs on, and visits then time what a lone run does. ORT
    refuses sessions with pools of their own once it exists, so ``session_options`` gives
    every session the shared one from then on.

    Raises RuntimeError when the pool exists with another thread count."""
    global _shared_pool_threads
    if _shared_pool_threads == threads:
        return
    if _shared_pool_threads is not None:
        raise RuntimeError(
            f"ONNX Runtime's sessions in this process already share a pool of "
            f"{_shared_pool_threads} threads; {threads} asked: run it in a process of its own"
        )
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(threads, 1)
    _shared_pool_threads = threads


def session_threads(threads: int) -> int:
    """The intra-op threads a session asked to run on ``threads`` gets: the shared pool's,
    once there is one."""
    return threads if _shared_pool_threads is None else _shared_pool_threads


def session_options(level: str, *, threads: int = 1, optimized_path: Path | None = None):
    """ORT session options at optimization ``level`` with ``threads`` intra-op threads (the
    shared pool's once there is one: ``share_thread_pool``), sequential."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if _shared_pool_threads is None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    else:
        so.use_per_session_threads = False
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def open_session(
    model_path: Path | bytes, level: str, *, threads: int = 1, optimized_path: Path | None = None
):
    """An ORT CPU session on a file (or serialized model bytes) at ``level``."""
    import onnxruntime as ort

    return ort.InferenceSession(
        model_path if isinstance(model_path, bytes) else str(model_path),
        session_options(level, threads=threads, optimized_path=optimized_path),
        providers=["CPUExecutionProvider"],
    )


def run_batched(session, inputs: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(outs)


def check_structure(model_path: Path) -> list[Check]:
    """onnx.checker full check (which runs strict shape inference) and a shape inference pass
    whose output must give the graph output a shape."""
    import onnx

    checks = []
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        checks.append(Check("onnx_checker", True, None, None, "", "onnx.checker full_check passed"))
    except Exception as exc:  # noqa: BLE001 - a failed check is a result
        checks.append(
            Check("onnx_checker", False, None, None, "", f"onnx.checker failed: {_one_line(exc)}")
        )
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)), check_type=True)
        out = inferred.graph.output[0].type.tensor_type
        ok = out.HasField("shape") and out.elem_type == onnx.TensorProto.FLOAT
        checks.append(
            Check(
                "shape_inference",
                ok,
                None,
                None,
                "",
                "shape inference passed" if ok else "shape inference left the output untyped",
            )
        )
    except Exception as exc:  # noqa: BLE001
        checks.append(
            Check(
                "shape_inference",
                False,
                None,
                None,
                "",
                f"shape inference failed: {_one_line(exc)}",
            )
        )
    return checks


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:400]


def agreement(ort_out: np.ndarray, sim_out: np.ndarray, step: float) -> dict[str, float]:
    """How far ORT's outputs are from the simulation's, absolute and in output steps."""
    diff = np.abs(ort_out.astype(np.float64) - sim_out.astype(np.float64))
    return {
        "max_abs": float(diff.max()),
        "max_steps": float(diff.max() / step),
        "p999_steps": float(np.quantile(diff, 0.999) / step),
        "frac_over_1_step": float((diff > step * 1.0001).mean()),
        "top1_agreement": float((ort_out.argmax(-1) == sim_out.argmax(-1)).mean()),
        "step": float(step),
    }


def time_sessions(
    sessions: dict[str, Any],
    sample: np.ndarray,
    *,
    warmup: int = 20,
    repeats: int = 200,
    rounds: int = 5,
    threads: int = 1,
) -> dict[str, Timing]:
    """Latency of several sessions on the same input, interleaved in rounds so that load on the
    machine hits all of them alike."""
    for sess in sessions.values():
        feed = {sess.get_inputs()[0].name: sample}
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for key, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: sample}
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feed)
                times[key].append((time.perf_counter() - start) * 1e3)
    out = {}
    for key, ts in times.items():
        q = np.quantile(ts, [0.1, 0.9])
        out[key] = Timing(
            statistics.median(ts),
            float(q[0]),
            float(q[1]),
            len(ts),
            warmup,
            threads,
            int(sample.shape[0]),
        )
    return out


def validate_export(
    model_path: Path,
    fp32_path: Path,
    *,
    eval_inputs: np.ndarray,
    eval_targets: Any,
    metric: Any,
    sim_outputs: np.ndarray,
    output_step: float,
    promised_accuracy: float | None,
    expected_int_kernels: bool,
    tolerances: Tolerances = Tolerances(),
    sample: np.ndarray | None = None,
    threads: int = 1,
    latency_repeats: int = 200,
    work_dir: Path | None = None,
) -> Validation:
    """Run every check on the graph at ``model_path``; ``fp32_path`` is the float graph of the
    same model (latency baseline). ``sim_outputs`` are the torch simulation's outputs on
    ``eval_inputs``."""
    import torch

    v = Validation()
    v.checks.extend(check_structure(model_path))
    sessions = {}
    work_dir = work_dir or model_path.parent
    for level in LEVELS:
        opt_path = work_dir / f".optimized_{level}.onnx" if level == "enable_all" else None
        try:
            sessions[level] = open_session(
                model_path, level, threads=threads, optimized_path=opt_path
            )
            v.checks.append(
                Check(f"ort_session_{level}", True, None, None, "", f"ORT session loads at {level}")
            )
        except Exception as exc:  # noqa: BLE001
            v.checks.append(
                Check(
                    f"ort_session_{level}",
                    False,
                    None,
                    None,
                    "",
                    f"ORT session at {level} failed: {_one_line(exc)}",
                )
            )
            continue
        if opt_path is not None and opt_path.exists():
            import onnx

            ops = sorted({n.op_type for n in onnx.load(str(opt_path)).graph.node})
            opt_path.unlink()
            v.optimized_ops = ops
            v.kernels = [op for op in ops if op in QUANTIZED_KERNELS]
        try:
            out = run_batched(sessions[level], eval_inputs)
        except Exception as exc:  # noqa: BLE001
            v.checks.append(
                Check(
                    f"ort_run_{level}",
                    False,
                    None,
                    None,
                    "",
                    f"ORT run at {level} failed: {_one_line(exc)}",
                )
            )
            continue
        ag = agreement(out, sim_outputs, output_step)
        v.agreement[level] = ag
        ok = bool(np.isfinite(out).all()) and ag["max_steps"] <= tolerances.output_steps
        v.checks.append(
            Check(
                f"agreement_{level}",
                ok,
                ag["max_steps"],
                tolerances.output_steps,
                "output steps",
                f"ORT ({level}) vs torch simulation: max |diff| {ag['max_abs']:.4g} = {ag['max_steps']:.2f} "
                f"output steps (limit {tolerances.output_steps:g}; step {output_step:.4g})",
            )
        )
        acc = float(metric(torch.from_numpy(out), eval_targets))
        v.accuracy[level] = acc
    if "enable_all" in v.accuracy and promised_accuracy is not None:
        acc = v.accuracy["enable_all"]
        delta = acc - promised_accuracy
        v.checks.append(
            Check(
                "accuracy",
                abs(delta) <= tolerances.accuracy,
                delta,
                tolerances.accuracy,
                "fraction",
                f"accuracy in ORT {acc:.4f} (measured) vs promised {promised_accuracy:.4f}: "
                f"{100 * delta:+.2f} points (limit ±{100 * tolerances.accuracy:g})",
            )
        )
    if expected_int_kernels and "enable_all" in sessions:
        ok = any(k in INTEGER_KERNELS for k in v.kernels)
        v.checks.append(
            Check(
                "integer_kernels",
                ok,
                None,
                None,
                "",
                f"optimized graph runs {', '.join(v.kernels) or 'no integer kernel'}"
                + ("" if ok else " although the config has int8 weight+activation layers"),
            )
        )
    size = os.path.getsize(model_path)
    import onnx

    from autoquant.export.graph import weight_bytes

    loaded = onnx.load(str(model_path))
    stored = weight_bytes(loaded)
    # graph structure: a fixed allowance plus some per node and per initializer (names, attrs)
    overhead = tolerances.file_overhead_bytes + 256 * (
        len(loaded.graph.node) + len(loaded.graph.initializer)
    )
    limit = stored + overhead
    v.checks.append(
        Check(
            "file_size",
            size <= limit,
            float(size),
            float(limit),
            "bytes",
            f"file {size} bytes vs {stored} bytes of initializers as stored "
            f"(limit {limit}: weights must be stored packed)",
        )
    )
    if "enable_all" in sessions and latency_repeats > 0:
        if sample is None:
            sample = eval_inputs[:1]
        fp32 = open_session(fp32_path, "enable_all", threads=threads)
        timing = time_sessions(
            {"export": sessions["enable_all"], "fp32": fp32},
            sample,
            repeats=latency_repeats,
            threads=threads,
        )
        v.latency = {
            "export": timing["export"].to_dict(),
            "fp32": timing["fp32"].to_dict(),
            "speedup_vs_fp32": timing["fp32"].median_ms / timing["export"].median_ms,
            "level": "enable_all",
        }
    return v
