"""The ONNX Runtime backend on this machine, no mocks: one-layer graphs in the exporter's form,
the backend contract, failures as data, profiling twice, a whole model end to end, the CLI.

Timings are never asserted beyond "measured and positive" (the machine is shared and noisy);
``min_repeat_ms`` is a few milliseconds so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_profile

from autoquant.hw.profiling import parse_label, profile_layers
from autoquant.hw.table import LatencyTable
from autoquant.hw.timing import KernelTiming
from autoquant.space.discovery import discover_layers
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

pytest.importorskip("onnxruntime")

# target without mcpu: auto, so that loading the profile does not import TVM
FAST = {
    "version": 1,
    "name": "test-ort",
    "target": {"kind": "llvm"},
    "device": {"where": "local"},
    "runtime": "onnxruntime",
    "threads": 2,
    "batch_size": 1,
    "measure": {"warmup": 1, "number": 1, "repeat": 3, "min_repeat_ms": 2, "timeout_s": 60},
    "formats": ["fp32", "fp16", "w8a8", "weight_only"],
}


def make_profile(tmp_path, **changes):
    return write_profile(tmp_path, {**FAST, **changes})


@pytest.fixture(scope="module")
def cnn_shapes():
    from autoquant.tasks.digits import DigitsCNN

    return discover_layers(DigitsCNN(), (1, 1, 8, 8))


@pytest.fixture
def backend(tmp_path):
    from autoquant.hw.backend import backend_for

    with backend_for(make_profile(tmp_path)) as b:
        yield b


# --- the LatencyBackend contract -------------------------------------------------------------


def test_backend_for_onnxruntime(backend):
    from autoquant.hw.ort_backend import OrtBackend

    assert isinstance(backend, OrtBackend)


def test_contract_fingerprint(backend, tmp_path):
    import onnxruntime

    from autoquant.hw.backend import backend_for

    fp = backend.fingerprint()
    for key in ("target", "runtime", "runtime_version", "threads", "batch", "kernels"):
        assert key in fp
    assert fp["runtime"] == "onnxruntime" and fp["runtime_version"] == onnxruntime.__version__
    assert fp["execution_provider"] == "CPUExecutionProvider"
    assert fp["threads"] == 2 and fp["batch"] == 1 and "export-form" in fp["kernels"]
    assert backend.fingerprint_hash() == backend.fingerprint_hash()
    with backend_for(make_profile(tmp_path, name="b4", batch_size=4)) as other:
        assert other.fingerprint_hash() != backend.fingerprint_hash()


def test_contract_exclusion_is_reported_not_timed(tmp_path, mlp_layers):
    from autoquant.hw.backend import backend_for

    with backend_for(make_profile(tmp_path, formats=["fp32", "weight_only"])) as b:
        w8a8 = QuantChoice(8, 8, "per_channel")
        reason = b.exclusion(mlp_layers[0], w8a8)
        assert reason and "w8a8" in reason and "test-ort" in reason
        timing = b.measure(mlp_layers[0], w8a8)
        assert timing.status == "excluded" and timing.error == reason
        assert b.exclusion(mlp_layers[0], QuantChoice()) is None
        assert b.exclusion(mlp_layers[0], parse_label("w4g32s-a32")) is None
        # choices the exporter cannot write are excluded too, with the space's reason
        assert "integer weights" in b.exclusion(mlp_layers[0], QuantChoice(32, 8))


def test_rpc_profiles_are_excluded(tmp_path, mlp_layers):
    from autoquant.hw.backend import backend_for

    prof = make_profile(
        tmp_path, name="remote", device={"where": "rpc", "tracker": "127.0.0.1:9", "key": "k"}
    )
    with backend_for(prof) as b:
        timing = b.measure(mlp_layers[0], QuantChoice())
        assert timing.status == "excluded"
        assert timing.error == "ONNX Runtime profiles run locally only"
        config = QuantConfig.uniform(mlp_layers, QuantChoice())
        assert b.measure_model(None, (1, 1, 8, 8), mlp_layers, config).status == "excluded"


# --- measuring one-layer graphs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "impl", "kernel"),
    [
        ("f32-a32", "ort:fp32", "Gemm"),
        ("w8cs-a8", "ort:int8-qdq-a8", "QGemm"),
        ("w4g32s-a32", "ort:matmulnbits", "MatMulNBits"),
    ],
)
def test_measure_linear(backend, mlp_layers, label, impl, kernel):
    layer = mlp_layers[1]  # hidden.1: 128 -> 64 on digits-mlp
    timing = backend.measure(layer, parse_label(label))
    assert timing.ok, timing.error
    assert timing.impl == impl and kernel in timing.details["ops"], timing.details
    assert len(timing.samples_us) == 3 and timing.min_us <= timing.median_us <= timing.max_us
    assert timing.median_us > 0 and not math.isnan(timing.spread)
    assert timing.build_s > 0 and timing.details["calls_per_sample"] >= 1


def test_sessions_share_one_thread_pool(backend, mlp_layers, tmp_path):
    """The backend's sessions run on one process-wide pool of the profile's threads (a pool per
    session let idle sessions' workers slow the visited one); sessions opened for exports then
    get that pool too, and a profile asking another thread count fails as data."""
    import onnx

    from autoquant.export.validate import open_session, session_threads, share_thread_pool
    from autoquant.hw.backend import backend_for

    assert backend.measure(mlp_layers[0], QuantChoice()).ok
    assert backend.fingerprint()["thread_pool"] == "shared"
    assert session_threads(1) == 2  # the profile's, whatever a later session asks
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4]) for n in "xy"]
    graph = onnx.helper.make_graph([node], "g", io[:1], io[1:])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = open_session(model.SerializeToString(), "enable_all", threads=1)
    assert session.run(None, {"x": -np.ones((1, 4), np.float32)})[0].max() == 0.0
    share_thread_pool(2)  # the same size again: nothing to do
    with pytest.raises(RuntimeError, match="already share a pool of 2 threads; 3 asked"):
        share_thread_pool(3)
    with backend_for(make_profile(tmp_path, name="one-thread", threads=1)) as other:
        timing = other.measure(mlp_layers[0], QuantChoice())
    assert timing.status == "failed" and "already share a pool of 2 threads" in timing.error


@pytest.mark.parametrize(("label", "kernel"), [("f32-a32", "Conv"), ("w8cs-a8", "QLinearConv")])
def test_measure_conv(backend, cnn_shapes, label, kernel):
    conv2 = next(layer for layer in cnn_shapes if layer.name == "conv2")
    timing = backend.measure(conv2, parse_label(label))
    assert timing.ok, timing.error
    assert kernel in timing.details["ops"] and timing.median_us > 0
    assert timing.details["input_shape"] == [1, 16, 8, 8]


def test_batch_size_is_the_profiles(tmp_path, mlp_layers):
    from autoquant.hw.backend import backend_for

    with backend_for(make_profile(tmp_path, name="b8", batch_size=8)) as b:
        timing = b.measure(mlp_layers[0], parse_label("w8cs-a8"))
    assert timing.ok, timing.error
    assert timing.details["input_shape"] == [8, 64]


def test_conv_geometry_from_shapes():
    import torch

    from autoquant.hw.ort_backend import conv_geometry

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), groups=4))
    (layer,) = discover_layers(model, (1, 8, 9, 11))
    geo = conv_geometry(layer)
    assert (geo.kernel, geo.stride, geo.padding, geo.groups) == ((3, 5), (2, 2), (1, 2), 4)


# --- failures are results, never exceptions --------------------------------------------------


def test_timeouts_are_data(tmp_path, mlp_layers):
    from autoquant.hw.backend import backend_for

    tiny = make_profile(tmp_path, name="tiny", measure={**FAST["measure"], "timeout_s": 1e-4})
    with backend_for(tiny) as b:
        timing = b.measure(mlp_layers[2], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("timeout: the export")
    slow = make_profile(
        tmp_path, name="slow", measure={**FAST["measure"], "min_repeat_ms": 50_000, "timeout_s": 30}
    )
    with backend_for(slow) as b:
        timing = b.measure(mlp_layers[2], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("timeout: one call takes")
    assert timing.impl == "ort:fp32"


def test_export_refusal_is_data(backend):
    # a 3-D Linear input: the exporter writes 2-D Linear layers only (excluded, not raised)
    layer = LayerInfo("seq", "linear", (8, 16), (1, 4, 16), (1, 4, 8), 512, 136, True)
    timing = backend.measure(layer, QuantChoice())
    assert timing.status == "excluded" and "2-D" in timing.error
    # shapes no convolution produces
    bad = LayerInfo("c", "conv", (4, 3, 3, 3), (1, 3, 8, 8), (1, 4, 20, 20), 1, 1, False)
    timing = backend.measure(bad, QuantChoice())
    assert timing.status == "excluded" and "stride/padding" in timing.error


def test_wrong_result_is_detected():
    from autoquant.hw.ort_backend import _disagreement

    expected = np.linspace(-1, 1, 50, dtype=np.float32).reshape(1, 50)
    assert _disagreement(expected + 1e-5, expected, 0.0) is None
    assert _disagreement(expected + 0.03, expected, 0.01) is None  # within 4 output steps
    off = expected.copy()
    off[0, 3] += 0.5
    assert "1 of 50 outputs differ" in _disagreement(off, expected, 0.01)
    assert "non-finite" in _disagreement(expected * np.nan, expected, 0.0)


# --- profiling through the table, end to end, the CLI ----------------------------------------


def test_profile_digits_mlp_twice_measures_nothing_the_second_time(backend, mlp_layers, tmp_path):
    choices = [parse_label(x) for x in ("f32-a32", "w8cs-a8", "w4g32s-a32", "w4cs-a8")]
    work = [(layer, choices) for layer in mlp_layers]
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        first = profile_layers(backend, work, table)
    excluded = {e.choice.label for e in first.entries if e.timing.status == "excluded"}
    assert excluded == {"w4cs-a8"}  # wNa8 is not among the profile's formats
    assert first.measured_now == 9 and first.count(status="measured") == 9, [
        e.timing.error for e in first.entries
    ]
    # the one-layer sessions stay open for the later rounds, one visit each (3 x 2 ms < 10 ms)
    rounds = backend.profile.spec.measure.rounds
    for e in first.entries:
        if e.timing.ok:
            assert e.timing.details["rounds"] == rounds
            assert len(e.timing.samples_us) == backend.profile.spec.measure.repeat + rounds - 1
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        second = profile_layers(backend, work, table)
    assert second.measured_now == 0 and second.count(reused=True) == 9
    assert second.lookup() == first.lookup()


def test_measure_model_digits_mlp(backend, mlp_layers):
    from autoquant.tasks.digits import DigitsMLP

    model = DigitsMLP()  # latency does not depend on trained values
    mixed = QuantConfig.from_mapping(
        {
            mlp_layers[0].name: parse_label("w8cs-a8"),
            mlp_layers[1].name: parse_label("w4g32s-a32"),
            mlp_layers[2].name: QuantChoice(),
        }
    )
    timing = backend.measure_model(model, (1, 1, 8, 8), mlp_layers, mixed)
    assert timing.ok, timing.error
    assert timing.impl == "model" and timing.median_us > 0 and len(timing.samples_us) == 3
    assert timing.details["forms"] == {"int8-qdq": 1, "matmulnbits": 1, "fp32": 1}
    assert {"QGemm", "MatMulNBits"} <= set(timing.details["ops"])
    partial = QuantConfig.from_mapping({mlp_layers[0].name: QuantChoice()})
    assert backend.measure_model(model, (1, 1, 8, 8), mlp_layers, partial).status == "failed"


def test_measure_model_default_is_failed_data(mlp_layers):
    from autoquant.hw.backend import LatencyBackend

    class Bare(LatencyBackend):
        def fingerprint(self):
            return {}

        def exclusion(self, layer, choice):
            return None

        def measure(self, layer, choice):
            return KernelTiming.failed("n/a")

    timing = Bare().measure_model(None, (1, 1, 8, 8), mlp_layers, QuantConfig())
    assert timing.status == "failed" and "not implemented" in timing.error


def test_reachability_says_local_onnxruntime():
    from autoquant.hw.command import reachability
    from autoquant.hw.profile import PROFILES_DIR, load_profile_spec

    answer = reachability(load_profile_spec(PROFILES_DIR / "cpu-local-ort.yaml"))
    assert answer == "yes (local onnxruntime)"


def test_cli_profile_cpu_local_ort(tmp_path):
    # cpu-local-ort's target says mcpu: auto, which the profile loader resolves through TVM
    pytest.importorskip("tvm")
    from typer.testing import CliRunner

    from autoquant.cli import app

    args = [
        "profile", "cpu-local-ort", "--task", "digits-mlp", "--choices", "f32-a32,w8cs-a8",
        "--table", str(tmp_path / "cli.sqlite"), "--min-repeat-ms", "5", "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())  # rich wraps the summary line at the terminal width
    assert result.exit_code == 0, text
    assert "6 kernels measured now, 0 reused" in text and "0 failed, 0 excluded" in text, text
