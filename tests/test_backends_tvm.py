"""The TVM backend on this machine: the backend contract, failures as data, and profiling
digits-mlp twice measuring nothing the second time."""

from __future__ import annotations

import math

import pytest
from conftest import FAST_PROFILE, fast_profile, tvm_or_skip

from autoquant.latency.profiling import parse_label, profile_layers
from autoquant.latency.table import LatencyTable
from autoquant.measure.timing import KernelTiming
from autoquant.space.values import QuantChoice

pytestmark = pytest.mark.requires_tvm


@pytest.fixture
def backend(tmp_path):
    tvm_or_skip()
    from autoquant.backends.registry import backend_for

    with backend_for(fast_profile(tmp_path)) as b:
        yield b


# --- the LatencyBackend contract (every implementation must pass these) ----------------------


def test_contract_fingerprint(backend):
    fp = backend.fingerprint()
    for key in ("target", "runtime", "runtime_version", "threads", "batch", "kernels"):
        assert key in fp
    assert fp["threads"] == 2 and fp["batch"] == 1
    assert backend.fingerprint_hash() == backend.fingerprint_hash()


def test_contract_measure_returns_timing(backend, mlp_layers):
    timing = backend.measure(mlp_layers[0], QuantChoice(8, 8, "per_channel"))
    assert timing.ok, timing.error
    assert len(timing.samples_us) == 3 and timing.min_us <= timing.median_us <= timing.max_us
    assert timing.median_us > 0 and not math.isnan(timing.spread)
    assert timing.impl.startswith("dense-w8a8-w8-c-sym-a8")


def test_contract_exclusion_is_reported_not_timed(tmp_path, mlp_layers):
    from autoquant.backends.registry import backend_for

    tvm_or_skip()
    with backend_for(fast_profile(tmp_path, formats=["fp32"])) as b:
        reason = b.exclusion(mlp_layers[0], QuantChoice(4, 32, "per_channel"))
        assert reason and "weight_only" in reason
        timing = b.measure(mlp_layers[0], QuantChoice(4, 32, "per_channel"))
        assert timing.status == "excluded" and timing.error == reason
        assert b.exclusion(mlp_layers[0], QuantChoice()) is None


def test_non_cpu_target_is_excluded(tmp_path, mlp_layers):
    from autoquant.backends.registry import backend_for

    tvm_or_skip()
    prof = fast_profile(tmp_path, name="gpu", target={"kind": "cuda", "arch": "sm_90"})
    with backend_for(prof) as b:
        timing = b.measure(mlp_layers[0], QuantChoice())
    assert timing.status == "excluded" and "cuda" in timing.error


# --- failures are results, never exceptions --------------------------------------------------


def test_build_error_is_data(backend, mlp_layers, monkeypatch):
    from autoquant.backends.tvm import kernels as tvm_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM module verification failed")

    monkeypatch.setattr(tvm_kernels, "build", broken)
    timing = backend.measure(mlp_layers[1], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("build error")
    assert "verification failed" in timing.error


def test_wrong_result_is_data(backend, mlp_layers, monkeypatch):
    import autoquant.backends.tvm.backend as tb

    monkeypatch.setattr(tb, "check_output", lambda *a: "3 of 256 outputs differ")
    timing = backend.measure(mlp_layers[1], QuantChoice())
    assert timing.status == "failed" and timing.error == "wrong result: 3 of 256 outputs differ"


def test_timeouts_are_data(tmp_path, mlp_layers):
    from autoquant.backends.registry import backend_for

    tvm_or_skip()
    slow = fast_profile(
        tmp_path, measure={**FAST_PROFILE["measure"], "min_repeat_ms": 50_000, "timeout_s": 30}
    )
    with backend_for(slow) as b:
        timing = b.measure(mlp_layers[2], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("timeout: one call takes")
    tiny = fast_profile(tmp_path, measure={**FAST_PROFILE["measure"], "timeout_s": 1e-4})
    with backend_for(tiny) as b:
        timing = b.measure(mlp_layers[2], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("timeout: the build took")


# --- profiling through the table ---------------------------------------------------------------


def test_profile_digits_mlp_twice_measures_nothing_the_second_time(
    backend, mlp_layers, tmp_path, monkeypatch
):
    from autoquant.backends.tvm import kernels as tvm_kernels

    choices = [parse_label(x) for x in ("f32-a32", "w8cs-a8", "w4g32s-a32", "w4g64s-a32")]
    work = [(layer, choices) for layer in mlp_layers]
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        first = profile_layers(backend, work, table)
    # 3 layers x 4 choices; hidden.0 has K=64, where groups of 64 are per-channel: excluded
    excluded = [
        (e.layer.name, e.choice.label) for e in first.entries if e.timing.status == "excluded"
    ]
    assert excluded == [("hidden.0", "w4g64s-a32")]
    assert first.measured_now == 11 and first.count(reused=True) == 0
    assert first.count(status="measured") == 11, [e.timing.error for e in first.entries]

    builds = []
    real_build = tvm_kernels.build
    monkeypatch.setattr(
        tvm_kernels, "build", lambda *a, **k: builds.append(a) or real_build(*a, **k)
    )
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        second = profile_layers(backend, work, table)
    assert second.measured_now == 0 and second.count(reused=True) == 11 and builds == []
    assert second.lookup() == first.lookup()


def test_failed_kernels_reused_unless_retry(backend, mlp_layers, tmp_path, monkeypatch):
    import autoquant.backends.tvm.backend as tb

    work = [(mlp_layers[2], [QuantChoice()])]
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        monkeypatch.setattr(tb, "check_output", lambda *a: "bad")
        first = profile_layers(backend, work, table)
        assert first.count(status="failed") == 1
        monkeypatch.undo()
        again = profile_layers(backend, work, table)
        assert again.count(status="failed") == 1 and again.measured_now == 0
        retried = profile_layers(backend, work, table, retry_failed=True)
        assert retried.measured_now == 1 and retried.count(status="measured") == 1


def test_corrupt_entry_is_measured_again(backend, mlp_layers, tmp_path):
    import sqlite3

    work = [(mlp_layers[2], [QuantChoice()])]
    path = tmp_path / "lat.sqlite"
    with LatencyTable(path) as table:
        profile_layers(backend, work, table)
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE timings SET checksum = 'x'")
    db.close()
    with LatencyTable(path) as table:
        result = profile_layers(backend, work, table)
        assert result.measured_now == 1 and table.invalidated == 1
        assert profile_layers(backend, work, table).measured_now == 0


def test_kernel_timing_is_never_raised_for_excluded_invalid_choice(backend, mlp_layers, tmp_path):
    work = [(mlp_layers[0], [QuantChoice(32, 8)])]  # int8 activations need integer weights
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        result = profile_layers(backend, work, table)
    (entry,) = result.entries
    assert entry.timing.status == "excluded" and "integer weights" in entry.timing.error
    assert isinstance(entry.timing, KernelTiming)


def test_kernels_measured_now_get_more_interleaved_rounds(tmp_path, mlp_layers):
    """measure.rounds: 3 — every fresh kernel gets its first round (repeat samples) and 2 more
    of visits: repeat x min_repeat_ms (3 x 2 ms) cut into 1 ms visits is 6 per round, all its
    samples stored together; reused ones are not timed again."""
    tvm_or_skip()
    from autoquant.backends.registry import backend_for

    measure = {**FAST_PROFILE["measure"], "rounds": 3, "min_repeat_ms": 2, "visit_ms": 1}
    profile = fast_profile(tmp_path, measure=measure)
    repeat = profile.spec.measure.repeat
    work = [(mlp_layers[2], [QuantChoice(), parse_label("w8cs-a8")])]
    with backend_for(profile) as backend, LatencyTable(tmp_path / "lat.sqlite") as table:
        first = profile_layers(backend, work, table)
        for e in first.entries:
            assert e.timing.details["rounds"] == 3 and e.timing.details["visits_per_round"] == 6
            assert len(e.timing.samples_us) == repeat + 2 * 6
        stored = table.get(backend.fingerprint_hash(), mlp_layers[2], QuantChoice())
        assert len(stored.timing.samples_us) == repeat + 2 * 6
        again = profile_layers(backend, work, table)
    assert again.measured_now == 0 and again.lookup() == first.lookup()


def test_short_error_keeps_the_message_line():
    from autoquant.backends.contract import short_error

    err = RuntimeError("Traceback (most recent call last):\n  File x\nInternalError: Check failed")
    assert short_error(err) == "RuntimeError: InternalError: Check failed"
    assert short_error(ValueError("")) == "ValueError: "


def test_short_error_of_a_real_tvmscript_diagnostic():
    """TVMScript diagnostics end with the source line and carets; the message comes first."""
    tvm_or_skip()
    from autoquant.backends.contract import short_error
    from autoquant.hardware._tvm import load_tvm

    load_tvm()
    from tvm.script import tirx as T

    with pytest.raises(Exception) as info:

        @T.prim_func(s_tir=True)
        def bad(A: T.Buffer((4,), "float32")) -> None:
            A[0] = no_such_name  # noqa: F821

    text = short_error(info.value)
    assert "error:" in text and "^^^" not in text, text
