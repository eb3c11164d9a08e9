"""What the search loop asks for the next config: a ``Proposer``.

The loop (``autoquant.search.driver.drive``) owns the budget, the time limit, the stop reasons,
resume, the ledger's answers for repeats and the progress; a proposer only proposes configs and
reads what became of them in the ledger the loop keeps (``LoopContext.recorder``). Two kinds:

- ``OptunaProposer``: an Optuna sampler; it never names a config (``propose`` returns None) and
  the study's ``ask`` lets the sampler suggest every layer's label, as Optuna does.
- a proposer that names its configs (the guided one): the study asks a ``NamingSampler``, which
  answers each layer's suggestion with the named config's label.

Samplers are registered by name in ``autoquant.search.samplers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from autoquant.space import QuantConfig


@dataclass(frozen=True)
class Proposal:
    """A config to measure next, and user attributes its trial keeps (what a predictor said)."""

    config: QuantConfig
    attrs: dict[str, str] = field(default_factory=dict)

    def params(self) -> dict[str, str]:
        return {name: choice.label for name, choice in self.config.choices}


@dataclass(frozen=True)
class Stop:
    """The proposer has nothing more to propose, and why."""

    reason: str


@dataclass(frozen=True)
class LoopContext:
    """What a proposer sees of the loop.

    ``recorder`` holds the ledger (``measured``, ``failed``, ``fp32_accuracy``: every worker's
    trials on a shared study); ``taken()`` the hashes of configs other workers have claimed and
    are measuring; ``run_dir`` is None on a worker, which writes nothing outside the storage;
    ``study`` is where state shared by every worker of the study lives (its system attributes).
    """

    run: Any  # PreparedRun
    objectives: tuple
    recorder: Any  # TrialRecorder
    study: Any
    run_dir: Path | None
    start: float  # time.monotonic() when this invocation began
    taken: Callable[[], set[str]] = frozenset
    on_status: Callable[[str], None] | None = None


class Proposer(Protocol):
    def study_sampler(self) -> Any:
        """The Optuna sampler the study is opened with."""

    def start(self, ctx: LoopContext) -> None:
        """Long steps before the first trial (the guided sensitivity pass)."""

    def propose(self, ctx: LoopContext, left: int) -> Proposal | Stop | None:
        """The next config (``left``: budget slots still free), None to let the study's sampler
        suggest it, or ``Stop``."""

    def finish(self, ctx: LoopContext) -> None:
        """After the last trial of this invocation (files a proposer keeps)."""


class OptunaProposer:
    """An Optuna sampler behind the loop: the study asks it for every layer's label."""

    def __init__(self, sampler: Any) -> None:
        self.optuna_sampler = sampler

    def study_sampler(self) -> Any:
        return self.optuna_sampler

    def start(self, ctx: LoopContext) -> None:
        return None

    def propose(self, ctx: LoopContext, left: int) -> None:
        return None

    def finish(self, ctx: LoopContext) -> None:
        return None


def naming_sampler(seed: int) -> Any:
    """An Optuna sampler that suggests the labels of the config it was last told to name
    (``named``), and random labels otherwise (a trial nobody named). Defined on first use:
    Optuna is imported lazily."""
    import optuna

    class NamingSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self.fallback = optuna.samplers.RandomSampler(seed=seed)
            self.named: dict[str, str] | None = None

        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            if self.named is not None and param_name in self.named:
                return self.named[param_name]
            return self.fallback.sample_independent(study, trial, param_name, param_distribution)

        def reseed_rng(self) -> None:
            self.fallback.reseed_rng()

    return NamingSampler()
