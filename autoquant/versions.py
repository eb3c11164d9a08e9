"""Tool, package and machine versions, recorded beside every result."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

PACKAGES = ("autoquant", "torch", "optuna", "numpy", "pandas", "xgboost", "onnx", "onnxruntime",
            "onnxscript", "ml_dtypes", "apache-tvm")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    from importlib import metadata

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cpu"] = cpu_name()
    out["cpu_count"] = str(os.cpu_count())
    return out
