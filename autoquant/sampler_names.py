"""The search strategies by name, and the seeds they take: the one list the spec's
``search.sampler``, the CLI's ``--sampler`` and the README's command synopsis read
(``tests/test_search_loop.py`` holds the README to it). Light on purpose (no imports): the spec
validates names with it, and ``autoquant.search.samplers`` registers one factory per name."""

from __future__ import annotations

SAMPLER_DESCRIPTIONS: dict[str, str] = {
    "guided": "a sensitivity pass, then an XGBoost accuracy predictor picks each batch",
    "nsga2": "Optuna's NSGA-II genetic algorithm",
    "tpe": "Optuna's multivariate tree-structured Parzen estimator",
    "random": "Optuna's uniform random sampler",
}
DEFAULT_SAMPLER = "guided"
MAX_SEED = 2**32 - 1  # numpy's and Optuna's seeded generators take 0 .. 2**32 - 1


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into the seeds a generator takes (a resumed run's sampler is
    seeded past the trials it has, a worker past its index; a spec's seed may be the largest)."""
    return (seed + offset) % (MAX_SEED + 1)
