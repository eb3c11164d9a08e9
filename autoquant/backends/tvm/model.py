"""Whole-model latency on TVM: the model composed from autoquant's own per-layer kernels.

A config's end-to-end latency is measured on a relax program built from the torch model's fx
graph: every quantizable layer is a ``call_tir`` to the same hand-scheduled kernel the latency
table times (random weights in the packed layout: latency does not depend on their values), and
the other operations (ReLU, max-pooling, flatten, reshapes, layout changes, padding to the
kernels' 16-channel blocks, and quantize / dequantize around uint8 / float16 layers; ``madd16``
int8 kernels take and return float32 and quantize inside, so they need none) are relax
operators compiled by TVM's default pipeline. Importing a QDQ ONNX graph instead would run float
kernels with dequantize overhead (see the TVM notes), which is not what the table measures.

Conv layers run NHWC (the kernels' layout): the graph transposes once into NHWC before the first
conv and back to NCHW where torch flattens. Supported fx nodes: Linear, Conv2d (groups 1),
ReLU, MaxPool2d, AdaptiveAvgPool2d to 1x1, Flatten, Identity (a folded BatchNorm) modules;
``torch.relu``/``F.relu``/``torch.flatten``/``F.max_pool2d``/``F.adaptive_avg_pool2d`` functions;
``flatten``/``view``/``reshape``/``relu`` methods; and the sum of two tensors (``x + y``,
``torch.add``: a residual connection). One float input only: a model with named or integer
inputs (token ids), a forward ``torch.fx`` cannot trace, or anything else raises
``UnsupportedModel`` (the backend reports it as an ``excluded`` whole-model timing).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoquant.hardware._tvm import load_tvm
from autoquant.hardware.kernels import KernelSpec, kernel_spec, make_data, output_dtype
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

# qparams of the relax quantize / dequantize operators around uint8 kernels (the kernels get
# make_data's); their values do not change the latency
ACT = {"sa": 0.05, "za": 8.0, "so": 0.05, "zo": 8.0}


class UnsupportedModel(Exception):
    """The model has an operation the composer does not translate (the message names it)."""


def composable_inputs(inputs: Any) -> tuple[int, ...]:
    """The batch-1 shape of a model's single float input (``backends.inputs``), or
    ``UnsupportedModel`` saying why the composer cannot feed it."""
    from autoquant.backends.inputs import ModelInputs

    model_inputs = ModelInputs.of(inputs)
    if model_inputs.float_shape is None:
        kind = "named" if model_inputs.is_named else "integer"
        raise UnsupportedModel(
            f"{kind} inputs ({', '.join(model_inputs.names)}): only models with one float "
            "input are composed"
        )
    return model_inputs.float_shape


def _relu_like(node: Any, modules: dict[str, Any]) -> str | None:
    import torch

    if node.op == "call_module":
        mod = modules[node.target]
        for cls, name in (
            (torch.nn.ReLU, "relu"),
            (torch.nn.MaxPool2d, "maxpool"),
            (torch.nn.Flatten, "flatten"),
            (torch.nn.Identity, "identity"),
            (torch.nn.Dropout, "identity"),
            (torch.nn.AdaptiveAvgPool2d, "avgpool1"),
        ):
            if isinstance(mod, cls):
                return name
        return None
    if node.op == "call_function":
        import torch.nn.functional as F

        table = {
            torch.relu: "relu",
            F.relu: "relu",
            torch.flatten: "flatten",
            F.max_pool2d: "maxpool",
            F.adaptive_avg_pool2d: "avgpool1",
            operator.add: "add",
            torch.add: "add",
        }
        return table.get(node.target)
    if node.op == "call_method":
        return {
            "relu": "relu",
            "flatten": "flatten",
            "view": "reshape",
            "reshape": "reshape",
            "add": "add",
        }.get(node.target)
    return None


def build_model(
    model: Any,
    input_shape: tuple[int, ...],
    layers: tuple[LayerInfo, ...],
    config: QuantConfig,
    *,
    batch: int,
    target: Any,
    threads: int,
    vnni: bool,
    avx2: bool = False,
    model_weights: bool = False,
    parallel_min_macs: int | None = None,
) -> Any:
    """Compile ``model`` under ``config`` at ``batch`` into a relax Executable.

    ``model_weights``: float32 layers use the model's own weights and biases (for checking the
    composition against torch); otherwise every layer gets random weights of its format.
    ``parallel_min_macs``: the profile's ``schedule.parallel_min_macs`` (None: its default).
    """
    tvm = load_tvm()
    from tvm import relax

    from autoquant.backends.tvm import kernels as tvm_kernels

    gm = _trace(model)
    composer = _Composer(
        bb=relax.BlockBuilder(),
        modules=dict(gm.named_modules()),
        by_name={layer.name: layer for layer in layers},
        choices=config.as_mapping(),
        batch=batch,
        threads=threads,
        vnni=vnni,
        avx2=avx2,
        model_weights=model_weights,
        parallel_min_macs=tvm_kernels.DEFAULT_PARALLEL_MIN_MACS
        if parallel_min_macs is None
        else parallel_min_macs,
        env={},
    )
    shape = (batch, *input_shape[1:])
    x_in = relax.Var("x", relax.TensorType(shape, "float32"))
    bb, env = composer.bb, composer.env
    with bb.function("main", [x_in]):
        with bb.dataflow():
            out_var = None
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    env[node.name] = (x_in, "NCHW" if len(shape) == 4 else "flat")
                elif node.op == "output":
                    expr, layout = env[node.args[0].name]
                    out_var = bb.emit_output(composer.to_layout(expr, layout, "NCHW"))
                else:
                    env[node.name] = composer.emit(node)
        bb.emit_func_output(out_var)
    return tvm.compile(bb.get(), target=target)


def _trace(model: Any) -> Any:
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported Python
        raise UnsupportedModel(
            f"torch.fx cannot trace the model's forward ({type(exc).__name__})"
        ) from None


def _shape_of(expr: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in expr.ty.shape)


@dataclass(frozen=True)
class _Composer:
    """What translating one fx graph shares: the relax block builder, the traced modules, the
    layers and their choices, the kernels' settings, and ``env`` (fx node name -> relax
    expression and its layout: NCHW, NHWC or flat), filled node by node."""

    bb: Any
    modules: dict[str, Any]
    by_name: dict[str, LayerInfo]
    choices: dict[str, QuantChoice]
    batch: int
    threads: int
    vnni: bool
    avx2: bool
    model_weights: bool
    parallel_min_macs: int
    env: dict[str, tuple[Any, str]]

    def emit(self, node: Any) -> tuple[Any, str]:
        """The relax expression (and its layout) of one fx node that is not an input/output."""
        args = [a for a in node.args if hasattr(a, "name") and a.name in self.env]
        if node.op == "call_module" and node.target in self.by_name:
            return self._layer(node, args)
        kind = _relu_like(node, self.modules)
        if kind is None or not args:
            raise UnsupportedModel(f"fx node {node.op} {node.target!r} is not supported")
        x, layout = self.env[args[0].name]
        if kind == "add":
            return self._add(node, args, x, layout)
        if kind in ("relu", "identity"):
            from tvm import relax

            return (self.bb.emit(relax.op.nn.relu(x)) if kind == "relu" else x), layout
        if kind == "avgpool1":
            return self._avgpool(node, x, layout), layout
        if kind == "maxpool":
            return self._maxpool(node, x, layout), layout
        return self._reshape(node, kind, x, layout), "flat"

    # --- quantizable layers: a call_tir to the table's kernel ---------------------------------

    def _layer(self, node: Any, args: list[Any]) -> tuple[Any, str]:
        from tvm import relax

        bb = self.bb
        layer = self.by_name[node.target]
        choice = self.choices.get(layer.name, QuantChoice())
        spec = kernel_spec(layer, choice, self.batch, vnni=self.vnni, avx2=self.avx2)
        if isinstance(spec, str):
            raise UnsupportedModel(f"layer {layer.name} {choice.label}: {spec}")
        spec = _module_geometry(spec, self.modules[node.target])
        x, layout = self.env[args[0].name]
        if layer.kind == "conv":
            x = self.to_layout(x, layout, "NHWC")
            y = self._call_kernel(layer, spec, self._prepare_act(spec, x))
            y = self._drop_padding(spec, self._finish_act(spec, y))
            g = spec.conv
            return bb.emit(relax.op.reshape(y, (g.batch, g.out_h, g.out_w, spec.n))), "NHWC"
        x = self.to_layout(x, layout, "NCHW")
        lead = _shape_of(x)[:-1]
        x = bb.emit(relax.op.reshape(x, (math.prod(lead), spec.k)))
        y = self._call_kernel(layer, spec, self._prepare_act(spec, x))
        y = self._drop_padding(spec, self._finish_act(spec, y))
        return bb.emit(relax.op.reshape(y, (*lead, spec.n))), "flat"

    def _call_kernel(self, layer: LayerInfo, spec: KernelSpec, x: Any) -> Any:
        from tvm import relax

        from autoquant.backends.tvm import kernels as tvm_kernels

        func, names = tvm_kernels.build_prim_func(spec)
        mod = tvm_kernels.schedule(
            spec, func, threads=self.threads, parallel_min_macs=self.parallel_min_macs
        )
        symbol = f"k_{layer.name.replace('.', '_')}"
        gv = self.bb.add_func(mod["main"].with_attr("global_symbol", symbol), symbol)
        data = make_data(spec)
        if self.model_weights and spec.fmt == "fp32":
            data.inputs.update(_model_weight_inputs(self.modules[layer.name], spec))
        args = [x] + [relax.const(a, str(a.dtype)) for a in (data.inputs[n] for n in names[1:-1])]
        out = relax.TensorType((spec.m, spec.np_), output_dtype(spec))
        return self.bb.emit(relax.call_tir(gv, args, out))

    def _prepare_act(self, spec: KernelSpec, x: Any) -> Any:
        from tvm import relax

        if spec.madd16:  # the kernel quantizes its float input itself
            return x
        if spec.act_bits == 8:
            x = self._quantize(x)
            if spec.vnni:  # K (dense) or C (conv) padded to a multiple of 4 with the zero point
                extra = (spec.kp - spec.k) if spec.conv is None else (spec.cp - spec.conv.channels)
                if extra:
                    rank = len(_shape_of(x))
                    x = self.bb.emit(
                        relax.op.nn.pad(x, [0] * (2 * rank - 1) + [extra], pad_value=ACT["za"])
                    )
        elif spec.act_bits == 16:
            x = self.bb.emit(relax.op.astype(x, "float16"))
        return x

    def _finish_act(self, spec: KernelSpec, y: Any) -> Any:
        from tvm import relax

        if spec.madd16:  # and dequantizes its output
            return y
        if spec.act_bits == 8:
            return self._dequantize(y)
        if spec.act_bits == 16:
            return self.bb.emit(relax.op.astype(y, "float32"))
        return y

    def _drop_padding(self, spec: KernelSpec, y: Any) -> Any:
        from tvm import relax

        if spec.np_ == spec.n:
            return y
        return self.bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[spec.n]))

    def _quantize(self, expr: Any) -> Any:
        from tvm import relax

        q = relax.op.add(
            relax.op.round(relax.op.divide(expr, relax.const(ACT["sa"], "float32"))),
            relax.const(ACT["za"], "float32"),
        )
        return self.bb.emit(relax.op.astype(relax.op.clip(q, 0, 255), "uint8"))

    def _dequantize(self, expr: Any) -> Any:
        from tvm import relax

        f = relax.op.astype(expr, "float32")
        return self.bb.emit(
            relax.op.multiply(
                relax.op.subtract(f, relax.const(ACT["zo"], "float32")),
                relax.const(ACT["so"], "float32"),
            )
        )

    # --- the other operations: relax operators ------------------------------------------------

    def to_layout(self, expr: Any, layout: str, want: str) -> Any:
        from tvm import relax

        if layout == want or len(_shape_of(expr)) != 4:
            return expr
        axes = [0, 2, 3, 1] if want == "NHWC" else [0, 3, 1, 2]
        return self.bb.emit(relax.op.permute_dims(expr, axes))

    def _add(self, node: Any, args: list[Any], x: Any, layout: str) -> tuple[Any, str]:
        from tvm import relax

        if len(args) != 2 or len(node.args) != 2 or node.kwargs:
            raise UnsupportedModel(
                f"fx node {node.op} {node.target!r}: only the sum of two tensors is supported"
            )
        other, other_layout = self.env[args[1].name]
        if layout != other_layout and len(_shape_of(x)) == 4:
            other = self.to_layout(other, other_layout, layout)
        elif layout != other_layout:
            x = self.to_layout(x, layout, "NCHW")
            other = self.to_layout(other, other_layout, "NCHW")
            layout = "flat"
        if _shape_of(x) != _shape_of(other):
            raise UnsupportedModel(
                f"fx node {node.name}: adds shapes {_shape_of(x)} and {_shape_of(other)} "
                "(broadcasting is not supported)"
            )
        return self.bb.emit(relax.op.add(x, other)), layout

    def _avgpool(self, node: Any, x: Any, layout: str) -> Any:
        from tvm import relax

        if node.op == "call_module":
            size = self.modules[node.target].output_size
        else:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size not in (1, (1, 1), [1, 1]) or len(_shape_of(x)) != 4:
            raise UnsupportedModel(
                f"fx node {node.name}: adaptive average pooling to {size!r}; "
                "only to 1x1 is supported"
            )
        return self.bb.emit(
            relax.op.nn.adaptive_avg_pool2d(
                x, (1, 1), layout=layout if layout in ("NCHW", "NHWC") else "NCHW"
            )
        )

    def _maxpool(self, node: Any, x: Any, layout: str) -> Any:
        from tvm import relax

        if node.op == "call_module":
            mod = self.modules[node.target]
            k, s, p = mod.kernel_size, mod.stride or mod.kernel_size, mod.padding
        else:
            k = node.args[1]
            s = node.kwargs.get("stride") or (node.args[2] if len(node.args) > 2 else k)
            p = node.kwargs.get("padding", 0)
        return self.bb.emit(relax.op.nn.max_pool2d(x, k, s, p, layout=layout))

    def _reshape(self, node: Any, kind: str, x: Any, layout: str) -> Any:
        """flatten / view / reshape: torch semantics on NCHW."""
        from tvm import relax

        x = self.to_layout(x, layout, "NCHW")
        if kind == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 1)
            if node.op == "call_module":
                start = self.modules[node.target].start_dim
            dims = _shape_of(x)
            new = (*dims[:start], math.prod(dims[start:]))
        else:
            new = tuple(int(a) for a in node.args[1:])
            if -1 in new:
                known = math.prod(d for d in new if d != -1)
                new = tuple(math.prod(_shape_of(x)) // known if d == -1 else d for d in new)
        return self.bb.emit(relax.op.reshape(x, new))


def _module_geometry(spec: KernelSpec, module: Any) -> KernelSpec:
    """``spec`` with the conv's own stride and padding where the shapes leave them ambiguous
    (a 3x3 conv from 4x4 to 2x2 is stride 1 unpadded or stride 2 padded by 1; the table's
    kernel, which knows only the shapes, takes the smaller stride: same M, N and K)."""
    from dataclasses import replace

    g = spec.conv
    stride, pad = getattr(module, "stride", None), getattr(module, "padding", None)
    if g is None or not isinstance(pad, tuple) or stride is None:
        return spec
    if len(set(stride)) != 1 or len(set(pad)) != 1 or (stride[0], pad[0]) == (g.stride, g.pad):
        return spec
    s, p = int(stride[0]), int(pad[0])
    if (g.height + 2 * p - g.kh) // s + 1 != g.out_h or (
        g.width + 2 * p - g.kw
    ) // s + 1 != g.out_w:
        return spec
    return replace(spec, conv=replace(g, stride=s, pad=p))


def _model_weight_inputs(module: Any, spec: KernelSpec) -> dict[str, np.ndarray]:
    """A torch layer's float32 weight (and bias) in the kernel's packed layout."""
    from autoquant.hardware.kernels import _pack_blocks

    w = module.weight.detach().numpy().astype(np.float32)
    if w.ndim == 4:  # [O, I, kh, kw] -> [O, kh*kw*I], K ordered (kh, kw, c)
        w = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    out = {"w": _pack_blocks(np.ascontiguousarray(w), spec.np_)}
    if module.bias is not None:
        bias = np.zeros(spec.np_, dtype=np.float32)
        bias[: spec.n] = module.bias.detach().numpy()
        out["bias"] = bias
    return out


def time_model(
    ex: Any,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    warmup: int,
    number: int,
    repeat: int,
    min_repeat_ms: float,
) -> tuple[list[float], np.ndarray]:
    """Local end-to-end timing samples (seconds) of a compiled model, and its output."""
    tvm = load_tvm()
    from tvm import relax

    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(ex, dev)
    x = tvm.runtime.tensor(
        np.random.default_rng(0).standard_normal((batch, *input_shape[1:])).astype("float32"), dev
    )
    out = vm["main"](x).numpy()
    for _ in range(warmup):
        vm["main"](x)
    timer = vm.time_evaluator(
        "main", dev, number=number, repeat=repeat, min_repeat_ms=int(min_repeat_ms)
    )
    return list(timer(x).results), out
