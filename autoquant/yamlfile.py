"""A user's YAML file read and validated into a pydantic model: every mistake comes out as one
``UserError`` line naming the file, the key path, the bad value (cut to a short prefix) and what
is allowed. Shared by the run spec (``spec.py``) and the hardware profiles
(``hardware/profile.py``); the reading itself, with its limits, is ``autoquant.safeyaml``'s."""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from autoquant.errors import SHOWN_CHARS, UserError, show
from autoquant.safeyaml import MAX_YAML_BYTES, read_yaml

__all__ = ["MAX_YAML_BYTES", "format_validation_error", "parse_model", "read_yaml"]


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = str(part) if len(str(part)) <= SHOWN_CHARS else show(part)
            out += f".{name}" if out else name
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
        message = f"unknown key {show(loc[-1])}; allowed keys: {allowed}"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = f"bad value {show(value)}: {first['msg'].removeprefix('Value error, ')}"
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
