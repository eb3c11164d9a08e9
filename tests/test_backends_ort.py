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

from autoquant.errors import UserError
from autoquant.latency.profiling import parse_label, profile_layers
from autoquant.latency.table import LatencyTable
from autoquant.measure.timing import KernelTiming
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
    from autoquant.backends.registry import backend_for

    with backend_for(make_profile(tmp_path)) as b:
        yield b


# --- the LatencyBackend contract -------------------------------------------------------------


def test_backend_for_onnxruntime(backend):
    from autoquant.backends.ort.backend import OrtBackend

    assert isinstance(backend, OrtBackend)


def test_contract_fingerprint(backend, tmp_path):
    import onnxruntime

    from autoquant.backends.registry import backend_for

    fp = backend.fingerprint()
    for key in ("target", "runtime", "runtime_version", "threads", "batch", "kernels"):
        assert key in fp
    assert fp["runtime"] == "onnxruntime" and fp["runtime_version"] == onnxruntime.__version__
    assert fp["execution_provider"] == "CPUExecutionProvider"
    assert fp["threads"] == 2 and fp["batch"] == 1 and "export-form" in fp["kernels"]
    assert backend.fingerprint_hash() == backend.fingerprint_hash()
    with backend_for(make_profile(tmp_path, name="b4", batch_size=4)) as other:
        assert other.fingerprint_hash() != backend.fingerprint_hash()


def test_execution_provider_from_the_profile(tmp_path):
    """Sessions run on the profile's execution provider; one this onnxruntime build lacks is
    the profile's mistake (one line naming the key), not a crash at the first session."""
    import onnxruntime

    from autoquant.backends.registry import backend_for

    available = onnxruntime.get_available_providers()
    chosen = available[0]
    with backend_for(make_profile(tmp_path, name="ep", execution_provider=chosen)) as b:
        assert b.provider == chosen and b.fingerprint()["execution_provider"] == chosen
    missing = make_profile(tmp_path, name="noep", execution_provider="NoSuchExecutionProvider")
    with pytest.raises(UserError) as info:
        backend_for(missing)
    message = str(info.value)
    assert "execution_provider" in message and "NoSuchExecutionProvider" in message
    assert "CPUExecutionProvider" in message and "\n" not in message


def test_contract_exclusion_is_reported_not_timed(tmp_path, mlp_layers):
    from autoquant.backends.registry import backend_for

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
    from autoquant.backends.registry import backend_for

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

    from autoquant.backends.registry import backend_for
    from autoquant.export.validate import open_session, session_threads, share_thread_pool

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
    from autoquant.backends.registry import backend_for

    with backend_for(make_profile(tmp_path, name="b8", batch_size=8)) as b:
        timing = b.measure(mlp_layers[0], parse_label("w8cs-a8"))
    assert timing.ok, timing.error
    assert timing.details["input_shape"] == [8, 64]


def test_conv_geometry_from_shapes():
    import torch

    from autoquant.backends.ort.backend import conv_geometry

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), groups=4))
    (layer,) = discover_layers(model, (1, 8, 9, 11))
    geo = conv_geometry(layer)
    assert (geo.kernel, geo.stride, geo.padding, geo.groups) == ((3, 5), (2, 2), (1, 2), 4)


@pytest.mark.parametrize("groups", [4, 16])
@pytest.mark.parametrize("label", ["f32-a32", "w8cs-a8"])
def test_grouped_and_depthwise_convs_are_timed(backend, groups, label):
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=groups))
    (layer,) = discover_layers(model, (1, 16, 8, 8))
    timing = backend.measure(layer, parse_label(label))
    assert timing.ok, timing.error
    assert timing.details["input_shape"] == [1, 16, 8, 8]


# --- failures are results, never exceptions --------------------------------------------------


def test_timeouts_are_data(tmp_path, mlp_layers):
    from autoquant.backends.registry import backend_for

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


def test_export_refusal_is_data(backend, mlp_layers, monkeypatch):
    # a Linear whose weight does not fit its input: excluded, not raised
    layer = LayerInfo("seq", "linear", (8, 16), (1, 4, 12), (1, 4, 8), 384, 136, True)
    timing = backend.measure(layer, QuantChoice())
    assert timing.status == "excluded" and "does not fit" in timing.error
    # shapes no convolution produces
    bad = LayerInfo("c", "conv", (4, 3, 3, 3), (1, 3, 8, 8), (1, 4, 20, 20), 1, 1, False)
    timing = backend.measure(bad, QuantChoice())
    assert timing.status == "excluded" and "stride/padding" in timing.error
    # the exporter refusing a layer: a failed timing with its one-line reason
    import autoquant.onnxgraph.graph as graph
    from autoquant.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("layer 'layer': not a form the exporter writes", key="config")

    monkeypatch.setattr(graph, "export_graph", refuse)
    timing = backend.measure(mlp_layers[0], QuantChoice())
    assert timing.status == "failed" and timing.error.startswith("export error: UserError")
    assert "\n" not in timing.error


def test_wrong_result_is_detected():
    from autoquant.backends.ort.backend import _disagreement

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


def test_equal_layers_share_every_round(backend, tmp_path):
    # a ResNet's or a transformer's repeated layers: the second reads the first's timing back
    # from the table after its first round, and still ends with all its rounds
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    work = [(layer, [QuantChoice()]) for layer in discover_layers(model, (1, 32))]
    with LatencyTable(tmp_path / "lat.sqlite") as table:
        result = profile_layers(backend, work, table)
    first, second = result.entries
    assert not first.reused and second.reused and result.measured_now == 1
    assert second.timing == first.timing
    assert first.timing.details["rounds"] == backend.profile.spec.measure.rounds


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
    from autoquant.backends.contract import LatencyBackend

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
    from autoquant.commands.profile import reachability
    from autoquant.hardware.profile import PROFILES_DIR, load_profile_spec

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


# --- N-D Linear layers, named inputs, profile --spec ------------------------------------------


@pytest.mark.parametrize("label", ["f32-a32", "w8cs-a8", "w4g32s-a32"])
def test_linear_on_token_input_is_timed_at_its_rank(backend, label):
    # a transformer's Linear runs on [batch, tokens, features]: its one-layer graph does too
    import torch

    from autoquant.backends.ort.backend import layer_module

    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    (layer,) = discover_layers(model, (1, 6, 64))
    assert layer.input_shape == (1, 6, 64) and backend.exclusion(layer, parse_label(label)) is None
    timing = backend.measure(layer, parse_label(label))
    assert timing.ok, timing.error
    assert timing.details["input_shape"] == [1, 6, 64] and timing.median_us > 0
    out = layer_module(layer)(torch.zeros(2, 6, 64))
    assert out.shape == (2, 6, 48)


class TwoInputs:
    """A tiny model with named int64 inputs, as a tokenizer gives them."""

    def __new__(cls):
        import torch

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = torch.nn.Embedding(50, 8)
                self.fc1 = torch.nn.Linear(5 * 8, 32)
                self.fc2 = torch.nn.Linear(32, 3)

            def forward(self, input_ids, attention_mask):
                h = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
                return self.fc2(torch.relu(self.fc1(torch.flatten(h, 1))))

        torch.manual_seed(0)
        return Model().eval()


def two_input_samples(n: int = 12):
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, 5), generator=generator)
    mask = torch.ones(n, 5, dtype=torch.int64)
    mask[::2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_named_inputs_through_the_whole_model_path(tmp_path):
    from autoquant.backends.inputs import ModelInputs
    from autoquant.backends.registry import backend_for
    from autoquant.latency.table import model_signature

    model, samples = TwoInputs(), two_input_samples()
    layers = discover_layers(model, {k: v[:1] for k, v in samples.items()})
    assert [layer.name for layer in layers] == ["fc1", "fc2"]
    config = QuantConfig.from_mapping({"fc1": parse_label("w8cs-a8"), "fc2": QuantChoice()})
    with backend_for(make_profile(tmp_path, name="b3", batch_size=3)) as b:
        prepared = b.prepare_model(model, samples, layers, config)
        assert not isinstance(prepared, KernelTiming), prepared.error
        try:
            # the task's own token ids and mask, taken to the profile's batch, int64
            assert set(prepared.feed) == {"input_ids", "attention_mask"}
            assert prepared.feed["input_ids"].dtype == np.int64
            np.testing.assert_array_equal(prepared.feed["input_ids"], samples["input_ids"][:3])
            assert prepared.details["input_shape"] == {
                "input_ids": [3, 5],
                "attention_mask": [3, 5],
            }
            assert prepared.visit(0.002) > 0
        finally:
            prepared.close()
        timing = b.measure_model(model, samples, layers, config)
        assert timing.ok, timing.error
        assert timing.details["forms"] == {"int8-qdq": 1, "fp32": 1}
        # more samples than the batch needs, or fewer: repeated in turn
        assert (
            ModelInputs.of({k: v[:2] for k, v in samples.items()}).feeds(3)["input_ids"].tolist()
            == samples["input_ids"][[0, 1, 0]].tolist()
        )
    # the table's key for whole-model timings: the inputs' shapes and dtypes, not their values
    key = model_signature(model, samples, layers)
    assert key == model_signature(model, two_input_samples(3), layers)
    assert key != model_signature(model, {"input_ids": samples["input_ids"]}, layers)


SPEC_TASK = """
import torch

from autoquant.tasks import Task, top1_accuracy


def tiny(hidden: int = 16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3)
    ).eval()
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    return Task(name="tiny", model=model, calibration_inputs=x, eval_inputs=x,
                eval_targets=y, metric=top1_accuracy, input_shape=(1, 8))
"""


def spec_with_user_task(tmp_path):
    import yaml

    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / "tinytask_for_profile.py").write_text(SPEC_TASK)
    (folder / "ort.yaml").write_text(yaml.safe_dump({**FAST, "name": "spec-ort"}))
    (folder / "space.yaml").write_text(
        "version: 1\nrules:\n  - match: {}\n    weight_bits: [8, 32]\n    act_bits: [8, 32]\n"
        "    granularity: [per_channel]\n"
    )
    spec = folder / "spec.yaml"
    spec.write_text(
        "version: 1\nname: tiny\n"
        "task: {function: tinytask_for_profile:tiny, args: {hidden: 24}}\nspace: space.yaml\n"
    )
    return spec


def test_profile_spec_profiles_the_spec_task_over_its_space(tmp_path, capsys):
    import json

    from conftest import run_cli

    spec = spec_with_user_task(tmp_path)
    out = tmp_path / "t.json"
    code, stdout, stderr = run_cli(
        ["profile", spec.parent / "ort.yaml", "--spec", spec, "--table", tmp_path / "t.sqlite",
         "--json", out, "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    entries = json.loads(out.read_text())["entries"]
    assert all(e["status"] == "measured" for e in entries), entries
    # the task's args reached it (hidden 24: the second layer's input), the space gave the
    # choices (8 or 32-bit weights, per channel)
    assert {e["layer"] for e in entries} == {"0", "2"}
    assert {tuple(e["details"]["input_shape"]) for e in entries if e["layer"] == "2"} == {(1, 24)}
    labels = {e["choice"] for e in entries}
    assert "f32-a32" in labels and "w8cs-a8" in labels
    assert all(label == "f32-a32" or label.startswith("w8c") for label in labels), labels


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--task", "digits-mlp"], "--task: bad value 'digits-mlp' with --spec"),
        (["--choices", "f32-a32"], "--choices: bad value --choices with --spec"),
        ([], None),  # no --spec and no --task
    ],
)
def test_profile_spec_errors_are_one_line(tmp_path, capsys, extra, needle):
    from conftest import run_cli

    spec = spec_with_user_task(tmp_path)
    args = ["profile", spec.parent / "ort.yaml", *extra]
    if needle is not None:
        args += ["--spec", spec]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert (needle or "no task given") in stderr
    missing = tmp_path / "nope.yaml"
    code, _, stderr = run_cli(["profile", spec.parent / "ort.yaml", "--spec", missing], capsys)
    assert code == 2 and "nope.yaml: file not found" in stderr


def test_statistic_override_rereads_the_same_samples(tmp_path, capsys):
    import json

    from conftest import run_cli

    spec = spec_with_user_task(tmp_path)
    table, out = tmp_path / "t.sqlite", tmp_path / "v.json"
    args = ["profile", spec.parent / "ort.yaml", "--spec", spec, "--table", table, "--validate",
            "3", "--quiet", "--json", out]  # fmt: skip
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert json.loads(out.read_text())["validation"]["model"]["statistic"] == "median"
    code, stdout, stderr = run_cli([*args, "--statistic", "min"], capsys)
    assert code == 0, stderr
    text = " ".join(stdout.split())
    assert "0 kernels measured now" in text and "0 configs measured now" in text, text
    data = json.loads(out.read_text())["validation"]
    assert data["model"]["statistic"] == "min"
    assert all(row["measured_ms"] > 0 for row in data["validation"]["rows"])
    code, _, stderr = run_cli([*args, "--statistic", "mean"], capsys)
    assert code == 2 and "measure.statistic: bad value 'mean'" in stderr
