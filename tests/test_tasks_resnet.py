"""The built-in digits-resnet task: a ResNet with BatchNorm and residual adds on 32x32 digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoquant.tasks.resnet import BasicBlock, DigitsResNet, upsample


def _fresh(seed: int = 0) -> DigitsResNet:
    torch.manual_seed(seed)
    return DigitsResNet()


def test_is_a_builtin_task():
    from autoquant.tasks import BUILTIN_TASKS

    assert BUILTIN_TASKS["digits-resnet"].target == "autoquant.tasks.resnet:digits_resnet"


def test_every_conv_is_followed_by_its_own_batchnorm():
    model = _fresh()
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    # stem + 2 per block (4 blocks) + a 1x1 shortcut in each of the 3 downsampling blocks
    assert len(convs) == 1 + 4 * 2 + 3
    for name in convs:
        assert modules[name].bias is None, name
        if name.endswith("downsample.0"):
            bn = name[: -len("0")] + "1"
        else:
            bn = name.replace("conv", "bn")
        assert isinstance(modules[bn], nn.BatchNorm2d), (name, bn)
        assert modules[bn].num_features == modules[name].out_channels
        # the running statistics are buffers: they go into the cached state_dict
        assert f"{bn}.running_mean" in model.state_dict()
    widths = [m.conv2.out_channels for m in model.modules() if isinstance(m, BasicBlock)]
    assert widths == [64, 128, 256, 512]


def test_forward_adds_the_residual():
    model = _fresh().eval()
    out = model(torch.rand(5, 1, 32, 32))
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    # zeroing every block's second BatchNorm leaves only the shortcut: a residual net still
    # passes a signal through, and the output changes
    with torch.no_grad():
        x = torch.rand(3, 1, 32, 32)
        before = model(x)
        for block in model.modules():
            if isinstance(block, BasicBlock):
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
        after = model(x)
    assert not torch.allclose(before, after)
    assert after.abs().sum() > 0


def test_block_output_is_relu_of_branch_plus_shortcut():
    torch.manual_seed(0)
    block = BasicBlock(64, 128, stride=2).eval()
    x = torch.rand(2, 64, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(branch + block.downsample(x))
        assert torch.equal(block(x), expected)
    assert block(x).shape == (2, 128, 4, 4)


def test_factory_is_deterministic():
    a, b, c = _fresh(0), _fresh(0), _fresh(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layer1.0.conv1.weight"], sc["layer1.0.conv1.weight"])


def test_layers_have_real_work():
    from autoquant.space.discovery import discover_layers

    layers = discover_layers(_fresh(), (1, 1, 32, 32))
    assert layers[0].name == "conv1" and layers[-1].name == "fc"
    assert len(layers) == 13
    assert sum(la.macs for la in layers) > 50_000_000
    assert 4_000_000 < sum(p.numel() for p in _fresh().parameters()) < 6_000_000


def test_upsample_is_bilinear_32x32_in_unit_range():
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upsample(images)
    assert up.shape == (16, 1, 32, 32)
    assert up.min() >= 0 and up.max() <= 1
    assert torch.equal(up, upsample(images))
    # bilinear, not nearest: a step between two pixels becomes a ramp
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    row = upsample(step)[0, 0, 0]
    assert len(set(row.tolist())) > 2


def test_batchnorm_pairs_are_found_by_the_generic_folder():
    fold = pytest.importorskip("autoquant.quant.fold")
    model = _fresh().eval()
    result = fold.fold_batchnorm(model)
    assert len(result.folded) == 12 and not result.left
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-4)


@pytest.mark.slow
def test_trains_to_95_percent_on_all_held_out_images():
    """Trains once (about two minutes on 2 idle cores), then loads from the cache."""
    from autoquant.tasks import evaluate
    from autoquant.tasks.resnet import digits_resnet

    task = digits_resnet()
    assert task.input_shape == (1, 1, 32, 32)
    assert len(task.eval_inputs) == 450 and len(task.calibration_inputs) == 256
    assert evaluate(task, task.model) >= 0.95
