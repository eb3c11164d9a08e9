"""The latency backend contract: what every runtime implements (``registry.py`` picks one for a
profile)."""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from autoquant.backends.inputs import InputsLike, ModelInputs
from autoquant.errors import MachineError
from autoquant.hardware.kernels import kernel_format
from autoquant.hardware.profile import HardwareProfile
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

# The share of a remote session's time that whole-model batches are planned to fill: the rest
# is margin for a round that runs slower than its estimate or than the batches before it.
SESSION_SHARE = 0.5


def short_error(exc: BaseException) -> str:
    """``Type: last line of the message``: TVM and ONNX Runtime errors end with the message, their
    first line is often a traceback header. TVMScript diagnostics put the message first
    (``error: ...``) and end with the source line and carets: their ``error:`` line is kept."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    flagged = [ln for ln in lines if ln.startswith("error:")]
    line = flagged[0] if flagged else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}"


class PreparedModel(ABC):
    """A whole model compiled and loaded on a device. ``time()`` runs one timing round (the
    profile's warm-up, then ``end_to_end.repeat`` samples of at least ``min_repeat_ms``) and
    returns the samples in seconds; ``visit(seconds)`` runs the warm-up and then calls for about
    ``seconds`` and returns their mean (one visit of ``interleave.visit_rounds``). Both may
    raise when the device is lost (the caller records a failure)."""

    build_s: float = 0.0
    details: dict[str, Any] = {}  # noqa: RUF012 - set per instance by implementations

    @abstractmethod
    def time(self) -> list[float]: ...

    @abstractmethod
    def visit(self, seconds: float) -> float: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model on the device."""


class LatencyBackend(ABC):
    """Measures one layer's kernel for one choice on one profile's device.

    Contract:
        * ``fingerprint()`` is a JSON-able dict of everything that changes a timing besides the
          layer and the choice (target, host CPU, runtime and its version, threads, batch,
          kernel template version); equal fingerprints mean timings can be shared.
        * ``exclusion(layer, choice)`` is None when the device has a kernel for it, else the
          reason; it is cheap and builds nothing.
        * ``measure(layer, choice)`` returns a ``KernelTiming`` and never raises for a build
          error, a wrong result, a timeout or a lost device: those are ``failed`` results.
          An excluded choice comes back ``excluded`` with the reason, never timed as another.
          A device that cannot be reached at all is a ``KernelTiming.unreachable`` result: it
          says nothing of the kernel, so callers stop the batch and store nothing for it.
        * ``device_problem()`` is None when the device can be reached now, else why not; it is
          asked once before a batch measures anything (a local device: always None).
        * ``measure_model(model, inputs, layers, config)`` times the whole model under
          ``config`` end to end on the same device, the same way (impl ``model``): the figure
          the per-layer latency model is checked against. ``inputs`` is a batch-1 input shape
          or the task's example inputs (one tensor, or named tensors: ``backends.inputs``). It never
          raises either; a backend without it, or that cannot build this model (named inputs,
          an operation it does not translate), returns a ``failed`` or ``excluded`` result
          saying so.
        * ``prepare_model(...)`` compiles and loads the whole model once and returns a
          ``PreparedModel`` to time in rounds (a failed timing when it can't).
        * ``kernel_visitor``, ``models_per_session`` and ``renew_session`` are optional hooks
          for more kernel rounds and for devices whose sessions end; the defaults do nothing.
        * ``close()`` releases sessions; the backend is a context manager.
    """

    profile: HardwareProfile

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]: ...

    @abstractmethod
    def exclusion(self, layer: LayerInfo, choice: QuantChoice) -> str | None: ...

    def format_exclusion(self, choice: QuantChoice) -> str | None:
        """Why the profile has no kernel for ``choice``'s format (its ``formats`` list), or None."""
        fmt, p = kernel_format(choice), self.profile
        if fmt in p.spec.formats:
            return None
        return f"format {fmt} is not in profile {p.name}'s formats ({', '.join(p.spec.formats)})"

    @abstractmethod
    def measure(self, layer: LayerInfo, choice: QuantChoice) -> KernelTiming: ...

    def measure_model(
        self,
        model: Any,
        inputs: InputsLike | ModelInputs,
        layers: tuple[LayerInfo, ...] | list[LayerInfo],
        config: QuantConfig,
    ) -> KernelTiming:
        """The whole ``model`` quantized as ``config`` says, timed end to end (impl ``model``):
        ``prepare_model`` then one round of ``PreparedModel.time``."""
        prepared = self.prepare_model(model, inputs, layers, config)
        if isinstance(prepared, KernelTiming):
            return prepared
        start = time.monotonic()
        try:
            samples = prepared.time()
        except Exception as exc:  # a lost device or a timeout mid-run is a failed measurement
            return KernelTiming.failed(
                f"run error: {short_error(exc)}",
                "model",
                build_s=prepared.build_s,
                measure_s=time.monotonic() - start,
                details=dict(prepared.details),
            )
        finally:
            prepared.close()
        return KernelTiming.from_samples(
            "model",
            samples,
            build_s=prepared.build_s,
            measure_s=time.monotonic() - start,
            details=dict(prepared.details),
        )

    def config_exclusion(
        self, layers: tuple[LayerInfo, ...] | list[LayerInfo], config: QuantConfig
    ) -> str | None:
        """``"<layer> <choice>: <reason>"`` for the first layer whose choice in ``config`` this
        device cannot run (a layer the config leaves out counts as float32); None when all can."""
        chosen = config.as_mapping()
        for layer in layers:
            choice = chosen.get(layer.name, QuantChoice())
            reason = self.exclusion(layer, choice)
            if reason is not None:
                return f"{layer.name} {choice.label}: {reason}"
        return None

    def prepare_model(
        self,
        model: Any,
        inputs: InputsLike | ModelInputs,
        layers: tuple[LayerInfo, ...] | list[LayerInfo],
        config: QuantConfig,
    ) -> PreparedModel | KernelTiming:
        """The whole model compiled and loaded on the device, ready to be timed again and again
        (so that several configs can be timed in interleaved rounds); a ``failed`` or
        ``excluded`` timing when it can't be. ``inputs``: see ``measure_model``."""
        return KernelTiming.failed("end-to-end timing is not implemented for this backend", "model")

    def device_problem(self) -> str | None:
        """None when the device answers now, else why not (one try, with a deadline)."""
        return None

    def kernel_visitor(
        self, layer: LayerInfo, choice: QuantChoice, seconds: float
    ) -> Callable[[], float] | None:
        """A visitor for ``interleave.visit_rounds`` of a kernel measured here and still
        loaded: each call runs the warm-up, then the kernel for about ``seconds``, and returns
        the mean seconds per call. None: no more rounds for it."""
        return None

    def models_per_session(self) -> int | None:
        """How many whole models fit one device session (None: no limit)."""
        return None

    def renew_session(self) -> None:  # noqa: B027 - optional hook
        """Start the next call on a fresh device session."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release any session or device."""

    def fingerprint_hash(self) -> str:
        text = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def __enter__(self) -> LatencyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeviceUnreachable(MachineError):
    """The profile's device could not be reached: one failure for the whole batch (exit 1)."""

    def __init__(self, profile: HardwareProfile, reason: str, *, measured: int = 0) -> None:
        kept = f"; the {measured} kernel(s) measured before are kept" if measured else ""
        super().__init__(
            f"the device of profile {profile.name} cannot be reached: {reason}; nothing was "
            f"recorded for it{kept}; check the tracker and its servers (autoquant hw) and run "
            "again",
            file=str(profile.path) if profile.path else None,
        )
