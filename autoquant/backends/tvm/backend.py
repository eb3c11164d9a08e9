"""The TVM latency backend: hand-scheduled per-layer kernels, timed locally or over RPC.

For each (layer, choice) at the profile's batch size: build the kernel (``backends.tvm.kernels``), run it
once on random data and compare with the numpy reference (``measure.verify``), then time it with
``time_evaluator(number, repeat, min_repeat_ms)`` after ``warmup`` calls; the kernel stays loaded
for the later rounds, short visits interleaved with the other kernels (``kernel_visitor``,
``interleave``). Remote devices get the compiled library uploaded through an RPC session from
the profile's tracker.

``timeout_s`` bounds each kernel: after the build and one timed call the remaining work is
predicted (``repeat x max(min_repeat_ms, number x call)``) and a kernel that would run past the
deadline is reported ``failed`` with a timeout instead of being run; an RPC session's own
``session_timeout_s`` stops a remote that hangs.

With a ``tuning:`` section (local llvm profiles only) each kernel that measured fine is then tuned
with meta_schedule (``tuning.tune_kernel``), the tuned kernel checked and timed the same way, and
the faster of the two kept: ``impl`` gets a ``tuned:`` prefix when the tuned one won, and
``details`` records ``hand_us``, ``tuned_us`` (or ``tuning_error``), ``tuning_s`` and
``tuning_trials``. ``budget_s`` bounds the tuning time over the backend's lifetime; later kernels
keep their hand schedule.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from autoquant.backends.contract import SESSION_SHARE, LatencyBackend, PreparedModel, short_error
from autoquant.backends.inputs import InputsLike, ModelInputs
from autoquant.backends.tvm import kernels as tvm_kernels
from autoquant.backends.tvm.rpc import request_session
from autoquant.backends.tvm.tuning import TunedKernel, TuningWorker, tune_kernel, tuning_refusal
from autoquant.hardware._tvm import load_tvm, set_threads
from autoquant.hardware.kernels import (
    KERNEL_TEMPLATE_VERSION,
    KernelSpec,
    check_output,
    kernel_spec,
    make_data,
    output_dtype,
)
from autoquant.hardware.profile import HardwareProfile, has_cpu_feature, has_vnni, target_object
from autoquant.measure.interleave import TIMING_METHOD, visits_per_round
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig
from autoquant.versions import cpu_name


class TvmBackend(LatencyBackend):
    def __init__(self, profile: HardwareProfile, *, tensorize: bool = True) -> None:
        self.profile = profile
        self.tvm = load_tvm(profile.threads)
        if profile.is_local:
            set_threads(profile.threads)
        self.target = target_object(profile) if profile.target_kind == "llvm" else None
        self.vnni = has_vnni(profile)
        self.avx2 = has_cpu_feature(profile, "avx2")
        self.tensorize = tensorize
        self._session: Any = None
        self._session_start = 0.0
        # why the last request for a session failed: the kernels after it fail at once instead
        # of each waiting out the tracker's deadline again (renew_session tries again)
        self._unreachable: str | None = None
        # the kernels measured by this backend, kept loaded for more rounds (``kernel_visitor``)
        self._kernel_visits: dict[KernelSpec, _Visits] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="autoquant-kernels-")
        self._tuning_refusal = tuning_refusal(profile) if profile.spec.tuning else None
        self._tuning_used_s = 0.0  # over the backend's lifetime, against tuning.budget_s
        self._tuner: TuningWorker | None = None  # started on the first kernel tuned

    # --- contract ---------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        p = self.profile
        if p.is_local:
            from autoquant.hardware._tvm import runtime_threads

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
            "timing": TIMING_METHOD,
            "tensorize": self.tensorize,
            # only with tuning: untuned fingerprints (and the tables keyed by them) stay as
            # they were, and tuned timings are never shared with untuned ones
            **({"tuning": p.spec.tuning.fingerprint()} if p.spec.tuning else {}),
            # only when set otherwise than the defaults every earlier table was measured with
            **({"schedule": schedule} if (schedule := p.spec.schedule.fingerprint()) else {}),
        }

    def spec_for(self, layer: LayerInfo, choice: QuantChoice) -> KernelSpec | str:
        p = self.profile
        if p.target_kind != "llvm":
            return (
                f"target kind {p.target_kind!r}: per-layer kernel templates exist only for "
                "llvm (CPU) targets so far"
            )
        unsupported = self.format_exclusion(choice)
        if unsupported is not None:
            return unsupported
        return kernel_spec(layer, choice, p.spec.batch_size, vnni=self.vnni, avx2=self.avx2)

    def exclusion(self, layer: LayerInfo, choice: QuantChoice) -> str | None:
        spec = self.spec_for(layer, choice)
        return spec if isinstance(spec, str) else None

    def measure(self, layer: LayerInfo, choice: QuantChoice) -> KernelTiming:
        spec = self.spec_for(layer, choice)
        if isinstance(spec, str):
            return KernelTiming.excluded(spec)
        return self.measure_spec(spec)

    def device_problem(self) -> str | None:
        """For a remote device: asks the tracker once, within ``connect_timeout_s``, whether a
        server is registered under the key."""
        if self.profile.is_local:
            return None
        from autoquant.backends.tvm.rpc import probe_tracker

        dev_spec = self.profile.spec.device
        host, port = dev_spec.host_port
        status = probe_tracker(host, port, timeout_s=dev_spec.connect_timeout_s)
        key = str(dev_spec.key)
        return None if status.has(key) else status.describe(key)

    def renew_session(self) -> None:
        """Drop the RPC session (and the modules loaded in it); the next call opens a new one."""
        self._unreachable = None
        if not self.profile.is_local and self._session is not None:
            import gc

            self._kernel_visits.clear()
            self._session = None
            # The session closes when its last reference goes; a server under a key serves one
            # session at a time, so a lingering old one would make the tracker queue the new
            # request forever. Collect now (loaded modules and VMs form reference cycles).
            gc.collect()

    def models_per_session(self) -> int | None:
        """How many whole models one RPC session can prepare and time in interleaved rounds
        before the server would end it (None: no limit, a local device)."""
        if self.profile.is_local:
            return None
        spec = self.profile.spec
        m, rounds = spec.measure, spec.end_to_end.rounds
        visits = visits_per_round(spec.end_to_end.repeat, m.min_repeat_ms, m.visit_ms)
        # each visit: the visit itself, and a round trip for it and each warm-up call
        per_round = visits * (m.visit_ms / 1000.0 + 0.002 * (1 + m.warmup))
        # build + upload, then the rounds, with a 2x margin: a busy machine stretches a round
        # past its sum, and later batches are sized from the pace the earlier ones really had
        per_model = 10.0 + rounds * per_round * 2
        return max(1, int(SESSION_SHARE * spec.device.session_timeout_s / per_model))

    def kernel_visitor(
        self, layer: LayerInfo, choice: QuantChoice, seconds: float
    ) -> Callable[[], float] | None:
        """Visits of a kernel this backend measured, still loaded; None when it has none (not
        measured here, or failed)."""
        spec = self.spec_for(layer, choice)
        visits = None if isinstance(spec, str) else self._kernel_visits.get(spec)
        return None if visits is None else lambda: visits(seconds)

    def close(self) -> None:
        self._kernel_visits.clear()
        self._session = None
        if self._tuner is not None:
            self._tuner.close()
            self._tuner = None
        self._tmp.cleanup()

    # --- work -------------------------------------------------------------------------------

    def measure_spec(self, spec: KernelSpec) -> KernelTiming:
        """Build, check and time one kernel; every failure is a ``failed`` result. With
        ``tuning``, a kernel that measured fine is tuned too and the faster one kept."""
        timing = self._measure_hand(spec)
        if self.profile.spec.tuning is None or not timing.ok:
            return timing
        return self._tune(spec, timing)

    def tuning_decision(self) -> str | None:
        """None when the next kernel is tuned, else why not (its ``tuning_error``)."""
        tuning = self.profile.spec.tuning
        if tuning is None:
            return "the profile has no tuning section"
        if self._tuning_refusal is not None:
            return self._tuning_refusal
        if self._tuning_used_s >= tuning.budget_s:
            return f"tuning budget of {tuning.budget_s:g} s used up"
        return None

    def _tune(self, spec: KernelSpec, hand: KernelTiming) -> KernelTiming:
        """Tune ``spec``, check and time the tuned kernel like the hand one, keep the faster;
        a tuned kernel that is missing, wrong or fails never replaces the hand timing."""
        tuning = self.profile.spec.tuning
        assert tuning is not None
        hand_visits = self._kernel_visits.get(spec)
        info: dict[str, Any] = {"hand_us": hand.median_us}
        reason = self.tuning_decision()
        tuned_timing: KernelTiming | None = None
        if reason is None:
            start = time.monotonic()
            if self._tuner is None:
                self._tuner = TuningWorker(
                    self.profile.threads, os.path.join(self._tmp.name, "tuning-worker.log")
                )
            tuned = tune_kernel(
                spec,
                self.profile.target,
                trials=tuning.trials_per_kernel,
                work_dir=tempfile.mkdtemp(prefix="tune-", dir=self._tmp.name),
                deadline_s=tuning.budget_s - self._tuning_used_s,
                worker=self._tuner,
                build_timeout_s=tuning.build_timeout_s,
            )
            tuning_s = time.monotonic() - start
            self._tuning_used_s += tuning_s
            info["tuning_s"] = round(tuning_s, 3)
            if isinstance(tuned, str):
                reason = tuned
            else:
                info["tuning_trials"] = tuned.trials
                tuned_timing = self._time_tuned(spec, tuned, dict(hand.details))
                if tuned_timing.ok:
                    info["tuned_us"] = tuned_timing.median_us
                else:
                    reason = f"tuned kernel {tuned_timing.error}"
                    tuned_timing = None
        if reason is not None:
            info["tuning_error"] = reason
        # medians decide: one lucky sample (the min) should not pick the schedule
        if tuned_timing is not None and tuned_timing.median_us < hand.median_us:
            return replace(
                tuned_timing,
                impl=f"tuned:{spec.impl}",
                build_s=hand.build_s + info["tuning_s"],
                details={**hand.details, **info},
            )  # its visits, set by _run, are the ones kernel_visitor uses
        if hand_visits is not None:
            self._kernel_visits[spec] = hand_visits
        return replace(hand, details={**hand.details, **info})

    def _time_tuned(
        self, spec: KernelSpec, tuned: TunedKernel, details: dict[str, Any]
    ) -> KernelTiming:
        """The tuned kernel checked against numpy and timed exactly as the hand one was (the
        per-kernel timeout counts from here: tuning has its own budget)."""
        start = time.monotonic()
        try:
            return self._run(
                spec, tuned.executable, list(tuned.names), start=start, build_s=0.0, details=details
            )
        except Exception as exc:
            return KernelTiming.failed(f"run error: {short_error(exc)}", spec.impl)

    def _measure_hand(self, spec: KernelSpec) -> KernelTiming:
        """The hand-scheduled kernel built, checked and timed."""
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
                spec,
                self.target,
                threads=self.profile.threads,
                tensorize=self.tensorize,
                parallel_min_macs=self.profile.spec.schedule.parallel_min_macs,
            )
        except Exception as exc:
            return KernelTiming.failed(
                f"build error: {short_error(exc)}",
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
            return self._run(spec, ex, names, start=start, build_s=build_s, details=details)
        except _Unreachable as exc:
            return KernelTiming.unreachable(
                str(exc), spec.impl, build_s=build_s, details=details
            )
        except Exception as exc:  # device lost, session closed, out of memory on the device
            if not self.profile.is_local:
                self._session = None
            return KernelTiming.failed(
                f"run error: {short_error(exc)}",
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
        # The server ends a session at session_timeout_s, whatever runs in it: start a new one
        # between kernels rather than lose a kernel (and its loaded module) mid-measurement.
        timeout = self.profile.spec.device.session_timeout_s
        if self._session is not None and time.monotonic() - self._session_start > 0.8 * timeout:
            self.renew_session()
        if self._session is None:
            if self._unreachable is not None:
                raise _Unreachable(self._unreachable)
            self._session_start = time.monotonic()
            dev_spec = self.profile.spec.device
            host, port = dev_spec.host_port
            try:
                self._session = request_session(
                    host,
                    port,
                    str(dev_spec.key),
                    session_timeout_s=dev_spec.session_timeout_s,
                    connect_timeout_s=dev_spec.connect_timeout_s,
                    request_timeout_s=dev_spec.request_timeout_s,
                )
            except Exception as exc:  # no tracker, no free server, the server does not answer
                self._unreachable = str(exc) if isinstance(exc, RuntimeError) else short_error(exc)
                raise _Unreachable(self._unreachable) from None
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
        inputs: InputsLike | ModelInputs,
        layers: tuple[LayerInfo, ...] | list[LayerInfo],
        config: QuantConfig,
    ) -> PreparedModel | KernelTiming:
        """The model composed from these kernels (``backends.tvm.model``), compiled, loaded on the
        device (uploaded over RPC for a remote one) and run once. A model the composer cannot
        build (named or integer inputs, an operation it does not translate) is ``excluded``
        with the reason."""
        from autoquant.backends.tvm.model import UnsupportedModel, build_model, composable_inputs

        reason = self.config_exclusion(layers, config)
        if reason is not None:
            return KernelTiming.excluded(reason, "model")
        start = time.monotonic()
        batch = self.profile.spec.batch_size
        try:
            shape = composable_inputs(inputs)
            ex = build_model(
                model,
                shape,
                tuple(layers),
                config,
                batch=batch,
                target=self.target,
                threads=self.profile.threads,
                vnni=self.vnni,
                avx2=self.avx2,
                parallel_min_macs=self.profile.spec.schedule.parallel_min_macs,
            )
        except UnsupportedModel as exc:
            return KernelTiming.excluded(
                f"the TVM whole-model composer cannot build this model: {exc}", "model"
            )
        except Exception as exc:
            return KernelTiming.failed(
                f"build error: {short_error(exc)}", "model", build_s=time.monotonic() - start
            )
        try:
            if self.profile.is_local:
                mod, dev = ex, self.tvm.cpu(0)
            else:
                mod, dev = self._upload(ex, f"m{config.hash[:16]}-{os.getpid()}.so")
            prepared = _TvmModel(self, mod, dev, (batch, *shape[1:]))
        except _Unreachable as exc:
            return KernelTiming.unreachable(str(exc), "model", build_s=time.monotonic() - start)
        except Exception as exc:
            if not self.profile.is_local:
                self._session = None
            return KernelTiming.failed(
                f"run error: {short_error(exc)}", "model", build_s=time.monotonic() - start
            )
        prepared.build_s = time.monotonic() - start
        return prepared

    def _run(
        self,
        spec: KernelSpec,
        ex: Any,
        names: list[str],
        *,
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
        self._kernel_visits[spec] = _Visits(
            mod, dev, args, per_call_s=float(np.median(samples)), warmup=m.warmup, call=func
        )
        return KernelTiming.from_samples(
            spec.impl,
            samples,
            build_s=build_s,
            measure_s=time.monotonic() - start - build_s,
            details=details,
        )


class _Unreachable(RuntimeError):
    """No RPC session could be had: the device, not the kernel, failed."""


class _TvmModel(PreparedModel):
    """A relax VM on the device (local, or remote through the backend's RPC session)."""

    def __init__(self, backend: TvmBackend, mod: Any, dev: Any, shape: tuple[int, ...]) -> None:
        from tvm import relax

        self.backend = backend
        self.details: dict[str, Any] = {"where": "local" if backend.profile.is_local else "rpc"}
        self.dev = dev
        self.vm = relax.VirtualMachine(mod, dev)
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        self.x = backend.tvm.runtime.tensor(x, dev)
        self.vm["main"](self.x)  # lazy initialisation happens here, not in the first sample
        once = self.vm.time_evaluator("main", dev, number=1, repeat=1)(self.x).results[0]
        warmup = backend.profile.spec.measure.warmup
        self._visits = _Visits(
            self.vm, dev, [self.x], per_call_s=once, warmup=warmup, call=self.vm["main"]
        )

    def time(self) -> list[float]:
        m = self.backend.profile.spec.measure
        repeat = self.backend.profile.spec.end_to_end.repeat
        for _ in range(m.warmup):
            self.vm["main"](self.x)
        evaluator = self.vm.time_evaluator(
            "main", self.dev, number=m.number, repeat=repeat, min_repeat_ms=int(m.min_repeat_ms)
        )
        return list(evaluator(self.x).results)

    def visit(self, seconds: float) -> float:
        return self._visits(seconds)

    def close(self) -> None:
        self.vm = None
        self.x = None
        self.dev = None
        self._visits = None


class _Visits:
    """Short timings of one loaded function (a kernel's module, or a whole model's VM): the
    warm-up calls, untimed, then as many calls as last about ``seconds``, timed by the
    device's own timer; the mean seconds per call. The warm-up matters here: between two visits
    of one kernel the others ran and took the cache."""

    def __init__(
        self, timed: Any, dev: Any, args: list[Any], *, per_call_s: float, warmup: int, call: Any
    ) -> None:
        self.timed, self.dev, self.args, self.call = timed, dev, args, call
        self.per_call_s, self.warmup = max(per_call_s, 1e-9), warmup
        self._evaluators: dict[int, Any] = {}  # calls per visit -> time_evaluator

    def __call__(self, seconds: float) -> float:
        calls = max(1, math.ceil(seconds / self.per_call_s))
        evaluator = self._evaluators.get(calls)
        if evaluator is None:
            evaluator = self.timed.time_evaluator("main", self.dev, number=calls, repeat=1)
            self._evaluators[calls] = evaluator
        for _ in range(self.warmup):
            self.call(*self.args)
        return float(evaluator(*self.args).results[0])
