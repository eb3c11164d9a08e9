"""Config features for the accuracy predictor.

A config is encoded as one row of floats. Per layer ``<layer>`` (in the space's layer order):

=============================  ====================================================================
``<layer>:w_bits``             weight bits (2/3/4/8 integer, 16 float16, 32 float32)
``<layer>:a_bits``             activation bits (8 uint8, static or dynamic; 16 float16; 32 float32)
``<layer>:a_dynamic``          1 when the uint8 activations are dynamic (ranges per call), else 0
``<layer>:granularity``        0 per-tensor, 1 per-channel, 2 per-group (integer weights only)
``<layer>:group_size``         the group size, 0 when not per-group
``<layer>:symmetric``          1 symmetric integer weights, 0 asymmetric
``<layer>:kl``                 KL(fp32 || quantized) of the outputs with only this layer at this
                               choice (``sensitivity.ChoiceSensitivity.kl``)
``<layer>:hawq``               curvature-weighted squared weight quantization error (0 where the
                               sensitivity pass computed no curvature)
``<layer>:distortion``         relative squared output error with only this layer at this choice
                               (``ChoiceSensitivity.distortion``; task-agnostic)
=============================  ====================================================================

and for the whole config:

=============================  ====================================================================
``sum_kl``, ``max_kl``         sum and maximum of the per-layer ``kl`` (sensitivity-weighted error:
                               the first-order additive estimate of the output change)
``sum_disagreement``           sum of per-layer top-1 disagreement with the float32 model
``sum_distortion``,            sum and maximum of the per-layer ``distortion`` (the same additive
``max_distortion``             estimate for outputs that are not logits: embeddings, regression)
``sum_hawq``                   sum of per-layer ``hawq`` (HAWQ's second-order loss estimate)
``mean_weight_bits``           parameter-weighted mean weight bits (exact)
``log_size_bytes``             log of the stored model size in bytes (exact)
``log_bops``                   log of the bit-operations per sample (exact)
``n_act8``                     how many layers take static (calibrated) uint8 activations
``n_act8_dynamic``             how many layers take dynamic uint8 activations
=============================  ====================================================================

Both the logit-minded (``kl``, ``disagreement``) and the task-agnostic (``distortion``) figures
are always there: which one tracks the task's metric is left to the predictor. Most per-layer
figures are interpolated from one or two measured passes per layer (``sensitivity``).

Every per-layer quantity is a lookup by choice, so encoding is vectorized over integer index
arrays ``idx[n, layer] = position of the choice in that layer's ``LayerSpace.choices``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from autoquant.predict.sensitivity import LayerSensitivity
from autoquant.space import QuantConfig, SearchSpace
from autoquant.space.cost import layer_weight_bytes

PER_LAYER = (
    "w_bits",
    "a_bits",
    "a_dynamic",
    "granularity",
    "group_size",
    "symmetric",
    "kl",
    "hawq",
    "distortion",
)
GLOBAL = (
    "sum_kl",
    "max_kl",
    "sum_disagreement",
    "sum_distortion",
    "max_distortion",
    "sum_hawq",
    "mean_weight_bits",
    "log_size_bytes",
    "log_bops",
    "n_act8",
    "n_act8_dynamic",
)
EXACT_FIGURES = ("size_bytes", "mean_weight_bits", "bops")
_GRANULARITY_CODE = {"per_tensor": 0, "per_channel": 1, "per_group": 2}
_BIG = 1e3  # stands in for an infinite figure (a choice whose single-layer run was non-finite)


def _finite(value: float | None) -> float:
    if value is None:
        return 0.0
    return value if math.isfinite(value) else _BIG


class FeatureEncoder:
    """Encodes configs of one ``SearchSpace`` with one task's ``LayerSensitivity``.

    Args:
        space: the search space (fixes the layer order and the choice positions).
        sensitivity: per-layer sensitivity of the task over exactly this space's choices.
        other_param_bytes: float32 bytes outside the quantizable layers (part of the size).
    """

    def __init__(
        self, space: SearchSpace, sensitivity: LayerSensitivity, *, other_param_bytes: int = 0
    ) -> None:
        self.space = space
        self.layer_names = tuple(ls.layer.name for ls in space.layers)
        self.feature_names: tuple[str, ...] = (
            tuple(f"{name}:{f}" for name in self.layer_names for f in PER_LAYER) + GLOBAL
        )
        self.other_param_bytes = other_param_bytes
        self._tables: list[np.ndarray] = []  # per layer: [n_choices, len(PER_LAYER)]
        self._disagree: list[np.ndarray] = []
        self._size: list[np.ndarray] = []
        self._bits_numel: list[np.ndarray] = []
        self._bops: list[np.ndarray] = []
        self._position: list[dict[str, int]] = []
        self._numel = 0
        for ls in space.layers:
            name = ls.layer.name
            if name not in sensitivity.choices:
                raise ValueError(f"sensitivity has no figures for layer {name!r}")
            rows, disagree = [], []
            for choice in ls.choices:
                s = sensitivity.choices[name].get(choice.label)
                if s is None:
                    raise ValueError(f"sensitivity has no figures for {name!r} at {choice.label}")
                rows.append(
                    (
                        choice.weight_bits,
                        choice.act_bits,
                        1.0 if choice.act_dynamic else 0.0,
                        _GRANULARITY_CODE[choice.granularity] if choice.weight_is_int else 1,
                        choice.group_size or 0,
                        1.0 if choice.symmetric else 0.0,
                        _finite(s.kl),
                        _finite(s.hawq),
                        _finite(s.distortion),
                    )
                )
                disagree.append(s.disagreement)
            self._tables.append(np.array(rows, dtype=float))
            self._disagree.append(np.array(disagree, dtype=float))
            self._size.append(
                np.array([layer_weight_bytes(ls.layer, c) for c in ls.choices], dtype=float)
            )
            self._bits_numel.append(
                np.array([c.weight_bits * ls.layer.weight_numel for c in ls.choices], dtype=float)
            )
            self._bops.append(
                np.array(
                    [ls.layer.macs * c.weight_bits * c.act_bits for c in ls.choices], dtype=float
                )
            )
            self._position.append({c.label: i for i, c in enumerate(ls.choices)})
            self._numel += ls.layer.weight_numel

    @property
    def n_choices(self) -> tuple[int, ...]:
        return tuple(len(ls.choices) for ls in self.space.layers)

    def indices(self, configs: Iterable[QuantConfig]) -> np.ndarray:
        """``[n, layers]`` choice positions of ``configs``."""
        rows = []
        for config in configs:
            mapping = config.as_mapping()
            rows.append([pos[mapping[n].label] for n, pos in zip(self.layer_names, self._position)])
        return np.array(rows, dtype=np.int64).reshape(-1, len(self.layer_names))

    def config(self, row: np.ndarray) -> QuantConfig:
        return QuantConfig(
            tuple((ls.layer.name, ls.choices[int(i)]) for ls, i in zip(self.space.layers, row))
        )

    def all_indices(self) -> np.ndarray:
        """Every config of the space, in ``SearchSpace.all_configs`` order."""
        grids = np.meshgrid(*(np.arange(n) for n in self.n_choices), indexing="ij")
        return np.stack([g.reshape(-1) for g in grids], axis=1)

    def sample_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.integers(0, k, size=n) for k in self.n_choices], axis=1)

    def exact(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The config-determined figures (``size_bytes``, ``mean_weight_bits``, ``bops``), the
        same numbers as ``autoquant.space.config_cost``."""
        idx = np.asarray(idx).reshape(-1, len(self.layer_names))
        size = self.other_param_bytes + sum(t[idx[:, j]] for j, t in enumerate(self._size))
        bits = sum(t[idx[:, j]] for j, t in enumerate(self._bits_numel)) / max(self._numel, 1)
        bops = sum(t[idx[:, j]] for j, t in enumerate(self._bops))
        return {"size_bytes": size, "mean_weight_bits": bits, "bops": bops}

    def encode_indices(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx).reshape(-1, len(self.layer_names))
        per_layer = [t[idx[:, j]] for j, t in enumerate(self._tables)]  # each [n, PER_LAYER]
        stacked = np.stack(per_layer, axis=1)  # [n, L, PER_LAYER]
        kl = stacked[:, :, PER_LAYER.index("kl")]
        hawq = stacked[:, :, PER_LAYER.index("hawq")]
        a_bits = stacked[:, :, PER_LAYER.index("a_bits")]
        a_dynamic = stacked[:, :, PER_LAYER.index("a_dynamic")] > 0
        distortion = stacked[:, :, PER_LAYER.index("distortion")]
        disagree = sum(t[idx[:, j]] for j, t in enumerate(self._disagree))
        exact = self.exact(idx)
        glob = np.stack(
            [
                kl.sum(axis=1),
                kl.max(axis=1),
                np.asarray(disagree, dtype=float),
                distortion.sum(axis=1),
                distortion.max(axis=1),
                hawq.sum(axis=1),
                exact["mean_weight_bits"],
                np.log(exact["size_bytes"]),
                np.log(np.maximum(exact["bops"], 1.0)),
                ((a_bits == 8) & ~a_dynamic).sum(axis=1).astype(float),
                ((a_bits == 8) & a_dynamic).sum(axis=1).astype(float),
            ],
            axis=1,
        )
        return np.concatenate([stacked.reshape(len(idx), -1), glob], axis=1)

    def encode(self, configs: Iterable[QuantConfig]) -> np.ndarray:
        return self.encode_indices(self.indices(configs))
