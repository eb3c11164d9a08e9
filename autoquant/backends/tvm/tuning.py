"""Opt-in meta_schedule tuning of one per-layer kernel (a profile's ``tuning:`` section).

``tune_kernel`` tunes the unscheduled PrimFunc of a ``KernelSpec`` (``backends.tvm.kernels``) with
``meta_schedule.tune_tir`` and returns a ``TunedKernel`` (the best schedule, compiled here), or a
one-line reason when tuning produced nothing: refused (not an llvm target), timed out, found no
working schedule, or raised. Failures are data, never exceptions: the caller keeps its
hand-scheduled kernel.

Tuning runs in a separate worker process (``TuningWorker``, started once and reused), because:

* a deadline must really stop it: ``tune_tir`` has no deadline, so the worker's whole process
  group (it and meta_schedule's builder/runner workers) is killed when time is up;
* ``tune_tir`` imports ``tvm.s_tir.tensor_intrin`` (30-55 s); a persistent worker pays that once,
  not once per kernel;
* a crash inside TVM (the apache-tvm-ffi 0.1.15 segfault) ends the worker, not the profiling run.

Only local llvm targets are tuned: meta_schedule's runner times candidates on this machine, so an
RPC profile would be tuned for the wrong device (``tuning_refusal``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.backends.contract import short_error
from autoquant.hardware.kernels import KernelSpec
from autoquant.hardware.profile import TuningSpec

# A profile's ``tuning.build_timeout_s`` when none is given (the machine constant lives in the
# profile schema: meta_schedule's default, 30 s, can be shorter than a builder worker's start).
DEFAULT_BUILD_TIMEOUT_S = TuningSpec.model_fields["build_timeout_s"].default
TRIALS_PER_ITER = 32
# a run record slower than this is meta_schedule's marker for a candidate that failed (1e10 s)
_FAILED_RUN_S = 1e9


@dataclass(frozen=True)
class TunedKernel:
    """The best schedule meta_schedule found for one kernel, compiled for the target."""

    executable: Any  # tvm Executable, called like the hand-scheduled one
    names: tuple[str, ...]  # argument names in order, as ``tvm_kernels.build`` gives them
    tuning_s: float  # wall seconds: worker start (first time), tuning, compile
    trials: int  # candidates meta_schedule measured
    valid: int  # of those, the ones that built and ran
    best_us: float  # meta_schedule's own figure (its runner's settings): for reference only


def tuning_refusal(profile: Any) -> str | None:
    """Why kernels of ``profile`` (a ``HardwareProfile``) cannot be tuned, or None."""
    if not profile.is_local:
        return (
            "tuning runs only on local profiles: meta_schedule times its candidates on this "
            "machine, and this profile measures over RPC"
        )
    if profile.target_kind != "llvm":
        return f"tuning runs only for llvm (CPU) targets, not {profile.target_kind}"
    return None


def tune_kernel(
    spec: KernelSpec,
    target: Any,
    *,
    trials: int,
    work_dir: str | Path,
    deadline_s: float,
    worker: TuningWorker | None = None,
    build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
) -> TunedKernel | str:
    """Tune ``spec`` for ``target`` (a ``tvm.target.Target`` or its dict) with at most ``trials``
    candidates, within ``deadline_s`` seconds from now; a reason string when there is no tuned
    kernel. ``worker`` reuses a running ``TuningWorker`` (else one is started and stopped);
    ``build_timeout_s`` is the profile's ``tuning.build_timeout_s`` (per candidate build)."""
    start = time.monotonic()
    target_dict = _jsonable(target if isinstance(target, dict) else dict(target.export()))
    kind = str(target_dict.get("kind"))
    if kind != "llvm":
        return f"tuning runs only for llvm (CPU) targets, not {kind}"
    if deadline_s <= 0:
        return "no time left for tuning"
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # the worker's (and its runner's) thread pool must match how the kernel is timed here
    threads = int(target_dict.get("num-cores") or os.cpu_count() or 1)
    own = worker is None
    if worker is None:
        worker = TuningWorker(threads, work_dir / "worker.log")
    try:
        reply = worker.request(
            ("tune", spec, target_dict, int(trials), str(work_dir), float(build_timeout_s)),
            deadline_s,
        )
    finally:
        if own:
            worker.close()
    if isinstance(reply, str):
        return reply
    if reply[0] != "ok":
        return str(reply[1])
    _, mod_json, names, n_trials, n_valid, best_us = reply
    try:
        from autoquant.hardware._tvm import load_tvm

        tvm = load_tvm()
        # compiled as is: meta_schedule's builder drops weight-layout-rewrite blocks (it feeds
        # pre-rewritten weights); kept here, the kernel takes our packed arguments like the hand one
        ex = tvm.compile(tvm.ir.load_json(mod_json), target=tvm.target.Target(target_dict))
    except Exception as exc:
        return f"the tuned schedule does not compile: {short_error(exc)}"
    return TunedKernel(
        ex, tuple(names), time.monotonic() - start, int(n_trials), int(n_valid), float(best_us)
    )


class TuningWorker:
    """A child process that tunes kernels on request, one at a time; killed (with the builder
    and runner processes it started) when a request runs past its deadline, and started again
    on the next request."""

    def __init__(self, threads: int, log_path: str | Path) -> None:
        self.threads = threads
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None

    def _start(self) -> None:
        parent, child = multiprocessing.Pipe()
        env = dict(os.environ)
        env["TVM_NUM_THREADS"] = str(self.threads)  # read when the worker imports tvm
        root = str(Path(__file__).resolve().parents[3])  # works without an installed package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "autoquant.backends.tvm.tuning", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # its own process group: killing it on a deadline takes its builders along
                start_new_session=True,
            )
        child.close()
        self._conn = parent

    def request(self, payload: tuple[Any, ...], timeout_s: float) -> tuple[Any, ...] | str:
        """The worker's reply, or why there is none (timeout, crash); never raises."""
        start = time.monotonic()
        try:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            self._conn.send(payload)
            left = timeout_s - (time.monotonic() - start)
            if left <= 0 or not self._conn.poll(left):
                self.close()
                return f"tuning timed out after {timeout_s:.3g} s"
            return tuple(self._conn.recv())
        except Exception as exc:  # EOF or a broken pipe: the worker died (a crash in TVM)
            code = self._proc.poll() if self._proc is not None else None
            self.close()
            return (
                f"the tuning process ended ({type(exc).__name__}, exit code {code}); "
                f"log: {self.log_path}{_last_line(self.log_path)}"
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:  # start_new_session: the group id is the worker's pid, never ours
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.wait()


# --- inside the worker process ------------------------------------------------------------------


def _serve(fd: int) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            reply: tuple[Any, ...] = _tune_here(*request[1:])
        except Exception as exc:
            reply = ("error", f"tuning raised {short_error(exc)}")
        conn.send(reply)


def _tune_here(
    spec: KernelSpec,
    target_dict: dict[str, Any],
    trials: int,
    work_dir: str,
    build_timeout_s: float = DEFAULT_BUILD_TIMEOUT_S,
) -> tuple[Any, ...]:
    from autoquant.backends.tvm import kernels as tvm_kernels
    from autoquant.hardware._tvm import load_tvm

    load_tvm()  # TVM_NUM_THREADS is in the environment already
    import tvm

    # tune_tir imports this itself (30-55 s); importing it first lets the VNNI fix override it
    import tvm.s_tir.tensor_intrin  # noqa: F401
    from tvm.s_tir import meta_schedule as ms

    _fix_vnni_intrinsic()
    target = tvm.target.Target(target_dict)
    func, names = tvm_kernels.build_prim_func(spec)
    cores = max(1, min(int(target_dict.get("num-cores") or 1), os.cpu_count() or 1))
    db = ms.tune_tir(
        mod=func,
        target=target,
        work_dir=work_dir,
        max_trials_global=trials,
        num_trials_per_iter=min(trials, TRIALS_PER_ITER),
        num_tuning_cores=cores,
        seed=0,
        builder=ms.builder.LocalBuilder(
            max_workers=cores, timeout_sec=build_timeout_s, f_build=_make_build()
        ),
    )
    records = db.get_all_tuning_records()
    runs = [_best_run_s(r) for r in records]
    valid = [s for s in runs if s < _FAILED_RUN_S]
    sch = ms.tir_integration.compile_tir(db, func, target)
    if sch is None or not valid:
        found = f"meta_schedule found no working schedule in {len(records)} trials"
        return ("none", f"{found} (log: {work_dir})")
    return ("ok", tvm.ir.save_json(sch.mod), names, len(records), len(valid), min(valid) * 1e6)


def _best_run_s(record: Any) -> float:
    secs = [float(getattr(s, "value", s)) for s in (record.run_secs or [])]
    return min(secs) if secs else float("inf")


def _fix_vnni_intrinsic() -> None:
    """Point meta_schedule's auto-tensorize name ``dot_16x4_vnni`` at the LLVM-22-valid VNNI
    implementation (the stock one fails LLVM's verifier, so every VNNI candidate would fail)."""
    try:
        from tvm.s_tir import TensorIntrin
        from tvm.s_tir.tensor_intrin.x86 import VNNI_DOT_16x4_INTRIN

        from autoquant.backends.tvm.kernels import register_vnni

        fixed = TensorIntrin.get(register_vnni())
        TensorIntrin.register(VNNI_DOT_16x4_INTRIN, fixed.desc, fixed.impl, override=True)
    except Exception:  # not fatal: VNNI candidates fail to build and others are kept
        pass


def _make_build() -> Any:
    """meta_schedule's build function without its ``import tvm.s_tir.tensor_intrin`` (30-55 s
    in every builder worker, and the builder pool restarts every iteration): the IR a builder
    receives is already tensorized, so it needs no registered intrinsic. Defined inside a
    function so cloudpickle sends it by value: the builder workers need not import autoquant."""

    def build(mod: Any, target: Any, _params: Any) -> Any:
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return build


# --- helpers ----------------------------------------------------------------------------------


def _jsonable(target: dict[str, Any]) -> dict[str, Any]:
    """A plain copy of a target dict (``Target.export()`` values include TVM containers)."""
    return json.loads(json.dumps(target, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return dict(value.items())
    if hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        return list(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:200]}" if lines else ""


if __name__ == "__main__":
    # ``python -m autoquant.backends.tvm.tuning FD``: run as __main__, so serve from the real module
    # (pickled requests name ``autoquant`` classes)
    from autoquant.backends.tvm.tuning import _serve as serve

    serve(int(sys.argv[1]))
