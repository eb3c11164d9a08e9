"""ONNX Runtime sessions of this process: their options, and the one intra-op thread pool they
share once ``share_thread_pool`` made it. The export's validation and the ORT backend open their
sessions through here."""

from __future__ import annotations

from pathlib import Path

# The intra-op threads of ONNX Runtime's process-wide pool once ``share_thread_pool`` made it;
# None while every session has a pool of its own.
_shared_pool_threads: int | None = None


def share_thread_pool(threads: int) -> None:
    """Run every later ONNX Runtime session of this process on one pool of ``threads``
    intra-op threads (made on the first call).

    A session's own pool keeps its idle workers spinning long after a run (a 20 ms pause did
    not calm them). With many sessions open and visited in turn (``autoquant.measure.interleave``),
    the workers of the sessions not running took the CPU from the one being timed, several
    times a one-layer graph's time alone (``benchmarks/ort_thread_pool.py`` measures both
    ways). One shared pool is what a single deployed session runs on, and visits then time what a lone run does. ORT
    refuses sessions with pools of their own once it exists, so ``session_options`` gives
    every session the shared one from then on.

    Raises RuntimeError when the pool exists with another thread count."""
    global _shared_pool_threads
    if _shared_pool_threads == threads:
        return
    if _shared_pool_threads is not None:
        raise RuntimeError(
            f"ONNX Runtime's sessions in this process already share a pool of "
            f"{_shared_pool_threads} threads; {threads} asked: run it in a process of its own"
        )
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(threads, 1)
    _shared_pool_threads = threads


def session_threads(threads: int) -> int:
    """The intra-op threads a session asked to run on ``threads`` gets: the shared pool's,
    once there is one."""
    return threads if _shared_pool_threads is None else _shared_pool_threads


def session_options(level: str, *, threads: int = 1, optimized_path: Path | None = None):
    """ORT session options at optimization ``level`` with ``threads`` intra-op threads (the
    shared pool's once there is one: ``share_thread_pool``), sequential."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if _shared_pool_threads is None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    else:
        so.use_per_session_threads = False
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so
