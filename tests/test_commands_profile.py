"""The ``profile`` and ``hw`` commands through typer, as the CLI will register them."""

from __future__ import annotations

import json

import pytest
import typer
import yaml
from conftest import tvm_or_skip
from typer.testing import CliRunner

from autoquant.commands.profile import hw, profile
from autoquant.errors import MachineError

pytestmark = pytest.mark.requires_tvm


@pytest.fixture(scope="module")
def app():
    tvm_or_skip()
    application = typer.Typer()
    application.command()(profile)
    application.command()(hw)
    return application


@pytest.fixture
def fast_profile(tmp_path):
    from autoquant.hardware.profile import PROFILES_DIR

    data = yaml.safe_load((PROFILES_DIR / "cpu-local.yaml").read_text())
    data.update(name="fast", threads=2)
    data["measure"].update(repeat=3, min_repeat_ms=2, warmup=0)
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_profile_twice_then_json(app, fast_profile, tmp_path):
    runner = CliRunner()
    table = tmp_path / "lat.sqlite"
    args = [
        "profile",
        str(fast_profile),
        "--task",
        "digits-mlp",
        "--choices",
        "f32-a32,w4g32s-a32",
        "--table",
        str(table),
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "6 kernels measured now, 0 reused" in first.output
    out = tmp_path / "t.json"
    second = runner.invoke(app, [*args, "--json", str(out), "--quiet"])
    assert second.exit_code == 0, second.output
    assert "0 kernels measured now, 6 reused" in second.output
    data = json.loads(out.read_text())
    assert data["counts"]["reused"] == 6 and len(data["entries"]) == 6
    assert {e["choice"] for e in data["entries"]} == {"f32-a32", "w4g32s-a32"}
    assert all(e["median_us"] > 0 for e in data["entries"])


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--validate", "1", "--choices", "w7cs-a8"], ["--choices", "w7cs-a8"]),
        (["--choices", "w5cs-a8"], ["--choices", "w5cs-a8"]),
        (["--repeat", "3", "--min-repeat-ms", "-1"], ["min"]),
    ],
)
def test_profile_bad_options(app, fast_profile, extra, words):
    result = CliRunner().invoke(app, ["profile", str(fast_profile), "--task", "digits-mlp", *extra])
    text = str(result.exception) + result.output
    assert result.exit_code != 0
    for word in words:
        assert word in text, text


def test_validate_on_an_onnxruntime_profile(app, tmp_path):
    """ONNX Runtime profiles check their model too: exported graphs timed end to end."""
    pytest.importorskip("onnxruntime")
    path = tmp_path / "ort.yaml"
    path.write_text(yaml.safe_dump({
        "name": "ort-fast",
        "target": {"kind": "llvm"},
        "runtime": "onnxruntime",
        "threads": 2,
        "measure": {"warmup": 1, "repeat": 3, "min_repeat_ms": 2},
        "end_to_end": {"calibration_configs": 2, "rounds": 2},
    }))
    out = tmp_path / "ort.json"
    args = ["profile", str(path), "--task", "digits-mlp", "--choices", "f32-a32,w8cs-a8",
            "--validate", "2", "--table", str(tmp_path / "t.sqlite"), "--json", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["validation"]
    assert data["calibration"]["configs"] == 2 and data["validation"]["summary"]["measured"] == 2
    assert "held-out configs" in result.output and "end to end: 4 configs measured now" in result.output


def test_hw_lists_profiles(app, tmp_path):
    result = CliRunner().invoke(app, ["hw", "--timeout", "0.5"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("cpu-local", "cuda-sm90", "arm64-rpc"):
        assert name in result.output
    assert "yes (local)" in result.output and "no: tracker unreachable" in result.output
    bad = tmp_path / "profiles"
    bad.mkdir()
    (bad / "broken.yaml").write_text("name: x\ntarget: {kind: fpga}\n")
    listed = CliRunner().invoke(app, ["hw", "--directory", str(bad)], env={"COLUMNS": "250"})
    assert "invalid" in listed.output and "fpga" in listed.output


def test_validate_with_an_unreachable_device_is_one_machine_failure(app, tmp_path):
    """The device, not the input, failed: one failure for the whole profile (exit 1), before
    --validate has anything to check."""

    args = ["profile", "arm64-rpc", "--task", "digits-mlp", "--validate", "2", "--choices",
            "f32-a32", "--table", str(tmp_path / "t.sqlite")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, MachineError)
    assert "cannot be reached" in str(result.exception)
    assert "tracker unreachable" in str(result.exception)
