"""Samplers by name: one factory for each name of ``autoquant.sampler_names`` (the list the spec,
the CLI and the README read).

A sampler is a ``Proposer`` (``autoquant.search.proposer``) made by its factory: Optuna's
samplers wrapped, and the predictor-guided proposer. This module stays light (no Optuna, no
numpy at import): the spec imports it to validate names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autoquant.sampler_names import DEFAULT_SAMPLER, SAMPLER_DESCRIPTIONS, derived_seed

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "SamplerArgs", "derived_seed", "make_proposer"]


@dataclass(frozen=True, kw_only=True)
class SamplerArgs:
    """What every factory is given: the seed (already offset for resumes and workers), NSGA-II's
    population, Optuna's constraint function (None without constraints), and the spec's file
    (named by a sampler that refuses to run)."""

    seed: int
    population_size: int
    constraints_func: Callable | None
    spec_file: str | None = None


@dataclass(frozen=True)
class SamplerKind:
    description: str
    factory: Callable[[SamplerArgs], Any]  # -> Proposer


def _quiet_optuna() -> None:
    import warnings

    import optuna

    # constraints_func is "experimental" in Optuna 4 and deprecated in Optuna 5 (for
    # trial.set_constraint, which Optuna 4 lacks); it works in both, and users need not see
    # either warning. Move to set_constraint when Optuna 4 support ends.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)


def _optuna(make: Callable[[SamplerArgs], Any]) -> Callable[[SamplerArgs], Any]:
    def factory(args: SamplerArgs) -> Any:
        from autoquant.search.proposer import OptunaProposer

        _quiet_optuna()
        return OptunaProposer(make(args))

    return factory


def _nsga2(args: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(
        population_size=args.population_size,
        seed=args.seed,
        constraints_func=args.constraints_func,
    )


def _tpe(args: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.TPESampler(
        seed=args.seed,
        constraints_func=args.constraints_func,
        multivariate=True,
        n_startup_trials=min(args.population_size, 20),
    )


def _random(args: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=args.seed)


def _guided(args: SamplerArgs) -> Any:
    from autoquant.search.guided import GuidedProposer

    return GuidedProposer(seed=args.seed, spec_file=args.spec_file)


_FACTORIES: dict[str, Callable[[SamplerArgs], Any]] = {
    "guided": _guided,
    "nsga2": _optuna(_nsga2),
    "tpe": _optuna(_tpe),
    "random": _optuna(_random),
}
assert set(_FACTORIES) == set(SAMPLER_DESCRIPTIONS), "a sampler name without a factory, or back"
SAMPLERS: dict[str, SamplerKind] = {
    name: SamplerKind(description, _FACTORIES[name])
    for name, description in SAMPLER_DESCRIPTIONS.items()
}


def make_proposer(name: str, args: SamplerArgs) -> Any:
    """The proposer registered as ``name``."""
    try:
        kind = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}") from None
    return kind.factory(args)


def make_sampler(name: str, *, seed: int, population_size: int, constraints_func: Callable | None):
    """The Optuna sampler registered as ``name`` (not ``guided``, which is no Optuna sampler)."""
    proposer = make_proposer(
        name,
        SamplerArgs(seed=seed, population_size=population_size, constraints_func=constraints_func),
    )
    if not hasattr(proposer, "optuna_sampler"):
        raise ValueError(f"sampler {name!r} is not an Optuna sampler")
    return proposer.optuna_sampler


def sampler_help() -> str:
    """The CLI's ``--sampler`` help: each name and what it does."""
    return "search strategy: " + "; ".join(
        f"{name}: {kind.description}" for name, kind in SAMPLERS.items()
    )


# The CLI's ``--sampler`` choices (typer takes an enum).
SamplerName = enum.Enum("SamplerName", {name: name for name in SAMPLERS}, type=str)
