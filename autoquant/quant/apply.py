"""Calibration of activation ranges and ``apply(model, config)``: a fake-quantized copy."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from autoquant.model_inputs import Inputs
from autoquant.quant.fake import (
    ActivationParams,
    fake_quantize_activation,
    fake_quantize_dynamic,
    fake_quantize_weight,
    quantize_bias,
    quantize_weight,
    runs_integer_kernel,
)
from autoquant.space.discovery import quantizable_modules
from autoquant.space.values import QuantConfig


@dataclass(frozen=True)
class Calibration:
    """Observed min/max of every quantizable layer's input and output on the calibration data,
    taken on the float model (as ONNX Runtime's static quantization calibrates)."""

    input_ranges: dict[str, tuple[float, float]]
    output_ranges: dict[str, tuple[float, float]]
    # Layers whose output is read only by a ReLU (``relu_fed_layers``): their int8 output is
    # quantized on the ReLU's range ``[0, hi]`` (zero point 0), as ONNX Runtime's static
    # quantization does; the ReLU is then exact on the grid and the exported graph needs no
    # requantization between the layer and the next one.
    relu_outputs: frozenset[str] = frozenset()

    def input_params(self, layer: str) -> ActivationParams:
        return ActivationParams.from_range(*self.input_ranges[layer])

    def output_params(self, layer: str) -> ActivationParams:
        lo, hi = self.output_ranges[layer]
        if layer in self.relu_outputs:
            lo = 0.0
        return ActivationParams.from_range(lo, hi)

    def to_dict(self) -> dict:
        out = {
            "input_ranges": {k: list(v) for k, v in self.input_ranges.items()},
            "output_ranges": {k: list(v) for k, v in self.output_ranges.items()},
        }
        if self.relu_outputs:
            out["relu_outputs"] = sorted(self.relu_outputs)
        return out


def relu_fed_layers(model: torch.nn.Module, names) -> frozenset[str]:
    """Quantizable layers (``names``) whose output is read by one ReLU and nothing else
    (through ``nn.Identity``, e.g. a folded BatchNorm), found by tracing ``model`` with
    ``torch.fx``; none when the model does not trace."""
    import torch.fx

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model: no fused ReLUs
        return frozenset()
    mods = dict(traced.named_modules())

    def is_identity(node) -> bool:
        return node.op == "call_module" and isinstance(mods.get(node.target), torch.nn.Identity)

    def is_relu(node) -> bool:
        if node.op == "call_module":
            return isinstance(mods.get(node.target), torch.nn.ReLU)
        if node.op == "call_function":
            return node.target in (torch.relu, torch.nn.functional.relu)
        return node.op == "call_method" and node.target == "relu"

    wanted = set(names)
    fused = set()
    for node in traced.graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        cur = node
        while len(cur.users) == 1 and is_identity(next(iter(cur.users))):
            cur = next(iter(cur.users))
        if len(cur.users) == 1 and is_relu(next(iter(cur.users))):
            fused.add(node.target)
    return frozenset(fused)


def calibrate(model: torch.nn.Module, inputs: Inputs, *, batch_size: int = 256) -> Calibration:
    """Min/max observers on each Linear/Conv2d input and output (``inputs``: one tensor or
    named tensors, see ``autoquant.model_inputs``). A layer the forward never reaches has no
    ranges."""
    from autoquant.model_inputs import batches, run_model

    modules = quantizable_modules(model)
    lo_in: dict[str, float] = {}
    hi_in: dict[str, float] = {}
    lo_out: dict[str, float] = {}
    hi_out: dict[str, float] = {}

    def observe(name: str):
        def hook(_module, args, output) -> None:
            x = args[0]
            lo_in[name] = min(lo_in.get(name, float("inf")), float(x.min()))
            hi_in[name] = max(hi_in.get(name, float("-inf")), float(x.max()))
            lo_out[name] = min(lo_out.get(name, float("inf")), float(output.min()))
            hi_out[name] = max(hi_out.get(name, float("-inf")), float(output.max()))

        return hook

    handles = [m.register_forward_hook(observe(n)) for n, m in modules.items()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches(inputs, batch_size):
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return Calibration(
        input_ranges={n: (lo_in[n], hi_in[n]) for n in lo_in},
        output_ranges={n: (lo_out[n], hi_out[n]) for n in lo_out},
        relu_outputs=relu_fed_layers(model, lo_out),
    )


def _input_hook(act_bits: int, params: ActivationParams | None):
    def hook(_module, args):
        return (fake_quantize_activation(args[0], act_bits, params), *args[1:])

    return hook


def _dynamic_input_hook(_module, args):
    return (fake_quantize_dynamic(args[0]), *args[1:])


def _output_hook(act_bits: int, params: ActivationParams | None):
    def hook(_module, _args, output):
        return fake_quantize_activation(output, act_bits, params)

    return hook


def apply(
    model: torch.nn.Module, config: QuantConfig, calibration: Calibration | None = None
) -> torch.nn.Module:
    """A deep copy of ``model`` computing as ``config`` says; ``model`` itself is not touched.

    Weights are replaced by their fake-quantized values once; activations are fake-quantized by
    hooks on the layer's input and output. Static int8 activations need ``calibration``. A
    layer that runs as an integer kernel once exported (int8 weights per-tensor/per-channel and
    static int8 activations, see ``runs_integer_kernel``) also gets its bias rounded to int32
    with scale input scale x weight scale, as the exported graph stores it. Dynamic int8
    activations (``act_dynamic``) quantize only the input, each sample from its own range
    (``fake_quantize_dynamic``); output and bias stay float32.
    """
    qmodel = copy.deepcopy(model)
    modules = quantizable_modules(qmodel)
    for name, choice in config.choices:
        if name not in modules:
            raise KeyError(f"config names layer {name!r}, which the model does not have")
        module = modules[name]
        if choice.act_static_int8 and calibration is None:
            raise ValueError(f"layer {name!r} has int8 activations but no calibration was given")
        with torch.no_grad():
            if runs_integer_kernel(choice) and module.bias is not None:
                params = quantize_weight(module.weight, choice)
                q, scale = quantize_bias(
                    module.bias, calibration.input_params(name).scale, params.scale
                )
                module.bias.copy_(q * scale)
            module.weight.copy_(fake_quantize_weight(module.weight, choice))
        if choice.act_bits == 32:
            continue
        if choice.act_dynamic:
            module.register_forward_pre_hook(_dynamic_input_hook)
            continue
        in_params = calibration.input_params(name) if choice.act_bits == 8 else None
        out_params = calibration.output_params(name) if choice.act_bits == 8 else None
        module.register_forward_pre_hook(_input_hook(choice.act_bits, in_params))
        module.register_forward_hook(_output_hook(choice.act_bits, out_params))
    return qmodel.eval()
