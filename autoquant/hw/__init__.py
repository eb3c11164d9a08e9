"""Hardware: profiles, latency backends, the latency table.

Nothing here imports TVM; the TVM backend (``autoquant.hw.tvm_backend``) and its kernels load it
on first use.
"""

from autoquant.hw.backend import LatencyBackend, backend_for
from autoquant.hw.profile import HardwareProfile, HardwareProfileSpec, load_profile
from autoquant.hw.profiling import ProfileResult, parse_label, profile_layers
from autoquant.hw.table import LatencyTable, default_table_path, layer_signature
from autoquant.hw.timing import KernelTiming

__all__ = [
    "HardwareProfile",
    "HardwareProfileSpec",
    "KernelTiming",
    "LatencyBackend",
    "LatencyTable",
    "ProfileResult",
    "backend_for",
    "default_table_path",
    "layer_signature",
    "load_profile",
    "parse_label",
    "profile_layers",
]
