"""Workers that bring their own hardware profile (``autoquant worker --hardware``): the profile
replaces the spec's profile of the same name, and a worker whose profile is another target than
the one the study's latency was measured on is refused before it measures anything."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, SMALL_SPACE, write

from autoquant.errors import UserError
from autoquant.hardware import override_hardware, resolve_hardware
from autoquant.latency.model import LatencyModel, model_from_state
from autoquant.measure.timing import KernelTiming
from autoquant.search.latency import RunLatency
from autoquant.search.targets import TARGET_ATTR, check_latency_targets
from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

# ONNX Runtime on this CPU with a short timing budget: digits-mlp profiles in seconds
LIGHT_ORT = {
    "version": 1,
    "name": "ort-light",
    "target": {"kind": "llvm", "mcpu": "auto"},
    "device": {"where": "local"},
    "runtime": "onnxruntime",
    "threads": 1,
    "batch_size": 1,
    "formats": ["fp32", "w8a8", "weight_only"],
    "measure": {"warmup": 1, "number": 1, "repeat": 3, "min_repeat_ms": 2, "timeout_s": 60},
    "end_to_end": {"calibration_configs": 4, "rounds": 1, "repeat": 1},
}


def profile_file(path: Path, **changes) -> Path:
    return write(path, yaml.safe_dump({**LIGHT_ORT, **changes}))


def worker_spec(tmp: Path) -> Path:
    write(tmp / "space.yaml", SMALL_SPACE)
    profile_file(tmp / "ort-light.yaml")
    return write(
        tmp / "spec.yaml",
        "version: 1\nname: targets\ntask: digits-mlp\nspace: space.yaml\n"
        "objectives: [accuracy, latency, size]\nhardware: [ort-light.yaml]\nhardware_validation: 0\n"
        "search: {sampler: random, trials: 3, seed: 0}\nevaluation: {eval_samples: 300}\n"
        "workers: {heartbeat_interval_s: 1, grace_period_s: 3, retry_s: 4}\n",
    )


# --- the override ---------------------------------------------------------------------------------


def test_own_profile_replaces_the_spec_profile_of_its_name(tmp_path):
    spec = worker_spec(tmp_path / "spec")
    (tmp_path / "mine").mkdir()
    mine = profile_file(tmp_path / "mine" / "board.yaml", threads=2)
    resolved = resolve_hardware(["ort-light.yaml"], spec)
    replaced = override_hardware(resolved, ["board.yaml"], cwd=tmp_path / "mine")
    assert [r.name for r in replaced] == ["ort-light"]
    assert replaced[0].path == mine and replaced[0].spec.threads == 2
    assert override_hardware(resolved, [], cwd=tmp_path) == resolved


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("other.yaml", "profile name 'other' is not one of the spec's hardware; allowed: a profile named ort-light"),
        ("missing.yaml", "profile file not found"),
        ("no-such-builtin", "no such hardware profile"),
    ],
)
def test_bad_own_profile_is_refused_naming_the_option(tmp_path, given, message):
    spec = worker_spec(tmp_path)
    profile_file(tmp_path / "other.yaml", name="other")
    resolved = resolve_hardware(["ort-light.yaml"], spec)
    with pytest.raises(UserError) as info:
        override_hardware(resolved, [given], cwd=tmp_path)
    assert info.value.key == "--hardware" and message in str(info.value)
    assert "current directory" in str(info.value) or "not one of" in str(info.value)


# --- the study's targets --------------------------------------------------------------------------


LAYER = LayerInfo("fc", "linear", (4, 8), (1, 8), (1, 4), 32, 36, True)


def _latency(name: str, fingerprint_hash: str, threads: int, intercept_us: float = 0.0) -> RunLatency:
    fidelity = {
        "fingerprint_hash": fingerprint_hash,
        "fingerprint": {"host_cpu": "Some CPU", "runtime": "onnxruntime", "threads": threads},
    }
    per_layer = {
        ("fc", "f32-a32"): KernelTiming("measured", "ort:fp32", median_us=10.0, min_us=9.0),
        ("fc", "w8cs-a8"): KernelTiming("measured", "ort:w8a8", median_us=4.0, min_us=3.5),
        ("fc", "w4cs-a32"): KernelTiming.failed("no kernel"),
    }
    model = LatencyModel((LAYER,), per_layer, intercept_us, {"integer": 1.2}, term_us={"changes": 2.0})
    return RunLatency(name, model, fidelity)


def _study(tmp_path: Path):
    import optuna

    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s", directions=["maximize"]
    )


def test_first_worker_records_the_target_others_must_match(tmp_path):
    study = _study(tmp_path)
    first = check_latency_targets(study, [_latency("board", "aaa", 1, 5.0)], spec_file="spec.yaml")
    assert study.user_attrs[TARGET_ATTR + "board"]["fingerprint_hash"] == "aaa"
    config = QuantConfig.from_mapping({"fc": QuantChoice(8, 8, "per_channel")})
    assert first[0].predict(config).value == pytest.approx((5.0 + 1.2 * 4.0) / 1000)
    # the same target again (another machine of the same kind, its own fit): accepted, and it
    # predicts with the study's model, not its own
    again = check_latency_targets(study, [_latency("board", "aaa", 1, 50.0)], spec_file="spec.yaml")
    assert again[0].model.intercept_us == 5.0 and again[0].model.term_us == {"changes": 2.0}
    assert again[0].predict(config).value == first[0].predict(config).value
    assert again[0].predict(QuantConfig.from_mapping({"fc": QuantChoice(4, 32, "per_channel")})).source == "failed"
    # another target, from the spec: names the spec's entry
    with pytest.raises(UserError) as info:
        check_latency_targets(study, [_latency("board", "bbb", 4)], spec_file="spec.yaml")
    text = str(info.value)
    assert info.value.key == "hardware[0]" and info.value.file == "spec.yaml"
    assert "threads 4" in text and "threads 1" in text and "bbb" in text and "aaa" in text
    # another target this worker brought itself: names --hardware
    with pytest.raises(UserError) as info:
        check_latency_targets(
            study, [_latency("board", "bbb", 4)], spec_file="spec.yaml", overridden={"board"}
        )
    assert info.value.key == "--hardware" and info.value.file is None
    assert study.user_attrs[TARGET_ATTR + "board"]["fingerprint_hash"] == "aaa"


@pytest.mark.parametrize(
    "record",
    [
        "not a mapping",
        {"fingerprint_hash": "aaa", "model": {"statistic": "median"}},
        {"fingerprint_hash": "aaa", "model": "x"},
    ],
)
def test_a_record_that_is_no_model_is_one_line_not_a_traceback(tmp_path, record):
    study = _study(tmp_path)
    study.set_user_attr(TARGET_ATTR + "board", record)
    with pytest.raises(UserError) as info:
        check_latency_targets(study, [_latency("board", "aaa", 1)], spec_file="spec.yaml")
    assert info.value.key == "hardware[0]" and "\n" not in str(info.value)


# --- end to end -----------------------------------------------------------------------------------


def _worker(args: list, cwd: Path, cache: str = "cache") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "autoquant.cli", "worker", *map(str, args), "--quiet"],
        cwd=cwd,
        env={**env, "AUTOQUANT_CACHE_DIR": str(cwd / cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_worker_with_another_target_is_refused_one_with_its_own_route_joins(tmp_path):
    spec = worker_spec(tmp_path)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = _worker([spec, "--storage", url], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    # this machine's own profile of the same name, but another target (threads): refused
    profile_file(tmp_path / "four-threads.yaml", threads=2)
    other = _worker([spec, "--storage", url, "--hardware", "four-threads.yaml"], tmp_path)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1, other.stderr[-2000:]
    assert "--hardware" in lines[0] and "threads 2" in lines[0] and "threads 1" in lines[0]
    # the same target given from another file, on "another machine" (an empty latency table):
    # joins the study and predicts with the study's model, nothing profiled or timed
    profile_file(tmp_path / "same.yaml", description="the same CPU, my copy")
    args = [spec, "--storage", url, "--hardware", "same.yaml", "--trials", "4"]
    same = _worker(args, tmp_path, cache="other-machine")
    assert same.returncode == 0, same.stderr[-2000:]
    assert "1 configs measured here" in same.stdout, same.stdout
    with sqlite3.connect(tmp_path / "other-machine" / "latency.sqlite") as conn:
        assert conn.execute("select count(*) from timings").fetchone() == (0,)
    # every config of the study predicted by one model: the one the first worker recorded
    study = optuna.load_study(study_name="targets", storage=url)
    model = model_from_state(_mlp_layers(), study.user_attrs[TARGET_ATTR + "ort-light"]["model"])
    measured = [t for t in study.trials if "figures" in t.user_attrs]
    assert len(measured) == 4
    for t in measured:
        config = QuantConfig.from_json(t.user_attrs["config"])
        figure = json.loads(t.user_attrs["figures"])["latency_ms@ort-light"]
        assert figure["value"] == pytest.approx(model.predict(config).value)
        assert figure["source"] == "predicted"


def _mlp_layers():
    from autoquant.space.discovery import discover_layers
    from autoquant.tasks import load_task

    task = load_task("digits-mlp")
    return tuple(discover_layers(task.model, task.example_inputs()))
