"""Layer discovery on the built-in models: names, kinds, shapes, MACs, params, order."""

from __future__ import annotations

import torch

from autoquant.space.discovery import discover_layers, other_param_bytes


def test_digits_cnn_layers(cnn_layers):
    by_name = {layer.name: layer for layer in cnn_layers}
    assert [layer.name for layer in cnn_layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert [layer.index for layer in cnn_layers] == [0, 1, 2, 3]
    conv2 = by_name["conv2"]
    assert conv2.kind == "conv" and conv2.weight_shape == (32, 16, 3, 3)
    assert conv2.input_shape == (1, 16, 8, 8) and conv2.output_shape == (1, 32, 8, 8)
    assert conv2.macs == 8 * 8 * 32 * 16 * 9
    assert conv2.params == 32 * 16 * 9 + 32
    fc1 = by_name["fc1"]
    assert fc1.kind == "linear" and fc1.weight_shape == (128, 512) and fc1.macs == 512 * 128
    assert fc1.reduction_dim == 512 and fc1.kernel_elems == 1


def test_execution_order_not_definition_order():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.late = torch.nn.Linear(4, 2)
            self.early = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return self.late(self.early(x).flatten(1))

    layers = discover_layers(Net(), (1, 1, 2, 2))
    assert [layer.name for layer in layers] == ["early", "late"]


def test_sequence_linear_macs_count_rows_and_strided_conv():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x)  # [1, 8, 4, 4]
            return self.proj(y.flatten(2).transpose(1, 2))  # 16 rows of 8

    layers = discover_layers(Net(), (1, 3, 8, 8))
    conv, proj = layers
    assert conv.macs == 4 * 4 * 8 * 3 * 9 and not conv.has_bias and conv.params == 8 * 3 * 9
    assert proj.macs == 16 * 8 * 4


def test_other_params_counted(cnn_task, cnn_layers):
    assert other_param_bytes(cnn_task.model, cnn_layers) == 0
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    layers = discover_layers(net.eval(), (2, 4))
    # BatchNorm: weight, bias, running mean, running var (num_batches_tracked is an integer)
    assert other_param_bytes(net, layers) == 4 * 16
