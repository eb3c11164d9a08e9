"""Optuna samplers by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _nsga2(*, seed: int, population_size: int, constraints_func: Callable | None) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(
        population_size=population_size, seed=seed, constraints_func=constraints_func
    )


def _tpe(*, seed: int, population_size: int, constraints_func: Callable | None) -> Any:
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed,
        constraints_func=constraints_func,
        multivariate=True,
        n_startup_trials=min(population_size, 20),
    )


def _random(*, seed: int, population_size: int, constraints_func: Callable | None) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into the seeds a generator takes (a resumed run's sampler is
    seeded past the trials it has; a spec's seed may be the largest one)."""
    from autoquant.spec import MAX_SEED

    return (seed + offset) % (MAX_SEED + 1)


SAMPLERS: dict[str, Callable[..., Any]] = {"nsga2": _nsga2, "tpe": _tpe, "random": _random}


def make_sampler(name: str, *, seed: int, population_size: int, constraints_func: Callable | None):
    import warnings

    import optuna

    # constraints_func is "experimental" in Optuna 4 and deprecated in Optuna 5 (for
    # trial.set_constraint, which Optuna 4 lacks); it works in both, and users need not see
    # either warning. Move to set_constraint when Optuna 4 support ends.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}") from None
    return factory(seed=seed, population_size=population_size, constraints_func=constraints_func)
