"""``backends.inputs``: what whole-model measurements feed a model (a shape, one tensor, named
tensors), and the TVM composer's refusal of what it cannot feed. No device needed."""

from __future__ import annotations

import pytest
import torch

from autoquant.backends.inputs import CALIBRATION_SAMPLES, ModelInputs, task_inputs


def named(n: int = 4) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.arange(n * 3).reshape(n, 3),
        "attention_mask": torch.ones(n, 3, dtype=torch.int64),
    }


def test_a_shape_and_one_float_tensor_are_random_inputs_of_that_shape():
    by_shape = ModelInputs.of((1, 1, 8, 8))
    by_tensor = ModelInputs.of(torch.zeros(32, 1, 8, 8))
    assert by_shape == by_tensor == ModelInputs(shape=(1, 1, 8, 8))
    assert by_shape.is_random and by_shape.float_shape == (1, 1, 8, 8)
    # the form model_signature always hashed, so whole-model timings in the table stay valid
    assert by_shape.signature() == [1, 1, 8, 8]
    assert by_shape.describe(4) == [4, 1, 8, 8]
    assert by_shape.export_arg() == (1, 1, 8, 8)
    x = by_shape.batch(3, seed=5)
    assert x.shape == (3, 1, 8, 8) and torch.equal(x, by_shape.batch(3, seed=5))
    assert by_shape.calibration().shape == (CALIBRATION_SAMPLES, 1, 8, 8)
    feeds = by_shape.feeds(2)
    assert list(feeds) == ["input"] and feeds["input"].dtype.name == "float32"


def test_named_inputs_are_fed_as_they_are_repeated_to_the_batch():
    inputs = ModelInputs.of(named(2))
    assert not inputs.is_random and inputs.is_named and inputs.float_shape is None
    assert inputs.names == ("input_ids", "attention_mask")
    batch = inputs.batch(5)
    assert batch["input_ids"][:, 0].tolist() == [0, 3, 0, 3, 0]
    assert inputs.describe(5) == {"input_ids": [5, 3], "attention_mask": [5, 3]}
    assert inputs.signature() == {"input_ids": [[3], "int64"], "attention_mask": [[3], "int64"]}
    assert {k: v.shape for k, v in inputs.export_arg().items()} == {
        "input_ids": (1, 3),
        "attention_mask": (1, 3),
    }
    assert inputs.feeds(1)["attention_mask"].dtype.name == "int64"
    ids_only = ModelInputs.of(torch.arange(6).reshape(2, 3))  # one integer tensor: real too
    assert not ids_only.is_random and not ids_only.is_named
    assert ids_only.batch(3).tolist() == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


@pytest.mark.parametrize(
    "bad, error",
    [
        ({}, ValueError),
        ({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, ValueError),
        ("x", TypeError),
        ((), ValueError),
    ],
)
def test_bad_inputs_say_what_is_allowed(bad, error):
    with pytest.raises(error):
        ModelInputs.of(bad)


def test_task_inputs_follow_the_task_contract():
    from autoquant.tasks import Task, top1_accuracy

    def task(cal):
        model = torch.nn.Linear(3, 2)
        return Task("t", model, cal, cal, torch.zeros(4), top1_accuracy, (1, 3))

    assert ModelInputs.of(task_inputs(task(torch.randn(40, 3)), 1)).shape == (1, 3)
    got = task_inputs(task(named(40)), 1)
    assert set(got) == {"input_ids", "attention_mask"} and len(got["input_ids"]) == 32
    ids = task_inputs(task(torch.arange(12).reshape(4, 3)), 8)  # integer single tensor
    assert ids.dtype == torch.int64 and ids.shape == (4, 3)


def test_tvm_composer_refuses_named_and_integer_inputs_with_the_reason():
    from autoquant.backends.tvm.model import UnsupportedModel, composable_inputs

    assert composable_inputs((1, 1, 8, 8)) == (1, 1, 8, 8)
    with pytest.raises(UnsupportedModel, match=r"named inputs \(input_ids, attention_mask\)"):
        composable_inputs(named())
    with pytest.raises(UnsupportedModel, match="integer inputs"):
        composable_inputs(torch.arange(6).reshape(2, 3))
