"""Write a ``QuantConfig`` as an ONNX graph that computes what the torch simulation computes.

The float model is exported once (``autoquant.onnxgraph.mapping.float_graph``: torch's legacy
exporter, which keeps parameter names) and every layer is found in it (``map_layers``: the
Conv/Gemm reading ``<layer>.weight``, or the MatMul of a Linear on N-D input, rewritten as
``Reshape -> Gemm -> Reshape``); then each layer's node is rewritten as its ``QuantChoice``
says. Every scale, zero point and integer comes from ``autoquant.quant.fake`` (the functions the
search measured with), never recomputed here. Everything else in the graph stays float.

Per layer (``form`` in ``LayerExport``); what ONNX Runtime (ORT_ENABLE_ALL) runs in brackets:

=================  ==========================================================================
``fp32``           untouched
``fp16``           float16 weight initializer + ``Cast`` to float32 [folded at load]
``int8-qdq``       int8 weight + ``DequantizeLinear`` (per-tensor, or per-channel axis 0 of
                   ``Conv W[O,I,kh,kw]`` / ``Gemm(transB=1) W[N,K]``); with int8 activations the
                   bias is int32 with scale ``s_in*s_w`` [QLinearConv / QGemm]
``matmulnbits``    weight-only Linear, per-group 3/4-bit with power-of-two groups >= 16:
                   ``com.microsoft.MatMulNBits`` (packed 2 per byte; ``accuracy_level=0``:
                   exact dequantization, float32 compute) + bias ``Add`` [MatMulNBits]
``int8-fold``,     weight-only layers otherwise (default ``weight_only="fold"``):
``int4-fold``,     ``Cast``/``Sub``/``Mul`` on the packed initializers (INT8, INT4, or 2-bit four
``int2-fold``      per byte unpacked by ``BitShift``/``BitwiseAnd``) [folded to a float weight
                   once at load: float kernels]
``int8-dynamic``   Linear, int8 per-tensor/per-channel weights, dynamic int8 activations:
                   ``com.microsoft.DynamicQuantizeMatMul`` (input quantized per call from its
                   own range, float bias) [DynamicQuantizeMatMul]; other layers with dynamic
                   activations get ``DynamicQuantizeLinear`` + ``DequantizeLinear`` in front
``int4-dq``        with ``weight_only="dq"``: 2/3/4-bit weight as INT4 + opset-21
                   ``DequantizeLinear`` (``block_size`` along axis 1 for per-group) [dequantized
                   on every call]; 8-bit ones as ``int8-qdq``; 2-bit Linear per-group as
                   MatMulNBits with ``bits=2``
format's own       weight formats whose export form is ``"dequantize"`` (``autoquant.formats``,
                   e.g. ``fp8-dq``): the codes they store + ``DequantizeLinear`` [dequantized
                   on every call]
=================  ==========================================================================

Activations: int8 = uint8 ``QuantizeLinear``/``DequantizeLinear`` on the layer's input and output
with the calibrated scale and zero point; 16 = ``Cast`` float16 and back; 32 = nothing. Between
two int8 layers ORT keeps ``DQ -> Q`` where the parameters differ (a requantization the numbers
need) and drops a Relu whose Q clamps the same. A layer read only by a ReLU is quantized on the
ReLU's range (``Calibration.relu_outputs``, zero point 0), so the next layer reads the same
parameters: ``_skip_exact_requantization`` then drops that Relu and the ``DQ -> Q`` pair (exact),
and ORT runs ``QLinearConv -> QLinearConv`` and residual Adds as ``QLinearAdd`` (both inputs
dequantized, the output quantized by the next layers' shared Q). A residual Add that feeds a
global average pool and then layers (``Calibration.pooled_adds``: a ResNet's last block) has no
next layer's Q; when its sources and readers are int8, the simulation quantizes the pool's input
and the export writes that Q/DQ and a Q/DQ on the readers' parameters behind the pool
(``_quantize_pooled_adds``): ORT runs ``QLinearAdd -> QLinearGlobalAveragePool`` as for
``quantize_static``'s graph. An activation dequantization that reaches input 0 of a float
Conv/Gemm is written as ``Cast(q) [- zp] * scale`` instead of ``DequantizeLinear``: same numbers, but ORT's
``WeightBiasQuantization`` no longer re-quantizes that float layer's weight and bias.

int8 weights of integer-kernel layers are stored as int8 (ONNX Runtime's U8S8 kernels) on x86
CPUs with VNNI, else as uint8 (``q + 128``, zero point ``z + 128``: U8U8 kernels, exact on every
CPU; U8S8 saturates 16-bit intermediate sums on AVX2 CPUs without VNNI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant import formats
from autoquant.errors import UserError
from autoquant.onnxgraph.mapping import (  # noqa: F401 - re-exported: the graph API in one place
    INPUT_NAME,
    IR_VERSION,
    OPSET,
    OUTPUT_NAME,
    find_layer_node,
    float_graph,
)
from autoquant.space.values import QuantChoice, QuantConfig

if TYPE_CHECKING:
    import onnx
    import torch

MS_DOMAIN = "com.microsoft"
SUPPORTED_OPS = ("Conv", "Gemm")
WEIGHT_ONLY_MODES = ("fold", "dq")
INT4_KERNELS = ("matmulnbits", "dq")
KERNEL_WEIGHTS = ("auto", "uint8", "int8")
# /proc/cpuinfo flags of x86 instructions that multiply u8 x s8 into int32 without saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def host_kernel_weights() -> str:
    """``kernel_weights`` that ``"auto"`` resolves to on this machine: ``"int8"`` (U8S8 kernels)
    on x86 CPUs with VNNI, whose ``vpdpbusd`` is exact and several times faster than U8U8
    (a digits ResNet's int8 convolutions: 2.5x); ``"uint8"`` everywhere else (AVX2 without VNNI
    saturates U8S8's 16-bit intermediate sums; other CPUs untested)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "uint8"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return "uint8"
    return "int8" if any(f in flags for f in VNNI_FLAGS) else "uint8"


NBITS_ACCURACY_LEVELS = (0, 4)


@dataclass(frozen=True)
class GraphOptions:
    """How ``export_graph`` writes the forms that have more than one (see its docstring)."""

    int4_kernel: str = "matmulnbits"
    kernel_weights: str = "auto"
    weight_only: str = "fold"
    nbits_accuracy_level: int = 0

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("int4_kernel", self.int4_kernel, INT4_KERNELS),
            ("kernel_weights", self.kernel_weights, KERNEL_WEIGHTS),
            ("weight_only", self.weight_only, WEIGHT_ONLY_MODES),
            ("nbits_accuracy_level", self.nbits_accuracy_level, NBITS_ACCURACY_LEVELS),
        ):
            if value not in allowed:
                raise UserError(
                    f"bad value {value!r}; allowed: {', '.join(map(str, allowed))}", key=key
                )
        if self.kernel_weights == "auto":
            object.__setattr__(self, "kernel_weights", host_kernel_weights())


@dataclass(frozen=True)
class LayerExport:
    """What was written for one layer: its node, the op it computes with (Conv, Gemm, MatMul,
    MatMulNBits), the form, and the bits the weight is stored in; ``reason`` says why a layer
    the export cannot write quantized stayed float."""

    layer: str
    node: str
    op: str
    choice: str
    form: str
    storage_bits: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "node": self.node,
            "op": self.op,
            "choice": self.choice,
            "form": self.form,
            "storage_bits": self.storage_bits,
        }
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class ExportedGraph:
    model: onnx.ModelProto
    layers: tuple[LayerExport, ...]
    options: GraphOptions = GraphOptions(kernel_weights="uint8")

    @property
    def float_layers(self) -> dict[str, str]:
        """Layers kept float because the export cannot write them quantized: name -> reason."""
        return {e.layer: e.reason for e in self.layers if e.reason}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class _Rewriter:
    """Collects the initializers and nodes replacing one layer's node."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.proto = proto
        self.inits = {i.name: i for i in proto.graph.initializer}

    def add_init(self, name: str, array: np.ndarray, dtype: str | None = None) -> str:
        import ml_dtypes
        from onnx import numpy_helper

        if dtype == "int4":
            array = np.asarray(array).astype(ml_dtypes.int4)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.proto.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def remove_init(self, name: str) -> None:
        """Drop initializer ``name`` unless another node still reads it."""
        graph = self.proto.graph
        if sum(name in n.input for n in graph.node) > 1:
            return
        for i, init in enumerate(graph.initializer):
            if init.name == name:
                del graph.initializer[i]
                break
        self.inits.pop(name, None)


@dataclass(frozen=True)
class _Layer:
    """One layer being rewritten: the rewriter and the layer's node in its graph, the module and
    its choice, the run's calibration and the export's options. ``name`` (the layer's) prefixes
    every tensor and node it adds."""

    rw: _Rewriter
    node: Any  # onnx.NodeProto
    name: str
    module: Any  # torch.nn.Module
    choice: QuantChoice
    calibration: Any
    options: GraphOptions


@dataclass(frozen=True)
class _Codes:
    """An integer weight as stored: codes, scales and zero points (numpy)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values packed along the last axis, ``8 // bits`` per byte, the first
    in the lowest bits (MatMulNBits' layout: for 4 bits, low nibble = even element)."""
    per = 8 // bits
    u = u.astype(np.uint8)
    pad = (-u.shape[-1]) % per
    if pad:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], pad), np.uint8)], axis=-1)
    out = np.zeros((*u.shape[:-1], u.shape[-1] // per), np.uint8)
    for i in range(per):
        out |= (u[..., i::per] << (i * bits)).astype(np.uint8)
    return out


def _matmulnbits_ok(op: str, choice: QuantChoice, k: int, options: GraphOptions) -> bool:
    """Whether a weight-only layer is written as MatMulNBits: a Linear, per-group 3/4-bit with
    power-of-two groups >= 16 (2-bit only with ``weight_only="dq"``: ORT 1.32 has no fast 2-bit
    kernel, it dequantizes the whole weight on every call, ~20x slower than float32 at M=1)."""
    g = choice.group_size
    return (
        formats.weight_format(choice).integer
        and options.int4_kernel == "matmulnbits"
        and op == "Gemm"
        and choice.granularity == "per_group"
        and (
            2 < choice.weight_bits <= 4 or (choice.weight_bits == 2 and options.weight_only == "dq")
        )
        and g is not None
        and g >= 16
        and g & (g - 1) == 0
        and k % g == 0
    )


def export_graph(
    model: torch.nn.Module,
    inputs: Any,
    config: QuantConfig,
    calibration: Any,
    *,
    int4_kernel: str = "matmulnbits",
    kernel_weights: str = "auto",
    weight_only: str = "fold",
    nbits_accuracy_level: int = 0,
) -> ExportedGraph:
    """The ONNX graph of ``model`` quantized as ``config`` says.

    Args:
        model: the float32 model the search quantized (not modified).
        inputs: one batch-1 input shape (graph input ``input``), or example inputs
            (``Task.example_inputs()``: one tensor, or named tensors that become graph inputs of
            those names); see ``autoquant.onnxgraph.mapping.float_graph``.
        config: a choice for every layer. A layer the export cannot write quantized (see
            ``map_layers``) must be ``f32-a32`` in it; it is listed with the reason.
        calibration: ``autoquant.quant.Calibration`` of the search (needed for int8 activations).
        int4_kernel: ``"matmulnbits"`` (Linear per-group 3/4-bit weight-only as
            com.microsoft.MatMulNBits) or ``"dq"`` (never MatMulNBits).
        kernel_weights: storage of int8 weights in integer-kernel layers. ``"uint8"`` stores
            ``q + 128`` with zero point ``z + 128`` (the same numbers): ONNX Runtime then runs
            U8U8 kernels, exact on every CPU. ``"int8"`` gives U8S8 kernels, exact and much
            faster on x86 CPUs with VNNI, but on AVX2-only x86 their 16-bit intermediate sums
            saturate and the results drift from the simulation (validation catches it).
            ``"auto"`` (default): ``"int8"`` when the exporting CPU has VNNI, else ``"uint8"``
            (``host_kernel_weights``; ``ExportedGraph.options`` says which).
        weight_only: integer weights of layers that run neither an integer kernel nor
            MatMulNBits. ``"fold"`` (default): ``Cast``/``Sub``/``Mul`` on the packed
            initializers (2-bit ones unpacked by ``BitShift``/``BitwiseAnd``), which ONNX
            Runtime folds into a float weight once at session start: same numbers and file
            size, float speed. ``"dq"``: ``DequantizeLinear``, the standard QDQ form, which
            ONNX Runtime re-runs on every call (it never folds a DequantizeLinear).
        nbits_accuracy_level: MatMulNBits' ``accuracy_level``. 0 (default): exact
            dequantization, float32 compute, what the simulation computes. 4: int8 activations
            inside the kernel (faster, not what the simulation computes).

    Raises:
        UserError: an option, or the config names a layer the model lacks, or quantizes one the
            export cannot write.
    """
    from autoquant.onnxgraph.mapping import map_layers
    from autoquant.quant.fake import runs_integer_kernel
    from autoquant.space.discovery import quantizable_modules

    options = GraphOptions(int4_kernel, kernel_weights, weight_only, nbits_accuracy_level)
    modules = quantizable_modules(model)
    for layer, _ in config.choices:
        if layer not in modules:
            raise UserError(
                f"config names layer {layer!r}, which the model does not have", key="config"
            )
    proto = float_graph(model, inputs)
    mapped = map_layers(proto, model, [layer for layer, _ in config.choices])
    rw = _Rewriter(proto)
    exported = [
        _export_layer(
            rw, mapped[layer], modules[layer], choice, calibration=calibration, options=options
        )
        for layer, choice in config.choices
    ]
    integer_nodes = {
        e.node for e, (_, c) in zip(exported, config.choices) if runs_integer_kernel(c)
    }
    _quantize_pooled_adds(rw, config, calibration)
    _share_quantization(proto.graph)
    _skip_exact_requantization(proto.graph)
    _protect_float_consumers(proto.graph, integer_nodes)
    _finalize(proto, uses_ms=any(e.form in ("matmulnbits", "int8-dynamic") for e in exported))
    return ExportedGraph(proto, tuple(exported), options)


def _export_layer(
    rw, where, module, choice: QuantChoice, *, calibration, options: GraphOptions
) -> LayerExport:
    """Rewrite one layer's node(s) in ``rw.proto`` as ``choice`` says (``where``: its node, or
    why it has none) and describe what was written."""
    from autoquant.onnxgraph.mapping import LayerNode, as_gemm
    from autoquant.quant.fake import runs_integer_kernel

    layer, label = where.layer, choice.label
    if not isinstance(where, LayerNode):
        if not choice.is_fp32:
            raise UserError(
                f"layer {layer!r} is {label} in the config, but the export cannot write it "
                f"quantized: {where.reason}; allowed: f32-a32 for it (`autoquant space SPEC` "
                "lists such layers before a search)",
                key="config",
            )
        return LayerExport(layer, "", "", label, "fp32", 32, where.reason)
    if choice.is_fp32:
        return LayerExport(layer, where.node, where.op, label, "fp32", 32)
    nd = False
    if where.op == "MatMul":
        # QGemm (and the standard QDQ forms) need 2-D input: Reshape -> Gemm -> Reshape; the
        # other forms run on the N-D input as MatMulNBits or MatMul + Add, without reshapes.
        flatten = runs_integer_kernel(choice) or (
            options.weight_only == "dq"
            and not _matmulnbits_ok("Gemm", choice, module.in_features, options)
            and not _dynamic_matmul_ok("Gemm", choice)
        )
        node = as_gemm(rw.proto, where, module, flatten=flatten)
        nd = not flatten and where.input_rank != 2
    else:
        node = next(n for n in rw.proto.graph.node if n.name == where.node)
    lay = _Layer(rw, node, layer, module, choice, calibration, options)
    form, bits = _rewrite_layer(lay, nd=nd)
    op = {"matmulnbits": "MatMulNBits", "int8-dynamic": "DynamicQuantizeMatMul"}.get(
        form, "MatMul" if nd else node.op_type
    )
    return LayerExport(layer, node.name, op, label, form, bits)


def _finalize(proto, *, uses_ms: bool) -> None:
    """Topological order, no unused initializer, opsets (com.microsoft for MatMulNBits and
    DynamicQuantizeMatMul), IR version, a cheap structural check (the full one runs in
    validation)."""
    import onnx
    from onnx import helper

    _toposort(proto.graph)
    used = {name for node in proto.graph.node for name in node.input}
    used |= {o.name for o in proto.graph.output}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)  # left by shared quantization, replaced weights
    opsets = [helper.make_opsetid("", OPSET)]
    if uses_ms:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    proto.ir_version = IR_VERSION
    proto.producer_name = "autoquant"
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)


def _quantize_input(lay: _Layer):
    """The layer's input activation as the simulation rounds it: uint8 Q/DQ with the calibrated
    parameters, or float16 and back, or nothing. Returns (nodes, the tensor the op reads).

    The DQ in front of a float Conv (int8 activations, weights not run by an integer kernel)
    repeats its scale and zero point per input channel (axis 1): the same numbers in one op,
    and ORT's ``WeightBiasQuantization``, which only rewrites layers behind a per-tensor DQ,
    leaves the float weight alone (see ``_protect_float_consumers``)."""
    from onnx import TensorProto, helper

    from autoquant.quant.fake import runs_integer_kernel

    rw, node, choice, calibration = lay.rw, lay.node, lay.choice, lay.calibration
    layer = pre = lay.name
    x_in = node.input[0]
    if _dynamic(choice):
        return [
            helper.make_node(
                "DynamicQuantizeLinear",
                [x_in],
                [f"{pre}.in_q", f"{pre}.in_scale", f"{pre}.in_zero"],
                name=f"{pre}/in_DynQ",
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{pre}.in_q", f"{pre}.in_scale", f"{pre}.in_zero"],
                [f"{pre}.in_dq"],
                name=f"{pre}/in_DQ",
            ),
        ], f"{pre}.in_dq"
    if choice.act_bits == 8:
        if calibration is None:
            raise UserError(f"layer {layer!r} has int8 activations but the run has no calibration")
        p_in = calibration.input_params(layer)
        s = rw.add_init(f"{pre}.in_scale", np.array(p_in.scale, np.float32))
        z = rw.add_init(f"{pre}.in_zero", np.array(p_in.zero_point, np.uint8))
        dq_inputs = [f"{pre}.in_q", s, z]
        attrs: dict[str, Any] = {}
        if node.op_type == "Conv" and not runs_integer_kernel(choice):
            c = int(lay.module.in_channels)
            dq_inputs[1:] = [
                rw.add_init(f"{pre}.in_scale_c", np.full(c, p_in.scale, np.float32)),
                rw.add_init(f"{pre}.in_zero_c", np.full(c, p_in.zero_point, np.uint8)),
            ]
            attrs["axis"] = 1
        return [
            helper.make_node("QuantizeLinear", [x_in, s, z], [f"{pre}.in_q"], name=f"{pre}/in_Q"),
            helper.make_node(
                "DequantizeLinear", dq_inputs, [f"{pre}.in_dq"], name=f"{pre}/in_DQ", **attrs
            ),
        ], f"{pre}.in_dq"
    if choice.act_bits == 16:
        return [
            helper.make_node(
                "Cast", [x_in], [f"{pre}.in_f16"], to=TensorProto.FLOAT16, name=f"{pre}/in_Cast16"
            ),
            helper.make_node(
                "Cast",
                [f"{pre}.in_f16"],
                [f"{pre}.in_f32"],
                to=TensorProto.FLOAT,
                name=f"{pre}/in_Cast32",
            ),
        ], f"{pre}.in_f32"
    return [], x_in


def _rewrite_layer(lay: _Layer, *, nd: bool = False) -> tuple[str, int]:
    """Replace ``node`` (the layer's Conv or Gemm) by the nodes of ``choice``: input
    activation, weight (and bias), op, output activation. Returns (form, storage bits).
    ``nd``: the Gemm is a placeholder on N-D input (``as_gemm(flatten=False)``), written as
    ``MatMul(x, Transpose(W)) + Add(bias)`` (the transpose of a constant weight is folded at
    load) unless it becomes MatMulNBits."""
    from onnx import TensorProto, helper

    from autoquant.quant.fake import quantize_weight, runs_integer_kernel

    rw, node, choice, pre = lay.rw, lay.node, lay.choice, lay.name
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y_out = node.output[0]
    if _dynamic_matmul_ok(node.op_type, choice):
        _dynamic_matmul(lay)
        return "int8-dynamic", 8
    new_nodes, x_in = _quantize_input(lay)
    weight = lay.module.weight.detach().float()
    w_float = f"{pre}.w_dq"
    storage_bits = choice.weight_bits
    export_form = formats.weight_format(choice).export_form
    if export_form == "float32":
        form, w_float = "fp32-weight", w_name
    elif export_form == "dequantize":
        form, storage_bits = _dequantized_weight(lay, weight, w_float, new_nodes)
        rw.remove_init(w_name)
    elif export_form == "float16":
        form = "fp16"
        rw.add_init(f"{pre}.w_f16", _np(weight).astype(np.float16))
        new_nodes.append(
            helper.make_node(
                "Cast", [f"{pre}.w_f16"], [w_float], to=TensorProto.FLOAT, name=f"{pre}/w_Cast"
            )
        )
        rw.remove_init(w_name)
    else:
        params = quantize_weight(weight, choice)
        if _matmulnbits_ok(node.op_type, choice, weight.shape[1], lay.options):
            op_nodes, last, storage_bits = _matmulnbits(lay, x_in, params)
            rw.remove_init(w_name)
            _finish(lay, new_nodes, op_nodes, last, y_out)
            return "matmulnbits", storage_bits
        integer = runs_integer_kernel(choice)
        form, storage_bits, weight_nodes = _integer_weight(
            lay, weight.shape, params, integer, w_float
        )
        new_nodes += weight_nodes
        rw.remove_init(w_name)
        if integer and b_name:
            new_nodes.append(_int32_bias(lay, params))
            rw.remove_init(b_name)
            b_name = f"{pre}.b_dq"
    raw_out = f"{pre}.raw" if choice.act_bits != 32 else y_out
    if nd:
        op_nodes = _nd_linear(lay, x_in, w_float, b_name, raw_out)
    else:
        main_inputs = [x_in, w_float] + ([b_name] if b_name else [])
        op_nodes = [_clone_node(node, main_inputs, [raw_out])]
    _finish(lay, new_nodes, op_nodes, raw_out, y_out)
    return form, storage_bits


def _nd_linear(lay: _Layer, x_in: str, w_float: str, b_name, out: str) -> list:
    """A Linear on N-D input: ``MatMul(x, Transpose(W[N,K]))`` then ``Add(bias)``."""
    from onnx import helper

    pre, name = lay.name, lay.node.name
    mm_out = f"{pre}.mm" if b_name else out
    nodes = [
        helper.make_node("Transpose", [w_float], [f"{pre}.w_t"], name=f"{pre}/w_T", perm=[1, 0]),
        helper.make_node("MatMul", [x_in, f"{pre}.w_t"], [mm_out], name=name),
    ]
    if b_name:
        nodes.append(helper.make_node("Add", [mm_out, b_name], [out], name=f"{pre}/bias_Add"))
    return nodes


def _dynamic(choice: QuantChoice) -> bool:
    """Dynamic int8 activations: the input quantized per call from its own range."""
    return bool(getattr(choice, "act_dynamic", False))


def _dynamic_matmul_ok(op: str, choice: QuantChoice) -> bool:
    """A Linear with int8 per-tensor/per-channel weights and dynamic activations: one
    ``com.microsoft.DynamicQuantizeMatMul`` (what ``quantize_dynamic`` gives a MatMul)."""
    return (
        _dynamic(choice)
        and op == "Gemm"
        and formats.weight_format(choice).integer
        and choice.weight_bits == 8
        and choice.granularity in ("per_tensor", "per_channel")
    )


def _dynamic_matmul(lay: _Layer) -> None:
    """Replace the layer's Gemm (2-D, or the N-D placeholder: the op takes N-D input) by
    ``DynamicQuantizeMatMul(x, W^T int8 [K,N], scale, zero point[, bias])``: the input is
    quantized to uint8 from the range of the tensor it gets (per call: per sample at batch 1,
    as the simulation quantizes), multiplied in integers, scaled, and the float bias added."""
    from onnx import helper

    from autoquant.quant.fake import quantize_weight

    rw, node, pre, choice = lay.rw, lay.node, lay.name, lay.choice
    params = quantize_weight(lay.module.weight.detach().float(), choice)
    q = _np(params.q).astype(np.int8)
    scale = _np(params.scale).astype(np.float32).reshape(-1)
    zero = _np(params.zero_point).astype(np.int8).reshape(-1)
    if choice.granularity == "per_tensor":
        scale, zero = scale.reshape(()), zero.reshape(())
    rw.add_init(f"{pre}.w_qT", np.ascontiguousarray(q.T))
    rw.add_init(f"{pre}.w_scale", scale)
    rw.add_init(f"{pre}.w_zero", zero)
    inputs = [node.input[0], f"{pre}.w_qT", f"{pre}.w_scale", f"{pre}.w_zero"]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    op = helper.make_node(
        "DynamicQuantizeMatMul", inputs, [node.output[0]], domain=MS_DOMAIN, name=node.name
    )
    rw.remove_init(node.input[1])
    _finish(lay, [], [op], node.output[0], node.output[0])


def _dequantized_weight(lay: _Layer, weight, w_float: str, new_nodes: list) -> tuple[str, int]:
    """A weight format's own stored form (``WeightFormat.export_weight``) and the
    ``DequantizeLinear`` that gives the float weight. Returns (form, storage bits)."""
    from onnx import helper

    rw, pre, choice = lay.rw, lay.name, lay.choice
    stored = formats.weight_format(choice).export_weight(_np(weight), choice)
    inputs = [rw.add_init(f"{pre}.w_q", stored.q), rw.add_init(f"{pre}.w_scale", stored.scale)]
    if stored.zero_point is not None:
        inputs.append(rw.add_init(f"{pre}.w_zero", stored.zero_point))
    attrs = {} if stored.axis is None else {"axis": stored.axis}
    new_nodes.append(
        helper.make_node("DequantizeLinear", inputs, [w_float], name=f"{pre}/w_DQ", **attrs)
    )
    return stored.form, stored.storage_bits


def _integer_weight(lay: _Layer, shape, params, integer: bool, w_float: str):
    """The float weight an integer-weight layer's op reads: ``DequantizeLinear`` (integer-kernel
    layers, which ONNX Runtime fuses; every layer with ``weight_only="dq"``) or the folded form.
    Returns (form, storage bits, nodes)."""
    choice, options = lay.choice, lay.options
    np_q = _np(params.q).astype(np.int8)
    np_z = _np(params.zero_point).astype(np.int8)
    np_s = _np(params.scale).astype(np.float32)
    if integer and options.kernel_weights == "uint8":
        # same numbers, shifted by 128: (q+128) - (z+128) = q - z
        np_q = (np_q.astype(np.int16) + 128).astype(np.uint8)
        np_z = (np_z.astype(np.int16) + 128).astype(np.uint8)
    if not integer and options.weight_only == "fold":
        bits = 2 if choice.weight_bits == 2 else 4 if choice.weight_bits <= 4 else 8
        nodes = _folded_weight(lay, shape, _Codes(np_q, np_s, np_z), bits, w_float)
        return f"int{bits}-fold", bits, nodes
    qdtype = "int4" if choice.weight_bits <= 4 else None
    storage_bits = 4 if choice.weight_bits <= 4 else 8
    form = "int8-qdq" if storage_bits == 8 else "int4-dq"
    return form, storage_bits, [_dq_weight(lay, _Codes(np_q, np_s, np_z), qdtype, w_float)]


def _int32_bias(lay: _Layer, params):
    """int32 bias with scale ``s_in * s_w`` (what the simulation adds), dequantized by a
    ``DequantizeLinear`` that ONNX Runtime fuses into the integer kernel."""
    from onnx import helper

    from autoquant.quant.fake import quantize_bias

    rw, pre = lay.rw, lay.name
    scale_in = lay.calibration.input_params(lay.name).scale
    q_b, s_b = quantize_bias(lay.module.bias, scale_in, params.scale)
    rw.add_init(f"{pre}.b_q", _np(q_b).astype(np.int32))
    s_arr = _np(s_b).astype(np.float32)
    attrs: dict[str, Any] = {}
    if lay.choice.granularity == "per_tensor":
        s_arr = s_arr.reshape(())
    else:
        attrs["axis"] = 0
    rw.add_init(f"{pre}.b_scale", s_arr)
    return helper.make_node(
        "DequantizeLinear",
        [f"{pre}.b_q", f"{pre}.b_scale"],
        [f"{pre}.b_dq"],
        name=f"{pre}/b_DQ",
        **attrs,
    )


def _matmulnbits(lay: _Layer, x_in: str, params):
    """``com.microsoft.MatMulNBits`` (+ the bias ``Add``): 3/4-bit weights packed two per
    byte, 2-bit four per byte, unsigned (``q + 2^(b-1)``, zero points alike). Returns (nodes,
    the output tensor, storage bits)."""
    from onnx import helper

    rw, node, pre, choice = lay.rw, lay.node, lay.name, lay.choice
    nbits = 2 if choice.weight_bits == 2 else 4
    offset = 2 ** (nbits - 1)
    n, k = params.q.shape
    g = int(choice.group_size)
    u = (_np(params.q).astype(np.int16) + offset).reshape(n, k // g, g)
    rw.add_init(f"{pre}.w_nbits", pack_bits(u, nbits))
    rw.add_init(f"{pre}.w_scale", _np(params.scale).astype(np.float32).reshape(n, k // g))
    inputs = [x_in, f"{pre}.w_nbits", f"{pre}.w_scale"]
    if not choice.symmetric:
        zu = (_np(params.zero_point).astype(np.int16) + offset).reshape(n, k // g)
        rw.add_init(f"{pre}.w_zero", pack_bits(zu, nbits))
        inputs.append(f"{pre}.w_zero")
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = f"{pre}.mm" if (b_name or choice.act_bits != 32) else node.output[0]
    nodes = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [out],
            domain=MS_DOMAIN,
            name=node.name,
            K=k,
            N=n,
            bits=nbits,
            block_size=g,
            accuracy_level=lay.options.nbits_accuracy_level,
        )
    ]
    if b_name:
        nodes.append(
            helper.make_node("Add", [out, b_name], [f"{pre}.biased"], name=f"{pre}/bias_Add")
        )
        out = f"{pre}.biased"
    return nodes, out, nbits


def _dq_weight(lay: _Layer, codes: _Codes, qdtype: str | None, w_float: str):
    """``DequantizeLinear`` of the stored weight: per-tensor, per-channel (axis 0 for Conv
    ``W[O,I,kh,kw]`` and Gemm(transB=1) ``W[N,K]``) or blocked along axis 1."""
    from onnx import helper

    rw, pre, choice = lay.rw, lay.name, lay.choice
    np_q, np_s, np_z = codes.q, codes.scale, codes.zero
    attrs: dict[str, Any] = {}
    if choice.granularity == "per_tensor":
        np_s, np_z = np_s.reshape(()), np_z.reshape(())
    elif choice.granularity == "per_channel":
        np_s, np_z = np_s.reshape(-1), np_z.reshape(-1)
        attrs["axis"] = 0
    else:  # per-group: scale [O, I/B, *k] is already the blocked layout along axis 1
        attrs.update(axis=1, block_size=int(choice.group_size))
    rw.add_init(f"{pre}.w_q", np_q, qdtype)
    rw.add_init(f"{pre}.w_scale", np_s)
    rw.add_init(f"{pre}.w_zero", np_z, qdtype)
    return helper.make_node(
        "DequantizeLinear",
        [f"{pre}.w_q", f"{pre}.w_scale", f"{pre}.w_zero"],
        [w_float],
        name=f"{pre}/w_DQ",
        **attrs,
    )


def _folded_weight(lay: _Layer, shape, codes: _Codes, bits: int, w_float: str) -> list:
    """``(Cast(q) - Cast(z)) * s`` from packed initializers: the numbers of DequantizeLinear,
    written with ops ONNX Runtime constant-folds at session start (it never folds
    DequantizeLinear while QDQ fusion is on), so the weight is dequantized once, not at every
    call. 8-bit weights are INT8, 3/4-bit ones INT4, 2-bit ones four per uint8 byte (``q + 2``,
    unpacked by ``BitShift`` and ``BitwiseAnd``). Per-group weights are stored as
    ``[O, I/B, B, *k]`` and reshaped after."""
    from onnx import helper

    rw, pre, choice = lay.rw, lay.name, lay.choice
    np_q, np_s, np_z = codes.q, codes.scale, codes.zero
    shape = tuple(int(d) for d in shape)
    bcast = (shape[0],) + (1,) * (len(shape) - 1)
    q = np_q
    if choice.granularity == "per_tensor":
        np_s, np_z = np_s.reshape(()), np_z.reshape(())
    elif choice.granularity == "per_channel":
        np_s, np_z = np_s.reshape(bcast), np_z.reshape(bcast)
    else:
        g = int(choice.group_size)
        q = np_q.reshape((shape[0], shape[1] // g, g, *shape[2:]))
        scale_shape = (shape[0], shape[1] // g, 1, *shape[2:])
        np_s, np_z = np_s.reshape(scale_shape), np_z.reshape(scale_shape)
    rw.add_init(f"{pre}.w_scale", np_s)
    nodes, needs_sub = _stored_codes(lay, q, np_z, bits)
    centred = f"{pre}.w_qf"
    if needs_sub:
        centred_inputs = [f"{pre}.w_qf", f"{pre}.w_zf"]
        nodes.append(helper.make_node("Sub", centred_inputs, [f"{pre}.w_qc"], name=f"{pre}/w_Sub"))
        centred = f"{pre}.w_qc"
    if choice.granularity == "per_group":
        rw.add_init(f"{pre}.w_shape", np.array(shape, np.int64))
        return nodes + [
            helper.make_node(
                "Mul", [centred, f"{pre}.w_scale"], [f"{pre}.w_grouped"], name=f"{pre}/w_Mul"
            ),
            helper.make_node(
                "Reshape",
                [f"{pre}.w_grouped", f"{pre}.w_shape"],
                [w_float],
                name=f"{pre}/w_Reshape",
            ),
        ]
    return nodes + [
        helper.make_node("Mul", [centred, f"{pre}.w_scale"], [w_float], name=f"{pre}/w_Mul")
    ]


def _stored_codes(lay: _Layer, q: np.ndarray, np_z: np.ndarray, bits: int) -> tuple[list, bool]:
    """A folded weight's codes, stored packed and cast to float (``<layer>.w_qf``), and the zero
    points to subtract (``<layer>.w_zf``). Returns (nodes, whether the ``Sub`` is needed)."""
    from onnx import TensorProto, helper

    rw, pre = lay.rw, lay.name
    # the stored zero points as float, when they are not all 0
    zero_to_float = helper.make_node(
        "Cast", [f"{pre}.w_zero"], [f"{pre}.w_zf"], to=TensorProto.FLOAT, name=f"{pre}/w_zCast"
    )
    if bits == 2:
        nodes = _unpack_2bit(rw, pre, q, f"{pre}.w_qf")
        # the stored values are q + 2: subtract z + 2 (one scalar when every z is 0)
        if np.any(np_z != 0):
            rw.add_init(f"{pre}.w_zero", (np_z.astype(np.int16) + 2).astype(np.uint8))
            nodes.append(zero_to_float)
        else:
            rw.add_init(f"{pre}.w_zf", np.array(2.0, np.float32))
        return nodes, True
    rw.add_init(f"{pre}.w_q", q, "int4" if bits == 4 else None)
    nodes = [
        helper.make_node(
            "Cast", [f"{pre}.w_q"], [f"{pre}.w_qf"], to=TensorProto.FLOAT, name=f"{pre}/w_Cast"
        )
    ]
    needs_sub = bool(np.any(np_z != 0))
    if needs_sub:
        rw.add_init(f"{pre}.w_zero", np_z, "int4" if bits == 4 else None)
        nodes.append(zero_to_float)
    return nodes, needs_sub


def _unpack_2bit(rw, pre: str, q: np.ndarray, out: str) -> list:
    """Nodes giving ``float(q + 2)`` in ``q``'s shape from a uint8 initializer holding ``q + 2``
    four per byte (first in the lowest bits): ``BitwiseAnd(BitShift(packed, [0,2,4,6]), 3)``,
    flattened, cut to size, reshaped, cast."""
    from onnx import TensorProto, helper

    flat = (q.astype(np.int16) + 2).astype(np.uint8).reshape(-1)
    packed = pack_bits(flat, 2)
    rw.add_init(f"{pre}.w_q2", packed.reshape(-1, 1))
    rw.add_init(f"{pre}.w_q2_shifts", np.array([0, 2, 4, 6], np.uint8))
    rw.add_init(f"{pre}.w_q2_mask", np.array(3, np.uint8))
    rw.add_init(f"{pre}.w_q2_flat", np.array([-1], np.int64))
    rw.add_init(f"{pre}.w_q2_start", np.array([0], np.int64))
    rw.add_init(f"{pre}.w_q2_count", np.array([flat.size], np.int64))
    rw.add_init(f"{pre}.w_q2_shape", np.array(q.shape, np.int64))
    p = f"{pre}.w_q2"
    return [
        helper.make_node(
            "BitShift", [p, f"{p}_shifts"], [f"{p}_s"], direction="RIGHT", name=f"{pre}/w_Shift"
        ),
        helper.make_node("BitwiseAnd", [f"{p}_s", f"{p}_mask"], [f"{p}_u"], name=f"{pre}/w_And"),
        helper.make_node("Reshape", [f"{p}_u", f"{p}_flat"], [f"{p}_l"], name=f"{pre}/w_Flat"),
        helper.make_node(
            "Slice", [f"{p}_l", f"{p}_start", f"{p}_count"], [f"{p}_c"], name=f"{pre}/w_Cut"
        ),
        helper.make_node("Reshape", [f"{p}_c", f"{p}_shape"], [f"{p}_r"], name=f"{pre}/w_Unflat"),
        helper.make_node("Cast", [f"{p}_r"], [out], to=TensorProto.FLOAT, name=f"{pre}/w_Cast"),
    ]


def _finish(lay: _Layer, new_nodes: list, op_nodes: list, last: str, y_out: str) -> None:
    """Output activation, then swap the layer's node for the new nodes."""
    from onnx import TensorProto, helper

    rw, node, choice, pre = lay.rw, lay.node, lay.choice, lay.name
    out_nodes: list = []
    if choice.act_bits == 8 and not _dynamic(choice):  # dynamic activations: output stays float
        p_out = lay.calibration.output_params(pre)
        s = rw.add_init(f"{pre}.out_scale", np.array(p_out.scale, np.float32))
        z = rw.add_init(f"{pre}.out_zero", np.array(p_out.zero_point, np.uint8))
        out_nodes += [
            helper.make_node("QuantizeLinear", [last, s, z], [f"{pre}.out_q"], name=f"{pre}/out_Q"),
            helper.make_node(
                "DequantizeLinear", [f"{pre}.out_q", s, z], [y_out], name=f"{pre}/out_DQ"
            ),
        ]
    elif choice.act_bits == 16:
        out_nodes += [
            helper.make_node(
                "Cast", [last], [f"{pre}.out_f16"], to=TensorProto.FLOAT16, name=f"{pre}/out_Cast16"
            ),
            helper.make_node(
                "Cast", [f"{pre}.out_f16"], [y_out], to=TensorProto.FLOAT, name=f"{pre}/out_Cast32"
            ),
        ]
    elif last != y_out:
        out_nodes.append(helper.make_node("Identity", [last], [y_out], name=f"{pre}/out_Identity"))
    graph = rw.proto.graph
    index = list(graph.node).index(node)
    replacement = new_nodes + op_nodes + out_nodes
    del graph.node[index]
    for offset, new in enumerate(replacement):
        graph.node.insert(index + offset, new)


# Ops ONNX Runtime's QDQPropagation moves a DequantizeLinear forward across (so the node after
# them may see the DQ as its direct producer), and Identity, which it removes.
DQ_PROPAGATES_ACROSS = {
    "MaxPool",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Flatten",
    "Identity",
}
# Ops whose float weight ORT's WeightBiasQuantization re-quantizes when input 0 comes from a
# per-tensor DequantizeLinear.
REQUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")


def _protect_float_consumers(graph, integer_nodes: set[str]) -> None:
    """Give float layers fed by an activation ``DequantizeLinear`` the same numbers written as
    ``Cast(q) [- zp] * scale``.

    ORT's ``WeightBiasQuantization`` rewrites any Conv/Gemm whose input 0 is produced by a
    per-tensor activation DequantizeLinear: a float weight becomes int8 per-tensor and a float
    bias int32, with parameters of its own. That would change what float, fp16 and weight-only
    layers compute. Only the consumers of a DQ that lead to input 0 of a Conv/Gemm that is not
    an integer-kernel layer (directly or across ops ORT moves a DQ over) read the explicit
    form; the DQ stays, in the one-op standard form ORT fuses, for every other consumer (the
    next layer's Q, an integer kernel, Relu, Add, the graph output).
    """

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}

    def leads_to_float_layer(consumer, tensor: str, depth: int = 0) -> bool:
        if consumer.op_type in REQUANTIZED_OPS:
            return consumer.input[0] == tensor and consumer.name not in integer_nodes
        if consumer.op_type not in DQ_PROPAGATES_ACROSS or depth >= 32:
            return False
        out = consumer.output[0]
        return any(leads_to_float_layer(c, out, depth + 1) for c in consumers.get(out, []))

    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        scale = inits.get(node.input[1])
        if scale is not None and math.prod(scale.dims) > 1:  # per-axis: ORT leaves it alone
            continue
        y = node.output[0]
        rewired = [c for c in consumers.get(y, []) if leads_to_float_layer(c, y)]
        if not rewired:
            continue
        keep = y in outputs or len(rewired) < len(consumers.get(y, []))
        out = f"{y}.explicit" if keep else y
        explicit = _explicit_dequantize(node, out, inits)
        for c in rewired:
            for i, name in enumerate(c.input):
                if name == y:
                    c.input[i] = out
        index = list(graph.node).index(node)
        if not keep:
            del graph.node[index]
        for offset, new in enumerate(explicit):
            graph.node.insert(index + 1 + offset - (0 if keep else 1), new)


def _explicit_dequantize(node, out: str, inits) -> list:
    """``DequantizeLinear`` ``node`` as ``Cast(q) [- Cast(zp)] * scale`` writing ``out``: the
    same numbers; the subtraction is left out when the zero point is 0."""
    from onnx import TensorProto, helper, numpy_helper

    x, scale, zero = node.input[0], node.input[1], node.input[2]
    pre = node.name or node.output[0]
    zp = numpy_helper.to_array(inits[zero]) if zero in inits else None
    nodes = [helper.make_node("Cast", [x], [f"{pre}.qf"], to=TensorProto.FLOAT, name=f"{pre}/Cast")]
    centred = f"{pre}.qf"
    if zp is None or np.any(zp != 0):
        nodes += [
            helper.make_node(
                "Cast", [zero], [f"{pre}.zf"], to=TensorProto.FLOAT, name=f"{pre}/zCast"
            ),
            helper.make_node("Sub", [centred, f"{pre}.zf"], [f"{pre}.c"], name=f"{pre}/Sub"),
        ]
        centred = f"{pre}.c"
    nodes.append(helper.make_node("Mul", [centred, scale], [out], name=f"{pre}/Mul"))
    return nodes


# Ops between a global average pool and the layer reading it that move no number.
POOL_TO_READER_OPS = ("Flatten", "Reshape", "Identity")


def _quantize_pooled_adds(rw, config: QuantConfig, calibration) -> None:
    """uint8 ``QuantizeLinear`` + ``DequantizeLinear`` in front of the ``GlobalAveragePool`` of
    each pooled residual Add the simulation quantizes (``Calibration.quantized_pools``), with
    the same parameters. Its readers' input Q already quantizes the pool's output, so ORT runs
    ``QLinearAdd`` (the ReLU before the Q, zero point 0, fused away) and
    ``QLinearGlobalAveragePool`` where the tail was float."""
    from onnx import helper

    if calibration is None:
        return
    graph = rw.proto.graph
    for pooled in calibration.quantized_pools(config):
        producer = {o: n for n in graph.node for o in n.output}
        by_name = {n.name: n for n in graph.node}
        pools = []
        for reader in pooled.readers:
            q = by_name.get(f"{reader}/in_Q")
            node = producer.get(q.input[0]) if q is not None else None
            while node is not None and node.op_type in POOL_TO_READER_OPS:
                node = producer.get(node.input[0])
            pools.append(node)
        pool = pools[0]
        if pool is None or pool.op_type != "GlobalAveragePool" or any(p is not pool for p in pools):
            raise RuntimeError(
                f"export found no GlobalAveragePool of {pooled.pool!r} between "
                f"{', '.join(pooled.sources)} and {', '.join(pooled.readers)}"
            )
        params = calibration.pool_input_params(pooled)
        pre = pooled.pool
        s = rw.add_init(f"{pre}.in_scale", np.array(params.scale, np.float32))
        z = rw.add_init(f"{pre}.in_zero", np.array(params.zero_point, np.uint8))
        # The pool's output on the readers' input parameters (the pool output's own range):
        # the readers' Q after the Flatten rounds it again to the same numbers, but ORT fuses
        # the pool only with a Q right behind it.
        s_out, z_out = by_name[f"{pooled.readers[0]}/in_Q"].input[1:3]
        out = pool.output[0]
        for reader in graph.node:
            for i, name in enumerate(reader.input):
                if name == out:
                    reader.input[i] = f"{pre}.out_dq"
        nodes = [
            helper.make_node(
                "QuantizeLinear", [pool.input[0], s, z], [f"{pre}.in_q"], name=f"{pre}/in_Q"
            ),
            helper.make_node(
                "DequantizeLinear", [f"{pre}.in_q", s, z], [f"{pre}.in_dq"], name=f"{pre}/in_DQ"
            ),
            pool,
            helper.make_node(
                "QuantizeLinear", [out, s_out, z_out], [f"{pre}.out_q"], name=f"{pre}/out_Q"
            ),
            helper.make_node(
                "DequantizeLinear",
                [f"{pre}.out_q", s_out, z_out],
                [f"{pre}.out_dq"],
                name=f"{pre}/out_DQ",
            ),
        ]
        pool.input[0] = f"{pre}.in_dq"
        index = list(graph.node).index(pool)
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)


def _share_quantization(graph) -> None:
    """One ``QuantizeLinear`` (and one ``DequantizeLinear`` after it) per tensor and parameters:
    layers reading the same activation with the same calibrated range (a ResNet block's conv1
    and its shortcut conv) quantize it once instead of once per layer."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def key(node):
        params = tuple(
            (inits[n].dtype.str, inits[n].tobytes()) if n in inits else (None, n)
            for n in node.input[1:]
        )
        attrs = tuple(sorted((a.name, a.SerializeToString()) for a in node.attribute))
        return node.op_type, node.input[0], params, attrs

    changed = True
    while changed:
        changed = False
        seen: dict = {}
        for node in list(graph.node):
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[0] in inits:
                continue
            k = key(node)
            if k not in seen:
                seen[k] = node
                continue
            kept, dup = seen[k].output[0], node.output[0]
            if dup in {o.name for o in graph.output}:
                continue
            for other in graph.node:
                for i, name in enumerate(other.input):
                    if name == dup:
                        other.input[i] = kept
            graph.node.remove(node)
            changed = True


def _skip_exact_requantization(graph) -> None:
    """Drop ops that cannot change a number, so ONNX Runtime sees integer tensors flow from one
    integer kernel to the next (fusing ``QLinearConv -> QLinearConv`` and ``QLinearAdd``
    without float ops or requantizations between them):

    - a ``Relu`` reading a uint8 ``DequantizeLinear`` with zero point 0 (every value is >= 0;
      the layer's output was quantized on its ReLU's range, ``Calibration.relu_outputs``);
    - a per-tensor ``QuantizeLinear`` reading a ``DequantizeLinear`` with the same scale and
      zero point (``Q(DQ(q)) == q``): its readers read ``q``.
    """
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = {o.name for o in graph.output}

    def per_tensor_params(node):
        if len(node.input) < 3 or any(n not in inits for n in node.input[1:3]):
            return None
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        if scale.size != 1 or zero.size != 1 or zero.dtype != np.uint8:
            return None
        return np.float32(scale.reshape(())), int(zero.reshape(()))

    def rewire(old: str, new: str) -> None:
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == old:
                    other.input[i] = new

    changed = True
    while changed:
        changed = False
        producer = {o: n for n in graph.node for o in n.output}
        for node in list(graph.node):
            src = producer.get(node.input[0]) if node.input else None
            if src is None or src.op_type != "DequantizeLinear" or node.output[0] in outputs:
                continue
            params = per_tensor_params(src)
            if params is None:
                continue
            if node.op_type == "Relu" and params[1] == 0:
                rewire(node.output[0], src.output[0])
            elif node.op_type == "QuantizeLinear" and per_tensor_params(node) == params:
                rewire(node.output[0], src.input[0])
            else:
                continue
            graph.node.remove(node)
            changed = True
        read = {name for n in graph.node for name in n.input} | outputs
        for node in list(graph.node):
            if node.op_type == "DequantizeLinear" and node.output[0] not in read:
                graph.node.remove(node)
                changed = True


def _clone_node(node, inputs: list[str], outputs: list[str]):
    from onnx import helper

    clone = helper.make_node(
        node.op_type, inputs, outputs, name=node.name, domain=node.domain or None
    )
    clone.attribute.extend(node.attribute)
    return clone


def _toposort(graph) -> None:
    """Nodes in an order where every input is produced before it is read (inserted nodes are
    already in place; this guards against initializers moved by the rewrite)."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = False
        for node in list(pending):
            if all(i in produced for i in node.input):
                ordered.append(node)
                produced.update(node.output)
                pending.remove(node)
                progress = True
        if not progress:
            names = ", ".join(n.name for n in pending[:5])
            raise RuntimeError(f"export produced a graph with unresolved inputs at: {names}")
    del graph.node[:]
    graph.node.extend(ordered)


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of all initializers as stored (INT4 counts half a byte per element)."""
    from onnx import TensorProto

    total = 0
    for init in proto.graph.initializer:
        numel = math.prod(init.dims) if init.dims else 1
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            total += math.ceil(numel / 2)
        else:
            total += numel * np.dtype(_np_dtype(init.data_type)).itemsize
    return total


def _np_dtype(data_type: int):
    from onnx import helper

    return helper.tensor_dtype_to_np_dtype(data_type)
