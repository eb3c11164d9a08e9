"""The ONNX Runtime latency backend: each layer as a one-layer graph in the exporter's exact form.

For each (layer, choice): a torch module holding only that layer (the ``LayerInfo`` shapes,
random weights from a fixed seed; a Linear on ``[batch, tokens, features]`` gets input of that
rank, so the graph timed is the one the whole model runs; grouped and depthwise convolutions
keep their groups) is calibrated on fixed-seed random inputs and written by
``autoquant.onnxgraph.graph.export_graph`` with its default options, so the graph ORT times is the
one ``autoquant export`` would write for that layer (QDQ int8 with int32 bias, MatMulNBits,
blocked INT4 ``DequantizeLinear``, fp16 weights...). An ORT CPU session (``ORT_ENABLE_ALL``,
sequential, on the process-wide pool of the profile's threads that every session shares:
``export.validate.share_thread_pool``) runs it once at the profile's
batch size, its output is checked against the torch simulation of the same choice, and then it
is timed like TVM's ``time_evaluator``: ``warmup`` calls, then ``repeat`` samples, each the mean
over enough calls (at least ``number``) to last ``min_repeat_ms``.

The one-layer graph's output is the graph's output, so an int8 output is dequantized the way the
exporter writes a model's last layer (``Cast``/``Sub``/``Mul``, see ``_protect_float_consumers``),
and an int8 input is quantized from float: the few elementwise ops this adds, and those a whole
model fuses away, are left to the latency model's calibration.

``measure_model`` times a whole model exported the same way (the end-to-end figure the latency
model is checked against), fed fixed-seed random values for one float input and the task's own
samples for named or integer inputs (``backends.inputs``). ``timeout_s`` bounds each measurement: an export + session start
slower than it, or a timing predicted to run past it, is ``failed`` with a timeout; a single
``session.run`` cannot be interrupted, so a call that hangs is not bounded. Every error is a
``failed`` ``KernelTiming``; nothing here raises for a bad layer or a runtime fault.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoquant.backends.contract import LatencyBackend, PreparedModel, short_error
from autoquant.backends.inputs import InputsLike, ModelInputs
from autoquant.errors import UserError
from autoquant.hardware.profile import HardwareProfile
from autoquant.measure.interleave import TIMING_METHOD
from autoquant.measure.timing import KernelTiming
from autoquant.space.searchspace import why_invalid
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig
from autoquant.versions import cpu_name

# Bump when export_graph's graph form or the one-layer wrapping here changes: timings of the old
# graphs then stop matching the fingerprint and are measured again.
EXPORT_FORM_VERSION = 2  # 2: weight-only layers folded (export default), N-D Linear via Gemm
LEVEL = "enable_all"
THREAD_POOL = "shared"
LAYER_NAME = "layer"  # the attribute the one-layer module keeps its layer under
SEED = 0
CALIBRATION_SAMPLES = 32
# Output agreement with the simulation: float graphs compute the simulation's numbers up to
# summation order; integer kernels may break a rounding tie the other way, moving an int8
# activation by a step that the next product spreads over a few output steps.
REL_TOL = 1e-3
OUTPUT_STEPS = 4.0


@dataclass(frozen=True)
class ConvArgs:
    """A Conv2d as torch builds it (dilation 1), inferred from a ``LayerInfo``'s shapes."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int


def _axis(size: int, kernel: int, out: int) -> tuple[int, int] | None:
    """(stride, padding) of one spatial axis, the smallest stride first; None when none fits."""
    for stride in range(1, max(size, kernel) + 1):
        for pad in range(kernel):
            if (size + 2 * pad - kernel) // stride + 1 == out:
                return stride, pad
    return None


def conv_geometry(layer: LayerInfo) -> ConvArgs | str:
    """The layer's Conv2d, or the reason its shapes do not describe one the exporter writes."""
    if len(layer.weight_shape) != 4 or len(layer.input_shape) != 4 or len(layer.output_shape) != 4:
        return f"conv layer with weight {layer.weight_shape}: only 2-D convolutions are exported"
    o, i_per_group, kh, kw = layer.weight_shape
    _, c, h, w = layer.input_shape
    _, oc, oh, ow = layer.output_shape
    if i_per_group < 1 or c % i_per_group or o % (c // i_per_group) or oc != o:
        return f"conv weight {layer.weight_shape} does not fit input {layer.input_shape}"
    rows, cols = _axis(h, kh, oh), _axis(w, kw, ow)
    if rows is None or cols is None:
        return (
            f"cannot infer stride/padding of a {kh}x{kw} conv from {h}x{w} -> {oh}x{ow} "
            "(dilated convolutions are not profiled)"
        )
    return ConvArgs(c, o, (kh, kw), (rows[0], cols[0]), (rows[1], cols[1]), groups=c // i_per_group)


def layer_module(layer: LayerInfo) -> Any:
    """A module whose only quantizable layer is ``LAYER_NAME``, with ``layer``'s shapes and
    fixed-seed random weights (torch's default initialization; the global RNG is untouched)."""
    import torch

    class OneLayer(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, LAYER_NAME, inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, LAYER_NAME)(x)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if layer.kind == "linear":
            out, inp = layer.weight_shape
            inner: torch.nn.Module = torch.nn.Linear(inp, out, bias=layer.has_bias)
        else:
            geo = conv_geometry(layer)
            if isinstance(geo, str):
                raise ValueError(geo)
            inner = torch.nn.Conv2d(
                geo.in_channels,
                geo.out_channels,
                geo.kernel,
                stride=geo.stride,
                padding=geo.padding,
                groups=geo.groups,
                bias=layer.has_bias,
            )
    return OneLayer(inner).eval()


def random_inputs(shape: tuple[int, ...], seed: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)


class _Timeout(Exception):
    pass


@dataclass(frozen=True)
class _Exported:
    graph: Any  # autoquant.onnxgraph.graph's ExportedGraph
    session: Any
    feed: dict[str, np.ndarray]
    calibration: Any


class OrtBackend(LatencyBackend):
    def __init__(self, profile: HardwareProfile) -> None:
        import onnxruntime as ort

        self.profile = profile
        self.ort_version = str(ort.__version__)
        # the profile's execution provider (CPU unless it names another this build has)
        self.provider = profile.spec.execution_provider
        available = ort.get_available_providers()
        if self.provider not in available:
            raise UserError(
                f"bad value {self.provider!r}: this onnxruntime build has no such execution "
                f"provider; allowed: {', '.join(available)}",
                file=profile.path,
                key="execution_provider",
            )
        # the one-layer sessions measured here, kept open for more rounds (``kernel_visitor``)
        self._loaded: dict[tuple[LayerInfo, str], tuple[Any, dict[str, np.ndarray], float]] = {}

    # --- contract ---------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        import torch

        from autoquant.onnxgraph.graph import OPSET

        p = self.profile
        return {
            "target": p.target,
            "host_cpu": cpu_name(),
            "host_arch": platform.machine(),
            "runtime": "onnxruntime",
            "runtime_version": self.ort_version,
            "execution_provider": self.provider,
            "optimization": LEVEL,
            "timing": TIMING_METHOD,
            "threads": p.threads,
            # every session on one process-wide pool (``share_thread_pool``): timings taken
            # with a pool per session were inflated by the idle sessions' spinning workers
            "thread_pool": THREAD_POOL,
            "batch": p.spec.batch_size,
            # the float graph comes from torch's exporter: its version is part of the form
            "kernels": f"export-form-{EXPORT_FORM_VERSION}/opset-{OPSET}/torch-{torch.__version__}",
        }

    def exclusion(self, layer: LayerInfo, choice: QuantChoice) -> str | None:
        p = self.profile
        if not p.is_local:
            return "ONNX Runtime profiles run locally only"
        if p.target_kind != "llvm":
            return (
                f"target kind {p.target_kind!r}: the ONNX Runtime backend runs the CPU "
                "execution provider only"
            )
        unsupported = self.format_exclusion(choice)
        if unsupported is not None:
            return unsupported
        invalid = why_invalid(layer, choice)
        if invalid:
            return invalid
        if layer.kind == "linear":
            # a Linear on [batch, tokens, features] is timed on input of that rank: the graph
            # is the one the whole model runs (the exporter's Reshape -> Gemm -> Reshape)
            if len(layer.weight_shape) != 2 or len(layer.input_shape) < 2:
                return (
                    f"a Linear with weight {layer.weight_shape} on input {layer.input_shape}: "
                    "allowed: a 2-D weight on input of rank 2 or more"
                )
            if layer.input_shape[-1] != layer.weight_shape[1]:
                return (
                    f"a Linear with weight {layer.weight_shape} does not fit input "
                    f"{layer.input_shape}"
                )
            return None
        geo = conv_geometry(layer)
        return geo if isinstance(geo, str) else None

    def measure(self, layer: LayerInfo, choice: QuantChoice) -> KernelTiming:
        reason = self.exclusion(layer, choice)
        if reason is not None:
            return KernelTiming.excluded(reason)
        start = time.monotonic()
        config = QuantConfig(((LAYER_NAME, choice),))
        details: dict[str, Any] = {}
        impl = "ort"
        try:
            module = layer_module(layer)
            exported = self._export(module, layer.input_shape, config, details)
            form = exported.graph.layers[0].form
            acts = "" if choice.act_bits == 32 else "-" + choice.label.split("-")[1]  # a8, a8d
            impl = f"ort:{form}{acts}"
        except Exception as exc:
            return KernelTiming.failed(
                f"export error: {short_error(exc)}",
                impl,
                build_s=time.monotonic() - start,
                details=details,
            )
        build_s = time.monotonic() - start
        timeout = self._build_timeout(build_s)
        if timeout:
            return KernelTiming.failed(timeout, impl, build_s=build_s, details=details)
        session, feed, calibration = exported.session, exported.feed, exported.calibration
        try:
            once, out = self._first_call(session, feed)
            if self.profile.spec.measure.verify:
                import torch

                from autoquant.quant import apply

                x = torch.from_numpy(next(iter(feed.values())))
                with torch.no_grad():
                    expected = apply(module, config, calibration)(x).numpy()
                step = calibration.output_params(LAYER_NAME).scale if choice.act_static_int8 else 0
                problem = _disagreement(out, expected, step)
                if problem:
                    return KernelTiming.failed(
                        f"wrong result: {problem}", impl, build_s=build_s, details=details
                    )
            samples, calls = self._time(session, feed, once, start)
        except _Timeout as exc:
            return KernelTiming.failed(
                str(exc),
                impl,
                build_s=build_s,
                measure_s=time.monotonic() - start - build_s,
                details=details,
            )
        except Exception as exc:
            return KernelTiming.failed(
                f"run error: {short_error(exc)}",
                impl,
                build_s=build_s,
                measure_s=time.monotonic() - start - build_s,
                details=details,
            )
        details["calls_per_sample"] = calls
        self._loaded[(layer, choice.label)] = (session, feed, float(np.median(samples)))
        return KernelTiming.from_samples(
            impl,
            samples,
            build_s=build_s,
            measure_s=time.monotonic() - start - build_s,
            details=details,
        )

    def kernel_visitor(
        self, layer: LayerInfo, choice: QuantChoice, seconds: float
    ) -> Callable[[], float] | None:
        loaded = self._loaded.get((layer, choice.label))
        if loaded is None:
            return None
        session, feed, per_call = loaded
        warmup = self.profile.spec.measure.warmup
        return lambda: _visit(session, feed, per_call, warmup, seconds)

    def close(self) -> None:
        self._loaded.clear()

    def prepare_model(
        self,
        model: Any,
        inputs: InputsLike | ModelInputs,
        layers: tuple[LayerInfo, ...] | list[LayerInfo],
        config: QuantConfig,
    ) -> PreparedModel | KernelTiming:
        """The whole model as ``config`` exports it, in an ORT session, run once and checked.

        ``inputs``: a batch-1 shape or one float tensor (calibrated and fed fixed-seed random
        values: they move the scales, not the latency), or the task's named / integer example
        inputs, fed as they are (``backends.inputs``). A layer whose choice this profile excludes
        makes the result ``excluded``."""
        impl = "model"
        chosen = config.as_mapping()
        missing = [layer.name for layer in layers if layer.name not in chosen]
        if missing:
            return KernelTiming.failed(f"config has no choice for {', '.join(missing[:5])}", impl)
        reason = self.config_exclusion(layers, config)
        if reason is not None:
            return KernelTiming.excluded(reason)
        start = time.monotonic()
        details: dict[str, Any] = {}
        try:
            exported = self._export(model, inputs, config, details)
        except Exception as exc:
            return KernelTiming.failed(
                f"export error: {short_error(exc)}",
                impl,
                build_s=time.monotonic() - start,
                details=details,
            )
        build_s = time.monotonic() - start
        timeout = self._build_timeout(build_s)
        if timeout:
            return KernelTiming.failed(timeout, impl, build_s=build_s, details=details)
        session, feed, batch = exported.session, exported.feed, self.profile.spec.batch_size
        try:
            once, out = self._first_call(session, feed)
        except Exception as exc:
            return KernelTiming.failed(
                f"run error: {short_error(exc)}", impl, build_s=build_s, details=details
            )
        if out.shape[0] != batch or not np.isfinite(out).all():
            return KernelTiming.failed(
                f"wrong result: output of shape {out.shape} with non-finite values"
                if out.shape[0] == batch
                else f"wrong result: output batch {out.shape[0]}, expected {batch}",
                impl,
                build_s=build_s,
                details=details,
            )
        return _OrtModel(self, session, feed, once=once, build_s=build_s, details=details)

    # --- work -------------------------------------------------------------------------------

    def _export(
        self,
        module: Any,
        inputs: InputsLike | ModelInputs,
        config: QuantConfig,
        details: dict[str, Any],
    ) -> _Exported:
        """Calibrate ``module``, export it under ``config`` as ``autoquant export`` would, and
        open the timed session on an input at the profile's batch size. ``inputs``: a batch-1
        shape or one float tensor (fixed-seed random values: they move the scales, not the
        latency), or named / integer inputs (the task's own samples, repeated to the batch;
        ``backends.inputs``). Raises on failure; ``details`` gets the input shape, the exported forms
        and the op types ORT runs."""
        from autoquant.onnxgraph.graph import export_graph
        from autoquant.quant import calibrate

        model_inputs = ModelInputs.of(inputs)
        batch = self.profile.spec.batch_size
        details["input_shape"] = model_inputs.describe(batch)
        calibration = calibrate(module, model_inputs.calibration(seed=SEED))
        graph = export_graph(module, model_inputs.export_arg(), config, calibration)
        forms: dict[str, int] = {}
        for exported in graph.layers:
            forms[exported.form] = forms.get(exported.form, 0) + 1
        details["forms"] = forms
        session, details["ops"] = self._session(graph.model)
        feed = _session_feed(session, model_inputs.feeds(batch, seed=SEED + 1))
        return _Exported(graph, session, feed, calibration)

    def _options(self, optimized_path: str | None = None) -> Any:
        import onnxruntime as ort

        from autoquant.backends.ort.session import session_options, share_thread_pool

        share_thread_pool(self.profile.threads)
        so = session_options(LEVEL, threads=self.profile.threads)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if optimized_path is not None:
            so.optimized_model_filepath = optimized_path
        return so

    def _session(self, model: Any) -> tuple[Any, list[str]]:
        """The timed session, and the op types ORT runs after optimization (read from a second
        session that saves its graph: saving is kept off the timed one)."""
        import os
        import tempfile

        import onnx
        import onnxruntime as ort

        data = model.SerializeToString()
        with tempfile.TemporaryDirectory(prefix="autoquant-ort-") as tmp:
            path = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(data, self._options(path), providers=[self.provider])
            ops = sorted({n.op_type for n in onnx.load(path, load_external_data=False).graph.node})
        return ort.InferenceSession(data, self._options(), providers=[self.provider]), ops

    def _build_timeout(self, build_s: float) -> str | None:
        limit = self.profile.spec.measure.timeout_s
        if build_s > limit:
            return (
                f"timeout: the export and session start took {build_s:.2f} s > timeout_s {limit:g}"
            )
        return None

    @staticmethod
    def _first_call(session: Any, feed: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        begin = time.perf_counter()
        out = session.run(None, feed)[0]
        return time.perf_counter() - begin, np.asarray(out)

    def _time(
        self,
        session: Any,
        feed: dict[str, np.ndarray],
        once: float,
        start: float,
        repeat: int | None = None,
    ) -> tuple[list[float], int]:
        """``repeat`` samples (seconds per call; default ``measure.repeat``), each the mean over
        ``calls`` calls lasting at least ``min_repeat_ms``, as TVM's ``time_evaluator`` grows
        ``number``; raises ``_Timeout`` when the timing would run, or runs, past
        ``timeout_s``."""
        m = self.profile.spec.measure
        repeat = m.repeat if repeat is None else repeat
        min_s = m.min_repeat_ms / 1000.0
        deadline = start + m.timeout_s
        predicted = m.warmup * once + repeat * max(min_s, m.number * once)
        if time.monotonic() + predicted > deadline:
            raise _Timeout(
                f"timeout: one call takes {once * 1e3:.3g} ms, timing it as configured needs "
                f"~{predicted:.3g} s more, past timeout_s {m.timeout_s:g}"
            )
        run = session.run
        for _ in range(m.warmup):
            run(None, feed)
        calls = max(m.number, 1)
        samples: list[float] = []
        while len(samples) < repeat:
            if time.monotonic() > deadline:
                raise _Timeout(
                    f"timeout: {len(samples)} of {repeat} samples taken when timeout_s "
                    f"{m.timeout_s:g} ran out"
                )
            begin = time.perf_counter()
            for _ in range(calls):
                run(None, feed)
            took = time.perf_counter() - begin
            if took < min_s:
                # too short to trust: grow the call count (golden ratio at least, like TVM)
                # and take the sample again
                per_call = max(took / calls, 1e-9)
                calls = max(math.ceil(min_s / per_call), math.ceil(calls * 1.618))
                continue
            samples.append(took / calls)
        return samples, calls


def _session_feed(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` under the session's input names: by name where they match, else in order (one
    tensor's default name ``input``); inputs the exported graph dropped (unused) are left out."""
    names = [i.name for i in session.get_inputs()]
    if set(names) <= set(feed):
        return {name: feed[name] for name in names}
    if len(names) <= len(feed):
        return dict(zip(names, feed.values()))
    missing = ", ".join(n for n in names if n not in feed)
    raise ValueError(f"the exported graph needs inputs {missing} that the model inputs lack")


def _disagreement(out: np.ndarray, expected: np.ndarray, step: float) -> str | None:
    """None when ORT's output matches the simulation loosely, else what differs."""
    if out.shape != expected.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    if not np.isfinite(out).all():
        return "non-finite outputs"
    diff = np.abs(out.astype(np.float64) - expected.astype(np.float64))
    limit = REL_TOL * max(1.0, float(np.abs(expected).max())) + OUTPUT_STEPS * step
    worst = float(diff.max()) if diff.size else 0.0
    if worst > limit:
        bad = int((diff > limit).sum())
        return (
            f"{bad} of {diff.size} outputs differ from the simulation by up to {worst:.4g} "
            f"(limit {limit:.4g})"
        )
    return None


class _OrtModel(PreparedModel):
    """An ORT session of a whole exported model, with its input feed."""

    def __init__(
        self,
        backend: OrtBackend,
        session: Any,
        feed: dict[str, np.ndarray],
        *,
        once: float,
        build_s: float,
        details: dict[str, Any],
    ) -> None:
        self.backend, self.session, self.feed, self.once = backend, session, feed, once
        self.build_s, self.details = build_s, details

    def time(self) -> list[float]:
        samples, self.details["calls_per_sample"] = self.backend._time(
            self.session,
            self.feed,
            self.once,
            time.monotonic(),
            self.backend.profile.spec.end_to_end.repeat,
        )
        return samples

    def visit(self, seconds: float) -> float:
        warmup = self.backend.profile.spec.measure.warmup
        return _visit(self.session, self.feed, self.once, warmup, seconds)

    def close(self) -> None:
        self.session = None


def _visit(
    session: Any, feed: dict[str, np.ndarray], per_call: float, warmup: int, seconds: float
) -> float:
    """One visit (``interleave``): ``warmup`` untimed runs, then runs for about ``seconds``;
    the mean seconds per run."""
    run = session.run
    for _ in range(warmup):
        run(None, feed)
    calls = max(1, math.ceil(seconds / max(per_call, 1e-9)))
    begin = time.perf_counter()
    for _ in range(calls):
        run(None, feed)
    return (time.perf_counter() - begin) / calls
