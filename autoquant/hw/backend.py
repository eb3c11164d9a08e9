"""The latency backend contract, and the choice of backend for a profile."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

from autoquant.errors import UserError
from autoquant.hw.profile import HardwareProfile
from autoquant.hw.timing import KernelTiming
from autoquant.space.values import LayerInfo, QuantChoice


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
        * ``close()`` releases sessions; the backend is a context manager.
    """

    profile: HardwareProfile

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]: ...

    @abstractmethod
    def exclusion(self, layer: LayerInfo, choice: QuantChoice) -> str | None: ...

    @abstractmethod
    def measure(self, layer: LayerInfo, choice: QuantChoice) -> KernelTiming: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release any session or device."""

    def fingerprint_hash(self) -> str:
        text = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def __enter__(self) -> LatencyBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_for(profile: HardwareProfile) -> LatencyBackend:
    """The backend a profile's ``runtime`` names."""
    if profile.spec.runtime == "tvm":
        from autoquant.hw._tvm import tvm_available

        reason = tvm_available(profile.threads if profile.is_local else None)
        if reason:
            raise UserError(f"bad value 'tvm': {reason}", file=profile.path, key="runtime")
        from autoquant.hw.tvm_backend import TvmBackend

        return TvmBackend(profile)
    raise UserError(
        f"bad value {profile.spec.runtime!r}: per-layer latency with this runtime is not "
        "implemented yet; allowed: tvm",
        file=profile.path,
        key="runtime",
    )
