"""Calibration of activation ranges and ``apply(model, config)``: a fake-quantized copy."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

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
class PooledAdd:
    """A residual Add of two layers' outputs, through an optional ReLU, read only by a global
    average pool module (``nn.AdaptiveAvgPool2d(1)``) whose output, through flattens, is read
    only by layers: a ResNet's last block before its pooled classifier.

    When every one of these layers has static int8 activations, the simulation quantizes the
    pool's input (on the ReLU's range ``[0, hi]`` when there is one) and the export writes the
    same ``QuantizeLinear``/``DequantizeLinear`` there: ONNX Runtime then runs the Add as
    ``QLinearAdd`` and the pool as ``QLinearGlobalAveragePool`` (whose output the readers' own
    input quantization quantizes, the pool's output range) instead of a float tail, as its
    ``quantize_static`` does.
    """

    pool: str  # module name of the pool
    sources: tuple[str, ...]  # the layers whose outputs the Add sums
    readers: tuple[str, ...]  # the layers reading the pooled tensor
    relu: bool
    input_range: tuple[float, float] = (0.0, 0.0)  # observed range of the pool's input

    def to_dict(self) -> dict:
        return {
            "pool": self.pool,
            "sources": list(self.sources),
            "readers": list(self.readers),
            "relu": self.relu,
            "input_range": list(self.input_range),
        }


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
    pooled_adds: tuple[PooledAdd, ...] = ()

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
        if self.pooled_adds:
            out["pooled_adds"] = [p.to_dict() for p in self.pooled_adds]
        return out

    def pool_input_params(self, pooled: PooledAdd) -> ActivationParams:
        lo, hi = pooled.input_range
        return ActivationParams.from_range(0.0 if pooled.relu else lo, hi)

    def quantized_pools(self, config: QuantConfig) -> tuple[PooledAdd, ...]:
        """The pooled Adds whose input the simulation and the export quantize under ``config``:
        every source and reader has static int8 activations (then both Add inputs and the
        pool's output are already uint8 tensors; otherwise nothing changes)."""
        choices = dict(config.choices)
        return tuple(
            p
            for p in self.pooled_adds
            if all(
                name in choices and choices[name].act_static_int8 for name in p.sources + p.readers
            )
        )


def _is_module(node, mods, kind) -> bool:
    return node.op == "call_module" and isinstance(mods.get(node.target), kind)


def _is_relu(node, mods) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), torch.nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu)
    return node.op == "call_method" and node.target == "relu"


def _trace(model: torch.nn.Module):
    """``torch.fx`` graph of ``model`` and its modules by name; None when it does not trace."""
    import torch.fx

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model: no graph facts
        return None
    return traced, dict(traced.named_modules())


def relu_fed_layers(model: torch.nn.Module, names) -> frozenset[str]:
    """Quantizable layers (``names``) whose output is read by one ReLU and nothing else
    (through ``nn.Identity``, e.g. a folded BatchNorm), found by tracing ``model`` with
    ``torch.fx``; none when the model does not trace."""
    found = _trace(model)
    if found is None:
        return frozenset()
    traced, mods = found
    wanted = set(names)
    fused = set()
    for node in traced.graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        cur = node
        while len(cur.users) == 1 and _is_module(next(iter(cur.users)), mods, torch.nn.Identity):
            cur = next(iter(cur.users))
        if len(cur.users) == 1 and _is_relu(next(iter(cur.users)), mods):
            fused.add(node.target)
    return frozenset(fused)


def _is_add(node) -> bool:
    import operator

    two_tensors = len(node.args) == 2 and all(hasattr(a, "op") for a in node.args)
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add) and two_tensors
    return node.op == "call_method" and node.target == "add" and two_tensors


def _is_flatten(node, mods) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), (torch.nn.Flatten, torch.nn.Identity))
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def pooled_residual_adds(model: torch.nn.Module, names, relu_fed) -> tuple[PooledAdd, ...]:
    """The ``PooledAdd`` patterns of ``model`` (ranges not yet observed), found by tracing it
    with ``torch.fx``; none when it does not trace. ``names``: its quantizable layers;
    ``relu_fed``: those among them quantized on their ReLU's range (``relu_fed_layers``), the
    only layers an Add may read through a ReLU (a zero point of 0 makes that ReLU exact)."""
    found = _trace(model)
    if found is None:
        return ()
    traced, mods = found
    wanted = set(names)

    def skip_identities(node):
        while _is_module(node, mods, torch.nn.Identity) and node.args:
            node = node.args[0]
        return node

    def source_layer(node) -> str | None:
        node = skip_identities(node)
        through_relu = _is_relu(node, mods)
        if through_relu:
            node = skip_identities(node.args[0])
        if node.op != "call_module" or node.target not in wanted:
            return None
        return node.target if not through_relu or node.target in relu_fed else None

    def reader_layers(node) -> list[str] | None:
        out: list[str] = []
        for user in node.users:
            if user.op == "call_module" and user.target in wanted:
                out.append(user.target)
            elif _is_flatten(user, mods) and user.args and user.args[0] is node:
                more = reader_layers(user)
                if more is None:
                    return None
                out += more
            else:
                return None
        return out or None

    def only_user(node):
        return next(iter(node.users)) if len(node.users) == 1 else None

    def global_pool(node) -> bool:
        module = mods.get(node.target) if node.op == "call_module" else None
        return isinstance(module, torch.nn.AdaptiveAvgPool2d) and module.output_size in (
            1,
            (1, 1),
        )

    patterns = []
    for node in traced.graph.nodes:
        if not _is_add(node):
            continue
        sources = [source_layer(arg) for arg in node.args]
        if None in sources:
            continue
        cur, relu = only_user(node), False
        while cur is not None and _is_module(cur, mods, torch.nn.Identity):
            cur = only_user(cur)
        if cur is not None and _is_relu(cur, mods):
            cur, relu = only_user(cur), True
        while cur is not None and _is_module(cur, mods, torch.nn.Identity):
            cur = only_user(cur)
        if cur is None or not global_pool(cur):
            continue
        readers = reader_layers(cur)
        if readers:
            patterns.append(PooledAdd(cur.target, tuple(sources), tuple(readers), relu))
    return tuple(patterns)


def calibrate(model: torch.nn.Module, inputs: Inputs, *, batch_size: int = 256) -> Calibration:
    """Min/max observers on each Linear/Conv2d input and output (``inputs``: one tensor or
    named tensors, see ``autoquant.model_inputs``). A layer the forward never reaches has no
    ranges. The inputs of ``PooledAdd`` pools are observed too."""
    from autoquant.model_inputs import batches, run_model

    modules = quantizable_modules(model)
    relu_fed = relu_fed_layers(model, modules)
    pooled = pooled_residual_adds(model, modules, relu_fed)
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

    pool_ranges: dict[str, tuple[float, float]] = {}

    def observe_pool(name: str):
        def hook(_module, args) -> None:
            lo, hi = pool_ranges.get(name, (float("inf"), float("-inf")))
            pool_ranges[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))

        return hook

    handles = [m.register_forward_hook(observe(n)) for n, m in modules.items()]
    named = dict(model.named_modules())
    handles += [named[p.pool].register_forward_pre_hook(observe_pool(p.pool)) for p in pooled]
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
        relu_outputs=frozenset(n for n in relu_fed if n in lo_out),
        pooled_adds=tuple(
            replace(p, input_range=pool_ranges[p.pool]) for p in pooled if p.pool in pool_ranges
        ),
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
    (``fake_quantize_dynamic``); output and bias stay float32. The input of a ``PooledAdd``'s
    pool is quantized when ``config`` makes its layers int8 (``Calibration.quantized_pools``).
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
    if calibration is not None:
        named = dict(qmodel.named_modules())
        for pooled in calibration.quantized_pools(config):
            params = calibration.pool_input_params(pooled)
            named[pooled.pool].register_forward_pre_hook(_input_hook(8, params))
    return qmodel.eval()
