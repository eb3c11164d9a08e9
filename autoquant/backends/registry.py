"""The latency backend for a profile, keyed by the profile's ``runtime``.

Each entry checks that its runtime imports and builds the backend; the implementations import
only the contract, never this registry, so adding a runtime is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

from autoquant.backends.contract import LatencyBackend
from autoquant.errors import UserError
from autoquant.hardware.profile import HardwareProfile


def _tvm(profile: HardwareProfile) -> LatencyBackend:
    from autoquant.hardware._tvm import tvm_available

    reason = tvm_available(profile.threads if profile.is_local else None)
    if reason:
        raise UserError(f"bad value 'tvm': {reason}", file=profile.path, key="runtime")
    from autoquant.backends.tvm.backend import TvmBackend

    return TvmBackend(profile)


def _onnxruntime(profile: HardwareProfile) -> LatencyBackend:
    try:
        from autoquant.backends.ort.backend import OrtBackend

        return OrtBackend(profile)
    except ImportError as exc:
        raise UserError(
            f"bad value 'onnxruntime': onnxruntime does not import ({exc})",
            file=profile.path,
            key="runtime",
        ) from None


BACKENDS: dict[str, Callable[[HardwareProfile], LatencyBackend]] = {
    "tvm": _tvm,
    "onnxruntime": _onnxruntime,
}


def backend_for(profile: HardwareProfile) -> LatencyBackend:
    """The backend a profile's ``runtime`` names."""
    make = BACKENDS.get(profile.spec.runtime)
    if make is None:
        raise UserError(
            f"bad value {profile.spec.runtime!r}: no latency backend for this runtime; "
            f"allowed: {', '.join(BACKENDS)}",
            file=profile.path,
            key="runtime",
        )
    return make(profile)
