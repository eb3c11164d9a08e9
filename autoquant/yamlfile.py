"""A user's YAML file read and validated into a pydantic model: every mistake comes out as one
``UserError`` line naming the file, the key path, the bad value and what is allowed. Shared by
the run spec (``spec.py``) and the hardware profiles (``hardware/profile.py``)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from autoquant.errors import UserError

MAX_YAML_BYTES = 1 << 20


def read_yaml(path: Path) -> Any:
    """safe_load with a size cap; a missing or unreadable file is a UserError."""
    if not path.exists():
        raise UserError("file not found", file=str(path))
    if not path.is_file():
        raise UserError("is not a file", file=str(path))
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"file is {size} bytes; at most {MAX_YAML_BYTES} allowed", file=str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"not valid YAML{where}: {problem}", file=str(path)) from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", file=str(path)) from None


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk field annotations along ``loc`` to the model class that holds the last key."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None if part not in {"UserTaskSpec", "SearchSpaceSpec"} else current
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return annotation


def format_validation_error(exc: ValidationError, model: type[BaseModel], file: str) -> UserError:
    errors = exc.errors(include_url=False)
    # For unions pydantic reports every branch; the branch whose name matches the input's shape
    # says the most, so prefer errors that are not about the wrong basic type.
    errors.sort(key=lambda e: e["type"] in {"string_type", "dict_type", "model_type"})
    first = errors[0]
    loc = tuple(
        p
        for p in first["loc"]
        if p not in {"str", "UserTaskSpec", "SearchSpaceSpec"}
        and not (isinstance(p, str) and p.startswith(("literal[", "constrained-str")))
    )
    key = _key_path(loc)
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        holder = _model_at(model, tuple(first["loc"][:-1]))
        allowed = ", ".join(holder.model_fields) if holder else "see the documentation"
        message = f"unknown key {loc[-1]!r}; allowed keys: {allowed}"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = f"bad value {value!r}: {first['msg'].removeprefix('Value error, ')}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return UserError(message + more, file=file, key=key)


def parse_model(model: type[BaseModel], data: Any, *, file: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(
            f"top level must be a mapping of keys to values, got {type(data).__name__}", file=file
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, model, file) from None
