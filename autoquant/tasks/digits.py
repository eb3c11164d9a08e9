"""Built-in tasks on scikit-learn's bundled digits data (1797 8x8 images, no download).

Models are trained deterministically at first use (seconds on 2 cores) and cached as a
``state_dict`` under the cache directory; loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoquant.tasks.base import Task, evaluate, top1_accuracy

RECIPE_VERSION = 1
MIN_FP32_ACCURACY = 0.95


def cache_dir() -> Path:
    root = os.environ.get("AUTOQUANT_CACHE_DIR") or Path.home() / ".cache" / "autoquant"
    return Path(root)


def digits_splits(seed: int = 0):
    """(train_x, train_y, eval_x, eval_y) as float tensors in [0, 1], images ``[N, 1, 8, 8]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    tx, ex, ty, ey = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return (torch.from_numpy(tx), torch.from_numpy(ty), torch.from_numpy(ex), torch.from_numpy(ey))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    def __init__(self, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        dims = (64, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class DigitsWide(nn.Module):
    """A wide conv net on the same 8x8 digits, sized so that compute, not memory, dominates its
    latency: about 80M MACs per image against 10 MB of float32 weights, well under a server
    CPU's L3 whatever the config. (A weight-heavy layer near the L3 size makes a kernel's time
    depend on what else shares the cache, which no per-layer table can predict.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv4 = nn.Conv2d(256, 256, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv5 = nn.Conv2d(256, 512, 3, padding=1)
        self.fc1 = nn.Linear(512 * 2 * 2, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = self.pool(torch.relu(self.conv4(x)))
        x = self.pool(torch.relu(self.conv5(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
    model.eval()


def _cached_model(
    name: str,
    factory,
    x,
    y,
    *,
    epochs: int,
    score: Callable[[nn.Module], float],
    train=_train,
    recipe: str = "",
) -> tuple[nn.Module, float]:
    """(model, its float32 metric): ``factory()`` trained by ``train(model, x, y, epochs=,
    seed=0)``, or loaded from the cache. ``recipe`` names what else the weights depend on (data preprocessing, a training recipe
    other than ``_train``): a changed recipe retrains.

    ``score(model)`` is the float32 metric on the evaluation data. It is recorded beside the
    weights when they are trained and checked when they are loaded: weights that load but score
    otherwise (damaged, overwritten, all zeros) are retrained, with one line on stderr, instead
    of failing every run that uses the task."""
    model = factory()
    # The architecture's repr (every layer's shape) is in the key: a changed net retrains.
    material = f"{name}-{RECIPE_VERSION}-{epochs}-{torch.__version__}-{model!r}"
    key = hashlib.sha256((material + (f"-{recipe}" if recipe else "")).encode()).hexdigest()
    path = cache_dir() / "tasks" / f"{name}-{key[:12]}.pt"
    record = path.with_suffix(".json")
    if path.exists():
        problem, metric = _cache_problem(name, model, path, score)
        if problem is None:
            return model.eval(), metric
        print(  # noqa: T201 - the one line a user needs, before seconds of training
            f"autoquant: {path}: {problem}; retraining the {name} task",
            file=sys.stderr,
        )
        path.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    torch.manual_seed(0)
    model = factory()
    train(model, x, y, epochs=epochs, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # weights first, their record last: a record always describes weights that are in place
    _atomic(path, lambda tmp: torch.save(model.state_dict(), tmp))
    metric = score(model)
    _write_record(record, name, metric)
    return model, metric


def _write_record(record: Path, name: str, metric: float) -> None:
    body = {"_type": "TaskCache", "_version": 1, "task": name, "fp32_metric": metric}
    _atomic(record, lambda tmp: tmp.write_text(json.dumps(body)))


def _cache_problem(name: str, model: nn.Module, path: Path, score) -> tuple[str | None, float]:
    """(None, metric) when the cached weights load and score what was recorded at training
    time, else (why not, NaN)."""
    record = path.with_suffix(".json")
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except Exception as exc:  # a damaged file is retrained, never trusted
        return f"cached weights do not load ({type(exc).__name__})", math.nan
    model.eval()
    got = score(model)
    if not record.exists():  # cached before records were kept: the built-in floor vouches
        if got >= MIN_FP32_ACCURACY:
            with contextlib.suppress(OSError):  # a cache shared read-only still loads
                _write_record(record, name, got)
            return None, got
        return f"cached weights score {got:.4f} < {MIN_FP32_ACCURACY}", math.nan
    try:
        recorded = float(json.loads(record.read_text())["fp32_metric"])
    except (OSError, ValueError, KeyError, TypeError):
        return "the record of the cached weights' float32 metric is unreadable", math.nan
    # the same weights on the same data give the same metric; a thread count can move a
    # float sum, so allow a hair, far below one sample of the evaluation set
    if not math.isclose(got, recorded, rel_tol=0.0, abs_tol=1e-4):
        return f"cached weights score {got:.4f}, recorded {recorded:.4f} when trained", math.nan
    return None, got


def _atomic(path: Path, write) -> None:
    tmp = path.with_suffix(f"{path.suffix}.tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def _digits_task(
    name: str, factory, *, epochs: int, description: str, calibration_samples: int = 256
) -> Task:
    tx, ty, ex, ey = digits_splits()

    def task_of(model: nn.Module) -> Task:
        return Task(
            name=name,
            model=model,
            calibration_inputs=tx[:calibration_samples],
            eval_inputs=ex,
            eval_targets=ey,
            metric=top1_accuracy,
            input_shape=(1, 1, 8, 8),
            description=description,
        )

    model, accuracy = _cached_model(
        name, factory, tx, ty, epochs=epochs, score=lambda m: evaluate(task_of(m), m)
    )
    if accuracy < MIN_FP32_ACCURACY:
        raise RuntimeError(f"built-in task {name} trained to {accuracy:.3f} < {MIN_FP32_ACCURACY}")
    return task_of(model)


def digits_cnn() -> Task:
    return _digits_task(
        "digits-cnn",
        DigitsCNN,
        epochs=30,
        description="2 conv + 2 linear layers on scikit-learn digits (8x8), 72k params",
    )


def digits_mlp() -> Task:
    return _digits_task(
        "digits-mlp",
        DigitsMLP,
        epochs=30,
        description="3-layer MLP 64-256-128-10 on scikit-learn digits, 50k params",
    )


def digits_wide() -> Task:
    return _digits_task(
        "digits-wide",
        DigitsWide,
        epochs=10,
        description="wide conv net (5 conv + 2 linear, 64-512 channels) on scikit-learn "
        "digits, 2.7M params, about 80M MACs per image",
    )
