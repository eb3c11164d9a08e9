"""A ledger read from a storage several workers write: a running trial may show its config with
only part of its params (PostgreSQL reads them in separate statements), which is no edit; a
finished trial's params must all be its config's, and a param that disagrees is always one."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from autoquant.errors import UserError
from autoquant.search.ledger import entry_from_trial
from autoquant.space.values import QuantChoice, QuantConfig

CONFIG = QuantConfig.from_mapping(
    {"hidden.0": QuantChoice(8, 8, "per_channel"), "out": QuantChoice(4, 32, "per_channel")}
)
LABELS = dict((name, choice.label) for name, choice in CONFIG.choices)
CHOICES = ["f32-a32", "w8cs-a8", "w4cs-a32"]


def trial(state: TrialState, params: dict[str, str]):
    return create_trial(
        state=state,
        values=[1.0] if state == TrialState.COMPLETE else None,
        params=params,
        distributions={name: CategoricalDistribution(CHOICES) for name in params},
        user_attrs={"config": CONFIG.to_json(), "config_hash": CONFIG.hash},
    )


def test_a_running_trial_read_between_its_params_is_no_edit():
    entry = entry_from_trial(trial(TrialState.RUNNING, {"hidden.0": LABELS["hidden.0"]}))
    assert entry.config == CONFIG


@pytest.mark.parametrize(
    ("state", "params", "layer"),
    [
        (TrialState.RUNNING, {"hidden.0": "f32-a32"}, "hidden.0"),
        (TrialState.COMPLETE, {"hidden.0": LABELS["hidden.0"]}, "out"),
        (TrialState.FAIL, {**LABELS, "out": "w8cs-a8"}, "out"),
    ],
)
def test_params_that_disagree_or_a_finished_trial_missing_some_are_refused(state, params, layer):
    with pytest.raises(UserError) as info:
        entry_from_trial(trial(state, params), file="study.db")
    assert f"disagrees with the trial's params on layer {layer!r}" in str(info.value)


def test_a_finished_trial_with_its_params_is_read():
    assert entry_from_trial(trial(TrialState.COMPLETE, LABELS)).config == CONFIG
