"""A ResNet on scikit-learn's digits upsampled to 32x32: convolutions big enough that integer
kernels pay off, with BatchNorm after every convolution and residual additions.

Trained deterministically at first use and cached like the other digits tasks
(``autoquant.tasks.digits``). The model keeps every ``Conv2d`` and its ``BatchNorm2d`` as
separate modules (``layer1.0.conv1`` / ``layer1.0.bn1``, shortcut ``downsample.0`` /
``downsample.1``, as torchvision names them): folding BatchNorm is autoquant's job, not the
task's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoquant.tasks.base import Task, evaluate, top1_accuracy
from autoquant.tasks.digits import MIN_FP32_ACCURACY, _cached_model, digits_splits

# Bumped whenever the preprocessing or the training recipe below changes: the cache retrains.
RESNET_RECIPE_VERSION = 1
IMAGE_SIZE = 32
WIDTHS = (64, 128, 256, 512)  # ResNet-18's stage widths


def upsample(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 1, 8, 8]`` digits in [0, 1] to ``[N, 1, size, size]``, bilinear (still in [0, 1])."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, a residual add, and a 1x1 conv + BatchNorm shortcut where the
    shape changes (torchvision's ``BasicBlock``, without in-place operations)."""

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DigitsResNet(nn.Module):
    """A CIFAR-style ResNet (3x3 stem, no max pool) for 1-channel 32x32 inputs and 10 classes.

    Args:
        blocks: ``BasicBlock`` count of each of the four stages (widths 64/128/256/512).
        stem_stride: stride of the stem convolution (2: the first stage runs at 16x16).
    """

    def __init__(self, *, blocks: tuple[int, ...] = (1, 1, 1, 1), stem_stride: int = 2) -> None:
        super().__init__()
        if len(blocks) != len(WIDTHS) or min(blocks) < 1:
            raise ValueError(f"bad value blocks={blocks!r}; allowed: four counts >= 1")
        self.conv1 = nn.Conv2d(1, WIDTHS[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU()
        in_planes = WIDTHS[0]
        for stage, (planes, count) in enumerate(zip(WIDTHS, blocks)):
            layers = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride=stride))
                in_planes = planes
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _train_resnet(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int
) -> None:
    """Adam with a cosine learning-rate decay to zero (the last epochs settle the weights and
    the BatchNorm statistics instead of leaving them wherever the last step threw them), full
    batches only (no BatchNorm batch of a handful of images)."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def digits_resnet(*, epochs: int = 12, calibration_samples: int = 256) -> Task:
    name = "digits-resnet"
    tx, ty, ex, ey = digits_splits()
    tx, ex = upsample(tx), upsample(ex)

    def task_of(model: nn.Module) -> Task:
        return Task(
            name=name,
            model=model,
            calibration_inputs=tx[:calibration_samples],
            eval_inputs=ex,
            eval_targets=ey,
            metric=top1_accuracy,
            input_shape=(1, 1, IMAGE_SIZE, IMAGE_SIZE),
            description="ResNet (4 stages of 1 BasicBlock, widths 64-512, Conv+BatchNorm, "
            "residual adds) on scikit-learn digits upsampled to 32x32, 4.9M params, "
            "about 63M MACs per image",
        )

    model, accuracy = _cached_model(
        name,
        DigitsResNet,
        tx,
        ty,
        epochs=epochs,
        score=lambda m: evaluate(task_of(m), m),
        train=_train_resnet,
        recipe=f"resnet-{RESNET_RECIPE_VERSION}-{IMAGE_SIZE}",
    )
    if accuracy < MIN_FP32_ACCURACY:
        raise RuntimeError(f"built-in task {name} trained to {accuracy:.3f} < {MIN_FP32_ACCURACY}")
    return task_of(model)
