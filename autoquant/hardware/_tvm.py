"""The one place that imports TVM: lazily, with the thread count set first.

``import tvm`` takes ~4 s and ~400 MB, so nothing imports this module at package import time.
TVM sizes its CPU thread pool from ``TVM_NUM_THREADS`` when the pool first starts; the profile's
thread count is therefore put in the environment before the import, and ``runtime_threads()``
reports what the pool really uses (recorded with every timing).
"""

from __future__ import annotations

import os
from types import ModuleType

_FAILED: str | None = None


def tvm_available(threads: int | None = None) -> str | None:
    """None when TVM imports, else why not (without raising); ``threads`` as in ``load_tvm``."""
    global _FAILED
    if _FAILED is not None:
        return _FAILED
    try:
        load_tvm(threads)
    except Exception as exc:  # ImportError, or a broken native library
        _FAILED = (
            f"apache-tvm does not import ({type(exc).__name__}: {exc}); install autoquant[tvm]"
        )
        return _FAILED
    return None


def load_tvm(threads: int | None = None) -> ModuleType:
    """Import TVM; ``threads`` sets ``TVM_NUM_THREADS`` if TVM is not imported yet.

    Without ``threads`` the pool is sized to every CPU (``TVM_NUM_THREADS`` left alone when
    set): TVM 0.27 defaults to half the CPUs and can shrink its pool later but never grow it.
    """
    import sys

    if "tvm" not in sys.modules:
        if threads is not None:
            os.environ["TVM_NUM_THREADS"] = str(threads)
        else:
            os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    import tvm

    return tvm


def runtime_threads() -> int:
    tvm = load_tvm()
    return int(tvm.get_global_func("runtime.NumThreads")())


def set_threads(threads: int) -> int:
    """Resize the local CPU thread pool (TVM ignores the environment after it started); returns
    the size it has now, which is smaller than asked when TVM was first imported elsewhere with
    a smaller ``TVM_NUM_THREADS``."""
    tvm = load_tvm(threads)
    if runtime_threads() != threads:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return runtime_threads()


def tvm_version() -> str:
    tvm = load_tvm()
    return str(tvm.__version__)
