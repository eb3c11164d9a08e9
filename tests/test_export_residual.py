"""A small ResNet (folded Conv+BN, ReLU, identity and 1x1-conv shortcuts) at uniform int8: the
simulation quantizes a layer's output on its ReLU's range (``Calibration.relu_outputs``) and the
export drops the ops that cannot change a number, so ONNX Runtime runs integer kernels from one
layer to the next (no DQ -> Q requantization, residual Adds as QLinearAdd) and the graph still
computes what the simulation computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autoquant.quant import calibrate  # noqa: E402
from autoquant.quant.apply import relu_fed_layers  # noqa: E402
from autoquant.quant.fold import fold_batchnorm  # noqa: E402
from autoquant.space.values import QuantChoice  # noqa: E402

INT8 = QuantChoice(8, 8, "per_channel", None, True)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = Block(16, 16, 1)  # identity shortcut: the stem's ReLU output
        self.layer2 = Block(16, 32, 2)  # 1x1 conv shortcut
        self.layer3 = Block(32, 64, 2)  # its Add feeds the pooling head (stays float)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = SmallResNet()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    model = fold_batchnorm(model.eval()).model.eval()
    return model, torch.randn(64, 3, 16, 16)


def test_layers_read_only_by_a_relu_are_found_through_folded_batchnorm(resnet):
    model, _ = resnet
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert relu_fed_layers(model, names) == {
        "conv1",
        "layer1.conv1",
        "layer2.conv1",
        "layer3.conv1",
    }


def test_a_layer_whose_output_has_another_reader_keeps_its_own_range():
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.relu(y)) + y

    model = TwoReaders().eval()
    assert relu_fed_layers(model, ["a", "b"]) == frozenset()
    cal = calibrate(model, torch.randn(8, 3, 8, 8))
    lo, hi = cal.output_ranges["a"]
    assert lo < 0 and cal.output_params("a").zero_point > 0


def test_untraceable_models_fall_back_to_plain_ranges():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.relu(self.a(x))
            return self.a(x)

    assert relu_fed_layers(Branchy().eval(), ["a"]) == frozenset()


def test_uniform_int8_residual_cnn_runs_integer_kernels_end_to_end_and_validates(resnet, tmp_path):
    from test_export_networks import export_and_validate

    model, x = resnet
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    graph, v = export_and_validate(model, x, dict.fromkeys(names, INT8), tmp_path)
    counts = v.optimized_op_counts
    assert counts["QLinearConv"] == len(names) - 1 and counts["QGemm"] == 1, counts
    # Every residual Add runs as QLinearAdd, layer3's too (it feeds the pooling head: its output
    # is quantized like the pool's input), and the pool as QLinearGlobalAveragePool: ORT's
    # quantize_static graph, no float op left.
    assert counts.get("QLinearAdd", 0) == 3, counts
    assert counts.get("QLinearGlobalAveragePool", 0) == 1, counts
    assert not {"Add", "Relu", "GlobalAveragePool"} & set(counts), counts
    # No requantization anywhere: the input's Q and the output's DQ only.
    assert counts.get("QuantizeLinear", 0) == 1, counts
    assert counts.get("DequantizeLinear", 0) == 1, counts
    assert counts.get("Transpose", 0) <= 2, counts
    nodes = graph.model.graph.node
    producer = {o: n.op_type for n in nodes for o in n.output}
    # A ReLU after a layer quantized on its range is not written at all.
    assert not [n.name for n in nodes if n.op_type == "Relu" and producer[n.input[0]] != "Add"]


def test_the_pooled_residual_add_is_found_and_calibrated_on_its_relu_range(resnet):
    model, x = resnet
    cal = calibrate(model, x)
    (pooled,) = cal.pooled_adds
    assert (pooled.pool, pooled.sources, pooled.readers, pooled.relu) == (
        "pool",
        ("layer3.conv2", "layer3.down.0"),
        ("fc",),
        True,
    )
    lo, hi = pooled.input_range
    assert lo == 0.0 and hi > 0 and cal.pool_input_params(pooled).zero_point == 0
    assert cal.to_dict()["pooled_adds"][0]["pool"] == "pool"


def test_the_simulation_quantizes_the_pool_input_only_when_its_layers_are_int8(resnet):
    from autoquant.quant import apply
    from autoquant.space.values import FP32, QuantConfig

    model, x = resnet
    cal = calibrate(model, x)
    (pooled,) = cal.pooled_adds
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    scale = cal.pool_input_params(pooled).scale

    def pool_input(config):
        seen = []
        qmodel = apply(model, config, cal)
        qmodel.pool.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            qmodel(x[:8])
        return seen[0] / scale

    steps = pool_input(QuantConfig.from_mapping(dict.fromkeys(names, INT8)))
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    # A float shortcut conv: the Add reads a float input, nothing about the tail changes.
    mixed = QuantConfig.from_mapping({**dict.fromkeys(names, INT8), "layer3.down.0": FP32})
    assert cal.quantized_pools(mixed) == ()
    steps = pool_input(mixed)
    assert not torch.allclose(steps, steps.round(), atol=1e-3)
