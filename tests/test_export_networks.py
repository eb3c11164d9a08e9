"""Real network shapes through the export, validated in ONNX Runtime as ``autoquant export``
validates a front point (checker, both ORT levels against the simulation, the metric, the
kernels ORT runs): a residual CNN with BatchNorm (folded), depthwise and grouped convolutions
and a concatenation; a small transformer encoder on named int64 inputs (token ids and an
attention mask) whose Linear layers run on 3-D input; each at int8, 4-bit per-group and mixed
configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autoquant.export.validate import open_session, validate_export  # noqa: E402
from autoquant.model_inputs import is_named, run_model, take, to_feeds  # noqa: E402
from autoquant.onnxgraph.graph import export_graph, float_graph  # noqa: E402
from autoquant.onnxgraph.mapping import LayerNode, Unmapped, map_layers  # noqa: E402
from autoquant.quant import apply, calibrate  # noqa: E402
from autoquant.quant.fake import ActivationParams, runs_integer_kernel  # noqa: E402
from autoquant.quant.fold import fold_batchnorm  # noqa: E402
from autoquant.space.discovery import discover_layers  # noqa: E402
from autoquant.space.values import FP32, QuantChoice, QuantConfig  # noqa: E402
from autoquant.tasks.base import top1_accuracy  # noqa: E402

C = QuantChoice
INT8 = C(8, 8, "per_channel", None, True)
INT8_TENSOR = C(8, 8, "per_tensor", None, False)
W4G = C(4, 32, "per_group", 16, True)
W4C = C(4, 32, "per_channel", None, False)
W2G = C(2, 32, "per_group", 16, False)
W8_A32 = C(8, 32, "per_channel", None, True)
F16 = C(16, 16)


class ResidualCNN(nn.Module):
    """Conv+BN stem, a residual block, a depthwise + pointwise pair, two branches concatenated
    into a grouped conv, max and global average pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.dw_bn = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 16, 1)
        self.side = nn.Conv2d(32, 16, 1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.fc = nn.Linear(32, 5)
        for bn in (self.stem_bn, self.bn1, self.bn2, self.dw_bn):  # BN that folding must honour
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.max_pool2d(x, 2)
        a = F.relu(self.pw(F.relu(self.dw_bn(self.dw(x)))))
        b = F.relu(self.side(x))
        x = F.relu(self.grouped(torch.cat([a, b], 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyEncoder(nn.Module):
    """One transformer encoder layer (4-head attention, LayerNorm, GELU MLP) over embedded
    token ids, masked mean pooling and a Linear head; called as ``model(input_ids=...,
    attention_mask=...)``."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, ff: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm1 = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.embed(input_ids) + self.pos[:, :t]

        def split(y):
            return y.reshape(b, t, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        mask = attention_mask[:, None, None, :].to(x.dtype)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (1.0 - mask) * -1e4
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = self.norm1(x + self.o(ctx))
        x = self.norm2(x + self.ff2(F.gelu(self.ff1(x))))
        m = attention_mask[..., None].to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1))


def tokens(n: int = 192, t: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, t), generator=g)
    lengths = torch.randint(4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def cnn():
    folded = fold_batchnorm(ResidualCNN().eval())
    assert len(folded.folded) == 4 and not folded.left
    x = torch.rand(160, 3, 16, 16)
    return folded.model, x


@pytest.fixture(scope="module")
def encoder():
    return TinyEncoder().eval(), tokens()


def export_and_validate(model, inputs, mapping, tmp_path: Path, *, batch_size=512, **options):
    """Export ``mapping`` as ``autoquant export`` does and run every validation check; the
    metric's targets are the fp32 model's own predictions."""
    config = QuantConfig.from_mapping(mapping)
    cal = calibrate(model, inputs)
    example = take(inputs, 1)
    graph = export_graph(model, example, config, cal, **options)
    path, fp32 = tmp_path / "m.onnx", tmp_path / "fp32.onnx"
    onnx.save(graph.model, str(path))
    onnx.save(float_graph(model, example), str(fp32))
    with torch.no_grad():
        ref = run_model(model, inputs)
        sim = run_model(apply(model, config, cal), inputs)
    targets = ref.argmax(-1)
    feeds = to_feeds(inputs)
    validation = validate_export(
        path,
        fp32,
        eval_inputs=feeds if is_named(inputs) else feeds["input"],
        eval_targets=targets,
        metric=top1_accuracy,
        sim_outputs=sim.numpy(),
        output_step=ActivationParams.from_range(float(ref.min()), float(ref.max())).scale,
        promised_accuracy=top1_accuracy(sim, targets),
        expected_int_kernels=sum(runs_integer_kernel(c) for _, c in config.choices)
        + sum(e.form == "int8-dynamic" for e in graph.layers),
        weight_dq_allowed=options.get("weight_only") == "dq",
        latency_repeats=0,
        batch_size=batch_size,
    )
    assert validation.ok, [c.message for c in validation.failures]
    return graph, validation


def cnn_mapping(model, kind: str) -> dict[str, QuantChoice]:
    names = [layer.name for layer in discover_layers(model, (1, 3, 16, 16))]
    if kind == "int8":
        return dict.fromkeys(names, INT8)
    if kind == "w4g":  # per-group where the input channels per group allow it (not depthwise)
        modules = dict(model.named_modules())
        return {n: W4G if modules[n].weight.shape[1] % 16 == 0 else W4C for n in names}
    mix = [INT8, W4C, FP32, INT8_TENSOR, F16, W8_A32, INT8, W2G, INT8]
    return dict(zip(names, mix))


@pytest.mark.parametrize("kind", ["int8", "w4g", "mix"])
def test_residual_cnn_with_folded_batchnorm_exports_and_validates(cnn, tmp_path, kind):
    model, x = cnn
    mapping = cnn_mapping(model, kind)
    graph, v = export_and_validate(model, x, mapping, tmp_path)
    convs = sum(c == INT8 or c == INT8_TENSOR for n, c in mapping.items() if n != "fc")
    assert v.optimized_op_counts.get("QLinearConv", 0) == convs, v.optimized_op_counts
    assert v.optimized_op_counts.get("QGemm", 0) == int(mapping["fc"] == INT8)
    assert v.weight_dequantize == []  # weights dequantized once at load, never per call
    assert {e.layer: e.op for e in graph.layers}["grouped"] == "Conv"


def test_every_int8_layer_of_the_residual_cnn_runs_an_integer_kernel_and_its_chains_stay_fused(
    cnn, tmp_path
):
    """All int8: 7 QLinearConv + 1 QGemm, every activation DQ in its one-op form (none written
    as Cast/Sub/Mul: no float Conv/Gemm reads them), the output's DQ included."""
    model, x = cnn
    graph, v = export_and_validate(model, x, cnn_mapping(model, "int8"), tmp_path)
    counts = v.optimized_op_counts
    assert counts["QLinearConv"] == 7 and counts["QGemm"] == 1, counts
    assert "Cast" not in counts and "Sub" not in counts, counts
    written = {n.op_type for n in graph.model.graph.node}
    assert "Cast" not in written
    assert graph.model.graph.node[-1].op_type == "DequantizeLinear"


def test_int8_weights_without_vnni_storage_still_validate(cnn, tmp_path):
    model, x = cnn
    _, v = export_and_validate(
        model, x, cnn_mapping(model, "int8"), tmp_path, kernel_weights="uint8"
    )
    assert v.optimized_op_counts["QLinearConv"] == 7


def test_weight_only_dq_is_flagged_per_call_only_when_asked_for(cnn, tmp_path):
    model, x = cnn
    mapping = dict.fromkeys(cnn_mapping(model, "int8"), W8_A32)
    _, v = export_and_validate(model, x, mapping, tmp_path, weight_only="dq")
    assert len(v.weight_dequantize) == len(mapping)  # what --weight-only dq asks for
    check = next(c for c in v.checks if c.name == "weight_dequantize")
    assert check.ok and "8 weight(s) on every call" in check.message


ENCODER_LINEARS = ("q", "k", "v", "o", "ff1", "ff2", "head")


@pytest.mark.parametrize(
    ("mapping", "qgemm", "nbits"),
    [
        (dict.fromkeys(ENCODER_LINEARS, INT8), 7, 0),
        (dict.fromkeys(ENCODER_LINEARS, W4G), 0, 7),
        ({"q": INT8, "k": W4G, "v": FP32, "o": INT8, "ff1": W4G, "ff2": W2G, "head": F16}, 2, 2),
    ],
    ids=["int8", "w4g", "mix"],
)
def test_transformer_on_named_int64_inputs_exports_and_validates(
    encoder, tmp_path, mapping, qgemm, nbits
):
    model, inputs = encoder
    graph, v = export_and_validate(model, inputs, mapping, tmp_path)
    assert [i.name for i in graph.model.graph.input] == ["input_ids", "attention_mask"]
    assert all(
        i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in graph.model.graph.input
    )
    assert v.optimized_op_counts.get("QGemm", 0) == qgemm, v.optimized_op_counts
    assert v.optimized_op_counts.get("MatMulNBits", 0) == nbits, v.optimized_op_counts
    # the attention's activation x activation MatMuls stay (they are no layer)
    assert {"LayerNormalization", "Softmax"} <= set(v.optimized_ops)
    # batch and sequence length are dynamic
    other = tokens(n=3, t=7, seed=5)
    for level in ("disable_all", "enable_all"):
        out = open_session(graph.model.SerializeToString(), level).run(None, to_feeds(other))[0]
        assert out.shape == (3, 3)
        with torch.no_grad():
            sim = run_model(
                apply(model, QuantConfig.from_mapping(mapping), calibrate(model, inputs)), other
            )
        np.testing.assert_allclose(out, sim.numpy(), atol=0.05)


def test_a_3d_linear_maps_to_its_matmul_and_is_written_as_reshape_gemm_reshape(encoder):
    model, inputs = encoder
    proto = float_graph(model, take(inputs, 1))
    mapped = map_layers(proto, model)
    assert all(isinstance(m, LayerNode) for m in mapped.values()), mapped
    assert mapped["q"].op == "MatMul" and mapped["q"].bias_add and mapped["q"].input_rank == 3
    assert mapped["head"].op == "Gemm"
    config = QuantConfig.from_mapping({"q": INT8, "k": INT8, "v": W4C, "ff1": W4G})
    graph = export_graph(model, take(inputs, 1), config, calibrate(model, inputs))
    nodes = list(graph.model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ops = {e.layer: e.op for e in graph.layers}
    assert ops == {"q": "Gemm", "k": "Gemm", "v": "MatMul", "ff1": "MatMulNBits"}

    def upstream(tensor: str, op: str):
        while tensor in producer and producer[tensor].op_type != op:
            tensor = producer[tensor].input[0]
        return producer.get(tensor)

    q, k = (next(n for n in nodes if n.name == f"/{name}/MatMul") for name in "qk")
    assert q.op_type == "Gemm" and k.op_type == "Gemm"
    # q and k read the same x: one Reshape to 2-D and one input quantization for both
    assert upstream(q.input[0], "Reshape") is upstream(k.input[0], "Reshape") is not None
    assert upstream(q.input[0], "QuantizeLinear") is upstream(k.input[0], "QuantizeLinear")
    inits = {i.name for i in graph.model.graph.initializer}
    assert {"q.w_q", "q.b_q"} <= inits  # int8 weight, int32 bias: QGemm's inputs
    # weight-only layers run on the 3-D input as they are: no reshape around them
    v = next(n for n in nodes if n.name == "/v/MatMul")
    assert v.op_type == "MatMul" and producer[v.input[1]].op_type == "Transpose"
    assert not any(c.op_type == "Reshape" for c in consumers[v.output[0]])


def test_layers_the_forward_never_reaches_or_calls_twice_stay_float_with_a_reason():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.twice = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x):
            return self.twice(torch.relu(self.twice(self.a(x))))

    model = Odd().eval()
    mapped = map_layers(float_graph(model, (1, 4, 8)), model)
    assert isinstance(mapped["a"], LayerNode)
    assert isinstance(mapped["twice"], Unmapped) and "more than once" in mapped["twice"].reason
    assert isinstance(mapped["unused"], Unmapped) and "not reached" in mapped["unused"].reason


@pytest.mark.skipif(
    "act_dynamic" not in QuantChoice.__dataclass_fields__, reason="no dynamic activations"
)
def test_dynamic_int8_activations_export_as_dynamic_quantize_matmul(encoder, cnn, tmp_path):
    """``w8cs-a8d``: ORT's DynamicQuantizeMatMul on the 3-D input, float bias, float output;
    its range is the whole tensor of a call, the simulation's one sample's: validated at batch
    1. Layers it does not fit (a Conv) quantize their input with DynamicQuantizeLinear."""
    dynamic = C(8, 8, "per_channel", None, True, act_dynamic=True)
    model, inputs = encoder
    mapping = dict.fromkeys(ENCODER_LINEARS, dynamic) | {"o": INT8, "ff2": W4G}
    graph, v = export_and_validate(model, take(inputs, 48), mapping, tmp_path, batch_size=1)
    assert [e.form for e in graph.layers].count("int8-dynamic") == 5
    assert v.optimized_op_counts["DynamicQuantizeMatMul"] == 5, v.optimized_op_counts
    assert v.optimized_op_counts.get("QGemm", 0) == 1
    cnn_model, x = cnn
    names = list(cnn_mapping(cnn_model, "int8"))
    mapping = dict.fromkeys(names, dynamic) | {"stem": INT8}
    graph, v = export_and_validate(cnn_model, x[:24], mapping, tmp_path, batch_size=1)
    # convs: float kernels on folded weights behind DynamicQuantizeLinear -> DQ; fc: the op
    assert {e.form for e in graph.layers if e.layer != "stem"} == {"int8-fold", "int8-dynamic"}
