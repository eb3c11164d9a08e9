"""report.html and compare: self-contained pages that render in headless Chromium."""

from __future__ import annotations

import json
import re

import pytest
from browser import render, requires_chromium
from conftest import run_cli, small_spec


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    import _pytest.capture  # noqa: F401  (run_cli needs a capsys-like object)

    base = tmp_path_factory.mktemp("runs")
    runs = []
    for sampler in ("nsga2", "random"):
        spec = small_spec(base / sampler, trials=10)
        out = base / f"run-{sampler}"
        code = _run(["search", spec, "--out", out, "--quiet", "--sampler", sampler])
        assert code == 0
        runs.append(out)
    return runs


def _run(args):
    import sys

    from autoquant.cli import main

    old = sys.argv
    sys.argv = ["autoquant", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    finally:
        sys.argv = old
    return 0


def _self_contained(html: str) -> None:
    assert "<link" not in html and "@import" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, not a request


def test_search_writes_report_and_run_info(two_runs):
    run = two_runs[0]
    html = (run / "report.html").read_text()
    _self_contained(html)
    assert html.count("<svg") >= 2  # the front and the precision map
    assert "fp32 reference" in html and "knee" in html
    # the accuracy's interval and the within-noise mark, in the table and on hover
    assert "95% interval" in html and "within noise of fp32" in html
    assert re.search(r"<title>trial \d+[^<]*accuracy [0-9.]+ \[[0-9.]+, [0-9.]+\] \(measured, 450 samples\)", html)
    info = json.loads((run / "run.json").read_text())
    assert info["measured"] == 10 and "torch" in info["versions"]


def test_report_command_prints_front(two_runs, capsys):
    code, out, _ = run_cli(["report", two_runs[1]], capsys)
    assert code == 0 and "Pareto front" in out and "report.html" in out
    assert "within noise of fp32" in out  # the caption explains the mark


def test_front_table_marks_drops_within_noise():
    import pandas as pd
    from rich.console import Console

    from autoquant.report.terminal import front_table

    row = {"trial": 3, "reference": None, "accuracy": 0.97, "accuracy_lo": 0.955, "accuracy_hi": 0.984,
           "size_bytes": 2048.0, "size_ratio": 4.0, "mean_weight_bits": 8.0, "bops": 1e6, "layer:fc": "w8cs-a32"}
    frame = pd.DataFrame([
        {**row, "accuracy_drop": 0.002, "accuracy_drop_lo": -0.004, "accuracy_drop_hi": 0.009,
         "within_noise_of_fp32": True},
        {**row, "trial": 4, "accuracy_drop": 0.05, "accuracy_drop_lo": 0.03, "accuracy_drop_hi": 0.07,
         "within_noise_of_fp32": False},
    ])
    console = Console(width=200, record=True)
    console.print(front_table(frame, title="front"))
    lines = console.export_text().splitlines()
    assert any("0.955-0.984" in line and "+0.20 ≈" in line for line in lines)
    assert any("+5.00" in line and "≈" not in line for line in lines)
    old = frame.drop(columns=["accuracy_lo", "accuracy_hi", "within_noise_of_fp32"])  # an older run
    console = Console(width=200, record=True)
    console.print(front_table(old, title="front"))
    assert "≈" not in console.export_text() and "95%" not in console.export_text()


def test_report_bad_run_dir(tmp_path, capsys):
    code, _, err = run_cli(["report", tmp_path / "missing"], capsys)
    assert code == 2 and "no such run directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["report", tmp_path / "empty"], capsys)
    assert code == 2 and "missing spec.yaml" in err


def test_compare_figures(two_runs, tmp_path, capsys):
    code, out, err = run_cli(["compare", *two_runs, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["run-nsga2", "run-random"]
    pair = data["pairs"][0]
    assert pair["objectives"] == ["accuracy", "size"]
    assert set(pair["hypervolume"]) == {"run-nsga2", "run-random"}
    assert all(v > 0 for v in pair["hypervolume"].values())
    assert all(0 <= v <= 1 for v in pair["dominated_fraction"].values())
    assert all(b["winners"] for b in pair["budgets"][-1:])  # the largest budget fits every front
    assert "hypervolume" in out and "best front" in out
    _self_contained((tmp_path / "cmp" / "compare.html").read_text())


def test_compare_needs_two_runs(two_runs, capsys):
    code, _, err = run_cli(["compare", two_runs[0]], capsys)
    assert code == 2 and "two or more" in err


def test_compare_hypervolume_matches_pareto_module(two_runs):
    import numpy as np

    from autoquant.pareto import hypervolume
    from autoquant.report.compare import compare_runs
    from autoquant.report.rundata import load_run

    runs = [load_run(p) for p in two_runs]
    comp = compare_runs(runs)
    pair = comp.pairs[0]
    for r in runs:
        front = r.front[["accuracy", "size_bytes"]].to_numpy(dtype=float)
        assert pair.hypervolume[r.name] == pytest.approx(
            hypervolume(front, ["maximize", "minimize"], pair.reference)
        )
    assert pair.reference[1] >= max(float(np.max(r.front["size_bytes"])) for r in runs)


@requires_chromium
def test_report_renders_in_chromium(two_runs, tmp_path):
    rendered = render(two_runs[0] / "report.html", tmp_path)
    assert rendered.console == [], rendered.console
    marks = re.search(r'data-rendered-marks="(\d+)"', rendered.dom)
    assert marks and int(marks.group(1)) > 10, "the page script did not run or drew nothing"
    assert re.search(r"<circle[^>]+class=\"pt\"", rendered.dom)
    assert rendered.screenshot.exists() and rendered.screenshot.stat().st_size > 10_000


@requires_chromium
def test_compare_renders_in_chromium(two_runs, tmp_path, capsys):
    assert run_cli(["compare", *two_runs, "--out", tmp_path / "cmp"], capsys)[0] == 0
    rendered = render(tmp_path / "cmp" / "compare.html", tmp_path)
    assert rendered.console == [], rendered.console
    assert rendered.dom.count('class="pt"') >= 2
    assert rendered.screenshot.exists() and rendered.screenshot.stat().st_size > 10_000


def test_terminal_table_summarises_the_choices_of_many_layers():
    import pandas as pd
    from rich.console import Console

    from autoquant.report.terminal import front_table

    layers = {f"layer:l{i}": ("w8cs-a8" if i % 3 else "f32-a32") for i in range(36)}
    row = {
        "trial": 3, "reference": None, "accuracy": 0.95, "accuracy_drop": 0.01,
        "size_bytes": 4096.0, "size_ratio": 3.0, "mean_weight_bits": 12.0, "bops": 1e6, **layers,
    }
    console = Console(width=120, record=True)
    console.print(front_table(pd.DataFrame([row]), title="front"))
    text = console.export_text()
    assert "24x w8cs-a8 12x f32-a32" in text
    assert "l35" not in text  # no per-layer header of 36 names
