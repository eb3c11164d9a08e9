"""The TVM latency backend: hand-scheduled per-layer kernels, timed locally or over RPC.

For each (layer, choice) at the profile's batch size: build the kernel (``tvm_kernels``), run it
once on random data and compare with the numpy reference (``measure.verify``), then time it with
``time_evaluator(number, repeat, min_repeat_ms)`` after ``warmup`` calls. Remote devices get the
compiled library uploaded through an RPC session from the profile's tracker.

``timeout_s`` bounds each kernel: after the build and one timed call the remaining work is
predicted (``repeat x max(min_repeat_ms, number x call)``) and a kernel that would run past the
deadline is reported ``failed`` with a timeout instead of being run; an RPC session's own
``session_timeout_s`` stops a remote that hangs.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any

import numpy as np

from autoquant.hw import tvm_kernels
from autoquant.hw._tvm import load_tvm, set_threads
from autoquant.hw.backend import LatencyBackend, PreparedModel
from autoquant.hw.kernels import (
    KERNEL_TEMPLATE_VERSION,
    KernelSpec,
    check_output,
    kernel_format,
    kernel_spec,
    make_data,
    output_dtype,
)
from autoquant.hw.profile import HardwareProfile, has_vnni, target_object
from autoquant.hw.rpc import request_session
from autoquant.hw.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig
from autoquant.versions import cpu_name


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # TVM errors end with the message; the first line is often a traceback header.
    text = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


class TvmBackend(LatencyBackend):
    def __init__(self, profile: HardwareProfile, *, tensorize: bool = True) -> None:
        self.profile = profile
        self.tvm = load_tvm(profile.threads)
        if profile.is_local:
            set_threads(profile.threads)
        self.target = target_object(profile) if profile.target_kind == "llvm" else None
        self.vnni = has_vnni(profile)
        self.tensorize = tensorize
        self._session: Any = None
        # the kernels measured by this backend, kept loaded so ``retime`` can take more rounds
        self._timers: dict[KernelSpec, Any] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="autoquant-kernels-")

    # --- contract ---------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        p = self.profile
        if p.is_local:
            from autoquant.hw._tvm import runtime_threads

            where: dict[str, Any] = {"host_cpu": cpu_name(), "host_arch": platform.machine()}
            threads = runtime_threads()
        else:
            where = {"rpc_key": p.spec.device.key}
            threads = p.threads
        return {
            "target": p.target,
            **where,
            "runtime": "tvm",
            "runtime_version": str(self.tvm.__version__),
            "threads": threads,
            "batch": p.spec.batch_size,
            "kernels": KERNEL_TEMPLATE_VERSION,
            "tensorize": self.tensorize,
        }

    def spec_for(self, layer: LayerInfo, choice: QuantChoice) -> KernelSpec | str:
        p = self.profile
        if p.target_kind != "llvm":
            return (
                f"target kind {p.target_kind!r}: per-layer kernel templates exist only for "
                "llvm (CPU) targets so far"
            )
        fmt = kernel_format(choice)
        if fmt not in p.spec.formats:
            return (
                f"format {fmt} is not in profile {p.name}'s formats ({', '.join(p.spec.formats)})"
            )
        return kernel_spec(layer, choice, p.spec.batch_size, vnni=self.vnni)

    def exclusion(self, layer: LayerInfo, choice: QuantChoice) -> str | None:
        spec = self.spec_for(layer, choice)
        return spec if isinstance(spec, str) else None

    def measure(self, layer: LayerInfo, choice: QuantChoice) -> KernelTiming:
        spec = self.spec_for(layer, choice)
        if isinstance(spec, str):
            return KernelTiming.excluded(spec)
        return self.measure_spec(spec)

    def retime(self, layer: LayerInfo, choice: QuantChoice) -> list[float] | None:
        """Another round of samples (seconds) of a kernel this backend measured, still loaded;
        None when it has none (not measured here, or failed)."""
        spec = self.spec_for(layer, choice)
        timer = None if isinstance(spec, str) else self._timers.get(spec)
        return None if timer is None else timer()

    def close(self) -> None:
        self._timers.clear()
        self._session = None
        self._tmp.cleanup()

    # --- work -------------------------------------------------------------------------------

    def measure_spec(self, spec: KernelSpec) -> KernelTiming:
        """Build, check and time one kernel; every failure is a ``failed`` result."""
        m = self.profile.spec.measure
        start = time.monotonic()
        details = {
            "m": spec.m,
            "n": spec.n,
            "k": spec.k,
            "np": spec.np_,
            "kp": spec.kp,
            "weight_bytes": spec.stored_weight_bytes,
        }
        try:
            ex, names = tvm_kernels.build(
                spec, self.target, threads=self.profile.threads, tensorize=self.tensorize
            )
        except Exception as exc:
            return KernelTiming.failed(
                f"build error: {_short(exc)}",
                spec.impl,
                build_s=time.monotonic() - start,
                details=details,
            )
        build_s = time.monotonic() - start
        if build_s > m.timeout_s:
            return KernelTiming.failed(
                f"timeout: the build took {build_s:.1f} s > timeout_s {m.timeout_s:g}",
                spec.impl,
                build_s=build_s,
                details=details,
            )
        try:
            return self._run(spec, ex, names, start, build_s, details)
        except Exception as exc:  # device lost, session closed, out of memory on the device
            if not self.profile.is_local:
                self._session = None
            return KernelTiming.failed(
                f"run error: {_short(exc)}",
                spec.impl,
                build_s=build_s,
                measure_s=time.monotonic() - start - build_s,
                details=details,
            )

    def _device(self, ex: Any, spec: KernelSpec) -> tuple[Any, Any]:
        """(module with ``main`` and ``time_evaluator``, device) for the profile's device."""
        if self.profile.is_local:
            return ex.mod, self.tvm.cpu(0)
        return self._upload(ex, f"k{abs(hash((spec, os.getpid()))) % 10**12}.so")

    def _remote_session(self) -> Any:
        if self._session is None:
            dev_spec = self.profile.spec.device
            host, port = dev_spec.host_port
            self._session = request_session(
                host,
                port,
                str(dev_spec.key),
                session_timeout_s=dev_spec.session_timeout_s,
                connect_timeout_s=dev_spec.connect_timeout_s,
            )
            try:  # the remote pool can shrink to the profile's threads, not grow past its own
                self._session.get_function("runtime.config_threadpool")(1, self.profile.threads)
            except Exception:
                pass
        return self._session

    def _upload(self, ex: Any, name: str) -> tuple[Any, Any]:
        """(remote module, remote device): ``ex`` exported, uploaded and loaded over RPC."""
        dev_spec = self.profile.spec.device
        session = self._remote_session()
        path = os.path.join(self._tmp.name, name)
        fcompile = None
        if dev_spec.cross_compiler:
            from tvm.support import cc

            fcompile = cc.cross_compiler(dev_spec.cross_compiler)
        ex.export_library(path, fcompile=fcompile)
        session.upload(path)
        return session.load_module(name), session.cpu(0)

    def prepare_model(
        self,
        model: Any,
        input_shape: tuple[int, ...],
        layers: tuple[LayerInfo, ...] | list[LayerInfo],
        config: QuantConfig,
    ) -> PreparedModel | KernelTiming:
        """The model composed from these kernels (``tvm_model``), compiled, loaded on the
        device (uploaded over RPC for a remote one) and run once."""
        from autoquant.hw.tvm_model import build_model

        chosen = config.as_mapping()
        for layer in layers:
            choice = chosen.get(layer.name, QuantChoice())
            reason = self.exclusion(layer, choice)
            if reason is not None:
                return KernelTiming.excluded(f"{layer.name} {choice.label}: {reason}", "model")
        start = time.monotonic()
        batch = self.profile.spec.batch_size
        try:
            ex = build_model(
                model,
                input_shape,
                tuple(layers),
                config,
                batch=batch,
                target=self.target,
                threads=self.profile.threads,
                vnni=self.vnni,
            )
        except Exception as exc:
            return KernelTiming.failed(
                f"build error: {_short(exc)}", "model", build_s=time.monotonic() - start
            )
        try:
            if self.profile.is_local:
                mod, dev = ex, self.tvm.cpu(0)
            else:
                mod, dev = self._upload(ex, f"m{config.hash[:16]}-{os.getpid()}.so")
            prepared = _TvmModel(self, mod, dev, (batch, *input_shape[1:]))
        except Exception as exc:
            if not self.profile.is_local:
                self._session = None
            return KernelTiming.failed(
                f"run error: {_short(exc)}", "model", build_s=time.monotonic() - start
            )
        prepared.build_s = time.monotonic() - start
        return prepared

    def _run(
        self,
        spec: KernelSpec,
        ex: Any,
        names: list[str],
        start: float,
        build_s: float,
        details: dict[str, Any],
    ) -> KernelTiming:
        m = self.profile.spec.measure
        mod, dev = self._device(ex, spec)
        data = make_data(spec)
        tensor = self.tvm.runtime.tensor
        args = [tensor(data.inputs[n], dev) for n in names[:-1]]
        args.append(tensor(np.zeros((spec.m, spec.np_), dtype=output_dtype(spec)), dev))
        func = mod["main"]
        once = mod.time_evaluator("main", dev, number=1, repeat=1)(*args).results[0]
        if m.verify:
            problem = check_output(spec, data, args[-1].numpy())
            if problem:
                return KernelTiming.failed(
                    f"wrong result: {problem}", spec.impl, build_s=build_s, details=details
                )
        elapsed = time.monotonic() - start
        predicted = m.warmup * once + m.repeat * max(m.min_repeat_ms / 1000.0, m.number * once)
        if elapsed + predicted > m.timeout_s:
            return KernelTiming.failed(
                f"timeout: one call takes {once * 1e3:.3g} ms, timing it as configured needs "
                f"~{predicted:.3g} s more, past timeout_s {m.timeout_s:g}",
                spec.impl,
                build_s=build_s,
                measure_s=elapsed - build_s,
                details=details,
            )
        for _ in range(m.warmup):
            func(*args)
        evaluator = mod.time_evaluator(
            "main", dev, number=m.number, repeat=m.repeat, min_repeat_ms=int(m.min_repeat_ms)
        )
        samples = list(evaluator(*args).results)
        self._timers[spec] = lambda: list(evaluator(*args).results)
        return KernelTiming.from_samples(
            spec.impl,
            samples,
            build_s=build_s,
            measure_s=time.monotonic() - start - build_s,
            details=details,
        )


class _TvmModel(PreparedModel):
    """A relax VM on the device (local, or remote through the backend's RPC session)."""

    def __init__(self, backend: TvmBackend, mod: Any, dev: Any, shape: tuple[int, ...]) -> None:
        from tvm import relax

        self.backend = backend
        self.dev = dev
        self.vm = relax.VirtualMachine(mod, dev)
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        self.x = backend.tvm.runtime.tensor(x, dev)
        self.vm["main"](self.x)  # lazy initialisation happens here, not in the first sample

    def time(self) -> list[float]:
        m = self.backend.profile.spec.measure
        for _ in range(m.warmup):
            self.vm["main"](self.x)
        evaluator = self.vm.time_evaluator(
            "main", self.dev, number=m.number, repeat=m.repeat, min_repeat_ms=int(m.min_repeat_ms)
        )
        return list(evaluator(self.x).results)

    def close(self) -> None:
        self.vm = None
        self.x = None
