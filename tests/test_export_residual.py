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
    # layer1's Add (reading the stem's ReLU output) and layer2's Add run as QLinearAdd; layer3's
    # feeds the float pooling head.
    assert counts.get("QLinearAdd", 0) == 2, counts
    assert counts.get("Add", 0) == 1 and counts.get("Relu", 0) == 1, counts
    # No requantization between layers: the input's Q and the head's Q only.
    assert counts.get("QuantizeLinear", 0) == 2, counts
    assert counts.get("Transpose", 0) <= 3, counts
    nodes = graph.model.graph.node
    producer = {o: n.op_type for n in nodes for o in n.output}
    # A ReLU after a layer quantized on its range is not written at all.
    assert not [n.name for n in nodes if n.op_type == "Relu" and producer[n.input[0]] != "Add"]
