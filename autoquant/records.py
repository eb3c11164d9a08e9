"""Versioned ``{"_type", "_version", "_data"}`` records: the one loader check every persisted
value shares, so a file of another type or version is refused, never half-read."""

from __future__ import annotations

from typing import Any


def record_data(data: Any, type_name: str, version: int) -> Any:
    """The ``_data`` of a record of ``type_name`` at ``version``; ``ValueError`` otherwise."""
    if not isinstance(data, dict) or data.get("_type") != type_name:
        found = data.get("_type") if isinstance(data, dict) else type(data).__name__
        article = "an" if type_name[:1].lower() in "aeiou" else "a"
        raise ValueError(f"not {article} {type_name} record: _type={found!r}")
    if data.get("_version") != version:
        raise ValueError(
            f"{type_name} version {data.get('_version')!r} is not supported; "
            f"this autoquant reads version {version}"
        )
    return data["_data"]
