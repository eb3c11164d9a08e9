"""Opt-in meta_schedule tuning (a profile's ``tuning:``): real TVM, no mocks.

The fast tests cover everything but a real tuning run: the fingerprint, the refusal for RPC
profiles and non-llvm targets, a deadline that kills the tuning worker, and a used-up budget
(hand timings, with the reason in ``details``). The slow one tunes one small digits-mlp kernel
with 8 trials (~1-2 min on 2 cores, most of it meta_schedule's start-up).
"""

from __future__ import annotations

import time

import pytest
from conftest import fast_profile, tvm_or_skip

from autoquant.measure.timing import KernelTiming
from autoquant.space.values import QuantChoice

pytestmark = pytest.mark.requires_tvm


def tvm_backend(profile):
    tvm_or_skip()
    from autoquant.backends.tvm.backend import TvmBackend

    return TvmBackend(profile)


def test_fingerprint_has_the_tuning_settings(tmp_path):
    plain = tvm_backend(fast_profile(tmp_path))
    tuned = tvm_backend(
        fast_profile(tmp_path, name="tuned", tuning={"trials_per_kernel": 8, "budget_s": 30})
    )
    with plain, tuned:
        assert "tuning" not in plain.fingerprint()  # untuned tables keep their keys
        assert tuned.fingerprint()["tuning"] == {"trials_per_kernel": 8, "budget_s": 30.0}
        assert plain.fingerprint_hash() != tuned.fingerprint_hash()
        fewer = tvm_backend(
            fast_profile(tmp_path, name="fewer", tuning={"trials_per_kernel": 4, "budget_s": 30})
        )
        with fewer:
            assert fewer.fingerprint_hash() != tuned.fingerprint_hash()


def test_machine_constants_enter_the_fingerprint_only_when_set(tmp_path):
    """``tuning.build_timeout_s`` and ``schedule.parallel_min_macs`` moved from code into the
    profile: at their defaults the fingerprint (and every table keyed by it) is as before."""
    tuning = {"trials_per_kernel": 8, "budget_s": 30}
    default = tvm_backend(
        fast_profile(tmp_path, name="d", tuning={**tuning, "build_timeout_s": 180})
    )
    slow = tvm_backend(fast_profile(tmp_path, name="s", tuning={**tuning, "build_timeout_s": 600}))
    serial = tvm_backend(fast_profile(tmp_path, name="p", schedule={"parallel_min_macs": 0}))
    with default, slow, serial:
        assert default.fingerprint()["tuning"] == {"trials_per_kernel": 8, "budget_s": 30.0}
        assert "schedule" not in default.fingerprint()
        assert slow.fingerprint()["tuning"]["build_timeout_s"] == 600
        assert serial.fingerprint()["schedule"] == {"parallel_min_macs": 0}
        assert len({b.fingerprint_hash() for b in (default, slow, serial)}) == 3


def test_rpc_profile_is_never_tuned(tmp_path):
    from autoquant.backends.tvm.tuning import tuning_refusal

    local = fast_profile(tmp_path, tuning={"trials_per_kernel": 8, "budget_s": 30})
    remote = local.with_overrides(rpc_tracker="127.0.0.1:9", rpc_key="nobody")
    assert remote.spec.tuning is not None and not remote.is_local
    assert tuning_refusal(local) is None
    reason = tuning_refusal(remote)
    assert reason and "only on local profiles" in reason
    with tvm_backend(local) as b:
        assert b.tuning_decision() is None
    with tvm_backend(remote) as b:  # no session is opened until a kernel is measured
        assert b.tuning_decision() == reason
        assert b.fingerprint()["tuning"] == {"trials_per_kernel": 8, "budget_s": 30.0}


def test_tune_kernel_refusals_and_deadline(tmp_path, mlp_layers):
    tvm_or_skip()
    from autoquant.backends.tvm.tuning import TuningWorker, tune_kernel
    from autoquant.hardware.kernels import kernel_spec

    spec = kernel_spec(mlp_layers[2], QuantChoice(), 1, vnni=False)
    target = {"kind": "llvm", "num-cores": 2}
    reason = tune_kernel(
        spec, {"kind": "cuda", "arch": "sm_90"}, trials=8, work_dir=tmp_path, deadline_s=60
    )
    assert reason == "tuning runs only for llvm (CPU) targets, not cuda"
    no_time = tune_kernel(spec, target, trials=8, work_dir=tmp_path, deadline_s=0)
    assert no_time == "no time left for tuning"
    # a deadline far shorter than the worker's start: it is killed, with what it started
    worker = TuningWorker(2, tmp_path / "worker.log")
    start = time.monotonic()
    late = tune_kernel(spec, target, trials=8, work_dir=tmp_path, deadline_s=0.2, worker=worker)
    assert late == "tuning timed out after 0.2 s"
    assert time.monotonic() - start < 5
    assert worker._proc is None  # killed and reaped, not left running
    worker.close()


def test_used_up_budget_keeps_hand_timings(tmp_path, mlp_layers):
    """budget_s 0.1: the first kernel's tuning is stopped at the budget, every later kernel
    is timed with its hand schedule at once; all keep their hand timings and say why."""
    profile = fast_profile(tmp_path, tuning={"trials_per_kernel": 8, "budget_s": 0.1})
    with tvm_backend(profile) as b:
        first = b.measure(mlp_layers[2], QuantChoice())
        start = time.monotonic()
        second = b.measure(mlp_layers[1], QuantChoice())
        later_s = time.monotonic() - start
        visit = b.kernel_visitor(mlp_layers[1], QuantChoice(), 0.002)
        visited = visit() if visit else None
    for t in (first, second):
        assert isinstance(t, KernelTiming) and t.ok, t.error
        assert not t.impl.startswith("tuned:") and t.impl == "dense-fp32-a32"
        assert t.details["hand_us"] == t.median_us and "tuned_us" not in t.details
    assert first.details["tuning_error"] == "tuning timed out after 0.1 s"
    assert first.details["tuning_s"] >= 0.1
    assert second.details["tuning_error"] == "tuning budget of 0.1 s used up"
    assert "tuning_s" not in second.details and later_s < 5
    assert visited and visited > 0  # the hand kernel's timer


@pytest.mark.slow
def test_tunes_a_digits_mlp_kernel(tmp_path, mlp_layers):
    """8 trials of meta_schedule on hidden.1 (256 -> 128, fp32, batch 1): the tuned kernel is
    checked against numpy and timed like the hand one; whichever won, both figures are kept."""
    profile = fast_profile(tmp_path, tuning={"trials_per_kernel": 8, "budget_s": 600})
    layer = mlp_layers[1]
    with tvm_backend(profile) as b:
        timing = b.measure(layer, QuantChoice())
        visit = b.kernel_visitor(layer, QuantChoice(), 0.002)
        visited = visit() if visit else None
    d = timing.details
    assert timing.ok, timing.error
    assert "tuning_error" not in d, d["tuning_error"]
    assert d["tuning_s"] > 0 and 1 <= d["tuning_trials"] <= 8
    assert d["hand_us"] > 0 and d["tuned_us"] > 0
    won = d["tuned_us"] < d["hand_us"]
    assert timing.impl == ("tuned:dense-fp32-a32" if won else "dense-fp32-a32")
    assert timing.median_us == (d["tuned_us"] if won else d["hand_us"])
    assert visited and visited > 0
    print(f"\nhand {d['hand_us']:.2f} us, tuned {d['tuned_us']:.2f} us, {d['tuning_s']:.0f} s")
