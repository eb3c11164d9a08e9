"""The search space: for each layer, the valid ``QuantChoice`` values, and why others are out."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from autoquant import formats
from autoquant.errors import UserError, show
from autoquant.space.namepattern import matching_names
from autoquant.space.values import FP32, LayerInfo, QuantChoice, QuantConfig

_FIELDS = (
    "weight_bits",
    "act_bits",
    "granularity",
    "group_sizes",
    "symmetric",
    "dynamic_activations",
)
# a later rule that sets one of these replaces an earlier pin (the others refine it)
_UNPINNING = ("weight_bits", "act_bits", "dynamic_activations")
_UNSET: dict[str, Any] = {
    "weight_bits": [32],
    "act_bits": [32],
    "granularity": ["per_channel"],
    "group_sizes": [],
    "symmetric": [True],
    "dynamic_activations": [False],
}


@dataclass(frozen=True)
class Exclusion:
    layer: str
    choice: str
    reason: str


@dataclass(frozen=True)
class LayerSpace:
    layer: LayerInfo
    choices: tuple[QuantChoice, ...]
    pinned: bool
    matched_rules: tuple[int, ...]

    def by_label(self) -> dict[str, QuantChoice]:
        return {c.label: c for c in self.choices}


@dataclass(frozen=True)
class SearchSpace:
    layers: tuple[LayerSpace, ...]
    exclusions: tuple[Exclusion, ...]

    @property
    def size(self) -> int:
        return math.prod(len(ls.choices) for ls in self.layers)

    @property
    def layer_infos(self) -> tuple[LayerInfo, ...]:
        return tuple(ls.layer for ls in self.layers)

    def layer(self, name: str) -> LayerSpace:
        for ls in self.layers:
            if ls.layer.name == name:
                return ls
        raise KeyError(name)

    def contains(self, config: QuantConfig) -> bool:
        mapping = config.as_mapping()
        return set(mapping) == {ls.layer.name for ls in self.layers} and all(
            mapping[ls.layer.name] in ls.choices for ls in self.layers
        )

    def reference(self, choice: QuantChoice) -> QuantConfig | None:
        """The config that gives every layer ``choice`` where allowed; layers that don't allow it
        (pinned ones) keep their closest allowed choice. None if no layer allows it."""
        if not any(choice in ls.choices for ls in self.layers):
            return None
        out = {}
        for ls in self.layers:
            out[ls.layer.name] = choice if choice in ls.choices else _closest(ls.choices, choice)
        return QuantConfig(tuple(out.items()))

    def all_configs(self):
        """Every config; only sensible for small spaces (benchmarks, tests)."""
        names = [ls.layer.name for ls in self.layers]
        for combo in itertools.product(*(ls.choices for ls in self.layers)):
            yield QuantConfig(tuple(zip(names, combo)))


def _closest(choices: tuple[QuantChoice, ...], target: QuantChoice) -> QuantChoice:
    return min(
        choices,
        key=lambda c: (
            abs(c.weight_bits - target.weight_bits),
            abs(c.act_bits - target.act_bits),
            c.act_dynamic != target.act_dynamic,
            c.granularity != target.granularity,
        ),
    )


def _named(spec, layers: tuple[LayerInfo, ...], file: str) -> dict[int, frozenset[str]]:
    """For each rule with a ``match.name`` pattern, the layer names it is found in."""
    out = {}
    for index, rule in enumerate(spec.rules):
        if rule.match.name is not None:
            try:
                out[index] = matching_names(rule.match.name, (layer.name for layer in layers))
            except ValueError as exc:
                raise UserError(
                    f"bad value {show(rule.match.name)}: {exc}",
                    file=file,
                    key=f"rules[{index}].match.name",
                ) from None
    return out


def _matches(rule, layer: LayerInfo, n_layers: int, named: frozenset[str] | None) -> bool:
    match = rule.match
    if match.kind is not None and layer.kind not in match.kind:
        return False
    if named is not None and layer.name not in named:
        return False
    if match.position is not None:
        positions = set()
        if layer.index == 0:
            positions.add("first")
        if layer.index == n_layers - 1:
            positions.add("last")
        if not positions & set(match.position):
            return False
    return True


def why_invalid(layer: LayerInfo, choice: QuantChoice) -> str | None:
    """None if ``choice`` can be applied to ``layer`` and exported; otherwise the reason (the
    choice's weight format says)."""
    return formats.weight_format(choice).why_invalid(layer, choice)


def _act_options(act_bits: list[int], dynamic: list[bool]) -> list[tuple[int, bool]]:
    """(act_bits, act_dynamic) pairs: ``dynamic`` only varies int8 activations."""
    out: list[tuple[int, bool]] = []
    for ab in act_bits:
        for dyn in dynamic if ab == 8 else [False]:
            if (ab, dyn) not in out:
                out.append((ab, dyn))
    return out


def _expand(values: dict[str, Any]) -> list[QuantChoice]:
    out = []
    acts = _act_options(values["act_bits"], values["dynamic_activations"])
    for wb, (ab, dyn), gran, sym in itertools.product(
        values["weight_bits"], acts, values["granularity"], values["symmetric"]
    ):
        if not formats.resolve(wb).scaled:
            out.append(QuantChoice(weight_bits=wb, act_bits=ab, act_dynamic=dyn))
            continue
        if gran == "per_group":
            for gs in values["group_sizes"] or [None]:
                out.append(QuantChoice(wb, ab, "per_group", gs, sym, dyn))
        else:
            out.append(QuantChoice(wb, ab, gran, None, sym, dyn))
    return out


def _pinned(p) -> QuantChoice:
    if not formats.resolve(p.weight_bits).scaled:
        return QuantChoice(p.weight_bits, p.act_bits, act_dynamic=p.dynamic_activations)
    return QuantChoice(
        p.weight_bits, p.act_bits, p.granularity, p.group_size, p.symmetric, p.dynamic_activations
    )


def build_space(layers: tuple[LayerInfo, ...], spec, *, file: str = "search space") -> SearchSpace:
    """Resolve the rules of a ``SearchSpaceSpec`` against the discovered layers.

    Raises ``UserError`` when a layer ends with no valid choice.
    """
    resolved = []
    exclusions: list[Exclusion] = []
    named = _named(spec, layers, file)
    for layer in layers:
        values = dict(_UNSET)
        pin = None
        listed: list[QuantChoice] | None = None  # a rule's explicit ``choices``
        matched = []
        for index, rule in enumerate(spec.rules):
            if not _matches(rule, layer, len(layers), named.get(index)):
                continue
            matched.append(index)
            if rule.pin is not None:
                pin = (index, rule.pin)
                continue
            if rule.choices is not None:
                listed = [QuantChoice.from_label(label) for label in rule.choices]
                pin = None
                continue
            for field in _FIELDS:
                value = getattr(rule, field)
                if value is not None:
                    values[field] = list(value)
                    listed = None
                    pin = None if field in _UNPINNING else pin
        if pin is not None:
            candidates = [_pinned(pin[1])]
        elif listed is not None:
            candidates = listed
        else:
            candidates = _expand(values)
        valid: list[QuantChoice] = []
        for choice in candidates:
            reason = why_invalid(layer, choice)
            if reason is None:
                if choice not in valid:
                    valid.append(choice)
            else:
                exclusions.append(Exclusion(layer.name, choice.label, reason))
        if not valid:
            rule_keys = ", ".join(f"rules[{i}]" for i in matched) or "no rule matched"
            reasons = "; ".join(sorted({e.reason for e in exclusions if e.layer == layer.name}))
            raise UserError(
                f"layer {layer.name!r} ({layer.kind}, weight {list(layer.weight_shape)}) is left with "
                f"no valid choice: {reasons}; allowed: widen the rule's values",
                file=file,
                key=rule_keys,
            )
        valid.sort(key=lambda c: (-c.weight_bits, -c.act_bits, c.act_dynamic, c.label))
        resolved.append(
            LayerSpace(
                layer,
                tuple(valid),
                pinned=pin is not None or len(valid) == 1,
                matched_rules=tuple(matched),
            )
        )
    return SearchSpace(tuple(resolved), tuple(exclusions))


def check_searchable(space: SearchSpace, *, file: str) -> None:
    """``UserError`` for a space of one config: a search of it measures that config and stops."""
    if space.size != 1:
        return
    labels = sorted({ls.choices[0].label for ls in space.layers})
    which = f"{labels[0]} on every layer" if len(labels) == 1 else "one choice on every layer"
    raise UserError(
        f"the space holds a single config ({which}): there is nothing to search; allowed: rules "
        "that give at least one layer two or more valid choices (autoquant space SPEC lists them)",
        file=file,
        key="rules",
    )


__all__ = [
    "FP32",
    "Exclusion",
    "LayerSpace",
    "SearchSpace",
    "build_space",
    "check_searchable",
    "why_invalid",
]
