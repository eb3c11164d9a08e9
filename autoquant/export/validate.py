"""Validation of an exported graph: checker, ORT at two optimization levels, agreement with the
torch simulation, the task metric re-measured in ORT, latency beside the fp32 graph.

Every check is a ``Check`` value with the measured figure, the limit and a one-line message;
``Validation.failures`` are the ones beyond tolerance. Nothing here raises for a bad export:
a session that does not load is a failed check with its reason.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.backends.ort.session import (  # noqa: F401 - the session API in one place
    session_options,
    session_threads,
    share_thread_pool,
)

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
    # Deep quantized nets (a transformer's dozens of int8 layers): a rounding tie that ORT's
    # integer kernels break differently moves one activation one step, and later layers carry
    # and amplify it, so a few samples end far from the simulation while most agree. Such an
    # export passes when ORT's deviation from the simulation (rms over the eval outputs) is at
    # most this fraction of the config's own quantization error (rms of simulation - fp32): a
    # wrong scale, axis or form is as large as the quantization error itself or larger.
    relative_rms: float = 0.5
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
    round_medians_ms: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "round_medians_ms": list(self.round_medians_ms),
            "source": "measured",
        }


@dataclass
class Validation:
    checks: list[Check] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)
    optimized_ops: list[str] = field(default_factory=list)
    optimized_op_counts: dict[str, int] = field(default_factory=dict)
    weight_dequantize: list[str] = field(default_factory=list)
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
            "optimized_op_counts": self.optimized_op_counts,
            "weight_dequantize_per_call": self.weight_dequantize,
            "latency": self.latency,
        }


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


Feeds = np.ndarray | Mapping[str, np.ndarray]


def session_feeds(session, inputs: Feeds) -> dict[str, np.ndarray]:
    """``inputs`` as a feed of ``session``: one array goes to its first input; named arrays to
    the inputs of those names (a name the graph does not have, an input the model's forward
    never reads, is left out)."""
    if isinstance(inputs, Mapping):
        names = {i.name for i in session.get_inputs()}
        return {k: v for k, v in inputs.items() if k in names}
    return {session.get_inputs()[0].name: inputs}


def feed_count(inputs: Feeds) -> int:
    """Samples in ``inputs`` (first axis)."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return len(inputs)


def feed_slice(inputs: Feeds, start: int, stop: int) -> Feeds:
    if isinstance(inputs, Mapping):
        return {k: v[start:stop] for k, v in inputs.items()}
    return inputs[start:stop]


def run_batched(session, inputs: Feeds, *, batch_size: int = 512) -> np.ndarray:
    """The session's first output on every sample of ``inputs`` (one array, or named arrays as
    ``autoquant.model_inputs.to_feeds`` makes them), run in batches."""
    outs = [
        session.run(None, session_feeds(session, feed_slice(inputs, i, i + batch_size)))[0]
        for i in range(0, feed_count(inputs), batch_size)
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


def agreement(
    ort_out: np.ndarray, sim_out: np.ndarray, step: float, fp32_out: np.ndarray | None = None
) -> dict[str, float]:
    """How far ORT's outputs are from the simulation's, absolute and in output steps; with the
    float model's outputs, also relative to the simulation's own quantization error
    (``relative_rms``) and the share of samples within 3 steps."""
    diff = np.abs(ort_out.astype(np.float64) - sim_out.astype(np.float64))
    extra: dict[str, float] = {}
    if fp32_out is not None:
        quant_error = float(np.sqrt(np.mean((sim_out.astype(np.float64) - fp32_out) ** 2)))
        deviation = float(np.sqrt(np.mean(diff**2)))
        extra["relative_rms"] = deviation / quant_error if quant_error > 0 else (
            0.0 if deviation == 0 else math.inf
        )
        per_sample = diff.reshape(len(diff), -1).max(axis=1) / step
        extra["samples_within_3_steps"] = float((per_sample <= 3.0).mean())
    return {
        **extra,
        "max_abs": float(diff.max()),
        "max_steps": float(diff.max() / step),
        "p999_steps": float(np.quantile(diff, 0.999) / step),
        "frac_over_1_step": float((diff > step * 1.0001).mean()),
        "top1_agreement": float((ort_out.argmax(-1) == sim_out.argmax(-1)).mean()),
        "step": float(step),
    }


def time_sessions(
    sessions: dict[str, Any],
    sample: Feeds,
    *,
    warmup: int = 20,
    repeats: int = 200,
    rounds: int = 5,
    threads: int = 1,
    min_visit_ms: float = 25.0,
) -> dict[str, Timing]:
    """Latency of several sessions on the same input, interleaved in rounds (the order turning
    from round to round) so that load on the machine hits all of them alike; every round's
    median is kept (``slower_in_every_round`` compares two sessions round by round). A visit
    (one session's share of a round) is ``repeats / rounds`` runs and at least
    ``min_visit_ms``: 40 runs of a 20 µs graph would otherwise fit the whole measurement in a
    few milliseconds, inside a single burst of another process's load."""
    feeds = {key: session_feeds(sess, sample) for key, sess in sessions.items()}
    for key, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[key])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    by_round: dict[str, list[float]] = {k: [] for k in sessions}
    per_round = max(1, repeats // rounds)
    keys = list(sessions)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            sess, feed, these = sessions[key], feeds[key], []
            while len(these) < per_round or sum(these) < min_visit_ms:
                start = time.perf_counter()
                sess.run(None, feed)
                these.append((time.perf_counter() - start) * 1e3)
            times[key] += these
            by_round[key].append(statistics.median(these))
    out = {}
    for key, ts in times.items():
        q = np.quantile(ts, [0.1, 0.9])
        out[key] = Timing(
            statistics.median(ts),
            float(q[0]),
            float(q[1]),
            len(ts),
            warmup,
            session_threads(threads),  # what the sessions ran on (a shared pool's, if any)
            feed_count(sample),
            tuple(by_round[key]),
        )
    return out


def slower_in_every_round(a: Timing, b: Timing) -> bool:
    """Whether ``a`` was slower than ``b`` in every round they were timed in together (each
    round sees both at the same moments of the machine's speed); False without rounds."""
    pairs = list(zip(a.round_medians_ms, b.round_medians_ms))
    return bool(pairs) and all(x > y for x, y in pairs)


def validate_export(
    model_path: Path,
    fp32_path: Path,
    *,
    eval_inputs: Feeds,
    eval_targets: Any,
    metric: Any,
    sim_outputs: np.ndarray,
    output_step: float,
    promised_accuracy: float | None,
    expected_int_kernels: int | bool,
    weight_dq_allowed: bool = False,
    format_weight_dq: int = 0,
    tolerances: Tolerances = Tolerances(),
    sample: Feeds | None = None,
    threads: int = 1,
    latency_repeats: int = 200,
    work_dir: Path | None = None,
    batch_size: int = 512,
    fp32_outputs: np.ndarray | None = None,
) -> Validation:
    """Run every check on the graph at ``model_path``; ``fp32_path`` is the float graph of the
    same model (latency baseline).

    Args:
        eval_inputs: one array or named arrays (ORT feeds, see
            ``autoquant.model_inputs.to_feeds``); ``sim_outputs`` are the torch simulation's
            outputs on them.
        expected_int_kernels: how many layers must run an integer kernel (int8 weights and
            activations); ``True`` means at least one.
        weight_dq_allowed: whether the optimized graph may dequantize weights on every call
            (``weight_only="dq"`` asked for it); otherwise a weight ``DequantizeLinear`` left
            after ORT's optimizations fails the ``weight_dequantize`` check.
        format_weight_dq: how many layers' weight formats are exported as a
            ``DequantizeLinear`` of their own codes (``WeightFormat.export_form`` "dequantize"):
            that many weight dequantizations per call are the form, not a failure.
        sample: the latency input (default: the first eval sample).
        fp32_outputs: the float model's outputs on the eval data (torch): with them, a graph
            beyond ``output_steps`` still agrees when its deviation is small against the
            config's quantization error (``Tolerances.relative_rms``).
        batch_size: samples per ORT run on the eval data; 1 for graphs with dynamic
            activations, whose ranges ORT takes over the whole tensor it gets and the
            simulation per sample.
    """
    expected = ExpectedOutputs(
        eval_inputs=eval_inputs,
        eval_targets=eval_targets,
        metric=metric,
        sim_outputs=sim_outputs,
        output_step=output_step,
        tolerances=tolerances,
        batch_size=batch_size,
        fp32_outputs=fp32_outputs,
    )
    v = Validation()
    v.checks.extend(check_structure(model_path))
    sessions = _check_levels(v, model_path, work_dir or model_path.parent, threads, expected)
    if "enable_all" in v.accuracy and promised_accuracy is not None:
        v.checks.append(_accuracy_check(v.accuracy["enable_all"], promised_accuracy, tolerances))
    if "enable_all" in sessions:
        v.checks.extend(
            _kernel_checks(v, int(expected_int_kernels), weight_dq_allowed, format_weight_dq)
        )
    v.checks.append(_file_size_check(model_path, tolerances))
    if "enable_all" in sessions and latency_repeats > 0:
        if sample is None:
            sample = feed_slice(eval_inputs, 0, 1)
        v.latency = _latency(model_path, fp32_path, sample, threads=threads, repeats=latency_repeats)
    return v


@dataclass(frozen=True)
class ExpectedOutputs:
    """What ORT's outputs on the eval data are checked against: the torch simulation's outputs
    (and the float model's, for ``Tolerances.relative_rms``), in output steps, and the metric."""

    eval_inputs: Feeds
    eval_targets: Any
    metric: Any
    sim_outputs: np.ndarray
    output_step: float
    tolerances: Tolerances
    batch_size: int = 512
    fp32_outputs: np.ndarray | None = None


def _check_levels(
    v: Validation, model_path: Path, work_dir: Path, threads: int, expected: ExpectedOutputs
) -> dict[str, Any]:
    """A session per optimization level that loads, each checked on the eval data; the
    optimized graph ORT runs read at ``enable_all``. Returns the sessions by level."""
    sessions = {}
    for level in LEVELS:
        opt_path = work_dir / f".optimized_{level}.onnx" if level == "enable_all" else None
        session = _open_checked(v, model_path, level, threads, opt_path)
        if session is None:
            continue
        sessions[level] = session
        if opt_path is not None and opt_path.exists():
            _read_optimized(v, opt_path)
        _check_outputs(v, session, level, expected)
    return sessions


def _accuracy_check(acc: float, promised: float, tolerances: Tolerances) -> Check:
    """ORT's accuracy (``ORT_ENABLE_ALL``) against the one the search measured."""
    delta = acc - promised
    return Check(
        "accuracy",
        abs(delta) <= tolerances.accuracy,
        delta,
        tolerances.accuracy,
        "fraction",
        f"accuracy in ORT {acc:.4f} (measured) vs promised {promised:.4f}: "
        f"{100 * delta:+.2f} points (limit ±{100 * tolerances.accuracy:g})",
    )


def _latency(
    model_path: Path, fp32_path: Path, sample: Feeds, *, threads: int, repeats: int
) -> dict[str, Any]:
    """The export's and the float graph's latency on ``sample``, timed interleaved."""
    # Fresh sessions for both: one that has run the eval data in batches of 512 keeps its
    # large arena blocks and ran batch 1 ~19% slower (a tiny transformer, measured).
    export = open_session(model_path, "enable_all", threads=threads)
    fp32 = open_session(fp32_path, "enable_all", threads=threads)
    timing = time_sessions({"export": export, "fp32": fp32}, sample, repeats=repeats, threads=threads)
    return {
        "export": timing["export"].to_dict(),
        "fp32": timing["fp32"].to_dict(),
        "speedup_vs_fp32": timing["fp32"].median_ms / timing["export"].median_ms,
        "slower_than_fp32": slower_in_every_round(timing["export"], timing["fp32"]),
        "level": "enable_all",
    }


def _open_checked(v: Validation, model_path: Path, level: str, threads: int, opt_path):
    """The session at ``level`` (None when it does not load), its check recorded in ``v``."""
    try:
        session = open_session(model_path, level, threads=threads, optimized_path=opt_path)
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
        return None
    v.checks.append(
        Check(f"ort_session_{level}", True, None, None, "", f"ORT session loads at {level}")
    )
    return session


def _read_optimized(v: Validation, opt_path: Path) -> None:
    """The op types of the graph ORT runs (saved at ``opt_path``, then deleted), its quantized
    kernels, and the weights it still dequantizes on every call."""
    import onnx

    graph = onnx.load(str(opt_path)).graph
    opt_path.unlink()
    inits = {i.name: i for i in graph.initializer}
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    v.optimized_ops = sorted(counts)
    v.optimized_op_counts = dict(sorted(counts.items()))
    v.kernels = [op for op in v.optimized_ops if op in QUANTIZED_KERNELS]
    v.weight_dequantize = [
        n.name or n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and math.prod(inits[n.input[0]].dims) > 1
        and inits[n.input[0]].data_type != onnx.TensorProto.INT32  # int32 bias of a kernel
    ]


def _check_outputs(v: Validation, session, level: str, expected: ExpectedOutputs) -> None:
    """Run the eval data at ``level``: agreement with the simulation, and the metric."""
    import torch

    tolerances, output_step = expected.tolerances, expected.output_step
    try:
        out = run_batched(session, expected.eval_inputs, batch_size=expected.batch_size)
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
        return
    ag = agreement(out, expected.sim_outputs, output_step, expected.fp32_outputs)
    v.agreement[level] = ag
    within_steps = ag["max_steps"] <= tolerances.output_steps
    relative = ag.get("relative_rms", math.inf)
    ok = bool(np.isfinite(out).all()) and (within_steps or relative <= tolerances.relative_rms)
    relative_text = (
        ""
        if within_steps or "relative_rms" not in ag
        else f"; deviation rms {relative:.3f} of the config's quantization error (limit "
        f"{tolerances.relative_rms:g}), {ag['samples_within_3_steps']:.0%} of samples within 3 steps"
    )
    v.checks.append(
        Check(
            f"agreement_{level}",
            ok,
            ag["max_steps"],
            tolerances.output_steps,
            "output steps",
            f"ORT ({level}) vs torch simulation: max |diff| {ag['max_abs']:.4g} = "
            f"{ag['max_steps']:.2f} output steps (limit {tolerances.output_steps:g}; "
            f"step {output_step:.4g}){relative_text}",
        )
    )
    v.accuracy[level] = float(expected.metric(torch.from_numpy(out), expected.eval_targets))


def _kernel_checks(
    v: Validation, expected: int, weight_dq_allowed: bool, format_dq: int = 0
) -> list[Check]:
    """Every int8 weight+activation layer runs an integer kernel; no weight is dequantized on
    every call unless asked for, or (``format_dq`` of them) their format's export form is a
    ``DequantizeLinear``."""
    checks = []
    if expected:
        found = sum(v.optimized_op_counts.get(k, 0) for k in INTEGER_KERNELS)
        ok = found >= expected
        ran = ", ".join(
            f"{v.optimized_op_counts[k]} {k}" for k in v.kernels if k in INTEGER_KERNELS
        )
        checks.append(
            Check(
                "integer_kernels",
                ok,
                float(found),
                float(expected),
                "kernels",
                f"optimized graph runs {ran or 'no integer kernel'} for {expected} int8 "
                "weight+activation layer(s)" + ("" if ok else ": ORT did not fuse them all"),
            )
        )
    n = len(v.weight_dequantize)
    ok = weight_dq_allowed or n <= format_dq
    checks.append(
        Check(
            "weight_dequantize",
            ok,
            float(n),
            None if weight_dq_allowed else float(format_dq),
            "nodes",
            f"optimized graph dequantizes {n} weight(s) on every call"
            + (f" ({', '.join(v.weight_dequantize[:4])})" if n else "")
            + (f", {format_dq} by their weight format's export form" if format_dq else "")
            + ("" if ok else ": --weight-only fold dequantizes them once at load"),
        )
    )
    return checks


def _file_size_check(model_path: Path, tolerances: Tolerances) -> Check:
    import onnx

    from autoquant.onnxgraph.graph import weight_bytes

    size = os.path.getsize(model_path)
    loaded = onnx.load(str(model_path))
    stored = weight_bytes(loaded)
    # graph structure: a fixed allowance plus some per node and per initializer (names, attrs)
    overhead = tolerances.file_overhead_bytes + 256 * (
        len(loaded.graph.node) + len(loaded.graph.initializer)
    )
    limit = stored + overhead
    return Check(
        "file_size",
        size <= limit,
        float(size),
        float(limit),
        "bytes",
        f"file {size} bytes vs {stored} bytes of initializers as stored "
        f"(limit {limit}: weights must be stored packed)",
    )
