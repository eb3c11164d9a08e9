"""``manifest.json``: what was exported, what the search promised, what was re-measured.

Versioned like every persisted record (``{"_type", "_version", ...}``); ``load_manifest`` reads
only known versions.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autoquant.errors import UserError
from autoquant.versions import package_versions

MANIFEST_TYPE = "ExportManifest"
MANIFEST_VERSION = 1
PROMISED_FIGURES = (
    "accuracy",
    "accuracy_drop",
    "size_bytes",
    "size_ratio",
    "mean_weight_bits",
    "bops",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def promised_figures(row: Any) -> dict[str, dict[str, Any]]:
    """The search's figures for the picked row, each with its source (measured/exact/predicted)."""
    import math

    out = {}
    for name in PROMISED_FIGURES:
        if name not in row.index:
            continue
        value = float(row[name])
        if math.isnan(value):
            continue
        source = row.get(f"{name}_source")
        if not isinstance(source, str):
            source = {"accuracy_drop": "measured", "size_ratio": "exact"}.get(name, "unknown")
        out[name] = {"value": value, "source": source}
    for col in row.index:
        if str(col).startswith("latency") and not str(col).endswith("_source"):
            value = float(row[col])
            if not math.isnan(value):
                out[str(col)] = {"value": value, "source": str(row.get(f"{col}_source", "unknown"))}
    return out


def build_manifest(**fields: Any) -> dict[str, Any]:
    return {
        "_type": MANIFEST_TYPE,
        "_version": MANIFEST_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "versions": package_versions(),
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    from autoquant.rundir import atomic_write_text

    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False, default=_default) + "\n")


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def load_manifest(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("_type") != MANIFEST_TYPE or data.get("_version") != MANIFEST_VERSION:
        raise UserError(
            f"not an export manifest this autoquant reads: _type={data.get('_type')!r} "
            f"_version={data.get('_version')!r}; allowed: {MANIFEST_TYPE} version {MANIFEST_VERSION}",
            file=str(path),
        )
    return data
