"""Built-in tasks by name, and a user's own task from ``package.module:function``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.tasks.base import Task


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    target: str
    description: str


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask(
            "digits-cnn",
            "autoquant.tasks.digits:digits_cnn",
            "conv net on scikit-learn digits (8x8), 2 conv + 2 linear layers",
        ),
        BuiltinTask(
            "digits-mlp",
            "autoquant.tasks.digits:digits_mlp",
            "MLP 64-256-128-10 on scikit-learn digits",
        ),
        BuiltinTask(
            "digits-wide",
            "autoquant.tasks.digits:digits_wide",
            "wide conv net on scikit-learn digits: 5 conv + 2 linear, 2.7M params, >1 ms/image",
        ),
    )
}


def _resolve(target: str, *, file: str, key: str, search_dir: Path | None) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    added = False
    if search_dir is not None and str(search_dir) not in sys.path:
        # A task module beside the spec file is importable without installing it.
        sys.path.insert(0, str(search_dir))
        added = True
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise UserError(
            f"bad value {target!r}: module {module_name!r} does not import "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "allowed: an importable package.module:function",
            file=file,
            key=key,
        ) from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(
            f"bad value {target!r}: module {module_name!r} has no function {attr!r}; "
            "allowed: an importable package.module:function",
            file=file,
            key=key,
        )
    return function


def load_task(task_spec, *, file: str = "spec", spec_dir: Path | None = None) -> Task:
    """A ``Task`` from a built-in name or a ``UserTaskSpec`` (function + args)."""
    if isinstance(task_spec, str):
        builtin = BUILTIN_TASKS.get(task_spec)
        if builtin is None:
            raise UserError(
                f"bad value {task_spec!r}: not a built-in task; allowed: "
                f"{', '.join(BUILTIN_TASKS)}, or {{function: package.module:function}}",
                file=file,
                key="task",
            )
        function = _resolve(builtin.target, file=file, key="task", search_dir=None)
        return with_batchnorm_folded(function())
    function = _resolve(task_spec.function, file=file, key="task.function", search_dir=spec_dir)
    try:
        task = function(**task_spec.args)
    except TypeError as exc:
        raise UserError(
            f"bad value {task_spec.args!r}: {task_spec.function} does not take these arguments ({exc})",
            file=file,
            key="task.args",
        ) from None
    if not isinstance(task, Task):
        raise UserError(
            f"bad value {task_spec.function!r}: returned {type(task).__name__}; "
            "allowed: a function returning autoquant.tasks.Task",
            file=file,
            key="task.function",
        )
    return with_batchnorm_folded(task)


def with_batchnorm_folded(task: Task) -> Task:
    """``task`` with its model replaced by a copy whose ``Conv2d -> BatchNorm2d`` pairs are
    folded (``autoquant.quant.fold``): what every later stage quantizes, measures and exports."""
    import dataclasses

    from autoquant.quant.fold import fold_batchnorm

    result = fold_batchnorm(task.model)
    if not result.folded and not result.left:
        return task
    return dataclasses.replace(
        task, model=result.model, folded_batchnorm=result.folded, unfolded_batchnorm=result.left
    )
