"""Quantizer correctness: round trip within half a step, ranges, exactness, apply()."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoquant.quant import (
    ActivationParams,
    apply,
    calibrate,
    fake_quantize_activation,
    fake_quantize_weight,
    int_range,
    quantize_weight,
)
from autoquant.space import QuantChoice, QuantConfig

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 8)]
SHAPES = [(16, 32), (8, 16, 3, 3)]


def _step_bound(params, w):
    scale = params.scale
    if params.group_size is not None:
        o, i = w.shape[:2]
        scale = scale.unsqueeze(2).expand(
            o, i // params.group_size, params.group_size, *w.shape[2:]
        )
        scale = scale.reshape(w.shape)
    return scale.expand_as(w) / 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("granularity", "group"), GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_half_a_step(bits, symmetric, granularity, group, shape):
    torch.manual_seed(bits * 7 + symmetric)
    w = torch.randn(shape) * 0.3 + (0.05 if not symmetric else 0.0)
    choice = QuantChoice(bits, 32, granularity, group, symmetric)
    params = quantize_weight(w, choice)
    qmin, qmax = int_range(bits)
    assert params.q.min() >= qmin and params.q.max() <= qmax
    assert torch.equal(params.q, params.q.round())
    assert torch.equal(params.zero_point, params.zero_point.round())
    if symmetric:
        assert torch.all(params.zero_point == 0)
    error = (params.dequantize() - w).abs()
    assert torch.all(error <= _step_bound(params, w) * (1 + 1e-5) + 1e-7)
    assert torch.equal(fake_quantize_weight(w, choice), params.dequantize())


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    gran=st.sampled_from(GRANULARITIES),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(bits, symmetric, gran, scale, offset, seed):
    w = (torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)) + offset) * scale
    params = quantize_weight(w, QuantChoice(bits, 32, gran[0], gran[1], symmetric))
    error = (params.dequantize() - w).abs()
    assert torch.all(error <= _step_bound(params, w) * (1 + 1e-4) + 1e-6 * scale)


def test_symmetric_scale_uses_largest_magnitude_and_full_grid():
    w = torch.tensor([[-1.0, 0.3], [0.25, 2.0]])
    p = quantize_weight(w, QuantChoice(4, 32, "per_channel", None, True))
    assert torch.allclose(p.scale.flatten(), torch.tensor([1.0 / 7, 2.0 / 7]))
    assert p.q.tolist() == [[-7.0, 2.0], [1.0, 7.0]]


def test_asymmetric_grid_spans_min_to_max_with_zero_exact():
    w = torch.tensor([[0.0, 1.0, 3.0]])
    p = quantize_weight(w, QuantChoice(8, 32, "per_tensor", None, False))
    assert float(p.scale) == pytest.approx(3.0 / 255)
    deq = p.dequantize()
    assert float(deq[0, 0]) == 0.0  # zero is exactly representable
    assert float(deq[0, 2]) == pytest.approx(3.0, abs=float(p.scale) / 2)


def test_all_zero_weight_does_not_divide_by_zero():
    for sym in (True, False):
        p = quantize_weight(torch.zeros(3, 4), QuantChoice(4, 32, "per_channel", None, sym))
        assert torch.equal(p.dequantize(), torch.zeros(3, 4))


def test_group_scales_are_per_block_of_axis_one_and_kernel_position():
    w = torch.randn(4, 16, 3, 3)
    p = quantize_weight(w, QuantChoice(4, 32, "per_group", 8, True))
    assert p.scale.shape == (4, 2, 3, 3)
    w2 = w.clone()
    w2[0, 0:8, 0, 0] *= 10  # one block only changes one scale
    p2 = quantize_weight(w2, QuantChoice(4, 32, "per_group", 8, True))
    changed = (p2.scale != p.scale).nonzero().tolist()
    assert changed == [[0, 0, 0, 0]]


def test_float_formats():
    w = torch.randn(5, 5)
    assert torch.equal(fake_quantize_weight(w, QuantChoice()), w)
    assert torch.equal(fake_quantize_weight(w, QuantChoice(16, 32)), w.half().float())


def test_activation_fake_quant_within_half_step_inside_range():
    params = ActivationParams.from_range(-1.0, 3.0)
    assert 0 <= params.zero_point <= 255
    x = torch.linspace(-1.0, 3.0, 1001)
    y = fake_quantize_activation(x, 8, params)
    assert torch.all((y - x).abs() <= params.scale / 2 + 1e-6)
    assert len(torch.unique(y)) <= 256
    clipped = fake_quantize_activation(torch.tensor([10.0, -10.0]), 8, params)
    assert clipped.max() <= 3.0 + params.scale and clipped.min() >= -1.0 - params.scale


def test_apply_leaves_the_original_model_untouched(cnn_task, cnn_layers):
    before = {k: v.clone() for k, v in cnn_task.model.state_dict().items()}
    calib = calibrate(cnn_task.model, cnn_task.calibration_inputs)
    config = QuantConfig.uniform(cnn_layers, QuantChoice(2, 8, "per_channel"))
    qmodel = apply(cnn_task.model, config, calib)
    after = cnn_task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not cnn_task.model._forward_pre_hooks and not cnn_task.model.conv1._forward_pre_hooks
    x = cnn_task.eval_inputs[:32]
    assert not torch.allclose(qmodel(x), cnn_task.model(x))


def test_apply_fp32_config_is_identity_and_int8_is_close(cnn_task, cnn_layers):
    calib = calibrate(cnn_task.model, cnn_task.calibration_inputs)
    x = cnn_task.eval_inputs[:64]
    with torch.no_grad():
        ref = cnn_task.model(x)
        same = apply(cnn_task.model, QuantConfig.uniform(cnn_layers, QuantChoice()), calib)(x)
        int8 = apply(
            cnn_task.model, QuantConfig.uniform(cnn_layers, QuantChoice(8, 8, "per_channel")), calib
        )(x)
    assert torch.equal(same, ref)
    assert (int8 - ref).abs().max() < 0.1 * ref.abs().max()
    assert (int8.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def test_apply_weights_equal_fake_quantized_weights(cnn_task, cnn_layers):
    choices = [
        QuantChoice(b, 32, g, s, sym)
        for b, (g, s), sym in itertools.product(
            [3, 8], [("per_channel", None), ("per_tensor", None)], [True, False]
        )
    ]
    for choice in choices:
        qmodel = apply(cnn_task.model, QuantConfig.uniform(cnn_layers, choice))
        expected = fake_quantize_weight(cnn_task.model.fc1.weight, choice)
        assert torch.equal(qmodel.fc1.weight, expected)


# --- dynamic int8 activations (-a8d) --------------------------------------------------------------


def test_dynamic_params_are_per_sample():
    from autoquant.quant.fake import dynamic_activation_params, fake_quantize_dynamic

    x = torch.stack([torch.linspace(-1.0, 3.0, 40), torch.linspace(0.5, 100.0, 40)]).reshape(
        2, 4, 10
    )
    scale, zero = dynamic_activation_params(x)
    assert scale.shape == (2, 1, 1) and zero.shape == (2, 1, 1)
    # sample 0 spans [-1, 3]; sample 1 spans [0, 100] (zero is always inside the range)
    assert scale[0].item() == torch.tensor(4.0 / 255.0).item()
    assert scale[1].item() == torch.tensor(100.0 / 255.0).item()
    assert zero[0].item() == round(1.0 / (4.0 / 255.0)) and zero[1].item() == 0
    y = fake_quantize_dynamic(x)
    assert torch.all((y - x).abs() <= scale / 2 + 1e-6)
    # each sample is quantized alone: the same as running it as a batch of one
    assert torch.equal(y[1:], fake_quantize_dynamic(x[1:]))
    assert torch.equal(y[:1], fake_quantize_dynamic(x[:1]))


def test_dynamic_params_match_ort_rules():
    from autoquant.quant.fake import dynamic_activation_params, fake_quantize_dynamic

    negative = -torch.rand(1, 8) - 0.5
    scale, zero = dynamic_activation_params(negative)
    assert zero.item() == 255  # max clamped up to 0
    assert scale.item() == ((torch.zeros(()) - negative.min()) / 255.0).item()  # float32
    zeros = torch.zeros(1, 5)
    scale, zero = dynamic_activation_params(zeros)
    assert scale.item() == 1.0 and zero.item() == 0
    assert torch.equal(fake_quantize_dynamic(zeros), zeros)
    # round half to even: 0.5 and 1.5 steps land on 0 and 2
    x = torch.tensor([[0.0, 0.5, 1.5, 255.0]])
    assert fake_quantize_dynamic(x).tolist() == [[0.0, 0.0, 2.0, 255.0]]


def test_apply_dynamic_quantizes_only_the_input_and_keeps_a_float_bias(cnn_task, cnn_layers):
    from autoquant.quant.fake import fake_quantize_dynamic

    dynamic = QuantChoice(8, 8, "per_channel", None, True, act_dynamic=True)
    fc = [layer for layer in cnn_layers if layer.kind == "linear"]
    config = QuantConfig(
        tuple(
            (layer.name, dynamic if layer.kind == "linear" else QuantChoice())
            for layer in cnn_layers
        )
    )
    qmodel = apply(cnn_task.model, config)  # no calibration needed
    first = fc[0].name
    module = dict(qmodel.named_modules())[first]
    original = dict(cnn_task.model.named_modules())[first]
    assert torch.equal(module.bias, original.bias)  # float32 bias, not rounded to int32
    assert torch.equal(module.weight, fake_quantize_weight(original.weight, dynamic))
    x = torch.randn(3, original.in_features) * torch.tensor([[0.1], [1.0], [10.0]])
    with torch.no_grad():
        got = module(x)
        expected = torch.nn.functional.linear(fake_quantize_dynamic(x), module.weight, module.bias)
    assert torch.equal(got, expected)  # the output is not quantized
    # static int8 still needs calibration; dynamic does not
    with pytest.raises(ValueError, match="no calibration"):
        apply(cnn_task.model, QuantConfig.uniform(cnn_layers, QuantChoice(8, 8, "per_channel")))


def test_apply_dynamic_results_do_not_depend_on_the_batch(cnn_task, cnn_layers):
    dynamic = QuantChoice(8, 8, "per_channel", None, True, act_dynamic=True)
    config = QuantConfig(
        tuple(
            (layer.name, dynamic if layer.kind == "linear" else QuantChoice())
            for layer in cnn_layers
        )
    )
    qmodel = apply(cnn_task.model, config)
    x = cnn_task.eval_inputs[:16]
    with torch.no_grad():
        whole = qmodel(x)
        alone = torch.cat([qmodel(x[i : i + 1]) for i in range(len(x))])
        ref = cnn_task.model(x)
    assert torch.allclose(whole, alone, atol=1e-5, rtol=0)
    assert (whole.argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_static_forms_unchanged_by_dynamic_support(cnn_task, cnn_layers):
    from autoquant.quant.fake import quantize_bias, runs_integer_kernel

    assert runs_integer_kernel(QuantChoice(8, 8, "per_channel"))
    assert not runs_integer_kernel(QuantChoice(8, 8, "per_channel", act_dynamic=True))
    calib = calibrate(cnn_task.model, cnn_task.calibration_inputs)
    config = QuantConfig.uniform(cnn_layers, QuantChoice(8, 8, "per_channel"))
    qmodel = apply(cnn_task.model, config, calib)
    fc1 = cnn_task.model.fc1
    params = quantize_weight(fc1.weight, QuantChoice(8, 8, "per_channel"))
    q, scale = quantize_bias(fc1.bias, calib.input_params("fc1").scale, params.scale)
    assert torch.equal(qmodel.fc1.bias, (q * scale).to(fc1.bias.dtype))


def test_dynamic_params_are_bit_exact_with_ort_dynamic_quantize_linear():
    import numpy as np
    from onnx import TensorProto, helper

    from autoquant.quant.fake import dynamic_activation_params

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])],
        [
            helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 6, 32]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.UINT8, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    from autoquant.export.validate import open_session

    # through autoquant's session options: the process may already run ORT's shared pool
    session = open_session(model.SerializeToString(), "enable_all")
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        x = torch.randn(1, 6, 32, generator=gen) * 10.0 ** (i % 7 - 3)
        x = x.abs() + 0.1 if i % 5 == 1 else (-x.abs() if i % 5 == 2 else x)
        q, s, z = session.run(None, {"x": x.numpy()})
        scale, zero = dynamic_activation_params(x)
        codes = torch.clamp(torch.round(x / scale) + zero, 0, 255).to(torch.uint8).numpy()
        assert np.float32(scale.item()) == s and int(zero.item()) == int(z)
        assert np.array_equal(codes, q)
