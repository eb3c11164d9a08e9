"""BatchNorm folding: the folded copy computes what conv + BN computed, and only what it must."""

from __future__ import annotations

import torch
from torch import nn

from autoquant.quant.fold import fold_batchnorm


def _randomize(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8)  # after an Add: not foldable into one conv
        for bn in (self.bn1, self.bn2, self.bn3):
            _randomize(bn)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.bn2(self.conv2(y)) + y)


def test_folded_copy_computes_the_same_and_leaves_the_model_alone():
    model = Residual().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    result = fold_batchnorm(model)
    assert result.folded == (("conv1", "bn1"), ("conv2", "bn2"))
    assert set(result.left) == {"bn3"}
    assert isinstance(result.model.bn1, nn.Identity) and isinstance(result.model.bn3, nn.BatchNorm2d)
    assert result.model.conv1.bias is not None  # the folded shift lives in the conv's bias
    torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_conv_whose_output_is_also_read_elsewhere_is_not_folded():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Branch().eval()
    result = fold_batchnorm(model)
    assert result.folded == () and result.model is model
    assert "bn" in result.left


def test_untraceable_model_keeps_its_batchnorm_with_the_reason():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    result = fold_batchnorm(Dynamic().eval())
    assert result.folded == ()
    assert "torch.fx" in result.left["bn"]


def test_model_without_batchnorm_is_returned_as_is():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert fold_batchnorm(model).model is model
