"""Find every quantizable layer (Linear, Conv2d) of a torch model and describe it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from autoquant.space.values import LayerInfo

if TYPE_CHECKING:
    import torch


def quantizable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def discover_layers(model: torch.nn.Module, probe: Any) -> tuple[LayerInfo, ...]:
    """Run one probe batch through a copy-free forward with hooks, and return the layers in
    execution order. ``probe``: a batch-1 input shape (zeros of it are run), or the inputs
    themselves (``Task.example_inputs()``: one tensor or named tensors).

    Layers the forward never reaches (a pooler whose output the model does not return) are not
    quantizable layers: nothing they compute reaches the output, so they stay float."""
    import torch

    from autoquant.model_inputs import run_model

    if isinstance(probe, tuple) and all(isinstance(d, int) for d in probe):
        probe = torch.zeros(probe)
    modules = quantizable_modules(model)
    seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    order: list[str] = []

    def hook(name: str):
        def record(_module, inputs, output) -> None:
            if name not in seen:
                seen[name] = (tuple(inputs[0].shape), tuple(output.shape))
                order.append(name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            run_model(model, probe)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()

    layers = []
    for index, name in enumerate(order):
        module = modules[name]
        in_shape, out_shape = seen[name]
        weight_shape = tuple(module.weight.shape)
        batch = in_shape[0]
        if isinstance(module, torch.nn.Conv2d):
            kind = "conv"
            # weight_shape is [out, in/groups, kh, kw]: grouped and depthwise convs included
            out_positions = math.prod(out_shape[2:])
            macs = out_positions * math.prod(weight_shape)
        else:
            kind = "linear"
            # a Linear on [batch, tokens, features] runs once per token
            rows = math.prod(in_shape[:-1]) // batch
            macs = rows * math.prod(weight_shape)
        bias = module.bias is not None
        layers.append(
            LayerInfo(
                name=name,
                kind=kind,
                weight_shape=weight_shape,
                input_shape=in_shape,
                output_shape=out_shape,
                macs=int(macs),
                params=math.prod(weight_shape) + (weight_shape[0] if bias else 0),
                has_bias=bias,
                index=index,
            )
        )
    return tuple(layers)


def other_param_bytes(model: torch.nn.Module, layers: tuple[LayerInfo, ...]) -> int:
    """float32 bytes of every parameter and buffer outside the quantizable layers."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return 4 * (total - sum(layer.params for layer in layers))
