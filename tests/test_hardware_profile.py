"""Hardware profile YAML: the shipped profiles load; every mistake is one line naming file/key/value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import tvm_or_skip

from autoquant.errors import UserError
from autoquant.hardware.profile import (
    HardwareProfileSpec,
    builtin_profiles,
    find_profile,
    load_profile_spec,
)

SHIPPED = {"cpu-local", "cpu-local-ort", "cuda-sm90", "arm64-rpc"}

GOOD = {
    "version": 1,
    "name": "t",
    "target": {"kind": "llvm", "mcpu": "auto"},
    "device": {"where": "local"},
    "runtime": "tvm",
    "threads": 2,
    "batch_size": 1,
    "measure": {"warmup": 0, "number": 1, "repeat": 3, "min_repeat_ms": 1, "timeout_s": 30},
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_shipped_profiles_validate():
    names = {load_profile_spec(p).name for p in builtin_profiles()}
    assert SHIPPED <= names
    for path in builtin_profiles():
        assert load_profile_spec(path).name == path.stem


def test_good_profile_defaults(tmp_path):
    spec = load_profile_spec(write(tmp_path, {"name": "x", "target": {"kind": "llvm"}}))
    assert spec.device.where == "local" and spec.runtime == "tvm"
    assert spec.measure.min_repeat_ms == 200 and spec.measure.repeat >= 3
    assert spec.tuning is None and "w8a8" in spec.formats


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"threads": 0}, "threads", ["0"]),
        ({"runtime": "tensorrt"}, "runtime", ["tensorrt", "tvm", "onnxruntime"]),
        ({"measure": {"repeat": 1}}, "measure.repeat", ["1", "3"]),
        ({"measure": {"min_repeat_ms": -5}}, "measure.min_repeat_ms", ["-5"]),
        ({"measure": {"repaet": 5}}, "measure.repaet", ["repaet", "repeat"]),
        ({"colour": "red"}, "colour", ["colour", "target"]),
        ({"target": {"kind": "fpga"}}, "target", ["fpga", "llvm"]),
        ({"target": {"kind": "llvm", "mcpu": "native"}}, "target", ["native", "auto"]),
        ({"formats": ["int1"]}, "formats[0]", ["int1", "w8a8"]),
        ({"batch_size": "big"}, "batch_size", ["big"]),
        ({"device": {"where": "rpc", "key": "x"}}, "device", ["tracker"]),
        (
            {"device": {"where": "rpc", "tracker": "host", "key": "x"}},
            "device.tracker",
            ["host", "port"],
        ),
        (
            {"device": {"where": "rpc", "tracker": "h:9190", "key": "x"}},
            "(top level)",
            ["mcpu", "auto"],
        ),
        ({"schedule": {"parallel_min_macs": -1}}, "schedule.parallel_min_macs", ["-1"]),
        ({"tuning": {"build_timeout_s": 0}}, "tuning.build_timeout_s", ["0"]),
        ({"execution_provider": "cuda"}, "execution_provider", ["cuda", "ExecutionProvider"]),
        (
            {"execution_provider": "CUDAExecutionProvider"},
            "(top level)",
            ["execution_provider", "onnxruntime"],
        ),
    ],
)
def test_profile_errors_are_one_line(tmp_path, change, key, words):
    data = {**GOOD, **change}
    path = write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_profile_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert key in message, message
    for word in words:
        assert word in message, message


def test_not_yaml_and_not_mapping(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_profile_spec(write(tmp_path, "name: [unclosed"))
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_profile_spec(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(UserError, match="file not found"):
        load_profile_spec(tmp_path / "missing.yaml")


def test_find_profile_by_name_and_unknown():
    assert find_profile("cpu-local").name == "cpu-local.yaml"
    with pytest.raises(UserError) as info:
        find_profile("no-such-device")
    assert "no-such-device" in str(info.value) and "cpu-local" in str(info.value)


def test_rpc_profile_needs_explicit_cpu_and_threads():
    data = {
        **GOOD,
        "device": {"where": "rpc", "tracker": "127.0.0.1:9190", "key": "k"},
        "target": {"kind": "llvm", "mcpu": "cortex-a72"},
        "threads": "auto",
    }
    with pytest.raises(Exception, match="threads"):
        HardwareProfileSpec.model_validate(data)


@pytest.mark.requires_tvm
def test_resolve_fills_auto(tmp_path):
    tvm_or_skip()
    from autoquant.hardware.profile import load_profile

    prof = load_profile(write(tmp_path, GOOD))
    assert prof.target["mcpu"] not in ("auto", "native", "")
    assert prof.target["num-cores"] == 2 and prof.threads == 2
    faster = prof.with_overrides(batch_size=4, min_repeat_ms=5)
    assert faster.spec.batch_size == 4 and faster.spec.measure.min_repeat_ms == 5
    with pytest.raises(UserError, match="measure.repeat"):
        prof.with_overrides(repeat=1)
