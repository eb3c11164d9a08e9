"""The per-layer sensitivity pass: O(layers) model passes, interpolated figures that track the
exhaustive single-layer measurements, the deadline, unused layers, named inputs."""

from __future__ import annotations

import json
import math
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from autoquant.model_inputs import run_model, take
from autoquant.predict import sensitivity as sens
from autoquant.predict.sensitivity import (
    LayerSensitivity,
    compute_sensitivity,
    load_or_compute,
    output_change,
    quantized_layer,
)
from autoquant.quant import Calibration, apply, calibrate
from autoquant.space import QuantChoice, QuantConfig, build_space
from autoquant.space.discovery import discover_layers, quantizable_modules
from autoquant.spec import SearchSpaceSpec
from autoquant.tasks.base import Task

WEIGHT_ONLY = [{"match": {}, "weight_bits": [4, 8, 32], "act_bits": [32]}]
WIDE = [
    {
        "match": {},
        "weight_bits": [2, 3, 4, 8, 16, 32],
        "act_bits": [8, 32],
        "granularity": ["per_channel", "per_group"],
        "group_sizes": [16, 32],
        "symmetric": [True, False],
    }
]


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class TinyEncoder(nn.Module):
    """Token ids + attention mask in, a mean-pooled [N, 16] embedding out; like BERT, it also
    computes a pooler whose output the model does not return."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 32)
        self.ff1 = nn.Linear(32, 64)
        self.ff2 = nn.Linear(64, 32)
        self.proj = nn.Linear(32, 16)
        self.pooler = nn.Linear(32, 32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.ff2(torch.relu(self.ff1(h)))
        self.pooler(h[:, 0])  # computed, never used: no gradient reaches its weight
        mask = attention_mask.unsqueeze(-1).float()
        return self.proj((h * mask).sum(1) / mask.sum(1))


def _setup(model: nn.Module, inputs, rules):
    model = model.eval()
    task = Task(
        name="synthetic",
        model=model,
        calibration_inputs=inputs,
        eval_inputs=inputs,
        eval_targets=torch.zeros(
            len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
        ),
        metric=lambda outputs, targets: 0.0,
        input_shape=(1, 16),
    )
    layers = discover_layers(model, take(inputs, 1))
    space = build_space(layers, SearchSpaceSpec.model_validate({"rules": rules}))
    return task, space, calibrate(model, inputs)


def _mlp(depth: int = 6, width: int = 64, rules=WIDE, n: int = 64):
    return _setup(
        DeepMLP(depth, width), torch.randn(n, 16, generator=torch.Generator().manual_seed(1)), rules
    )


def _tokens(n: int = 24):
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(n, 12, dtype=torch.int64)
    mask[:, 9:] = 0
    return {"input_ids": torch.randint(0, 50, (n, 12), generator=g), "attention_mask": mask}


def test_pass_count_grows_with_layers_not_choices():
    """Same passes whether a layer has 3 choices or 30: one weight probe per layer, one
    activation probe per layer that has int8-activation choices, a reference, the curvature."""
    for depth in (3, 12):
        counts = {}
        for name, rules in (("weight-only", WEIGHT_ONLY), ("wide", WIDE)):
            task, space, cal = _mlp(depth=depth, width=32, rules=rules, n=32)
            s = compute_sensitivity(task, space, cal, hutchinson_samples=4)
            counts[name] = s.passes
            assert s.forward_passes == sum(s.passes.values())
            assert s.complete and s.sources()["estimated"] == 0
            n_choices = sum(len(ls.choices) for ls in space.layers)
            assert s.sources()["measured"] == depth  # the weight probe, as is
            assert sum(s.sources().values()) == n_choices
        assert counts["weight-only"] == {
            "reference": 1,
            "weight_probe": depth,
            "activation_probe": 0,
            "curvature_forward": 1,
            "curvature_backward": 4,
        }
        assert counts["wide"] == {**counts["weight-only"], "activation_probe": depth}


@pytest.mark.parametrize(
    "choice",
    [
        QuantChoice(3, 32, "per_group", 16, False),
        QuantChoice(2, 32, "per_channel"),
        QuantChoice(32, 8),
        QuantChoice(32, 8, act_dynamic=True),
    ],
    ids=lambda c: c.label,
)
def test_quantized_layer_computes_what_apply_does_and_restores(choice):
    task, space, cal = _mlp()
    model = task.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = task.calibration_inputs
    name = space.layers[1].layer.name
    want = apply(model, QuantConfig(((name, choice),)), cal)(x)
    with torch.no_grad(), quantized_layer(quantizable_modules(model)[name], name, choice, cal):
        got = model(x)
    assert torch.equal(got, want)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not quantizable_modules(model)[name]._forward_hooks


def test_dynamic_activation_choices_get_their_own_probe():
    rules = [
        {
            "match": {},
            "weight_bits": [4, 8, 32],
            "act_bits": [8, 32],
            "granularity": ["per_channel"],
            "dynamic_activations": [False, True],
        }
    ]
    task, space, cal = _mlp(depth=3, rules=rules)
    assert any(c.act_dynamic for ls in space.layers for c in ls.choices)
    s = compute_sensitivity(task, space, cal, hutchinson_samples=2)
    assert s.passes["activation_probe"] == 2 * len(space.layers)
    for ls in space.layers:
        probe = s.probes[ls.layer.name]
        assert probe.dynamic is not None and probe.activation is not None
        by = s.choices[ls.layer.name]
        w8 = by[QuantChoice(8, 32, "per_channel").label]
        dyn = by[QuantChoice(8, 8, "per_channel", act_dynamic=True).label]
        assert dyn.distortion == pytest.approx(w8.distortion + probe.dynamic.distortion)


def test_quantized_layer_refuses_an_integer_kernel_choice():
    task, space, cal = _mlp()
    name = space.layers[0].layer.name
    module = quantizable_modules(task.model)[name]
    with pytest.raises(ValueError, match="rounds the bias"):
        with quantized_layer(module, name, QuantChoice(8, 8, "per_channel"), cal):
            pass


def _ranks(values):
    return np.argsort(np.argsort(values, kind="stable"), kind="stable")


def test_interpolated_figures_track_exhaustive_single_layer_measurements():
    rules = [{**WIDE[0], "weight_bits": [2, 3, 4, 8, 32], "group_sizes": [16]}]
    task, space, cal = _mlp(depth=3, width=32, rules=rules, n=128)
    s = compute_sensitivity(task, space, cal)
    x = take(task.calibration_inputs, s.samples)
    with torch.no_grad():
        ref = run_model(task.model, x)
    measured, interpolated = [], []
    for ls in space.layers:
        for c in ls.choices:
            if c.is_fp32:
                continue
            with torch.no_grad():
                truth = output_change(
                    ref, apply(task.model, QuantConfig(((ls.layer.name, c),)), cal)(x)
                )
            figure = s.choices[ls.layer.name][c.label]
            if figure.source == "measured":
                assert figure.distortion == truth.distortion and figure.kl == truth.kl
            measured.append(truth.distortion)
            interpolated.append(figure.distortion)
    rho = np.corrcoef(_ranks(measured), _ranks(interpolated))[0, 1]
    assert rho > 0.95, rho
    ratio = np.abs(np.log(np.array(interpolated) / np.array(measured)))
    assert np.median(ratio) < math.log(2.0)


def test_unused_layer_and_named_inputs():
    """BERT's pooler: reached by the forward, its output unused. No crash: zero curvature, zero
    distortion at every choice. Token ids are hashed as integers, never cast."""
    task, space, cal = _setup(TinyEncoder(), _tokens(), WIDE)
    assert "pooler" in {ls.layer.name for ls in space.layers}
    s = compute_sensitivity(task, space, cal, hutchinson_samples=4)
    assert s.trace_per_param["pooler"] == 0.0 and s.trace_per_param["ff1"] > 0
    assert all(f.distortion == 0 and f.kl == 0 for f in s.choices["pooler"].values())
    assert max(f.distortion for f in s.choices["ff1"].values()) > 0
    assert s.samples == 24 and s.complete
    other = dict(task.calibration_inputs, input_ids=task.calibration_inputs["input_ids"].flip(0))
    assert sens.fingerprint(task, space, task.calibration_inputs) != sens.fingerprint(
        task, space, other
    )


def test_a_failed_probe_is_a_result():
    """An activation probe without calibrated ranges fails with its reason; the layer's
    int8-activation figures are estimated from the other layers, nothing raises."""
    task, space, cal = _mlp(depth=4)
    first = space.layers[0].layer.name
    partial = Calibration(
        {k: v for k, v in cal.input_ranges.items() if k != first},
        {k: v for k, v in cal.output_ranges.items() if k != first},
    )
    s = compute_sensitivity(task, space, partial, hutchinson_samples=2)
    assert "KeyError" in s.probes[first].error
    a8 = [f for label, f in s.choices[first].items() if label.endswith("-a8")]
    assert a8 and all(f.source == "estimated" and math.isfinite(f.distortion) for f in a8)
    assert s.probes[space.layers[1].layer.name].error is None


class _FakeClock:
    """``time`` for the sensitivity module: the clock moves one second per status line."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lines: list[str] = []

    def monotonic(self) -> float:
        return self.now

    def status(self, text: str) -> None:
        self.lines.append(text)
        self.now += 1.0


def test_deadline_estimates_the_rest_and_the_next_call_completes(tmp_path, monkeypatch):
    task, space, cal = _mlp(depth=6)
    clock = _FakeClock()
    monkeypatch.setattr(sens, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    # reference at +1, curvature at +2, weight errors at +3, layer 1 at +4, layer 2 at +5, then
    # past the deadline
    cut = load_or_compute(tmp_path, task, space, cal, deadline=clock.now + 4.5, status=clock.status)
    # the two layers probed are the two with the largest predicted distortion
    predicted = {n: max(f.hawq for f in by.values()) for n, by in cut.choices.items()}
    assert not cut.complete and set(cut.probes) == set(sorted(predicted, key=predicted.get)[-2:])
    assert cut.passes["weight_probe"] == 2 and cut.trace_per_param
    assert any("probing layer 2/6" in line for line in clock.lines)
    assert "deadline reached, 4 layers estimated" in clock.lines[-1]
    late = next(ls.layer.name for ls in space.layers if ls.layer.name not in cut.probes)
    assert {f.source for f in cut.choices[late].values()} == {"exact", "estimated"}
    assert all(math.isfinite(f.distortion) for f in cut.choices[late].values())
    stored = LayerSensitivity.from_dict(json.loads((tmp_path / sens.FILE_NAME).read_text()))
    assert stored == cut

    done = load_or_compute(tmp_path, task, space, cal, status=clock.status)
    assert done.complete and all(done.probes[n] == p for n, p in cut.probes.items())
    assert done.passes["weight_probe"] == 6 and done.passes["reference"] == 2
    assert done.samples == cut.samples
    assert {f.source for f in done.choices[late].values()} <= {"exact", "measured", "interpolated"}
    assert load_or_compute(tmp_path, task, space, cal) == done  # complete: from the cache


def test_no_time_at_all_gives_weight_error_estimates():
    from autoquant.predict.features import FeatureEncoder

    task, space, cal = _mlp(depth=4)
    s = compute_sensitivity(task, space, cal, deadline=time.monotonic() - 1.0)
    assert not s.complete and not s.probes and not s.trace_per_param
    assert s.passes == {**dict.fromkeys(s.passes, 0), "reference": 1}
    for ls in space.layers:
        figures = s.choices[ls.layer.name]
        assert all(f.hawq is None for f in figures.values())
        four = figures[QuantChoice(4, 32, "per_channel").label]
        eight = figures[QuantChoice(8, 32, "per_channel").label]
        assert four.source == "estimated" and four.distortion > eight.distortion > 0
    encoder = FeatureEncoder(space, s)
    X = encoder.encode_indices(encoder.sample_indices(20, np.random.default_rng(0)))
    assert np.isfinite(X).all()


def test_subset_shrinks_for_big_models_and_tight_deadlines(monkeypatch):
    task, space, cal = _mlp(depth=4, n=300)
    assert sens.sample_count(task, space) == sens.MAX_SAMPLES
    big = types.SimpleNamespace(
        layers=[types.SimpleNamespace(layer=types.SimpleNamespace(macs=2e9))]
    )
    assert sens.sample_count(task, big) == sens.MIN_SAMPLES
    # a reference pass that "takes" 10 s, 60 s left: the probes are planned on fewer samples
    clock = _FakeClock()
    monkeypatch.setattr(sens, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    real_run = sens._Pass.run

    def slow_run(self):
        clock.now += 10.0 if self.reference is None else 0.0
        return real_run(self)

    monkeypatch.setattr(sens._Pass, "run", slow_run)
    s = compute_sensitivity(task, space, cal, deadline=clock.now + 60.0, hutchinson_samples=2)
    assert sens.MIN_SAMPLES <= s.samples < sens.MAX_SAMPLES


def test_output_change():
    ref = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert output_change(ref, ref.clone()) == sens.OutputChange(0.0, 0.0, 0.0)
    changed = output_change(ref, torch.tensor([[0.0, 2.0, -1.0], [0.0, 1.0, 0.0]]))
    assert changed.disagreement == 0.5
    assert changed.distortion == pytest.approx(8.0 / 6.0) and changed.kl > 0
    assert not output_change(ref, ref * math.inf).finite


def test_old_records_are_recomputed(tmp_path):
    task, space, cal = _mlp(depth=4)
    (tmp_path / sens.FILE_NAME).write_text(
        json.dumps({"_type": "LayerSensitivity", "_version": 1, "_data": {}})
    )
    s = load_or_compute(tmp_path, task, space, cal)
    record = json.loads((tmp_path / sens.FILE_NAME).read_text())
    assert record["_version"] == sens.SENSITIVITY_VERSION == 2
    assert LayerSensitivity.from_dict(record) == s
    with pytest.raises(ValueError, match="version 1 is not supported"):
        LayerSensitivity.from_dict({**record, "_version": 1})
