from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _main(args: list) -> int:
    """``autoquant ARGS`` in-process the way the console script runs it; its exit code."""
    from autoquant.cli import main

    old = sys.argv
    sys.argv = ["autoquant", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return 0


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``autoquant`` in-process the way the console script does; return (code, out, err)."""
    code = _main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_captured(args: list) -> tuple[int, str, str]:
    """``run_cli`` where pytest's capsys is not at hand (a module fixture, a hypothesis
    example): (code, out, err) from sys.stdout / sys.stderr redirected, which is where rich's
    consoles write at print time."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def cnn_task():
    from autoquant.tasks import load_task

    return load_task("digits-cnn")


@pytest.fixture(scope="session")
def cnn_layers(cnn_task):
    from autoquant.space.discovery import discover_layers

    return discover_layers(cnn_task.model, cnn_task.input_shape)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


SMALL_SPACE = """\
version: 1
rules:
  - match: {}
    weight_bits: [4, 8, 32]
    act_bits: [8, 32]
    granularity: [per_channel]
"""


def small_spec(tmp: Path, *, name: str = "small", trials: int = 12, extra: str = "") -> Path:
    write(tmp / "space.yaml", SMALL_SPACE)
    return write(
        tmp / "spec.yaml",
        f"version: 1\nname: {name}\ntask: digits-mlp\nspace: space.yaml\n"
        f"search: {{sampler: nsga2, trials: {trials}, population_size: 6, seed: 0}}\n{extra}",
    )


def tvm_or_skip():
    """Skip without TVM; size TVM's thread pool first (it can shrink later, never grow)."""
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    return pytest.importorskip("tvm")


def write_profile(tmp_path: Path, data: dict):
    """A hardware profile from ``data``, written as ``<name>.yaml`` under ``tmp_path`` and loaded."""
    import yaml

    from autoquant.hardware.profile import load_profile

    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(path)


# A local CPU profile with a short timing budget, for backend tests.
FAST_PROFILE = {
    "version": 1,
    "name": "test-cpu",
    "target": {"kind": "llvm", "mcpu": "auto"},
    "device": {"where": "local"},
    "runtime": "tvm",
    "threads": 2,
    "batch_size": 1,
    "measure": {"warmup": 1, "number": 1, "repeat": 3, "min_repeat_ms": 2, "timeout_s": 60},
}


def fast_profile(tmp_path: Path, **changes):
    """``FAST_PROFILE`` with top-level keys replaced, written and loaded."""
    return write_profile(tmp_path, {**FAST_PROFILE, **changes})


@pytest.fixture(scope="module")
def mlp_layers():
    from autoquant.space.discovery import discover_layers
    from autoquant.tasks.digits import DigitsMLP

    return discover_layers(DigitsMLP(), (1, 1, 8, 8))  # shapes only: no training needed
