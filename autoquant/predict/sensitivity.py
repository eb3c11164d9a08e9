"""Per-layer sensitivity, computed once per task and space and cached in the run directory.

For every layer and every choice the space allows it, the model is run on the calibration inputs
with *only that layer* quantized at that choice (every other layer float32), and compared with
the float32 model on the same inputs:

- ``kl``: mean KL divergence ``KL(p_fp32 || p_quant)`` of the output distributions (a loss change
  that needs no labels);
- ``disagreement``: fraction of calibration samples whose top-1 class changes;
- ``weight_error``: squared error ``||W - Q(W)||^2`` of the layer's weight.

And once per layer, a curvature proxy: the Hutchinson estimate of the trace of the Hessian of the
cross-entropy (against the float32 model's own top-1 labels on the calibration inputs) with respect
to that layer's weight, divided by the weight's size (``trace_per_param``). HAWQ's sensitivity of
a choice is then ``trace_per_param * weight_error``.

Only calibration inputs are used, never the evaluation data the search measures accuracy on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.records import record_data
from autoquant.space import QuantConfig, SearchSpace

SENSITIVITY_VERSION = 1
FILE_NAME = "sensitivity.json"


@dataclass(frozen=True)
class ChoiceSensitivity:
    kl: float
    disagreement: float
    weight_error: float

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "disagreement": self.disagreement, "weight_error": self.weight_error}


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity figures of one task's layers. ``choices[layer][label]`` → ``ChoiceSensitivity``;
    ``trace_per_param[layer]`` → Hutchinson Hessian-trace estimate per weight element."""

    fingerprint: str
    choices: dict[str, dict[str, ChoiceSensitivity]]
    trace_per_param: dict[str, float]
    seconds: float
    forward_passes: int

    def hawq(self, layer: str, label: str) -> float:
        return self.trace_per_param[layer] * self.choices[layer][label].weight_error

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": "LayerSensitivity",
            "_version": SENSITIVITY_VERSION,
            "_data": {
                "fingerprint": self.fingerprint,
                "choices": {
                    layer: {label: s.to_dict() for label, s in by_label.items()}
                    for layer, by_label in self.choices.items()
                },
                "trace_per_param": self.trace_per_param,
                "seconds": self.seconds,
                "forward_passes": self.forward_passes,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSensitivity:
        d = record_data(data, "LayerSensitivity", SENSITIVITY_VERSION)
        return cls(
            fingerprint=d["fingerprint"],
            choices={
                layer: {label: ChoiceSensitivity(**s) for label, s in by_label.items()}
                for layer, by_label in d["choices"].items()
            },
            trace_per_param={k: float(v) for k, v in d["trace_per_param"].items()},
            seconds=float(d["seconds"]),
            forward_passes=int(d["forward_passes"]),
        )


def fingerprint(task: Any, space: SearchSpace, calibration_inputs: Any) -> str:
    """Changes when the model's weights, the calibration inputs or the space's choices change."""
    import torch

    digest = hashlib.sha256()
    digest.update(f"v{SENSITIVITY_VERSION}".encode())
    for name, tensor in sorted(task.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(calibration_inputs.detach().to(torch.float32).cpu().numpy().tobytes())
    for ls in space.layers:
        digest.update(ls.layer.name.encode())
        digest.update(",".join(c.label for c in ls.choices).encode())
    return digest.hexdigest()[:16]


def _hutchinson_traces(model: Any, inputs: Any, names: list[str], *, samples: int, seed: int):
    import torch

    from autoquant.space.discovery import quantizable_modules

    modules = quantizable_modules(model)
    params = [modules[name].weight for name in names]
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        logits = model(inputs)
        labels = logits.argmax(dim=-1).detach()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        totals = [0.0] * len(params)
        for _ in range(samples):
            vs = [
                torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
                for p in params
            ]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            for i, (hv, v) in enumerate(zip(hvs, vs)):
                totals[i] += float((hv * v).sum())
    return {name: totals[i] / samples / params[i].numel() for i, name in enumerate(names)}


def compute_sensitivity(
    task: Any,
    space: SearchSpace,
    calibration: Any,
    *,
    max_samples: int = 256,
    hutchinson_samples: int = 16,
    seed: int = 0,
) -> LayerSensitivity:
    """One forward pass per (layer, choice) on up to ``max_samples`` calibration inputs, plus the
    Hutchinson estimate (``hutchinson_samples`` Hessian-vector products)."""
    import copy

    import torch

    from autoquant.quant import apply, fake_quantize_weight
    from autoquant.space.discovery import quantizable_modules

    start = time.perf_counter()
    inputs = task.calibration_inputs[:max_samples]
    model = copy.deepcopy(task.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = quantizable_modules(model)
    with torch.no_grad():
        ref_logits = model(inputs)
        ref_logp = torch.log_softmax(ref_logits, dim=-1)
        ref_top = ref_logits.argmax(dim=-1)
    out: dict[str, dict[str, ChoiceSensitivity]] = {}
    passes = 1
    for ls in space.layers:
        name = ls.layer.name
        weight = modules[name].weight.detach()
        by_label = {}
        for choice in ls.choices:
            if choice.is_fp32:
                by_label[choice.label] = ChoiceSensitivity(0.0, 0.0, 0.0)
                continue
            qmodel = apply(model, QuantConfig(((name, choice),)), calibration)
            with torch.no_grad():
                logits = qmodel(inputs)
                passes += 1
                if not torch.isfinite(logits).all():
                    by_label[choice.label] = ChoiceSensitivity(math.inf, 1.0, math.inf)
                    continue
                logp = torch.log_softmax(logits, dim=-1)
                kl = float((ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean())
                disagreement = float((logits.argmax(dim=-1) != ref_top).float().mean())
                err = float(((fake_quantize_weight(weight, choice) - weight) ** 2).sum())
            by_label[choice.label] = ChoiceSensitivity(max(kl, 0.0), disagreement, err)
        out[name] = by_label
    for p in model.parameters():
        p.requires_grad_(True)
    traces = _hutchinson_traces(
        model, inputs, [ls.layer.name for ls in space.layers], samples=hutchinson_samples, seed=seed
    )
    passes += hutchinson_samples
    return LayerSensitivity(
        fingerprint=fingerprint(task, space, inputs),
        choices=out,
        trace_per_param=traces,
        seconds=time.perf_counter() - start,
        forward_passes=passes,
    )


def load_or_compute(
    directory: Path, task: Any, space: SearchSpace, calibration: Any, *, max_samples: int = 256
) -> LayerSensitivity:
    """The cached sensitivity in ``directory/sensitivity.json`` if its fingerprint matches the
    task, calibration inputs and space; otherwise computed and written there."""
    path = Path(directory) / FILE_NAME
    expected = fingerprint(task, space, task.calibration_inputs[:max_samples])
    if path.exists():
        try:
            cached = LayerSensitivity.from_dict(json.loads(path.read_text()))
            if cached.fingerprint == expected:
                return cached
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a stale or corrupt cache is recomputed, never trusted
    result = compute_sensitivity(task, space, calibration, max_samples=max_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=True))
    tmp.replace(path)
    return result
