"""The exported graph computes what the torch simulation computes, form by form, in real ONNX
Runtime sessions at ORT_DISABLE_ALL and ORT_ENABLE_ALL; and the known traps are caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from autoquant.export.validate import (  # noqa: E402
    INTEGER_KERNELS,
    LEVELS,
    Tolerances,
    agreement,
    open_session,
    run_batched,
    validate_export,
)
from autoquant.onnxgraph.graph import export_graph, float_graph  # noqa: E402
from autoquant.quant import apply, calibrate  # noqa: E402
from autoquant.quant.fake import ActivationParams  # noqa: E402
from autoquant.space.values import FP32, QuantChoice, QuantConfig  # noqa: E402
from autoquant.tasks import load_task  # noqa: E402
from autoquant.tasks.base import top1_accuracy  # noqa: E402

C = QuantChoice
INT8_KERNEL = C(8, 8, "per_channel", None, True)


@pytest.fixture(scope="module")
def cnn():
    task = load_task("digits-cnn")
    cal = calibrate(task.model, task.calibration_inputs)
    with torch.no_grad():
        ref = task.model(task.calibration_inputs)
    step = ActivationParams.from_range(float(ref.min()), float(ref.max())).scale
    return task, cal, step


def _max_steps(task, cal, step, config, tmp_path: Path, **kw) -> tuple[dict[str, float], object]:
    graph = export_graph(task.model, task.input_shape, config, cal, **kw)
    path = tmp_path / "m.onnx"
    onnx.save(graph.model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        sim = apply(task.model, config, cal)(task.eval_inputs).numpy()
    x = task.eval_inputs.numpy()
    steps = {
        lvl: agreement(run_batched(open_session(path, lvl), x), sim, step)["max_steps"]
        for lvl in LEVELS
    }
    return steps, graph


CASES = [
    ("conv2", C(8, 8, "per_tensor", None, False)),
    ("conv2", C(8, 8, "per_channel", None, False)),
    ("conv2", C(4, 32, "per_group", 16, True)),  # 4-D weight, blocked DQ along axis 1
    ("conv2", C(3, 8, "per_group", 16, False)),
    ("conv2", C(8, 32, "per_group", 16, False)),
    ("conv2", C(2, 32, "per_channel", None, False)),
    ("conv2", C(16, 16)),
    ("fc1", C(8, 8, "per_channel", None, False)),
    ("fc1", C(4, 32, "per_group", 32, False)),  # MatMulNBits with packed zero points
    ("fc1", C(3, 8, "per_group", 64, True)),
    ("fc1", C(2, 32, "per_group", 16, False)),  # MatMulNBits bits=2, 4 per byte
    ("fc1", C(2, 8, "per_group", 32, True)),
    ("fc1", C(8, 32, "per_group", 16, True)),
    ("fc1", C(4, 8, "per_tensor", None, False)),
    ("fc1", C(16, 32)),
    ("fc1", C(32, 8)),
]


@pytest.mark.parametrize(
    ("int4_kernel", "weight_only"), [("matmulnbits", "dq"), ("dq", "dq"), ("matmulnbits", "fold")]
)
@pytest.mark.parametrize(("layer", "choice"), CASES, ids=[f"{n}-{c.label}" for n, c in CASES])
def test_every_form_matches_the_simulation_at_both_levels(
    cnn, tmp_path, layer, choice, int4_kernel, weight_only
):
    task, cal, step = cnn
    mapping = {
        "conv1": INT8_KERNEL,
        "conv2": FP32,
        "fc1": FP32,
        "fc2": C(8, 8, "per_channel", None, False),
    }
    mapping[layer] = choice
    steps, _ = _max_steps(
        task,
        cal,
        step,
        QuantConfig.from_mapping(mapping),
        tmp_path,
        int4_kernel=int4_kernel,
        weight_only=weight_only,
    )
    # One rounding tie broken differently moves one int8 output by exactly one step.
    assert max(steps.values()) <= 1.0 + 1e-4, steps


def test_group_quantized_conv_weight_has_blocked_scale_in_torch_layout(cnn):
    task, cal, _ = cnn
    config = QuantConfig.from_mapping(
        {"conv1": FP32, "conv2": C(4, 32, "per_group", 16, False), "fc1": FP32, "fc2": FP32}
    )
    graph = export_graph(task.model, task.input_shape, config, cal, weight_only="dq")
    inits = {i.name: i for i in graph.model.graph.initializer}
    dq = next(n for n in graph.model.graph.node if n.name == "conv2/w_DQ")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 1, "block_size": 16}
    assert list(inits["conv2.w_scale"].dims) == [32, 1, 3, 3]  # [O, I/B, kh, kw]
    assert inits["conv2.w_q"].data_type == onnx.TensorProto.INT4
    assert len(inits["conv2.w_q"].raw_data) == 32 * 16 * 9 // 2  # packed two per byte
    assert inits["conv2.w_zero"].data_type == onnx.TensorProto.INT4  # same dtype as the weight
    assert "conv2.weight" not in inits


def test_transposed_blocked_scale_is_caught(cnn, tmp_path):
    """The trap from the notes: a blocked scale in the wrong layout passes the checker."""
    task, cal, _ = cnn
    config = QuantConfig.from_mapping(
        {"conv1": FP32, "conv2": FP32, "fc1": C(4, 32, "per_group", 16, True), "fc2": FP32}
    )
    graph = export_graph(
        task.model, task.input_shape, config, cal, int4_kernel="dq", weight_only="dq"
    )
    scale = next(i for i in graph.model.graph.initializer if i.name == "fc1.w_scale")
    arr = onnx.numpy_helper.to_array(scale).T.copy()  # [K/B, N] instead of [N, K/B]
    scale.CopyFrom(onnx.numpy_helper.from_array(arr, "fc1.w_scale"))
    path = tmp_path / "bad.onnx"
    onnx.save(graph.model, str(path))
    with pytest.raises(Exception):  # noqa: B017 - ORT's own exception types
        run_batched(open_session(path, "disable_all"), task.eval_inputs.numpy()[:4])


def test_int8_export_runs_integer_kernels_and_is_small(cnn, tmp_path):
    task, cal, step = cnn
    config = QuantConfig.from_mapping({n: INT8_KERNEL for n in ("conv1", "conv2", "fc1", "fc2")})
    steps, graph = _max_steps(task, cal, step, config, tmp_path)
    assert max(steps.values()) <= 1.0 + 1e-4
    open_session(tmp_path / "m.onnx", "enable_all", optimized_path=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops, ops
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(float_graph(task.model, task.input_shape), str(fp32))
    ratio = (tmp_path / "m.onnx").stat().st_size / fp32.stat().st_size
    assert ratio <= 0.35, ratio


@pytest.mark.parametrize(
    ("weight_only", "forms"),
    [
        ("dq", ["int8-qdq", "int4-dq", "matmulnbits", "int8-qdq"]),
        ("fold", ["int8-fold", "int4-fold", "matmulnbits", "int8-fold"]),
    ],
)
def test_four_bit_heavy_export_is_under_a_fifth_of_fp32(cnn, tmp_path, weight_only, forms):
    task, cal, step = cnn
    config = QuantConfig.from_mapping(
        {
            "conv1": C(8, 32, "per_channel", None, True),
            "conv2": C(4, 32, "per_group", 16, True),
            "fc1": C(4, 32, "per_group", 32, True),
            "fc2": C(8, 32, "per_channel", None, True),
        }
    )
    steps, graph = _max_steps(task, cal, step, config, tmp_path, weight_only=weight_only)
    assert max(steps.values()) <= 1e-3  # no int8 activations: float math only
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(float_graph(task.model, task.input_shape), str(fp32))
    ratio = (tmp_path / "m.onnx").stat().st_size / fp32.stat().st_size
    assert ratio <= 0.20, ratio
    assert [layer.form for layer in graph.layers] == forms


def test_every_quantize_node_has_an_explicit_zero_point_of_the_right_type(cnn):
    task, cal, _ = cnn
    config = QuantConfig.from_mapping(
        {
            "conv1": INT8_KERNEL,
            "conv2": C(4, 8, "per_group", 16, False),
            "fc1": C(8, 8, "per_tensor", None, False),
            "fc2": C(3, 8, "per_channel", None, True),
        }
    )
    graph = export_graph(task.model, task.input_shape, config, cal)
    inits = {i.name: i for i in graph.model.graph.initializer}
    for node in graph.model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert len(node.input) == 3 and inits[node.input[2]].data_type == onnx.TensorProto.UINT8
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None:
            q = inits[node.input[0]]
            if q.data_type != onnx.TensorProto.INT32:  # int32 bias: zero point omitted (= 0)
                assert inits[node.input[2]].data_type == q.data_type, node.name


# --------------------------------------------------------------- traps caught by validation


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 4)
        with torch.no_grad():  # very different rows make a wrong scale axis visible
            self.a.weight.mul_(torch.logspace(-2, 1, 16).unsqueeze(1))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _validate_square(tmp_path, mutate, *, tolerances: Tolerances | None = None):
    model = Square().eval()
    torch.manual_seed(1)
    x = torch.randn(256, 16)
    cal = calibrate(model, x)
    config = QuantConfig.from_mapping({"a": INT8_KERNEL, "b": FP32})
    graph = export_graph(model, (1, 16), config, cal)
    mutate(graph.model)
    path, fp32 = tmp_path / "m.onnx", tmp_path / "fp32.onnx"
    onnx.save(graph.model, str(path))
    onnx.save(float_graph(model, (1, 16)), str(fp32))
    with torch.no_grad():
        sim = apply(model, config, cal)(x).numpy()
        ref = model(x)
    targets = torch.from_numpy(sim.argmax(-1))
    step = ActivationParams.from_range(float(ref.min()), float(ref.max())).scale
    return validate_export(
        path,
        fp32,
        eval_inputs=x.numpy(),
        eval_targets=targets,
        metric=top1_accuracy,
        sim_outputs=sim,
        output_step=step,
        promised_accuracy=1.0,
        expected_int_kernels=True,
        tolerances=tolerances or Tolerances(),
        latency_repeats=0,
    )


def test_square_weight_exports_per_channel_axis_zero_and_validates(tmp_path):
    v = _validate_square(tmp_path, lambda m: None)
    assert v.ok, [c.message for c in v.failures]
    assert "QGemm" in v.kernels


def test_wrong_per_channel_axis_on_a_square_weight_is_caught(tmp_path):
    """Fused kernels ignore the DQ axis, so only the ORT_DISABLE_ALL run shows the error."""

    def wrong_axis(model):
        node = next(n for n in model.graph.node if n.name == "a/w_DQ")
        for attr in node.attribute:
            if attr.name == "axis":
                attr.i = 1

    v = _validate_square(tmp_path, wrong_axis)
    failed = {c.name for c in v.failures}
    assert "agreement_disable_all" in failed, [c.message for c in v.checks]
    assert (
        onnx.checker.check_model is not None and "onnx_checker" not in failed
    )  # the checker misses it


def test_missing_activation_zero_point_is_caught(tmp_path):
    """Without a zero point QuantizeLinear clamps negatives to 0."""

    def drop_zero(model):
        for node in model.graph.node:
            if node.name in ("a/in_Q", "a/in_DQ"):
                del node.input[2]

    v = _validate_square(tmp_path, drop_zero)
    assert {c.name for c in v.failures} >= {"agreement_disable_all"}, [c.message for c in v.checks]


def test_export_disagreeing_with_the_simulation_fails_with_the_figure_named(tmp_path):
    def scale_off(model):
        init = next(i for i in model.graph.initializer if i.name == "a.out_scale")
        init.CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.5, "a.out_scale")
        )

    v = _validate_square(tmp_path, scale_off)
    messages = " ".join(c.message for c in v.failures)
    assert not v.ok
    assert "agreement_enable_all" in {c.name for c in v.failures}
    assert "output steps" in messages and "limit 3" in messages


def test_integer_kernel_set_is_what_ort_names():
    assert "QLinearConv" in INTEGER_KERNELS and "MatMulNBits" not in INTEGER_KERNELS


def test_pack_bits_puts_the_first_element_in_the_lowest_bits():
    from autoquant.onnxgraph.graph import pack_bits

    assert pack_bits(np.array([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(np.array([1, 2, 3, 0, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]


def test_integer_kernel_bias_is_the_simulations_int32_bias(cnn):
    from autoquant.quant.fake import quantize_bias, quantize_weight

    task, cal, _ = cnn
    config = QuantConfig.from_mapping({n: INT8_KERNEL for n in ("conv1", "conv2", "fc1", "fc2")})
    graph = export_graph(task.model, task.input_shape, config, cal)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.model.graph.initializer}
    module = task.model.fc1
    q, scale = quantize_bias(
        module.bias,
        cal.input_params("fc1").scale,
        quantize_weight(module.weight, INT8_KERNEL).scale,
    )
    assert inits["fc1.b_q"].dtype == np.int32
    np.testing.assert_array_equal(inits["fc1.b_q"], q.numpy().astype(np.int32))
    np.testing.assert_array_equal(inits["fc1.b_scale"], scale.numpy())
    simulated = dict(apply(task.model, config, cal).named_modules())["fc1"].bias.detach()
    np.testing.assert_array_equal(simulated.numpy(), (q * scale).numpy())


def test_folded_weight_only_layers_leave_no_dequantize_in_the_optimized_graph(cnn, tmp_path):
    task, cal, step = cnn
    config = QuantConfig.from_mapping(
        {
            "conv1": C(8, 32, "per_channel", None, False),
            "conv2": C(4, 32, "per_group", 16, False),
            "fc1": C(3, 32, "per_channel", None, True),
            "fc2": C(8, 32, "per_tensor", None, False),
        }
    )
    steps, graph = _max_steps(task, cal, step, config, tmp_path, weight_only="fold")
    assert max(steps.values()) <= 1e-3
    assert [layer.form for layer in graph.layers] == [
        "int8-fold",
        "int4-fold",
        "int4-fold",
        "int8-fold",
    ]
    open_session(tmp_path / "m.onnx", "enable_all", optimized_path=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"DequantizeLinear", "Cast", "Sub", "Mul"}, ops
    inits = {i.name: i for i in graph.model.graph.initializer}
    assert inits["conv2.w_q"].data_type == onnx.TensorProto.INT4


@pytest.mark.parametrize(
    "conv2", [C(2, 32, "per_channel", None, False), C(2, 32, "per_group", 16, True)]
)
def test_two_bit_weights_are_stored_four_per_byte_and_unpacked_once_at_load(cnn, tmp_path, conv2):
    """No fast 2-bit MatMulNBits in ORT (it dequantizes on every call, ~20x fp32 at M=1): 2-bit
    weight-only layers, Linear included, fold from four-per-byte storage into float weights."""
    task, cal, step = cnn
    fc1 = C(2, 32, "per_group", 16, False)
    config = QuantConfig.from_mapping({"conv1": FP32, "conv2": conv2, "fc1": fc1, "fc2": FP32})
    steps, graph = _max_steps(task, cal, step, config, tmp_path)
    assert max(steps.values()) <= 1e-3
    assert [(e.form, e.storage_bits) for e in graph.layers[1:3]] == [("int2-fold", 2)] * 2
    inits = {i.name: i for i in graph.model.graph.initializer}
    assert len(inits["conv2.w_q2"].raw_data) == 32 * 16 * 9 // 4
    assert len(inits["fc1.w_q2"].raw_data) == 512 * 128 // 4
    open_session(tmp_path / "m.onnx", "enable_all", optimized_path=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"BitShift", "BitwiseAnd", "Cast", "Sub", "Mul", "MatMulNBits"}, ops


@pytest.mark.parametrize(
    "choice_a",
    [C(32, 8), C(16, 8), C(3, 8, "per_channel", None, False), C(8, 8, "per_group", 8, True)],
)
def test_ort_does_not_requantize_float_or_weight_only_layers_with_int8_activations(
    tmp_path, choice_a
):
    """ORT's WeightBiasQuantization turns a Gemm/Conv fed by an activation DequantizeLinear into
    an int8-weight, int32-bias kernel of its own making; the export must not let it, or the
    graph computes something the search never measured. Also the fp32 layer ``b`` right after
    ``a``'s output must keep its float weight."""
    model = Square().eval()
    torch.manual_seed(1)
    x = torch.randn(256, 16)
    cal = calibrate(model, x)
    for weight_only in ("dq", "fold"):
        config = QuantConfig.from_mapping({"a": choice_a, "b": FP32})
        graph = export_graph(model, (1, 16), config, cal, weight_only=weight_only)
        path = tmp_path / "m.onnx"
        onnx.save(graph.model, str(path))
        with torch.no_grad():
            sim = apply(model, config, cal)(x).numpy()
        for level in LEVELS:
            out = run_batched(open_session(path, level), x.numpy())
            assert np.abs(out - sim).max() <= 1e-4 * np.abs(sim).max(), (weight_only, level)


def test_ops_that_are_not_layers_stay_float_and_a_3d_linear_exports():
    """LayerNormalization is no quantizable layer: it stays float, never a refusal. A Linear on
    3-D input (MatMul on a transposed copy + Add) is written as Reshape -> Gemm -> Reshape."""

    class WithNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.a(x))

    model = WithNorm().eval()
    x = torch.randn(64, 5, 8)
    cal = calibrate(model, x)
    config = QuantConfig.from_mapping({"a": INT8_KERNEL})
    graph = export_graph(model, (1, 5, 8), config, cal)
    ops = [n.op_type for n in graph.model.graph.node]
    assert "LayerNormalization" in ops and "MatMul" not in ops and ops.count("Reshape") == 2
    assert graph.layers[0].op == "Gemm" and graph.layers[0].form == "int8-qdq"
    with torch.no_grad():
        sim = apply(model, config, cal)(x).numpy()
    for level in LEVELS:
        out = open_session(graph.model.SerializeToString(), level).run(None, {"input": x.numpy()})
        assert np.abs(out[0] - sim).max() <= 1e-3, level


def test_a_layer_the_export_cannot_write_stays_float_or_is_a_user_error():
    from autoquant.errors import UserError

    class Twice(torch.nn.Module):  # one module called twice: one weight, two nodes
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(torch.relu(self.a(x))))

    model = Twice().eval()
    cal = calibrate(model, torch.randn(32, 8))
    graph = export_graph(
        model, (1, 8), QuantConfig.from_mapping({"a": FP32, "b": INT8_KERNEL}), cal
    )
    assert "more than once" in graph.float_layers["a"]
    assert graph.layers[0].to_dict()["reason"] == graph.float_layers["a"]
    with pytest.raises(UserError, match="'a' is w8cs-a8 in the config, but the export cannot"):
        export_graph(model, (1, 8), QuantConfig.from_mapping({"a": INT8_KERNEL, "b": FP32}), cal)


class Mixed(torch.nn.Module):
    """Layer shapes the digits models lack: no-bias conv, depthwise conv, strided 1x1 conv,
    no-bias Linear (exported by torch as MatMul on a transposed copy)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = torch.nn.Conv2d(16, 32, 1, stride=2)
        self.fc = torch.nn.Linear(32 * 4 * 4, 32, bias=False)
        self.out = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.c2(x))
        return self.out(torch.relu(self.fc(x.flatten(1))))


@pytest.mark.parametrize("weight_only", ["dq", "fold"])
@pytest.mark.parametrize(
    "choice",
    [
        C(8, 8, "per_channel", None, True),
        C(8, 8, "per_tensor", None, False),
        C(4, 32, "per_group", 16, False),
    ],
    ids=lambda c: c.label,
)
def test_grouped_biasless_and_strided_layers_match_the_simulation(choice, weight_only):
    model = Mixed().eval()
    x = torch.randn(128, 3, 8, 8)
    cal = calibrate(model, x)
    mapping = {n: choice for n in ("c1", "dw", "c2", "fc", "out")}
    if choice.granularity == "per_group":  # c1 has 3 input channels, dw 1 per group
        mapping.update(c1=INT8_KERNEL, dw=C(4, 32, "per_channel", None, True))
    config = QuantConfig.from_mapping(mapping)
    graph = export_graph(model, (1, 3, 8, 8), config, cal, weight_only=weight_only)
    assert all(layer.op in ("Conv", "Gemm", "MatMulNBits") for layer in graph.layers)
    with torch.no_grad():
        sim = apply(model, config, cal)(x).numpy()
        ref = model(x)
    step = ActivationParams.from_range(float(ref.min()), float(ref.max())).scale
    for level in LEVELS:
        out = run_batched(open_session(graph.model.SerializeToString(), level), x.numpy())
        assert agreement(out, sim, step)["max_steps"] <= 1.0 + 1e-4, level
