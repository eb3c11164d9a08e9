"""The built-in tasks' weight cache: weights that load but are wrong are retrained, not used.

Each test has its own cache directory (AUTOQUANT_CACHE_DIR), seeded with a copy of the shared
cache's digits-mlp weights when there are any, so the shared cache is never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    from autoquant.tasks.digits import cache_dir

    shared = cache_dir() / "tasks"
    monkeypatch.setenv("AUTOQUANT_CACHE_DIR", str(tmp_path))
    (tmp_path / "tasks").mkdir()
    for weights in shared.glob("digits-mlp-*.pt") if shared.is_dir() else ():
        shutil.copy(weights, tmp_path / "tasks" / weights.name)  # saves a training
    return tmp_path / "tasks"


def test_wrong_cached_weights_are_retrained(cache, capsys):
    from autoquant.tasks.base import evaluate
    from autoquant.tasks.digits import digits_mlp

    task = digits_mlp()
    (weights,) = cache.glob("digits-mlp-*.pt")
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["fp32_metric"] == pytest.approx(evaluate(task, task.model))
    capsys.readouterr()
    # weights that load fine but are wrong: all zeros
    zeros = {k: torch.zeros_like(v) for k, v in torch.load(weights, weights_only=True).items()}
    torch.save(zeros, weights)
    again = digits_mlp()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(weights) in lines[0] and "retraining" in lines[0], err
    assert "recorded" in lines[0]
    assert evaluate(again, again.model) == pytest.approx(record["fp32_metric"], abs=1e-4)
    reloaded = digits_mlp()  # now from the cache again, without a word
    assert capsys.readouterr().err == ""
    assert evaluate(reloaded, reloaded.model) == pytest.approx(record["fp32_metric"], abs=1e-4)


def test_wrong_weights_without_a_record_are_retrained(cache, capsys):
    """A cache written before records were kept: the built-in accuracy floor vouches."""
    from autoquant.tasks.digits import digits_mlp

    digits_mlp()
    (weights,) = cache.glob("digits-mlp-*.pt")
    weights.with_suffix(".json").unlink()
    zeros = {k: torch.zeros_like(v) for k, v in torch.load(weights, weights_only=True).items()}
    torch.save(zeros, weights)
    capsys.readouterr()
    digits_mlp()
    assert "retraining" in capsys.readouterr().err
    assert weights.with_suffix(".json").exists()
