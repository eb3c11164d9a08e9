"""``autoquant export`` end to end on a real (small) run of the default example."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli_captured

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autoquant.export.pick import Pick, choose, load_front  # noqa: E402
from autoquant.export.pipeline import ExportContext, ExportOptions, export_point  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--latency-repeats", "20"]


def cli(*args: str) -> tuple[int, str, str]:
    """Run the real ``autoquant`` entry point in-process; (exit code, stdout, stderr)."""
    return run_cli_captured(list(args))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-run") / "digits-cnn"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "autoquant.cli",
            "search",
            str(ROOT / "examples" / "digits-cnn.yaml"),
            "--out",
            str(out),
            "--trials",
            "30",
            "--quiet",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return out


@pytest.fixture(scope="session")
def exported_all(run_dir) -> tuple[int, str, str]:
    return cli("export", str(run_dir), "--all", *FAST)


def test_every_front_point_exports_checks_runs_and_keeps_its_accuracy(run_dir, exported_all):
    code, out, err = exported_all
    assert code == 0, err
    front = pd.read_csv(run_dir / "pareto.csv")
    summary = pd.read_csv(run_dir / "exports" / "summary.csv")
    assert sorted(summary["trial"]) == sorted(front["trial"])
    for trial in front["trial"]:
        manifest = json.loads(
            (run_dir / "exports" / f"trial-{trial}" / "manifest.json").read_text()
        )
        checks = {c["name"]: c for c in manifest["checks"]}
        for name in (
            "onnx_checker",
            "shape_inference",
            "ort_session_disable_all",
            "ort_session_enable_all",
            "agreement_disable_all",
            "agreement_enable_all",
            "accuracy",
            "file_size",
        ):
            assert checks[name]["ok"], checks[name]["message"]
        promised = manifest["promised"]["accuracy"]["value"]
        measured = manifest["measured"]["accuracy_ort_enable_all"]["value"]
        assert abs(measured - promised) <= 0.005
        assert manifest["measured"]["accuracy_ort_enable_all"]["source"] == "measured"
        onnx.checker.check_model(
            str(run_dir / "exports" / f"trial-{trial}" / "model.onnx"), full_check=True
        )
    assert summary["ok"].all()


def test_manifest_says_where_it_came_from_and_what_was_measured(run_dir, exported_all):
    trial = int(pd.read_csv(run_dir / "pareto.csv")["trial"].iloc[0])
    m = json.loads((run_dir / "exports" / f"trial-{trial}" / "manifest.json").read_text())
    from autoquant.space.values import QuantConfig

    config = QuantConfig.from_dict(m["config"])
    assert m["_type"] == "ExportManifest" and m["_version"] == 1
    assert m["config_hash"] == config.hash and m["trial"] == trial
    assert m["promised"]["size_bytes"]["source"] == "exact"
    from autoquant.backends.ort.session import session_threads

    # --threads 1, unless an earlier test in this process made ORT's shared pool: the manifest
    # says what the sessions really ran on, in both places
    threads = session_threads(1)
    lat = m["measured"]["latency_ms"]
    assert (
        lat["source"] == "measured"
        and lat["threads"] == threads
        and lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    )
    assert m["measured"]["fp32_latency_ms"]["median_ms"] > 0
    assert m["ort"]["intra_op_threads"] == threads and m["ort"]["levels_checked"] == [
        "ORT_DISABLE_ALL",
        "ORT_ENABLE_ALL",
    ]
    for pkg in ("onnx", "onnxruntime", "torch", "autoquant"):
        assert m["versions"][pkg] != "not installed"
    assert (
        m["files"]["model.onnx"]["bytes"]
        == (run_dir / "exports" / f"trial-{trial}" / "model.onnx").stat().st_size
    )


def test_default_pick_is_the_knee_into_run_exports_knee(run_dir):
    code, out, err = cli("export", str(run_dir), *FAST)
    assert code == 0, err
    m = json.loads((run_dir / "exports" / "knee" / "manifest.json").read_text())
    front = load_front(run_dir)
    assert m["trial"] == int(choose(front, Pick.parse("knee"))["trial"])
    assert m["pick"] == "knee"


def test_budget_picks(run_dir, tmp_path):
    front = load_front(run_dir)
    frame = front.frame
    # a cost budget takes the most accurate point inside it
    budget = float(frame["size_bytes"].median())
    row = choose(front, Pick.parse(f"max_size_bytes={budget}"))
    inside = frame[frame["size_bytes"] <= budget]
    assert row["accuracy"] == inside["accuracy"].max()
    # an accuracy budget takes the cheapest point (first cost objective: size) inside it
    drop = float(frame["accuracy_drop"].max())
    row = choose(front, Pick.parse(f"max_accuracy_drop={drop}"))
    assert row["size_bytes"] == frame["size_bytes"].min()
    assert Pick.parse("max_size_bytes=40KiB").value == 40 * 1024
    trial = int(frame["trial"].iloc[-1])
    code, _, err = cli(
        "export", str(run_dir), "--pick", f"trial={trial}", "--out", str(tmp_path / "t"), *FAST
    )
    assert code == 0, err
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["trial"] == trial


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pick", "trial=99999"], "not on the front"),
        (["--pick", "max_accuracy_drop=-1"], "no front point satisfies"),
        (["--pick", "max_size_bytes=10"], "no front point satisfies"),
        (["--pick", "max_latency_ms=1"], "no 'latency_ms' figure"),
        (["--pick", "fastest"], "allowed: knee"),
    ],
)
def test_bad_picks_are_one_line_exit_2_and_write_nothing(run_dir, tmp_path, args, needle):
    out = tmp_path / "out"
    code, stdout, err = cli("export", str(run_dir), *args, "--out", str(out))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_bad_run_dirs_and_out_paths(run_dir, tmp_path):
    code, _, err = cli("export", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_dir / "spec.yaml", empty / "spec.yaml")
    (empty / "pareto.csv").write_text("")
    code, _, err = cli("export", str(empty))
    assert code == 2 and "no Pareto front" in err
    assert not (empty / "exports").exists()
    as_file = tmp_path / "file.onnx"
    as_file.write_text("x")
    code, _, err = cli("export", str(run_dir), "--out", str(as_file))
    assert code == 2 and "exists and is not a directory" in err
    assert as_file.read_text() == "x"


def test_a_broken_promise_fails_with_exit_1_and_keeps_the_files(run_dir, tmp_path):
    """The run claims an accuracy ORT does not reproduce: the export must say which figure."""
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run_dir / "spec.yaml", broken / "spec.yaml")
    frame = pd.read_csv(run_dir / "pareto.csv")
    frame.loc[0, "accuracy"] = frame.loc[0, "accuracy"] - 0.02
    frame.to_csv(broken / "pareto.csv", index=False)
    trial = int(frame.loc[0, "trial"])
    code, _, err = cli("export", str(broken), "--pick", f"trial={trial}", "--latency-repeats", "0")
    assert code == 1
    assert "accuracy in ORT" in err and "+2.00 points" in err
    assert (broken / "exports" / f"trial-{trial}" / "model.onnx").exists()
    m = json.loads((broken / "exports" / f"trial-{trial}" / "manifest.json").read_text())
    assert m["ok"] is False and any("accuracy" in f for f in m["failures"])


def test_reference_int8_point_runs_integer_kernels_and_is_small(run_dir, tmp_path):
    """The search's uniform int8 reference (not necessarily on the front) through the library."""
    import tempfile

    frame = pd.read_parquet(run_dir / "trials.parquet")
    row = frame[frame["reference"] == "int8"].iloc[0]
    front = load_front(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ExportContext(front, Path(tmp))
        result = export_point(
            row, tmp_path / "int8", ctx, ExportOptions(latency_repeats=20), pick="reference"
        )
    assert result.ok, result.failure_message()
    assert {"QLinearConv", "QGemm"} <= set(result.validation.kernels)
    assert result.manifest["measured"]["file_ratio_vs_fp32"]["value"] <= 0.35


def test_latency_budget_uses_the_runs_per_profile_latency_column(run_dir, tmp_path):
    """Runs with a hardware profile carry ``latency_ms@<profile>`` (here added by hand: the
    figures are made up, the pick logic is what is tested)."""
    run = tmp_path / "with-latency"
    run.mkdir()
    shutil.copy(run_dir / "spec.yaml", run / "spec.yaml")
    frame = pd.read_csv(run_dir / "pareto.csv")
    frame["latency_ms@cpu"] = [float(i + 1) for i in range(len(frame))]
    frame["latency_ms@cpu_source"] = "predicted"
    frame.to_csv(run / "pareto.csv", index=False)
    front = load_front(run)
    for budget in (1.0, float(len(frame))):
        row = choose(front, Pick.parse(f"max_latency_ms={budget}"))
        inside = frame[frame["latency_ms@cpu"] <= budget]
        assert row["accuracy"] == inside["accuracy"].max()
    assert choose(front, Pick.parse("max_latency_ms@cpu=1"))["trial"] == frame["trial"].iloc[0]
    code, _, err = cli(
        "export", str(run), "--pick", "max_latency_ms=0.5", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "smallest latency_ms@cpu on the front: 1" in err


@pytest.mark.parametrize(
    ("fidelity", "expected"),
    [
        ({"profiles": {"cpu-local-ort": {"threads": 2, "fingerprint": {"runtime": "onnxruntime"}}}}, 2),
        ({"profiles": {"cpu-local": {"threads": 2, "fingerprint": {"runtime": "tvm"}}}}, 1),
        ({"profiles": {"ort": {"threads": 10**6, "fingerprint": {"runtime": "onnxruntime"}}}}, 1),
        ({"profiles": {"ort": {"threads": True, "fingerprint": {"runtime": "onnxruntime"}}}}, 1),
        ({"profiles": {"ort": {"threads": "2; rm -rf /", "fingerprint": {"runtime": "onnxruntime"}}}}, 1),
        ({"profiles": ["not", "a", "mapping"]}, 1),
        ("garbage", 1),
        (None, 1),
    ],
)
def test_export_times_on_the_threads_the_search_predicted_for(tmp_path, fidelity, expected):
    """The export's latency check runs on the threads of the run's ONNX Runtime profile (what
    its latency figures were predicted for); a run without one, or a file that is not one
    autoquant writes (a run directory is input like any other), gets 1 thread."""
    import os

    from autoquant.export.pick import run_ort_threads

    if fidelity is not None:
        text = fidelity if isinstance(fidelity, str) else json.dumps(fidelity)
        (tmp_path / "latency_fidelity.json").write_text(text)
    threads, why = run_ort_threads(tmp_path)
    assert threads == min(expected, os.cpu_count() or 1)
    assert ("cpu-local-ort" in why) == (threads == 2 and expected == 2)
