"""Write a ``QuantConfig`` as an ONNX graph that computes what the torch simulation computes.

The float model is exported once with torch's legacy exporter (it keeps parameter names, so the
node of layer ``fc1`` is the Conv/Gemm whose weight initializer is ``fc1.weight``); then each
layer's node is rewritten as its ``QuantChoice`` says. Every scale, zero point and integer comes
from ``autoquant.quant.fake`` (the functions the search measured with), never recomputed here.

Per layer (``form`` in ``LayerExport``):

=================  ==========================================================================
``fp32``           untouched
``fp16``           float16 weight initializer + ``Cast`` to float32
``int8-qdq``       int8 weight + ``DequantizeLinear`` (per-tensor, or per-channel axis 0 of
                   ``Conv W[O,I,kh,kw]`` / ``Gemm(transB=1) W[N,K]``); with int8 activations the
                   bias is int32 with scale ``s_in*s_w``: ONNX Runtime fuses it into QLinearConv /
                   QGemm
``int4-dq``        2/3/4-bit weight stored as packed INT4 (8-bit per-group: INT8) + opset-21
                   ``DequantizeLinear`` (``block_size`` along weight axis 1 for per-group)
``matmulnbits``    Linear, per-group 2/3/4-bit with power-of-two groups >= 16:
                   ``com.microsoft.MatMulNBits`` (2-bit packed 4 per byte, 3/4-bit packed 2 per
                   byte; ``accuracy_level=0``: exact dequantization, float32 compute) + bias
                   ``Add``
``int8-fold``,     with ``weight_only="fold"``: weight-only integer layers as ``Cast``/``Sub``/``Mul``
``int4-fold``      on the same packed initializers (folded to float once by ONNX Runtime)
=================  ==========================================================================

Activations: int8 = uint8 ``QuantizeLinear``/``DequantizeLinear`` on the layer's input and output
with the calibrated scale and zero point; 16 = ``Cast`` float16 and back; 32 = nothing. An
activation dequantization whose value reaches a float computation (anything but the next
quantization or an integer-kernel layer) is written as ``(Cast(q) - zp) * scale`` instead of
``DequantizeLinear``: same numbers, but ONNX Runtime's ``WeightBiasQuantization`` no longer
re-quantizes that float layer's weight and bias with parameters of its own.

int8 weights of integer-kernel layers are stored as uint8 (``q + 128``, zero point ``z + 128``)
by default: ONNX Runtime then picks U8U8 kernels, exact on every x86 CPU; int8 storage (U8S8)
saturates 16-bit intermediate sums on AVX2 CPUs without VNNI.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.errors import UserError
from autoquant.space.values import QuantChoice, QuantConfig

if TYPE_CHECKING:
    import onnx
    import torch

OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
SUPPORTED_OPS = ("Conv", "Gemm")
# Ops a Linear/Conv2d/ReLU/MaxPool/flatten model exports to, that the export has been checked with.
KNOWN_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Flatten",
    "Reshape",
    "Identity",
    "Constant",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Concat",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "LogSoftmax",
    "Mul",
    "Sub",
    "Div",
    "Transpose",
    "Squeeze",
    "Clip",
    "BatchNormalization",
    "Dropout",
    "LeakyRelu",
    "Gelu",
    "Erf",
    "Pad",
    "Slice",
    "Cast",
}


@dataclass(frozen=True)
class LayerExport:
    """What was written for one layer: its node, the form, and the bits the weight is stored in."""

    layer: str
    node: str
    op: str
    choice: str
    form: str
    storage_bits: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "node": self.node,
            "op": self.op,
            "choice": self.choice,
            "form": self.form,
            "storage_bits": self.storage_bits,
        }


@dataclass(frozen=True)
class ExportedGraph:
    model: onnx.ModelProto
    layers: tuple[LayerExport, ...]


def float_graph(model: torch.nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The float32 model as ONNX (opset 21, IR 10, dynamic batch), nodes named by module path."""
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros(input_shape),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = IR_VERSION
    del proto.graph.value_info[:]
    unknown = sorted({n.op_type for n in proto.graph.node} - KNOWN_OPS)
    if unknown:
        raise UserError(
            f"the model exports to ONNX ops the quantized export does not handle: {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(KNOWN_OPS))}",
            key="task",
        )
    return proto


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
        graph = self.proto.graph
        for i, init in enumerate(graph.initializer):
            if init.name == name:
                del graph.initializer[i]
                break
        self.inits.pop(name, None)


def _normalize_matmul(proto: onnx.ModelProto, layer: str, module: Any) -> None:
    """A 2-D ``nn.Linear`` without bias exports as ``MatMul(x, W^T)`` on an anonymous transposed
    copy of the weight. Rewrite it as ``Gemm(x, <layer>.weight, transB=1)`` (the form a Linear
    with bias takes), so that one code path handles both. Other MatMuls are left alone."""
    import onnx
    from onnx import helper, numpy_helper

    weight = f"{layer}.weight"
    if any(weight in n.input for n in proto.graph.node):
        return
    w_t = _np(module.weight.detach().float()).T
    inits = {i.name: i for i in proto.graph.initializer}
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if tuple(init.dims) != w_t.shape or not np.array_equal(numpy_helper.to_array(init), w_t):
            continue
        inferred = onnx.shape_inference.infer_shapes(proto)
        ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)
        }
        if ranks.get(node.input[0]) != 2:
            return  # a Linear on 3-D input: find_layer_node says it is not supported
        gemm = helper.make_node(
            "Gemm", [node.input[0], weight], list(node.output), name=node.name, transB=1
        )
        proto.graph.initializer.append(numpy_helper.from_array(w_t.T.copy(), weight))
        del proto.graph.node[index]
        proto.graph.node.insert(index, gemm)
        if not any(init.name in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(init)
        return


def find_layer_node(proto: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The Conv/Gemm node computing ``layer``: the one fed by initializer ``<layer>.weight``."""
    weight = f"{layer}.weight"
    users = [n for n in proto.graph.node if weight in list(n.input)[1:2]]
    if len(users) != 1 or users[0].op_type not in SUPPORTED_OPS:
        found = ", ".join(f"{n.op_type} {n.name}" for n in users) or "no node"
        raise UserError(
            f"layer {layer!r}: expected one Conv or Gemm node reading initializer {weight!r}, "
            f"found {found}; allowed: nn.Conv2d and 2-D nn.Linear layers",
            key="config",
        )
    node = users[0]
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        from onnx import helper

        values = {k: helper.get_attribute_value(v) for k, v in attrs.items()}
        if (
            values.get("transB", 0) != 1
            or values.get("transA", 0) != 0
            or values.get("alpha", 1.0) != 1.0
            or values.get("beta", 1.0) != 1.0
        ):
            raise UserError(
                f"layer {layer!r}: Gemm {node.name} has attributes {values}; "
                "allowed: transA=0, transB=1, alpha=beta=1 (as torch exports nn.Linear)",
                key="config",
            )
    return node


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


def _matmulnbits_ok(op: str, choice: QuantChoice, k: int) -> bool:
    g = choice.group_size
    return (
        op == "Gemm"
        and choice.granularity == "per_group"
        and choice.weight_bits <= 4
        and g is not None
        and g >= 16
        and g & (g - 1) == 0
        and k % g == 0
    )


def export_graph(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    config: QuantConfig,
    calibration: Any,
    *,
    int4_kernel: str = "matmulnbits",
    kernel_weights: str = "uint8",
    weight_only: str = "dq",
) -> ExportedGraph:
    """The ONNX graph of ``model`` quantized as ``config`` says.

    Args:
        model: the float32 model the search quantized (not modified).
        input_shape: one batch-1 input shape; the batch axis of the graph is dynamic.
        config: a choice for every layer.
        calibration: ``autoquant.quant.Calibration`` of the search (needed for int8 activations).
        int4_kernel: ``"matmulnbits"`` (Linear per-group ≤4-bit as com.microsoft.MatMulNBits) or
            ``"dq"`` (always standard-ONNX blocked DequantizeLinear). Ignored with
            ``weight_only="fold"``, which folds those layers too.
        kernel_weights: storage of int8 weights in integer-kernel layers. ``"uint8"`` stores
            ``q + 128`` with zero point ``z + 128`` (the same numbers): ONNX Runtime then runs
            U8U8 kernels, exact on every CPU. ``"int8"`` gives U8S8 kernels, faster on CPUs with
            VNNI but on AVX2-only x86 their 16-bit intermediate sums saturate and the results
            drift from the simulation (validation catches it).
        weight_only: integer weights of layers that do not run an integer kernel. ``"dq"``:
            ``DequantizeLinear`` (the standard QDQ form; ONNX Runtime re-runs it at every call).
            ``"fold"``: ``Cast``/``Sub``/``Mul`` on the same packed initializers, which ONNX
            Runtime folds into a float weight once at session start (same numbers, same file
            size, float speed).
    """
    import onnx
    from onnx import helper

    from autoquant.quant.fake import runs_integer_kernel
    from autoquant.space.discovery import quantizable_modules

    if int4_kernel not in ("matmulnbits", "dq"):
        raise UserError(f"bad value {int4_kernel!r}; allowed: matmulnbits, dq", key="int4_kernel")
    if weight_only not in ("dq", "fold"):
        raise UserError(f"bad value {weight_only!r}; allowed: dq, fold", key="weight_only")
    if kernel_weights not in ("uint8", "int8"):
        raise UserError(f"bad value {kernel_weights!r}; allowed: uint8, int8", key="kernel_weights")
    proto = float_graph(model, input_shape)
    modules = quantizable_modules(model)
    rw = _Rewriter(proto)
    exported: list[LayerExport] = []
    uses_ms = False
    for layer, choice in config.choices:
        if layer not in modules:
            raise UserError(
                f"config names layer {layer!r}, which the model does not have", key="config"
            )
        if not choice.is_fp32:
            _normalize_matmul(proto, layer, modules[layer])
        node = find_layer_node(proto, layer)
        if choice.is_fp32:
            exported.append(LayerExport(layer, node.name, node.op_type, choice.label, "fp32", 32))
            continue
        form, bits = _rewrite_layer(
            rw,
            node,
            layer,
            modules[layer],
            choice,
            calibration,
            int4_kernel,
            kernel_weights,
            weight_only,
        )
        uses_ms |= form == "matmulnbits"
        exported.append(LayerExport(layer, node.name, node.op_type, choice.label, form, bits))
    integer_nodes = {
        e.node for e, (_, c) in zip(exported, config.choices) if runs_integer_kernel(c)
    }
    _protect_float_consumers(proto.graph, integer_nodes)
    _toposort(proto.graph)
    opsets = [helper.make_opsetid("", OPSET)]
    if uses_ms:
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    proto.ir_version = IR_VERSION
    proto.producer_name = "autoquant"
    del proto.graph.value_info[:]
    onnx.checker.check_model(proto)  # cheap structural check; the full one runs in validate
    return ExportedGraph(proto, tuple(exported))


def _rewrite_layer(
    rw, node, layer, module, choice, calibration, int4_kernel, kernel_weights, weight_only
) -> tuple[str, int]:
    from onnx import TensorProto, helper

    from autoquant.quant.fake import quantize_bias, quantize_weight, runs_integer_kernel

    x_in, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y_out = node.output[0]
    pre = f"{layer}"
    new_nodes: list = []

    # --- input activation
    if choice.act_bits == 8:
        if calibration is None:
            raise UserError(f"layer {layer!r} has int8 activations but the run has no calibration")
        p_in = calibration.input_params(layer)
        s, z = (
            rw.add_init(f"{pre}.in_scale", np.array(p_in.scale, np.float32)),
            rw.add_init(f"{pre}.in_zero", np.array(p_in.zero_point, np.uint8)),
        )
        new_nodes += [
            helper.make_node("QuantizeLinear", [x_in, s, z], [f"{pre}.in_q"], name=f"{pre}/in_Q"),
            helper.make_node(
                "DequantizeLinear", [f"{pre}.in_q", s, z], [f"{pre}.in_dq"], name=f"{pre}/in_DQ"
            ),
        ]
        x_in = f"{pre}.in_dq"
    elif choice.act_bits == 16:
        new_nodes += [
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
        ]
        x_in = f"{pre}.in_f32"

    # --- weight (and bias)
    weight = module.weight.detach().float()
    w_float = f"{pre}.w_dq"
    storage_bits = choice.weight_bits
    main_inputs: list[str]
    op_nodes: list = []
    if choice.weight_bits == 32:
        form, w_float = "fp32-weight", w_name
    elif choice.weight_bits == 16:
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
        k = weight.shape[1]
        if (
            int4_kernel == "matmulnbits"
            and weight_only == "dq"
            and _matmulnbits_ok(node.op_type, choice, k)
        ):
            # 2-bit weights pack 4 per byte; 3-bit ones are stored in 4 bits.
            nbits = 2 if choice.weight_bits == 2 else 4
            offset = 2 ** (nbits - 1)  # MatMulNBits is unsigned: q + 2^(b-1), zero point alike
            form, storage_bits = "matmulnbits", nbits
            n, g = weight.shape[0], choice.group_size
            u = (_np(params.q).astype(np.int16) + offset).reshape(n, k // g, g)
            rw.add_init(f"{pre}.w_nbits", pack_bits(u, nbits))
            rw.add_init(f"{pre}.w_scale", _np(params.scale).astype(np.float32).reshape(n, k // g))
            mm_inputs = [x_in, f"{pre}.w_nbits", f"{pre}.w_scale"]
            if not choice.symmetric:
                zu = (_np(params.zero_point).astype(np.int16) + offset).reshape(n, k // g)
                rw.add_init(f"{pre}.w_zero", pack_bits(zu, nbits))
                mm_inputs.append(f"{pre}.w_zero")
            mm_out = f"{pre}.mm" if (b_name or choice.act_bits != 32) else y_out
            op_nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    mm_inputs,
                    [mm_out],
                    domain=MS_DOMAIN,
                    name=node.name,
                    K=k,
                    N=n,
                    bits=nbits,
                    block_size=g,
                    accuracy_level=0,
                )
            )
            last = mm_out
            if b_name:
                last = f"{pre}.biased"
                op_nodes.append(
                    helper.make_node("Add", [mm_out, b_name], [last], name=f"{pre}/bias_Add")
                )
            rw.remove_init(w_name)
            _finish(rw, node, new_nodes, op_nodes, last, y_out, layer, choice, calibration)
            return form, storage_bits
        qdtype = "int4" if choice.weight_bits <= 4 else None
        storage_bits = 4 if choice.weight_bits <= 4 else 8
        np_q = _np(params.q).astype(np.int8)
        np_z = _np(params.zero_point).astype(np.int8)
        if runs_integer_kernel(choice) and kernel_weights == "uint8":
            # same numbers, shifted by 128: (q+128) - (z+128) = q - z
            np_q = (np_q.astype(np.int16) + 128).astype(np.uint8)
            np_z = (np_z.astype(np.int16) + 128).astype(np.uint8)
        np_s = _np(params.scale).astype(np.float32)
        if weight_only == "fold" and not runs_integer_kernel(choice):
            form = "int8-fold" if storage_bits == 8 else "int4-fold"
            new_nodes += _folded_weight(
                rw, pre, weight.shape, choice, np_q, np_s, np_z, qdtype, w_float
            )
        else:
            form = "int8-qdq" if storage_bits == 8 else "int4-dq"
            new_nodes.append(_dq_weight(rw, pre, choice, np_q, np_s, np_z, qdtype, w_float))
        rw.remove_init(w_name)
        if runs_integer_kernel(choice) and b_name:
            bias = module.bias
            q_b, s_b = quantize_bias(bias, calibration.input_params(layer).scale, params.scale)
            rw.add_init(f"{pre}.b_q", _np(q_b).astype(np.int32))
            s_arr = _np(s_b).astype(np.float32)
            b_attrs: dict[str, Any] = {}
            if choice.granularity == "per_tensor":
                s_arr = s_arr.reshape(())
            else:
                b_attrs["axis"] = 0
            rw.add_init(f"{pre}.b_scale", s_arr)
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{pre}.b_q", f"{pre}.b_scale"],
                    [f"{pre}.b_dq"],
                    name=f"{pre}/b_DQ",
                    **b_attrs,
                )
            )
            rw.remove_init(b_name)
            b_name = f"{pre}.b_dq"
    main_inputs = [x_in, w_float] + ([b_name] if b_name else [])
    raw_out = f"{pre}.raw" if choice.act_bits != 32 else y_out
    op_node = _clone_node(node, main_inputs, [raw_out])
    op_nodes.append(op_node)
    _finish(rw, node, new_nodes, op_nodes, raw_out, y_out, layer, choice, calibration)
    return form, storage_bits


def _dq_weight(rw, pre, choice, np_q, np_s, np_z, qdtype, w_float):
    """``DequantizeLinear`` of the stored weight: per-tensor, per-channel (axis 0 for Conv
    ``W[O,I,kh,kw]`` and Gemm(transB=1) ``W[N,K]``) or blocked along axis 1."""
    from onnx import helper

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


def _folded_weight(rw, pre, shape, choice, np_q, np_s, np_z, qdtype, w_float) -> list:
    """``(Cast(q) - Cast(z)) * s`` from the same packed initializers: the numbers of
    DequantizeLinear, written with ops ONNX Runtime constant-folds at session start (it never
    folds DequantizeLinear while QDQ fusion is on), so the weight is dequantized once, not at
    every call. Per-group weights are stored as ``[O, I/B, B, *k]`` and reshaped after."""
    from onnx import TensorProto, helper

    shape = tuple(int(d) for d in shape)
    bcast = (shape[0],) + (1,) * (len(shape) - 1)
    q = np_q
    if choice.granularity == "per_tensor":
        np_s, np_z = np_s.reshape(()), np_z.reshape(())
    elif choice.granularity == "per_channel":
        np_s, np_z = np_s.reshape(bcast), np_z.reshape(bcast)
    else:
        g = int(choice.group_size)
        grouped = (shape[0], shape[1] // g, g, *shape[2:])
        q = np_q.reshape(grouped)
        scale_shape = (shape[0], shape[1] // g, 1, *shape[2:])
        np_s, np_z = np_s.reshape(scale_shape), np_z.reshape(scale_shape)
    rw.add_init(f"{pre}.w_q", q, qdtype)
    rw.add_init(f"{pre}.w_scale", np_s)
    nodes = [
        helper.make_node(
            "Cast", [f"{pre}.w_q"], [f"{pre}.w_qf"], to=TensorProto.FLOAT, name=f"{pre}/w_Cast"
        )
    ]
    centred = f"{pre}.w_qf"
    if np.any(np_z != 0):
        rw.add_init(f"{pre}.w_zero", np_z, qdtype)
        nodes += [
            helper.make_node(
                "Cast",
                [f"{pre}.w_zero"],
                [f"{pre}.w_zf"],
                to=TensorProto.FLOAT,
                name=f"{pre}/w_zCast",
            ),
            helper.make_node(
                "Sub", [f"{pre}.w_qf", f"{pre}.w_zf"], [f"{pre}.w_qc"], name=f"{pre}/w_Sub"
            ),
        ]
        centred = f"{pre}.w_qc"
    if choice.granularity == "per_group":
        rw.add_init(f"{pre}.w_shape", np.array(shape, np.int64))
        nodes += [
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
    else:
        nodes.append(
            helper.make_node("Mul", [centred, f"{pre}.w_scale"], [w_float], name=f"{pre}/w_Mul")
        )
    return nodes


def _finish(
    rw, node, new_nodes, op_nodes, last: str, y_out: str, layer, choice, calibration
) -> None:
    """Output activation, then swap ``node`` for the new nodes."""
    from onnx import TensorProto, helper

    pre = layer
    out_nodes: list = []
    if choice.act_bits == 8:
        p_out = calibration.output_params(layer)
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


# Ops a quantized activation passes through unchanged in value (so a Q after them still sees
# the dequantized grid): ORT moves DequantizeLinear forward across these.
PASS_THROUGH = {
    "Relu",
    "MaxPool",
    "Flatten",
    "Reshape",
    "Identity",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
}


def _protect_float_consumers(graph, integer_nodes: set[str]) -> None:
    """Write an activation ``DequantizeLinear`` as ``(Cast(q) - Cast(zp)) * scale`` (the same
    numbers) wherever its value can reach something other than a ``QuantizeLinear`` or an
    integer-kernel layer.

    ONNX Runtime's ``WeightBiasQuantization`` rewrites any Conv/Gemm fed by a per-tensor
    activation DequantizeLinear: a float weight becomes int8 per-tensor and a float bias int32,
    with parameters of its own. That would change what float, fp16 and weight-only layers
    compute. A DequantizeLinear whose every path ends in a Q (the next layer's input
    quantization) or in an integer-kernel layer keeps the standard form that ORT fuses.
    """
    from onnx import TensorProto, helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    inits = {i.name for i in graph.initializer}

    def safe(tensor: str, depth: int = 0) -> bool:
        if tensor in outputs or depth > 32:
            return False
        for c in consumers.get(tensor, []):
            if c.op_type == "QuantizeLinear" or c.name in integer_nodes:
                continue
            if c.op_type in PASS_THROUGH and safe(c.output[0], depth + 1):
                continue
            return False
        return True

    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] in inits or safe(node.output[0]):
            continue
        x, scale, zero = node.input[0], node.input[1], node.input[2]
        pre = node.name or node.output[0]
        explicit = [
            helper.make_node("Cast", [x], [f"{pre}.qf"], to=TensorProto.FLOAT, name=f"{pre}/Cast"),
            helper.make_node(
                "Cast", [zero], [f"{pre}.zf"], to=TensorProto.FLOAT, name=f"{pre}/zCast"
            ),
            helper.make_node("Sub", [f"{pre}.qf", f"{pre}.zf"], [f"{pre}.c"], name=f"{pre}/Sub"),
            helper.make_node("Mul", [f"{pre}.c", scale], [node.output[0]], name=f"{pre}/Mul"),
        ]
        index = list(graph.node).index(node)
        del graph.node[index]
        for offset, new in enumerate(explicit):
            graph.node.insert(index + offset, new)


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
