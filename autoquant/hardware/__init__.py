"""What a target is: the hardware profile schema (``profile.py``), a spec's profiles found and
validated once (``resolved.py``: ``resolve_hardware``), the kernel formats a target can run
(``kernels.py``), and the one lazy TVM import (``_tvm.py``, which ``mcpu: auto`` needs).
Nothing here measures anything."""

from autoquant.hardware.resolved import ResolvedProfile, override_hardware, resolve_hardware

__all__ = ["ResolvedProfile", "override_hardware", "resolve_hardware"]
