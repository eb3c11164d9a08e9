"""BatchNorm folded into the convolution before it, as every deployment does before quantizing.

A ``Conv2d`` whose only consumer is a ``BatchNorm2d`` (in eval mode: running statistics) computes
``bn(conv(x)) = conv'(x)`` with ``w' = w * g`` and ``b' = (b - mean) * g + beta``, where ``g =
gamma / sqrt(var + eps)`` per output channel. Quantizing ``w`` and then applying BatchNorm (what
a simulation on the unfolded model does) is not what ships: the exporter, ONNX Runtime and TVM
all fold first and quantize ``w'``. So the search, the size accounting, the latency profile and
the export all see the folded model; the user's model is never changed (a copy is folded).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FoldResult:
    """The folded copy (or the model itself when nothing was folded), the ``(conv, bn)`` pairs
    folded, and why BatchNorm modules were left alone (``bn name -> reason``)."""

    model: torch.nn.Module
    folded: tuple[tuple[str, str], ...]
    left: dict[str, str]


def _conv_bn_pairs(model: torch.nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(conv, bn)`` module pairs where the BN's input is the conv's output and nothing else
    reads that output; found by tracing the forward with ``torch.fx``."""
    import torch

    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return [], {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # a forward fx cannot trace: BatchNorm stays as it is
        reason = f"the model's forward cannot be traced by torch.fx ({type(exc).__name__})"
        return [], dict.fromkeys(bns, reason)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    left: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), torch.nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), torch.nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    for bn in bns:
        if modules[bn].running_var is None:  # normalises with each batch's own statistics
            left[bn] = "no running statistics (track_running_stats=False)"
    paired = {bn for _, bn in pairs}
    convs = [c for c, _ in pairs]
    left.update({bn: "not directly after a Conv2d whose only consumer it is" for bn in bns if bn not in paired})
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    for conv, bn in pairs:  # a module called twice in forward cannot be folded for one call only
        if calls.count(bn) > 1 or calls.count(conv) > 1 or convs.count(conv) > 1:
            left[bn] = "it or its conv is called more than once in forward"
    pairs = [(c, b) for c, b in pairs if b not in left]
    return pairs, left


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def fold_batchnorm(model: torch.nn.Module) -> FoldResult:
    """A copy of ``model`` with every foldable ``Conv2d -> BatchNorm2d`` pair folded into the
    conv (the BN becomes ``nn.Identity``); ``model`` itself when there is nothing to fold."""
    import torch

    pairs, left = _conv_bn_pairs(model)
    if not pairs:
        return FoldResult(model, (), left)
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv = folded.get_submodule(conv_name)
            bn = folded.get_submodule(bn_name)
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_var)
            gain = gamma / torch.sqrt(bn.running_var + bn.eps)
            weight = conv.weight.detach() * gain.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(gain)
            conv.weight = torch.nn.Parameter(weight)
            conv.bias = torch.nn.Parameter((bias - bn.running_mean) * gain + beta)
            _set_module(folded, bn_name, torch.nn.Identity())
    return FoldResult(folded, tuple(pairs), left)
