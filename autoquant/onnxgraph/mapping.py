"""The float32 ONNX graph of a model, and where each quantizable layer is in it.

``float_graph`` exports the model once with torch's legacy exporter, which keeps parameter
names: the node of ``conv1`` is the Conv reading initializer ``conv1.weight``, that of a 2-D
``fc1`` the ``Gemm(transB=1)`` reading ``fc1.weight``. A Linear on N-D input (batch x tokens x
features) exports as ``MatMul(x, W^T)`` on an anonymous transposed copy of the weight, then
``Add(bias)``; ``map_layers`` finds that MatMul by the copy's values (the legacy exporter's name
scope, ``/encoder/layer.0/query/MatMul``, breaks ties between equal weights), and ``as_gemm``
rewrites it as ``Reshape(x, [-1, K]) -> Gemm(<layer>.weight, <layer>.bias, transB=1) ->
Reshape(back to [..., N])``, the form every quantized choice is written in.

A layer that cannot be found (its module is called twice, its weight was transformed by the
exporter, a Gemm with other attributes) is an ``Unmapped`` with the reason: it stays float.
Everything else in the graph (LayerNormalization, attention's activation x activation MatMuls,
Softmax, Where, ...) is not a quantizable layer and stays float as exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.errors import UserError

if TYPE_CHECKING:
    import onnx
    import torch

OPSET = 21
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "output"
# The attribute the wrapper of a model with named inputs keeps it under; stripped from names.
_WRAPPED = "m"


@dataclass(frozen=True)
class LayerNode:
    """The node computing a layer: ``op`` is ``Conv``, ``Gemm`` (2-D Linear) or ``MatMul`` (a
    Linear on N-D input, or a 2-D one without bias); ``bias_add`` the Add after a MatMul."""

    layer: str
    node: str
    op: str
    bias_add: str | None = None
    input_rank: int | None = None

    def describe(self) -> str:
        if self.op == "MatMul":
            return (
                f"MatMul {self.node}"
                + (f" + Add {self.bias_add}" if self.bias_add else "")
                + " (quantized as Reshape -> Gemm -> Reshape)"
            )
        return f"{self.op} {self.node}"


@dataclass(frozen=True)
class Unmapped:
    """A layer the export cannot write quantized, and why: it stays float."""

    layer: str
    reason: str


Mapped = LayerNode | Unmapped


# ------------------------------------------------------------------------------- float graph


def example_batch(inputs: Any) -> Any:
    """``inputs`` as a probe batch: a shape tuple becomes zeros of that shape; a tensor or a
    mapping of named tensors is used as it is (``Task.example_inputs()``)."""
    import torch

    if isinstance(inputs, tuple) and all(isinstance(d, int) for d in inputs):
        return torch.zeros(inputs)
    return inputs


class _Named:
    """Factory of a module calling ``model(**dict(zip(names, args)))`` (lazy torch import)."""

    @staticmethod
    def wrap(model: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module:
        import torch

        class Named(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.add_module(_WRAPPED, model)

            def forward(self, *args):  # noqa: ANN202
                return getattr(self, _WRAPPED)(**dict(zip(names, args)))

        return Named()


def float_graph(model: torch.nn.Module, inputs: Any) -> onnx.ModelProto:
    """The float32 model as ONNX (opset 21, IR 10), nodes named by module path.

    Args:
        model: the float model (set to eval mode).
        inputs: one batch-1 input shape (the graph input is ``input``), or example inputs as
            ``Task.example_inputs()`` gives them: one tensor, or a mapping ``name -> tensor``
            (graph inputs of those names, in that order; the model is called as
            ``model(**inputs)``). Axis 0 of every input and output is dynamic (``batch``), and
            axis 1 of integer inputs too (``sequence``: token ids, attention masks).

    Raises:
        UserError: the model does not export (the exporter's message, on one line).
    """
    import onnx
    import torch

    from autoquant.model_inputs import as_tuple, input_names, is_named, run_model

    example = example_batch(inputs)
    names = input_names(example, INPUT_NAME)
    args = as_tuple(example)
    model = model.eval()
    with torch.no_grad():
        outputs = run_model(model, example)
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    out_names = [OUTPUT_NAME] if count == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(count)]
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, args):
        axes[name] = {0: "batch"}
        if not tensor.is_floating_point() and tensor.dim() >= 2:
            axes[name][1] = "sequence"
    axes.update({name: {0: "batch"} for name in out_names})
    exported = _Named.wrap(model, names) if is_named(example) else model
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), _native_output_silenced():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exported,
                args,
                buf,  # type: ignore[arg-type]  # the legacy exporter writes to file objects
                dynamo=False,
                opset_version=OPSET,
                input_names=list(names),
                output_names=out_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything
        message = " ".join(str(exc).split())[:300]
        raise UserError(
            f"the model's float32 ONNX export failed: {type(exc).__name__}: {message}",
            key="task",
        ) from None
    proto = onnx.load_from_string(buf.getvalue())
    if exported is not model:
        _strip_wrapper(proto)
    proto.ir_version = IR_VERSION
    del proto.graph.value_info[:]
    return proto


@contextlib.contextmanager
def _native_output_silenced():
    """Process-level stdout/stderr to /dev/null for the duration: the legacy exporter's C++
    side logs the whole TorchScript graph to stderr when an export fails, which would bury the
    one-line error."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _strip_wrapper(proto: onnx.ModelProto) -> None:
    """Initializers ``m.<name>`` -> ``<name>`` and node names ``/m/...`` -> ``/...``, as if the
    model had been exported without the wrapper of its named inputs."""
    prefix, scope = f"{_WRAPPED}.", f"/{_WRAPPED}/"
    renamed = {}
    for init in proto.graph.initializer:
        if init.name.startswith(prefix):
            renamed[init.name] = init.name[len(prefix) :]
            init.name = renamed[init.name]
    for node in proto.graph.node:
        if node.name.startswith(scope):
            node.name = node.name[len(scope) - 1 :]
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


# ---------------------------------------------------------------------------- layer -> node


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def _in_scope(node_name: str, layer: str) -> bool:
    """Whether a legacy-exporter node name (``/encoder/layer.0/query/MatMul``) lies under the
    module path ``layer`` (``encoder.layer.0.query``), in any of its calls (the exporter names
    the scope of a module's second call ``query_1``)."""
    path = node_name.strip("/").replace("/", ".")
    return re.match(rf"{re.escape(layer)}(_\d+)?\.", path) is not None


class _GraphIndex:
    """Consumers, producers, initializers and ranks of one graph, computed once."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        import onnx
        from onnx import numpy_helper

        graph = proto.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.matmuls: dict[tuple, list] = {}
        for node in graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in self.inits:
                w = numpy_helper.to_array(self.inits[node.input[1]])
                if w.dtype == np.float32 and w.ndim == 2:
                    self.matmuls.setdefault(_digest(w), []).append(node)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
            values = list(inferred.graph.value_info) + list(inferred.graph.input)
            self.ranks = {
                v.name: len(v.type.tensor_type.shape.dim)
                for v in values
                if v.type.tensor_type.HasField("shape")
            }
        except Exception:  # noqa: BLE001 - ranks unknown: N-D Linear layers use the Reshape form
            self.ranks = {}


def map_layers(
    proto: onnx.ModelProto, model: torch.nn.Module, layers: Iterable[str] | None = None
) -> dict[str, Mapped]:
    """Every quantizable layer (``layers``, default all of the model's) mapped to its node in
    the float graph ``proto``, or to the reason it has none."""
    from autoquant.space.discovery import quantizable_modules

    modules = quantizable_modules(model)
    index = _GraphIndex(proto)
    names = list(modules) if layers is None else list(layers)
    return {
        name: (
            _map_one(index, name, modules[name])
            if name in modules
            else Unmapped(name, "the model has no Linear or Conv2d module of that name")
        )
        for name in names
    }


def _map_one(index: _GraphIndex, layer: str, module: Any) -> Mapped:
    weight = f"{layer}.weight"
    readers = index.consumers.get(weight, [])
    if readers:
        return _map_named_weight(layer, weight, readers)
    return _map_matmul(index, layer, module)


def _map_named_weight(layer: str, weight: str, readers: list) -> Mapped:
    from onnx import helper

    users = [n for n in readers if list(n.input)[1:2] == [weight]]
    if len(users) != 1 or len(readers) != 1:
        found = ", ".join(f"{n.op_type} {n.name}" for n in readers)
        return Unmapped(
            layer,
            f"initializer {weight!r} is read by {found}: the module is called more than once "
            "or its weight is used outside the layer",
        )
    node = users[0]
    if node.op_type not in ("Conv", "Gemm"):
        return Unmapped(layer, f"its weight feeds {node.op_type} {node.name}, not a Conv or Gemm")
    if node.op_type == "Gemm":
        values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            values.get("transB", 0) != 1
            or values.get("transA", 0) != 0
            or values.get("alpha", 1.0) != 1.0
            or values.get("beta", 1.0) != 1.0
        ):
            return Unmapped(
                layer,
                f"Gemm {node.name} has attributes {values}; allowed: transA=0, transB=1, "
                "alpha=beta=1 (as torch exports nn.Linear)",
            )
    return LayerNode(layer, node.name, node.op_type)


def _map_matmul(index: _GraphIndex, layer: str, module: Any) -> Mapped:
    """A Linear exported as ``MatMul(x, W^T)`` (+ ``Add(bias)``): found by the values of the
    transposed copy, ties broken by the node's name scope."""
    from onnx import numpy_helper

    w_t = module.weight.detach().float().cpu().numpy().T
    nodes = index.matmuls.get(_digest(w_t), [])
    if len(nodes) > 1:
        nodes = [n for n in nodes if _in_scope(n.name, layer)]
    if not nodes:
        return Unmapped(
            layer,
            f"no node reads initializer '{layer}.weight' or a transposed copy of it (the module "
            "is not reached by the forward, or the exporter transformed its weight)",
        )
    node = nodes[0]
    others = [n for n in index.consumers.get(node.input[1], []) if n is not node]
    others += [n for n in index.consumers.get(f"{layer}.bias", []) if n.op_type != "Add"]
    if len(nodes) > 1 or others or len(index.consumers.get(f"{layer}.bias", [])) > 1:
        found = ", ".join(n.name for n in nodes + others)
        return Unmapped(
            layer,
            f"its weight or bias is read by several nodes ({found}): the module is called more "
            "than once",
        )
    bias_add = None
    if module.bias is not None:
        bias = module.bias.detach().float().cpu().numpy()
        users = index.consumers.get(node.output[0], [])
        for user in users:
            if user.op_type != "Add" or len(users) != 1:
                continue
            other = [i for i in user.input if i != node.output[0]]
            init = index.inits.get(other[0]) if len(other) == 1 else None
            if (
                init is not None
                and np.array_equal(numpy_helper.to_array(init).reshape(-1), bias)
                and tuple(init.dims) in ((bias.size,), (1, bias.size))
            ):
                bias_add = user.name
        if bias_add is None:
            return Unmapped(
                layer,
                f"MatMul {node.name} is not followed by one Add of the layer's bias",
            )
    return LayerNode(layer, node.name, "MatMul", bias_add, index.ranks.get(node.input[0]))


def find_layer_node(proto: onnx.ModelProto, layer: str) -> onnx.NodeProto:
    """The Conv/Gemm node computing ``layer``: the one fed by initializer ``<layer>.weight``."""
    weight = f"{layer}.weight"
    readers = [n for n in proto.graph.node if weight in n.input]
    mapped = _map_named_weight(layer, weight, readers) if readers else None
    if not isinstance(mapped, LayerNode):
        reason = mapped.reason if mapped else f"no node reads initializer {weight!r}"
        raise UserError(
            f"layer {layer!r}: {reason}; allowed: nn.Conv2d and nn.Linear layers called once",
            key="config",
        )
    return next(n for n in proto.graph.node if n.name == mapped.node)


# ------------------------------------------------------------------- N-D Linear -> 2-D Gemm


def as_gemm(
    proto: onnx.ModelProto, mapped: LayerNode, module: Any, *, flatten: bool = True
) -> onnx.NodeProto:
    """Rewrite the MatMul (+ bias Add) of a Linear as ``Gemm(x2, <layer>.weight[, <layer>.bias],
    transB=1)`` and return the Gemm.

    On 2-D input ``x2`` is ``x``. On N-D input with ``flatten`` (what an integer kernel, QGemm,
    needs), ``x2 = Reshape(x, [-1, K])`` and the Gemm's output is reshaped back to
    ``Shape(x)[:-1] + [N]``, so the value the graph had keeps its shape and name; layers reading
    the same ``x`` share the Reshape and Shape nodes (and so, with equal calibrated ranges,
    their input quantization). Without ``flatten`` the returned Gemm reads the N-D ``x``
    directly: a placeholder the caller must replace by ops that take N-D input (MatMulNBits, or
    MatMul + Add on the transposed weight)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    nodes = {n.name: n for n in graph.node}
    matmul = nodes[mapped.node]
    add = nodes[mapped.bias_add] if mapped.bias_add else None
    layer = mapped.layer
    weight = module.weight.detach().float().cpu().numpy()
    n_out, k = weight.shape
    inits = {i.name for i in graph.initializer}
    anonymous = matmul.input[1]
    graph.initializer.append(numpy_helper.from_array(weight.copy(), f"{layer}.weight"))
    x = matmul.input[0]
    gemm_inputs = [x, f"{layer}.weight"]
    if add is not None:
        bias_name = f"{layer}.bias"
        if bias_name not in inits:
            bias = module.bias.detach().float().cpu().numpy()
            graph.initializer.append(numpy_helper.from_array(bias.copy(), bias_name))
        gemm_inputs.append(bias_name)
    y = (add if add is not None else matmul).output[0]
    reshape = flatten and mapped.input_rank != 2
    produced = {o for n in graph.node for o in n.output} | inits
    new = []

    def shared(name: str, make) -> str:
        if name not in produced:
            made = make(name)
            if isinstance(made, np.ndarray):
                graph.initializer.append(numpy_helper.from_array(made, name))
            else:
                new.append(made)
            produced.add(name)
        return name

    if reshape:
        shape_2d = shared(f"flatten_to_K{k}", lambda n: np.array([-1, k], np.int64))
        gemm_inputs[0] = shared(
            f"{x}/2d",
            lambda n: helper.make_node("Reshape", [x, shape_2d], [n], name=f"{n}/Reshape"),
        )
    gemm_out = f"{layer}.y2d" if reshape else y
    gemm = helper.make_node("Gemm", gemm_inputs, [gemm_out], name=matmul.name, transB=1)
    new.append(gemm)
    if reshape:
        lead = shared(
            f"{x}/lead_shape",
            lambda n: helper.make_node("Shape", [x], [n], name=f"{n}/Shape", end=-1),
        )
        n_const = shared(f"last_dim_N{n_out}", lambda n: np.array([n_out], np.int64))
        out_shape = shared(
            f"{x}/lead_shape+N{n_out}",
            lambda n: helper.make_node("Concat", [lead, n_const], [n], name=f"{n}/Concat", axis=0),
        )
        new.append(
            helper.make_node("Reshape", [gemm_out, out_shape], [y], name=f"{layer}/Reshape_back")
        )
    position = list(graph.node).index(matmul)
    for old in [n for n in (matmul, add) if n is not None]:
        graph.node.remove(old)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    _drop_unused_initializers(proto, [anonymous] + ([i for i in add.input] if add else []))
    return gemm


def _drop_unused_initializers(proto: onnx.ModelProto, names: Iterable[str]) -> None:
    used = {i for n in proto.graph.node for i in n.input}
    for name in set(names):
        if name in used:
            continue
        for init in list(proto.graph.initializer):
            if init.name == name:
                proto.graph.initializer.remove(init)


def dry_run(model: torch.nn.Module, inputs: Any, layers: Iterable[str]) -> tuple[int, dict]:
    """Export the fp32 graph and map ``layers`` to their nodes, as ``autoquant export`` will:
    (the float graph's node count, layer -> ``LayerNode`` or ``Unmapped``). Raises
    ``UserError`` when the fp32 export itself fails."""
    proto = float_graph(model, inputs)
    return len(proto.graph.node), map_layers(proto, model, layers)
