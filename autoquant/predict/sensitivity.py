"""Per-layer sensitivity, computed once per task and space and cached in the run directory.

The pass costs O(layers) model passes, never O(layers x choices):

1. one float32 *reference* pass on a subset of the calibration inputs (``sample_count``);
2. a *curvature* pass: one forward with gradients and ``HUTCHINSON_PROBES`` backward passes of
   Rademacher output-space probes, which estimate (unbiased, for every quantizable weight at
   once) the diagonal of the Gauss-Newton matrix ``J^T J`` of the relative output distortion
   ``||f(x) - f_fp32(x)||^2 / ||f_fp32||^2``: its Hessian at the float32 point. It needs no
   labels, so it means the same for a classifier's logits and a model's embeddings (a
   cross-entropy Hessian against argmax labels would not). A layer whose output reaches nothing
   gets no gradient: zero curvature;
3. per layer, one *weight probe*: the model with only that layer quantized at its most
   aggressive weight format (largest curvature-weighted weight error, float32 activations), and,
   where the layer has static int8-activation choices, one *activation probe*: only that layer's
   input and output quantized to uint8 with the calibrated ranges, weights float32; where it has
   dynamic ones (``act_dynamic``), one *dynamic activation probe*: only its input, per sample.

Every other choice's figures are interpolated from the layer's probes, without a forward pass.
From the weights alone, for every choice: the weight error ``||W - Q(W)||^2`` and its
curvature-weighted form ``hawq = sum diag(J^T J) (W - Q(W))^2``, the second-order prediction of
the distortion. A choice's distortion is its ``hawq`` times a ratio that goes from the layer's
mild-choice ratio to the probe's measured / predicted ratio (``_interpolate``); its KL and top-1
disagreement are the probe's, scaled by the distortion ratio. An int8-activation choice adds the
(static or dynamic) activation probe's figures (independent errors: distortions and KLs add), a
float16-activation choice twice its float16 weight term. (A second curvature, the softmax
Fisher, to interpolate the KL by its own prediction, was tried: the same predictor quality on
digits-mlp, at twice the backward passes.)

Figures per choice (``ChoiceSensitivity``), each against the float32 model on the same inputs:

- ``distortion``: relative squared output error ``sum ||y_q - y||^2 / sum ||y||^2`` over the
  samples: task-agnostic, the primary signal (it means the same for a classifier's logits and a
  sentence-embedding model's vectors);
- ``kl``: mean KL divergence ``KL(softmax y || softmax y_q)`` over the output's last axis, and
  ``disagreement``: the share of rows whose argmax changes. They mean "loss change" and "top-1
  changes" for logits; for other outputs they are computed all the same and are only weaker
  signals. Whether an output *is* logits is not guessed: both kinds are recorded, the predictor's
  features carry both, and the sensitivity prior uses ``distortion``;
- ``weight_error`` and ``hawq`` (``None`` where no curvature was computed);
- ``source``: ``exact`` (float32: zeros), ``measured`` (a probe, as is), ``interpolated`` (from
  this layer's probes), ``estimated`` (this layer was not probed before the deadline: its
  curvature terms times the median ratios of the probed layers, or the relative weight error
  alone when there is no curvature either) or ``failed`` (the probe's output was not finite).

A deadline (``time.monotonic()`` value) bounds the pass: the sample subset shrinks (to no fewer
than ``MIN_SAMPLES``) when the reference pass shows that probing every layer would not fit, and
the layers not probed when it passes are ``estimated``. Such a record is ``complete=False``; the
next ``load_or_compute`` probes the rest and keeps what was done. ``status(text)`` is told what
is going on.

Only calibration inputs are used, never the evaluation data the search measures accuracy on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from autoquant import formats
from autoquant.records import record_data
from autoquant.rundir import atomic_write_text
from autoquant.space import QuantChoice, SearchSpace

SENSITIVITY_VERSION = 2
FILE_NAME = "sensitivity.json"
MAX_SAMPLES = 256
MIN_SAMPLES = 16
# MACs one pass over the sample subset may take before the subset shrinks below MAX_SAMPLES
# (about a second on 2 cores): a 1.4 GMAC/sample transformer gets MIN_SAMPLES, digits 256.
PASS_MACS = 2.5e10
HUTCHINSON_PROBES = 8
# MACs of one batch the passes run at once (a 1.4 GMAC/sample transformer: 28 samples a batch)
BATCH_MACS = 4e10
SOURCES = ("exact", "measured", "interpolated", "estimated", "failed")
# The share of the remaining time the passes may be planned to take when the subset is sized.
_PLAN_SHARE = 0.8
# The share of the time left after the reference pass the curvature probes may take.
CURVATURE_SHARE = 0.3

Status = Callable[[str], None]


@dataclass(frozen=True)
class OutputChange:
    """What one measured pass gives: the model's output against the float32 reference."""

    kl: float
    disagreement: float
    distortion: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.kl) and math.isfinite(self.distortion)

    def plus(self, other: OutputChange) -> OutputChange:
        """Independent errors: KLs and squared distortions add, flips as independent events."""
        return OutputChange(
            self.kl + other.kl,
            1.0 - (1.0 - self.disagreement) * (1.0 - other.disagreement),
            self.distortion + other.distortion,
        )

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "disagreement": self.disagreement, "distortion": self.distortion}


_ZERO = OutputChange(0.0, 0.0, 0.0)
_FAILED = OutputChange(math.inf, 1.0, math.inf)


@dataclass(frozen=True)
class ChoiceSensitivity:
    """One (layer, choice): the output change with only this layer at this choice, its weight
    error, the curvature-weighted error (``hawq``: the predicted distortion; ``None`` without
    curvature) and where the output figures come from."""

    kl: float
    disagreement: float
    distortion: float
    weight_error: float
    hawq: float | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "disagreement": self.disagreement,
            "distortion": self.distortion,
            "weight_error": self.weight_error,
            "hawq": self.hawq,
            "source": self.source,
        }


@dataclass(frozen=True)
class LayerProbe:
    """What was measured for one layer: the weight probe (``weight_label``: the choice, with
    float32 activations), the activation probe (static uint8 input and output, float32 weights)
    and the dynamic activation probe (input only, per-sample ranges), each ``None`` when not run;
    ``error``: why a probe failed."""

    weight_label: str | None = None
    weight: OutputChange | None = None
    activation: OutputChange | None = None
    error: str | None = None
    dynamic: OutputChange | None = None

    def to_dict(self) -> dict[str, Any]:
        def change(v: OutputChange | None) -> dict[str, float] | None:
            return None if v is None else v.to_dict()

        return {
            "weight_label": self.weight_label,
            "weight": change(self.weight),
            "activation": change(self.activation),
            "dynamic": change(self.dynamic),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerProbe:
        def change(v: Any) -> OutputChange | None:
            return None if v is None else OutputChange(**v)

        return cls(
            d["weight_label"],
            change(d["weight"]),
            change(d["activation"]),
            d["error"],
            change(d["dynamic"]),
        )


@dataclass(frozen=True)
class LayerSensitivity:
    """Sensitivity figures of one task's layers. ``choices[layer][label]`` → ``ChoiceSensitivity``;
    ``trace_per_param[layer]`` → mean Gauss-Newton diagonal per weight element (empty without
    curvature); ``probes[layer]`` → what was measured for it; ``passes`` → model passes by kind
    (``reference``, ``weight_probe``, ``activation_probe`` (static and dynamic),
    ``curvature_forward``, ``curvature_backward``); ``forward_passes``: their sum; ``samples``:
    calibration samples used.
    ``complete``: every layer probed (not cut short by a deadline)."""

    fingerprint: str
    choices: dict[str, dict[str, ChoiceSensitivity]]
    trace_per_param: dict[str, float]
    seconds: float
    forward_passes: int
    samples: int = 0
    probes: dict[str, LayerProbe] | None = None
    passes: dict[str, int] | None = None
    complete: bool = True

    @property
    def probe_passes(self) -> int:
        """Single-layer quantized passes: what counts as measurements of the pass."""
        p = self.passes or {}
        return p.get("weight_probe", 0) + p.get("activation_probe", 0)

    def hawq(self, layer: str, label: str) -> float:
        value = self.choices[layer][label].hawq
        return math.nan if value is None else value

    def sources(self) -> dict[str, int]:
        """How many (layer, choice) figures came from each source."""
        out = dict.fromkeys(SOURCES, 0)
        for by_label in self.choices.values():
            for s in by_label.values():
                out[s.source] += 1
        return out

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
                "samples": self.samples,
                "probes": {k: p.to_dict() for k, p in (self.probes or {}).items()},
                "passes": self.passes or {},
                "complete": self.complete,
                "curvature": "gauss_newton_output" if self.trace_per_param else None,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSensitivity:
        d = record_data(data, "LayerSensitivity", SENSITIVITY_VERSION)
        for by_label in d["choices"].values():
            for s in by_label.values():
                if s["source"] not in SOURCES:
                    raise ValueError(f"unknown figure source {s['source']!r}")
        return cls(
            fingerprint=d["fingerprint"],
            choices={
                layer: {label: ChoiceSensitivity(**s) for label, s in by_label.items()}
                for layer, by_label in d["choices"].items()
            },
            trace_per_param={k: float(v) for k, v in d["trace_per_param"].items()},
            seconds=float(d["seconds"]),
            forward_passes=int(d["forward_passes"]),
            samples=int(d["samples"]),
            probes={k: LayerProbe.from_dict(p) for k, p in d["probes"].items()},
            passes={k: int(v) for k, v in d["passes"].items()},
            complete=bool(d["complete"]),
        )


def sample_count(task: Any, space: SearchSpace, max_samples: int | None = None) -> int:
    """Calibration samples the pass uses: up to ``max_samples`` (default ``MAX_SAMPLES``), fewer
    for a model whose pass over them would exceed ``PASS_MACS``, never fewer than
    ``MIN_SAMPLES`` (or what the task has)."""
    from autoquant.model_inputs import sample_count as available

    cap = MAX_SAMPLES if max_samples is None else max_samples
    macs = max(sum(ls.layer.macs for ls in space.layers), 1)
    n = min(cap, max(MIN_SAMPLES, int(PASS_MACS // macs)))
    return max(1, min(n, available(task.calibration_inputs)))


def fingerprint(
    task: Any, space: SearchSpace, calibration_inputs: Any, calibration: Any = None
) -> str:
    """Changes when the model's weights, the calibration inputs (the subset the pass may use),
    the activation ranges, the space's choices or the pass's settings change."""
    from autoquant.model_inputs import fingerprint_bytes

    digest = hashlib.sha256()
    digest.update(f"v{SENSITIVITY_VERSION}-p{HUTCHINSON_PROBES}".encode())
    for name, tensor in sorted(task.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(fingerprint_bytes(calibration_inputs))
    if calibration is not None:
        digest.update(json.dumps(calibration.to_dict(), sort_keys=True).encode())
    for ls in space.layers:
        digest.update(ls.layer.name.encode())
        digest.update(",".join(c.label for c in ls.choices).encode())
    return digest.hexdigest()[:16]


# --- measuring -----------------------------------------------------------------------------------


def output_change(reference: Any, output: Any) -> OutputChange:
    """``output`` against ``reference`` (same shape, first axis = samples)."""
    import torch

    if not torch.isfinite(output).all():
        return _FAILED
    ref = reference.double()
    out = output.double()
    distortion = float(((out - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))
    rows_ref = ref.reshape(-1, ref.shape[-1]) if ref.dim() > 1 else ref.reshape(-1, 1)
    rows_out = out.reshape(rows_ref.shape)
    ref_logp = torch.log_softmax(rows_ref, dim=-1)
    logp = torch.log_softmax(rows_out, dim=-1)
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean())
    disagreement = float((rows_out.argmax(dim=-1) != rows_ref.argmax(dim=-1)).double().mean())
    return OutputChange(max(kl, 0.0), disagreement, distortion)


@contextlib.contextmanager
def quantized_layer(
    module: Any, name: str, choice: QuantChoice, calibration: Any
) -> Iterator[None]:
    """``module`` computing as ``choice`` says, in place, until the block ends (then exactly as
    before): what ``autoquant.quant.apply`` does to one layer, without copying the model. The
    probes are weight-only or activation-only, never an integer-kernel layer, so ``apply``'s int32
    bias rounding does not arise; ``choice`` must not be one (``ValueError``)."""
    import torch

    from autoquant.quant import fake_quantize_activation, fake_quantize_weight
    from autoquant.quant.fake import fake_quantize_dynamic, runs_integer_kernel

    if runs_integer_kernel(choice) and module.bias is not None:
        raise ValueError(f"{choice.label} rounds the bias: use autoquant.quant.apply")
    saved = module.weight.detach().clone()
    handles = []
    try:
        with torch.no_grad():
            module.weight.copy_(fake_quantize_weight(module.weight, choice))
        if choice.act_dynamic:  # the input only, each sample from its own range (as apply does)
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args: (fake_quantize_dynamic(args[0]), *args[1:])
                )
            )
        elif choice.act_bits != 32:
            bits = choice.act_bits
            in_p = calibration.input_params(name) if bits == 8 else None
            out_p = calibration.output_params(name) if bits == 8 else None
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args: (fake_quantize_activation(args[0], bits, in_p), *args[1:])
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, out: fake_quantize_activation(out, bits, out_p)
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            module.weight.copy_(saved)


def _weight_key(choice: QuantChoice) -> QuantChoice:
    """The weight part of a choice (activations float32): choices sharing it share weight terms."""
    return replace(choice, act_bits=32, act_dynamic=False)


_W8_PER_TENSOR = QuantChoice(8, 32, "per_tensor", None, True)
_F16 = QuantChoice(16, 32)
_ACT8 = QuantChoice(32, 8)
_ACT8_DYNAMIC = QuantChoice(32, 8, act_dynamic=True)


class _Pass:
    """State of one ``compute_sensitivity`` call: the model copy, the sample subset, the
    reference outputs, the curvature, the probes and the pass counters."""

    def __init__(
        self,
        task: Any,
        space: SearchSpace,
        calibration: Any,
        *,
        n: int,
        seed: int,
        probes: int,
        deadline: float | None,
        status: Status | None,
    ) -> None:
        import copy

        from autoquant.model_inputs import take
        from autoquant.space.discovery import quantizable_modules

        self.space = space
        self.calibration = calibration
        self.inputs = take(task.calibration_inputs, n)
        self.n = n
        self.seed = seed
        self.n_probes = probes
        self.deadline = deadline
        self.status = status or (lambda _text: None)
        self.model = copy.deepcopy(task.model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.modules = quantizable_modules(self.model)
        macs = max(sum(ls.layer.macs for ls in space.layers), 1)
        self.batch = max(1, int(BATCH_MACS // macs))
        self.passes = dict.fromkeys(
            (
                "reference",
                "weight_probe",
                "activation_probe",
                "curvature_forward",
                "curvature_backward",
            ),
            0,
        )
        self.reference: Any = None
        self.pass_seconds = 0.0

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def run(self) -> Any:
        import torch

        from autoquant.model_inputs import batches, run_model

        with torch.no_grad():
            outs = [run_model(self.model, b) for b in batches(self.inputs, self.batch)]
        return torch.cat(outs).detach()

    def measure_reference(self) -> None:
        self.status(f"layer sensitivity: float32 reference on {self.n} calibration samples")
        start = time.monotonic()
        self.reference = self.run()
        self.pass_seconds = time.monotonic() - start
        self.passes["reference"] += 1

    def shrink_to(self, units: float) -> None:
        """Fewer samples when ``units`` passes of the reference's cost would not fit in the time
        left (the reference outputs are sliced, not recomputed)."""
        from autoquant.model_inputs import take

        left = self.time_left()
        planned = units * self.pass_seconds
        if planned <= _PLAN_SHARE * left or self.n <= MIN_SAMPLES or left <= 0:
            return  # it fits; or it cannot be smaller; or nothing will be probed anyway
        n = max(MIN_SAMPLES, int(self.n * _PLAN_SHARE * max(left, 0.0) / planned))
        if n < self.n:
            self.pass_seconds *= n / self.n
            self.n = n
            self.inputs = take(self.inputs, n)
            self.reference = self.reference[:n]

    def curvature(self, until: float) -> dict[str, Any]:
        """Per layer, the diagonal (a tensor shaped like the weight) of the Gauss-Newton matrix of
        the relative output distortion, scaled so that ``sum diag * delta^2`` predicts the
        distortion of a weight change ``delta``: the mean of ``g^2`` for ``g = J^T u`` over the
        probes, ``u`` Rademacher over the output, summed over samples, over ``sum ||y||^2``. A
        layer whose output reaches nothing gets no gradient (``allow_unused``): zeros. Batches of
        ``BATCH_MACS``, each with up to ``n_probes`` probes, fewer past ``until``
        (``time.monotonic()``; at least one); past it no further batch starts."""
        import torch

        from autoquant.model_inputs import batches, sample_count

        names = [ls.layer.name for ls in self.space.layers]
        params: list[Any] = [self.modules[n].weight for n in names]
        sums = [torch.zeros_like(p) for p in params]
        generator = torch.Generator().manual_seed(self.seed)
        self.status(f"layer sensitivity: curvature, up to {self.n_probes} backward probes")
        done, backward, norm = 0, 0.0, 0.0
        for p in params:
            p.requires_grad_(True)
        try:
            for batch in batches(self.inputs, self.batch):
                if done and time.monotonic() >= until:
                    break
                k, batch_norm = self._curvature_batch(batch, params, sums, generator, until)
                norm += batch_norm
                done += sample_count(batch)
                backward += k * sample_count(batch) / max(self.n, 1)
        finally:
            for p in params:
                p.requires_grad_(False)
        self.passes["curvature_forward"] += math.ceil(done / max(self.n, 1))
        self.passes["curvature_backward"] += math.ceil(backward - 1e-9)
        return {n: sq / max(norm, 1e-30) for n, sq in zip(names, sums)}

    def _curvature_batch(
        self, batch: Any, params: list, sums: list, generator: Any, until: float
    ) -> tuple[int, float]:
        """Adds one batch's mean squared probe gradients to ``sums``; returns the probes run and
        the batch's ``sum ||y||^2``."""
        import torch

        from autoquant.model_inputs import run_model

        with torch.enable_grad():
            out = run_model(self.model, batch)
            norm = float((out.detach().double() ** 2).sum())
            if not out.requires_grad:  # no quantizable weight reaches the output
                return 0, norm
            squares = [torch.zeros_like(w) for w in params]
            k = 0
            while k < self.n_probes and (k == 0 or time.monotonic() < until):
                k += 1
                u = torch.randint(0, 2, out.shape, generator=generator).to(out.dtype) * 2 - 1
                grads = torch.autograd.grad(
                    out, params, grad_outputs=u, retain_graph=True, allow_unused=True
                )
                for acc, g in zip(squares, grads):
                    if g is not None:  # None: the layer's output is unused, zero curvature
                        acc += g.detach() ** 2
        for total, acc in zip(sums, squares):
            total += acc / k
        return k, norm

    def probe(self, name: str, choice: QuantChoice) -> tuple[OutputChange, str | None]:
        """Only layer ``name`` at ``choice``: the output change, or a failure and its reason."""
        key = "weight_probe" if formats.weight_format(choice).quantizes else "activation_probe"
        self.passes[key] += 1
        try:
            with quantized_layer(self.modules[name], name, choice, self.calibration):
                out = self.run()
        except (RuntimeError, KeyError, ValueError) as exc:  # a failed probe is a result
            return _FAILED, f"{choice.label}: {type(exc).__name__}: {exc}"
        return output_change(self.reference, out), None


# --- weight terms and interpolation -----------------------------------------------------------


@dataclass(frozen=True)
class _WeightTerms:
    """Per layer, for every weight format (``_weight_key``): squared weight error and its
    curvature-weighted form (``None`` without curvature); ``norm``: ``||W||^2``."""

    error: dict[QuantChoice, float]
    hawq: dict[QuantChoice, float] | None
    norm: float

    @property
    def curved(self) -> bool:
        return self.hawq is not None

    def basis(self, key: QuantChoice) -> float:
        """What a weight format's distortion is taken proportional to: ``hawq`` (the predicted
        distortion), or the relative weight error without curvature."""
        if self.hawq is None:
            return self.error[key] / max(self.norm, 1e-30)
        return self.hawq[key]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the block: the weight terms are thousands of small element-wise
    operations, where OpenMP's fork and join cost more than the work they split."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _weight_terms(weight: Any, keys: list[QuantChoice], diag: Any) -> _WeightTerms:
    import torch

    from autoquant.quant import fake_quantize_weight

    w = weight.detach()
    error: dict[QuantChoice, float] = {}
    hawq: dict[QuantChoice, float] | None = None if diag is None else {}
    flat = None if diag is None else diag.reshape(-1).float()
    for key in keys:
        if key in error:
            continue
        delta2 = (fake_quantize_weight(w, key) - w).float().square_()
        error[key] = float(delta2.sum(dtype=torch.float64))
        if hawq is not None and flat is not None:
            hawq[key] = float(torch.dot(delta2.reshape(-1), flat))
    return _WeightTerms(error, hawq, float((w.double() ** 2).sum()))


def _probe_choice(
    space_choices: tuple[QuantChoice, ...], terms: _WeightTerms
) -> QuantChoice | None:
    """The layer's most aggressive weight format (largest basis; ties: the first), or None when
    every choice keeps float32 weights."""
    keys = [_weight_key(c) for c in space_choices if formats.weight_format(c).quantizes]
    if not keys:
        return None
    return max(keys, key=lambda k: (terms.basis(k), terms.error[k]))


def _kappa_linear(kappa_probe: float, curved: bool) -> float:
    """The measured-over-predicted ratio of a layer's mild choices, from the probe's: 1 (the
    second-order prediction) where the probe changes the output more than predicted (the probe,
    the layer's coarsest format, can leave the quadratic regime: 2-bit weights zero most
    elements), the probe's ratio where it changes it less (the layer's curvature is
    overestimated throughout). Without curvature, the probe's ratio."""
    return min(kappa_probe, 1.0) if curved else kappa_probe


def _interpolate(basis: float, probe_figure: float, probe_basis: float, curved: bool) -> float:
    """A weight format's figure (distortion or KL) from its basis and the layer's probe: ``basis
    x kappa``, ``kappa`` rising from the mild choices' ratio (``_kappa_linear``) to the probe's as
    the cube of ``basis / probe_basis``. On digits-cnn, -mlp and -wide (default space, every
    single-layer weight format measured) this ranks the 214 measured distortions with Spearman
    0.994, a median error factor 1.3 and at most 4.5; scaling every format by the probe's ratio:
    0.93 and 33. The cube keeps the probe's excess to formats nearly as coarse as the probe."""
    if probe_basis <= 0 or probe_figure <= 0:
        return 0.0  # the layer changes nothing the output shows: an unused layer
    kappa = probe_figure / probe_basis
    linear = _kappa_linear(kappa, curved)
    r = min(basis / probe_basis, 1.0)
    return basis * (linear + (kappa - linear) * r**3)


def _from_probe(key: QuantChoice, probe_key: QuantChoice, probe: OutputChange, terms: _WeightTerms):
    """The weight term of format ``key`` from the layer's weight probe at ``probe_key``: the
    distortion interpolated (``_interpolate``), KL and top-1 changes scaled by the distortion's
    ratio to the probe's (both second order in small perturbations; flips were closer to linear
    than to square-root in the distortion on digits-mlp)."""
    distortion = _interpolate(
        terms.basis(key), probe.distortion, terms.basis(probe_key), terms.curved
    )
    ratio = distortion / probe.distortion if probe.distortion > 0 else 0.0
    return OutputChange(probe.kl * ratio, min(1.0, probe.disagreement * ratio), distortion)


@dataclass(frozen=True)
class _Calibrations:
    """Median ratios over the probed layers, for the layers that were not probed: measured over
    predicted distortion of the weight terms at mild choices (``_kappa_linear``) and of the
    activation probe over 8-bit per-tensor weights' prediction; KL and flips per unit of
    distortion. With nothing probed: the predictions as they are, the distortion standing in for
    the KL, no flips."""

    distortion: float = 1.0
    act_distortion: float = 1.0
    dynamic_distortion: float = 1.0
    kl: float = 1.0
    flips: float = 0.0

    @classmethod
    def from_probes(cls, probes: dict[str, LayerProbe], terms: dict[str, _WeightTerms]):
        ratios: dict[str, list[float]] = {f: [] for f in cls.__dataclass_fields__}

        def add(figure: str, value: float, per: float) -> None:
            if per > 0 and math.isfinite(value):
                ratios[figure].append(value / per)

        for name, p in probes.items():
            t = terms[name]
            for change in (p.weight, p.activation, p.dynamic):
                if change is not None and change.finite and change.distortion > 0:
                    add("kl", change.kl, change.distortion)
                    add("flips", change.disagreement, change.distortion)
            if p.weight is not None and p.weight.finite and p.weight_label is not None:
                b = t.basis(QuantChoice.from_label(p.weight_label))
                if b > 0 and p.weight.distortion > 0:
                    ratios["distortion"].append(_kappa_linear(p.weight.distortion / b, t.curved))
            if p.activation is not None and p.activation.finite:
                add("act_distortion", p.activation.distortion, t.basis(_W8_PER_TENSOR))
            if p.dynamic is not None and p.dynamic.finite:
                add("dynamic_distortion", p.dynamic.distortion, t.basis(_W8_PER_TENSOR))
        defaults = cls()
        return cls(
            **{f: statistics.median(v) if v else getattr(defaults, f) for f, v in ratios.items()}
        )

    def change(self, distortion: float) -> OutputChange:
        return OutputChange(self.kl * distortion, min(1.0, self.flips * distortion), distortion)

    def weight(self, key: QuantChoice, terms: _WeightTerms) -> OutputChange:
        return self.change(self.distortion * terms.basis(key))

    def activation(self, terms: _WeightTerms, *, dynamic: bool) -> OutputChange:
        ratio = self.dynamic_distortion if dynamic else self.act_distortion
        return self.change(ratio * terms.basis(_W8_PER_TENSOR))


def _layer_choices(
    choices: tuple[QuantChoice, ...], probe: LayerProbe, terms: _WeightTerms, cal: _Calibrations
) -> dict[str, ChoiceSensitivity]:
    """Every choice's figures from the layer's probes (or the calibrations, for what was not
    probed) and its weight terms."""
    probe_key = QuantChoice.from_label(probe.weight_label) if probe.weight_label else None
    measured = probe.weight if probe.weight is not None and probe.weight.finite else None
    failed = probe.weight is not None and not probe.weight.finite
    w_source = "interpolated" if measured is not None else "estimated"

    def act_term(dynamic: bool) -> tuple[OutputChange, str]:
        measured_act = probe.dynamic if dynamic else probe.activation
        if measured_act is not None and measured_act.finite:
            return measured_act, "interpolated"
        return cal.activation(terms, dynamic=dynamic), "estimated"

    def weight_term(key: QuantChoice) -> OutputChange:
        if measured is None or probe_key is None:
            return cal.weight(key, terms)
        if key == probe_key:
            return measured
        return _from_probe(key, probe_key, measured, terms)

    out = {}
    for c in choices:
        key = _weight_key(c)
        error = terms.error.get(key, 0.0)
        hawq = None if terms.hawq is None else terms.hawq.get(key, 0.0)
        if c.is_fp32:
            out[c.label] = ChoiceSensitivity(0.0, 0.0, 0.0, 0.0, hawq, "exact")
            continue
        if failed and key == probe_key:
            out[c.label] = ChoiceSensitivity(math.inf, 1.0, math.inf, error, hawq, "failed")
            continue
        change = weight_term(key) if formats.weight_format(c).quantizes else _ZERO
        source = "measured" if key == probe_key and measured is not None else w_source
        if c.act_bits == 8:
            act, a_source = act_term(c.act_dynamic)
            change = change.plus(act)
            source = "estimated" if "estimated" in (source, a_source) else "interpolated"
        elif c.act_bits == 16:  # float16 rounding of input and output: twice the weights' term
            f16 = weight_term(_F16)
            change = change.plus(OutputChange(2 * f16.kl, 2 * f16.disagreement, 2 * f16.distortion))
            source = "estimated" if source == "estimated" else "interpolated"
        out[c.label] = ChoiceSensitivity(
            change.kl, change.disagreement, change.distortion, error, hawq, source
        )
    return out


# --- the pass ------------------------------------------------------------------------------------


def compute_sensitivity(
    task: Any,
    space: SearchSpace,
    calibration: Any,
    *,
    max_samples: int | None = None,
    hutchinson_samples: int = HUTCHINSON_PROBES,
    seed: int = 0,
    deadline: float | None = None,
    status: Status | None = None,
    previous: LayerSensitivity | None = None,
) -> LayerSensitivity:
    """The O(layers) pass (module docstring): one reference pass, one curvature pass with
    ``hutchinson_samples`` backward probes, and per layer a weight probe and (where the layer has
    int8-activation choices) activation probes, until ``deadline`` (``time.monotonic()``).

    ``previous``: a record of the same fingerprint cut short by a deadline; its probes are kept
    and only the other layers are probed (on the same samples)."""
    start = time.monotonic()
    if previous is not None and not previous.probes:
        previous = None  # nothing to keep: start afresh
    n = sample_count(task, space, max_samples) if previous is None else previous.samples
    state = _Pass(
        task,
        space,
        calibration,
        n=n,
        seed=seed,
        probes=hutchinson_samples,
        deadline=deadline,
        status=status,
    )
    probes: dict[str, LayerProbe] = dict(previous.probes or {}) if previous else {}
    todo = [ls for ls in space.layers if ls.layer.name not in probes]
    state.measure_reference()
    if previous is None:  # a resumed pass keeps its samples: the probes must compare alike
        units = 1 + 2 * hutchinson_samples  # a backward pass costs about two forward passes
        units += sum(
            1 + any(c.act_static_int8 for c in ls.choices) + any(c.act_dynamic for c in ls.choices)
            for ls in todo
        )
        state.shrink_to(units)
    diag = None
    curved_before = previous is not None and bool(previous.trace_per_param)
    if hutchinson_samples > 0 and (state.time_left() > 0 or curved_before):
        # the curvature may take CURVATURE_SHARE of the time left; a resumed pass whose earlier
        # part had curvature computes it again, deadline or not, to keep its figures alike
        diag = state.curvature(time.monotonic() + CURVATURE_SHARE * max(state.time_left(), 0.0))
    terms = _all_weight_terms(state, diag)
    _probe_layers(state, todo, terms, probes)
    cal = _Calibrations.from_probes(probes, terms)
    choices = {
        ls.layer.name: _layer_choices(
            ls.choices, probes.get(ls.layer.name, LayerProbe()), terms[ls.layer.name], cal
        )
        for ls in space.layers
    }
    passes = state.passes
    if previous is not None and previous.passes:
        passes = {k: v + previous.passes.get(k, 0) for k, v in passes.items()}
    return LayerSensitivity(
        fingerprint=fingerprint(
            task, space, _fingerprint_inputs(task, space, max_samples), calibration
        ),
        choices=choices,
        trace_per_param={}
        if diag is None
        else {name: float(d.double().mean()) for name, d in diag.items()},
        seconds=time.monotonic() - start + (previous.seconds if previous else 0.0),
        forward_passes=sum(passes.values()),
        samples=state.n,
        probes=probes,
        passes=passes,
        complete=all(ls.layer.name in probes for ls in space.layers),
    )


def _all_weight_terms(state: _Pass, diag: dict[str, Any] | None) -> dict[str, _WeightTerms]:
    state.status("layer sensitivity: weight errors of every format")
    with _one_thread():
        return {
            ls.layer.name: _weight_terms(
                state.modules[ls.layer.name].weight,
                [_weight_key(c) for c in ls.choices] + [_W8_PER_TENSOR, _F16],
                None if diag is None else diag[ls.layer.name],
            )
            for ls in state.space.layers
        }


def _probe_layers(
    state: _Pass, todo: list, terms: dict[str, _WeightTerms], probes: dict[str, LayerProbe]
) -> None:
    """A weight probe and (where the layer has static or dynamic int8-activation choices) the
    activation probes per layer of ``todo`` until the deadline; a layer is recorded once its
    probes are done. The layers go most sensitive first (largest predicted distortion at their
    coarsest format), so those a deadline leaves to estimates are the ones that matter least."""
    keys = {ls.layer.name: _probe_choice(ls.choices, terms[ls.layer.name]) for ls in todo}

    def predicted(ls: Any) -> float:
        key = keys[ls.layer.name]
        return 0.0 if key is None else terms[ls.layer.name].basis(key)

    order = sorted(todo, key=predicted, reverse=True)
    start = time.monotonic()
    for i, ls in enumerate(order):
        name = ls.layer.name
        if state.time_left() <= 0:
            state.status(f"layer sensitivity: deadline reached, {len(order) - i} layers estimated")
            return
        eta = f", ~{(time.monotonic() - start) / i * (len(order) - i):.0f} s left" if i else ""
        state.status(f"layer sensitivity: probing layer {i + 1}/{len(order)} ({name}){eta}")
        key = keys[name]
        weight = act = None
        errors = []
        if key is not None:
            weight, error = state.probe(name, key)
            errors.append(error)
        dynamic = None
        if any(c.act_static_int8 for c in ls.choices):
            act, error = state.probe(name, _ACT8)
            errors.append(error)
        if any(c.act_dynamic for c in ls.choices):
            dynamic, error = state.probe(name, _ACT8_DYNAMIC)
            errors.append(error)
        reason = "; ".join(e for e in errors if e) or None
        label = None if key is None else key.label
        probes[name] = LayerProbe(label, weight, act, reason, dynamic)


def _fingerprint_inputs(task: Any, space: SearchSpace, max_samples: int | None) -> Any:
    from autoquant.model_inputs import take

    return take(task.calibration_inputs, sample_count(task, space, max_samples))


def load_or_compute(
    directory: Path,
    task: Any,
    space: SearchSpace,
    calibration: Any,
    *,
    max_samples: int | None = None,
    deadline: float | None = None,
    status: Status | None = None,
) -> LayerSensitivity:
    """The cached sensitivity in ``directory/sensitivity.json`` if its fingerprint matches the
    task, calibration inputs, activation ranges and space and it is complete; a matching record
    cut short by a deadline is completed (its probes kept); otherwise computed. Written there."""
    path = Path(directory) / FILE_NAME
    expected = fingerprint(task, space, _fingerprint_inputs(task, space, max_samples), calibration)
    previous = None
    if path.exists():
        try:
            cached = LayerSensitivity.from_dict(json.loads(path.read_text()))
            if cached.fingerprint == expected:
                if cached.complete:
                    return cached
                previous = cached
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a stale or corrupt cache is recomputed, never trusted
    result = compute_sensitivity(
        task,
        space,
        calibration,
        max_samples=max_samples,
        deadline=deadline,
        status=status,
        previous=previous,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1, allow_nan=True))
    return result
