"""The XGBoost accuracy predictor: a bootstrap ensemble whose spread is the uncertainty.

``AccuracyPredictor`` keeps its training data (features, targets, config hashes). ``save`` writes
a directory: ``predictor.json`` (versioned manifest with the parameters and the training data) and
one ``member_<i>.ubj`` XGBoost booster per ensemble member, in XGBoost's own UBJSON format.
``load`` reads it back; the reloaded predictor predicts identically and, holding its training
data, keeps learning (``fit`` with new rows refits on old and new together). Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoquant.records import record_data

PREDICTOR_VERSION = 1
MANIFEST = "predictor.json"
Z90 = 1.2815515655446004  # the 0.9 quantile of the standard normal

#: Features on which accuracy can only fall as they grow (XGBoost monotone constraints).
DECREASING = ("kl", "hawq", "sum_kl", "max_kl", "sum_disagreement", "sum_hawq")

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "reg:squarederror",
    "max_depth": 3,
    "eta": 0.1,
    "min_child_weight": 1.0,
    "subsample": 1.0,
    "colsample_bytree": 0.8,
    "lambda": 1.0,
    "tree_method": "hist",
    "nthread": 1,
}
DEFAULT_ROUNDS = 100


def require_xgboost() -> Any:
    """The ``xgboost`` module; ImportError naming the extra that installs it otherwise."""
    try:
        import xgboost
    except ImportError:
        raise ImportError("the accuracy predictor needs xgboost: pip install xgboost") from None
    return xgboost


@dataclass(frozen=True)
class Prediction:
    """Per row: the ensemble mean, its standard deviation, and the 10% / 90% quantiles of a
    normal with that mean and spread."""

    mean: np.ndarray
    std: np.ndarray

    @property
    def q10(self) -> np.ndarray:
        return self.mean - Z90 * self.std

    @property
    def q90(self) -> np.ndarray:
        return self.mean + Z90 * self.std

    def row(self, i: int) -> dict[str, float]:
        return {
            "mean": float(self.mean[i]),
            "std": float(self.std[i]),
            "q10": float(self.q10[i]),
            "q90": float(self.q90[i]),
        }


@dataclass
class AccuracyPredictor:
    """Predicts a config's accuracy from its features (``features.FeatureEncoder``).

    Args:
        feature_names: names of the feature columns, in order.
        n_members: ensemble size; each member is fit on a bootstrap resample of the data.
        rounds: boosting rounds per member.
        seed: seeds the bootstrap and XGBoost.
        params: XGBoost parameters over ``DEFAULT_PARAMS``.
    """

    feature_names: tuple[str, ...]
    n_members: int = 5
    rounds: int = DEFAULT_ROUNDS
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    X: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    keys: list[str] = field(default_factory=list)
    _members: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.feature_names = tuple(self.feature_names)
        if self.n_members < 1:
            raise ValueError(f"n_members must be at least 1, got {self.n_members}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.X.size == 0:
            self.X = np.zeros((0, len(self.feature_names)))

    @property
    def n_train(self) -> int:
        return len(self.y)

    @property
    def fitted(self) -> bool:
        return bool(self._members)

    def _xgb_params(self, member: int) -> dict[str, Any]:
        params = {**DEFAULT_PARAMS, **self.params, "seed": self.seed * 1000 + member}
        if "monotone_constraints" not in params:
            signs = [
                -1 if name.rsplit(":", 1)[-1] in DECREASING else 0 for name in self.feature_names
            ]
            params["monotone_constraints"] = "(" + ",".join(map(str, signs)) + ")"
        return params

    def add(self, X: np.ndarray, y: np.ndarray, keys: list[str] | None = None) -> None:
        """Append training rows (without refitting). ``keys`` identify the configs (hashes)."""
        X = np.asarray(X, dtype=float).reshape(-1, len(self.feature_names))
        y = np.asarray(y, dtype=float).reshape(-1)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
        if not np.isfinite(y).all():
            raise ValueError("y must be finite: failed measurements are not training data")
        keys = list(keys) if keys is not None else [""] * len(y)
        self.X = np.concatenate([self.X, X])
        self.y = np.concatenate([self.y, y])
        self.keys.extend(keys)

    def fit(
        self,
        X: np.ndarray | None = None,
        y: np.ndarray | None = None,
        keys: list[str] | None = None,
    ) -> AccuracyPredictor:
        """Add the given rows (if any) to the training data and refit every member on all of it."""
        xgb = require_xgboost()

        if X is not None and y is not None:
            self.add(X, y, keys)
        if self.n_train < 2:
            raise ValueError(f"need at least 2 training rows to fit, have {self.n_train}")
        rng = np.random.default_rng(self.seed + 7919 * self.n_train)
        members = []
        for m in range(self.n_members):
            rows = rng.integers(0, self.n_train, size=self.n_train) if self.n_members > 1 else None
            X, y = (self.X, self.y) if rows is None else (self.X[rows], self.y[rows])
            dtrain = xgb.DMatrix(X, label=y, feature_names=list(self.feature_names))
            members.append(xgb.train(self._xgb_params(m), dtrain, num_boost_round=self.rounds))
        self._members = members
        return self

    def predict(self, X: np.ndarray) -> Prediction:
        xgb = require_xgboost()

        if not self._members:
            raise ValueError("the predictor is not fitted: call fit() first")
        X = np.asarray(X, dtype=float).reshape(-1, len(self.feature_names))
        dmat = xgb.DMatrix(X, feature_names=list(self.feature_names))
        preds = np.stack([b.predict(dmat) for b in self._members]).astype(float)
        return Prediction(mean=preds.mean(axis=0), std=preds.std(axis=0))

    # --- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``predictor.json`` and its ``member_<i>_<digest>.ubj`` files into ``directory``;
        returns it. All or nothing: the members go to files named by their content, the manifest
        naming them replaces the old one last, then the old members are removed; a save cut
        short at any point leaves the previous predictor loadable and whole."""
        import hashlib

        from autoquant.rundir import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        members = []
        for i, booster in enumerate(self._members):
            raw = bytes(booster.save_raw(raw_format="ubj"))
            name = f"member_{i}_{hashlib.sha256(raw).hexdigest()[:16]}.ubj"
            atomic_write_bytes(directory / name, raw)
            members.append(name)
        manifest = {
            "_type": "AccuracyPredictor",
            "_version": PREDICTOR_VERSION,
            "_data": {
                "feature_names": list(self.feature_names),
                "n_members": self.n_members,
                "rounds": self.rounds,
                "seed": self.seed,
                "params": self.params,
                "members": members,
                "training": {
                    "X": self.X.tolist(),
                    "y": self.y.tolist(),
                    "keys": self.keys,
                },
            },
        }
        atomic_write_text(directory / MANIFEST, json.dumps(manifest))
        for old in directory.glob("member_*.ubj"):
            if old.name not in members:
                old.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> AccuracyPredictor:
        xgb = require_xgboost()

        directory = Path(directory)
        data = json.loads((directory / MANIFEST).read_text())
        d = record_data(data, "AccuracyPredictor", PREDICTOR_VERSION)
        names = tuple(d["feature_names"])
        training = d["training"]
        X = np.array(training["X"], dtype=float).reshape(-1, len(names))
        out = cls(
            feature_names=names,
            n_members=int(d["n_members"]),
            rounds=int(d["rounds"]),
            seed=int(d["seed"]),
            params=dict(d["params"]),
            X=X,
            y=np.array(training["y"], dtype=float),
            keys=list(training["keys"]),
        )
        for name in d["members"]:
            if "/" in name or "\\" in name or not name.endswith(".ubj"):
                raise ValueError(f"bad member file name {name!r} in {directory / MANIFEST}")
            booster = xgb.Booster()
            booster.load_model(str(directory / name))
            out._members.append(booster)
        return out
