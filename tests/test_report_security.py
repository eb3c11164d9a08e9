"""report.html and compare.html with hostile names: a run directory, a task, layers and
a latency profile whose names are markup. Nothing of it may run as script, and the pages' own
script must still run."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import render, requires_chromium
from conftest import run_cli, run_cli_captured, small_spec

# Each payload, if it ran, marks <body> with its own number: the test names which one got through.
IMG = "<img src=x onerror=document.body.setAttribute('data-pwned',1)>"
CLOSE = "</script><script>document.body.setAttribute('data-pwned',2)</script>"
ATTR = "\"'><svg onload=document.body.setAttribute('data-pwned',3)>"
COMMENT = "<!--<script>"  # in a script's text, keeps the next </script> from closing it
# A directory name Linux accepts (no '/'): every payload whose closing tags need no slash.
RUN_A = f"a{IMG}{ATTR}"
RUN_B = f"b{COMMENT}{ATTR}"
TASK = f"t{CLOSE}{COMMENT}"
LAYER = f"{COMMENT}{CLOSE}{ATTR}"
PROFILE = f"p{CLOSE}{IMG}"
# What must never reach a page as markup: each is the start of an element, comment or handler.
FORBIDDEN = ["<img", "<svg onload", "<script>document", "<!--", "</script><script>"]


def _tamper(run: Path, task: str, layer: str) -> None:
    """Give a finished run hostile names where a shared run directory could carry them."""
    import pandas as pd
    import yaml

    spec = yaml.safe_load((run / "spec.yaml").read_text())
    # the name and the sampler must be a spec's (a run spec is validated: test_hostile_input),
    # a task name is any string until a command imports it
    spec["task"] = task
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    rename = {"layer:out": f"layer:{layer}"}
    trials = pd.read_parquet(run / "trials.parquet").rename(columns=rename)
    trials.to_parquet(run / "trials.parquet", index=False)
    pd.read_csv(run / "pareto.csv").rename(columns=rename).to_csv(run / "pareto.csv", index=False)
    info = json.loads((run / "run.json").read_text())
    info["versions"]["torch"] = IMG
    (run / "run.json").write_text(json.dumps(info))
    (run / "predictor").mkdir(exist_ok=True)
    (run / "predictor" / "sensitivity.json").write_text(json.dumps({"_data": {
        "choices": {layer: {"w8cs-a8": {"kl": 0.1, "disagreement": 0.0}, IMG: {"kl": 0.2, "disagreement": 0.5}}},
        "trace_per_param": {layer: 1.0}, "forward_passes": IMG, "seconds": 1.0,
    }}))
    (run / "latency_fidelity.json").write_text(json.dumps({"profiles": {PROFILE: {
        "model": {"formula": ATTR, "intercept_us": 1.0, "calibration_configs": IMG},
        "fp32_e2e_us": 100.0, "measured_source": CLOSE,
        "validation": {"summary": {"configs": IMG}, "rows": [
            {"config_hash": ATTR, "predicted_ms": 1.0, "measured_ms": 1.1},
            {"config_hash": CLOSE, "predicted_ms": 2.0, "measured_ms": 1.9},
        ]},
    }}}))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Two runs whose directories have hostile names (the search writes report.html into the
    first as it finishes), tampered with hostile task, layer and profile names, then
    rendered again: report.html of each and compare.html of both."""
    from autoquant.report.compare import compare_runs, write_compare
    from autoquant.report.html import write_report
    from autoquant.report.rundata import load_run

    base = tmp_path_factory.mktemp("hostile")
    spec = small_spec(base / "spec", trials=6)
    first = base / RUN_A
    code, _, err = run_cli_captured(["search", spec, "--out", first, "--quiet"])
    assert code == 0, err
    searched = (first / "report.html").read_text()
    second = base / RUN_B
    shutil.copytree(first, second)
    _tamper(first, TASK, LAYER)
    _tamper(second, f"other {TASK}", LAYER)  # two tasks: compare writes a note naming both
    runs = [load_run(first), load_run(second)]
    pages = {"searched": (first / "report.html", searched)}
    for name, run in zip(("report-a", "report-b"), runs):
        path = write_report(run)
        pages[name] = (path, path.read_text())
    html_path, _ = write_compare(compare_runs(runs), base / "cmp")
    pages["compare"] = (html_path, html_path.read_text())
    return pages


class _Markup(HTMLParser):
    """Elements, attributes and comments as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.handlers: list[tuple[str, str]] = []
        self.comments: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [(tag, k) for k, _ in attrs if k.startswith("on")]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)

    def handle_comment(self, data):
        self.comments.append(data)


@pytest.mark.parametrize("name", ["searched", "report-a", "report-b", "compare"])
def test_hostile_names_reach_the_page_only_as_text(hostile, name):
    path, html = hostile[name]
    for fragment in FORBIDDEN:
        assert fragment not in html, f"{fragment!r} unescaped in {path.name}"
    markup = _Markup()
    markup.feed(html)
    assert "img" not in markup.tags and markup.handlers == [] and markup.comments == []
    assert markup.tags.count("script") == 2  # the config data and the page's own script
    # The names are shown, escaped, not dropped; the embedded data decodes to them unchanged.
    assert "&lt;img src=x onerror=" in html
    data = json.loads(re.search(r"<script type='application/json' id='configs'>(.*?)</script>", html, re.S).group(1))
    runs = {item["run"] for item in data.values()}
    assert runs <= {RUN_A, RUN_B} and runs
    if name != "searched":
        assert all(LAYER in item["layers"] for item in data.values())


@pytest.mark.parametrize("name", ["searched", "report-a", "report-b", "compare"])
def test_csp_allows_only_the_pages_own_script_and_style(hostile, name):
    import base64
    import hashlib

    _, html = hostile[name]
    csp = re.search(r"http-equiv='Content-Security-Policy' content=\"([^\"]*)\"", html).group(1)
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    own = re.findall(r"<script>(.*?)</script>", html, re.S) + re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(own) == 2
    for text in own:
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp


def test_json_for_script_survives_what_ends_a_script():
    from autoquant.report.escape import json_for_script

    value = {"k</script>": ["<!--", "-->", "&amp;", "\u2028\u2029", "<script>"]}
    text = json_for_script(value)
    assert not set(text) & set("<>&\u2028\u2029")
    assert json.loads(text) == value


@requires_chromium
@pytest.mark.parametrize("name", ["report-a", "report-b", "compare"])
def test_no_attacker_script_runs_in_chromium(hostile, name, tmp_path):
    path, _ = hostile[name]
    rendered = render(path, tmp_path, screenshot=False)
    pwned = re.search(r'data-pwned="([^"]*)"', rendered.dom)
    assert pwned is None, f"payload {pwned.group(1)} ran in {path.name}"
    assert rendered.console == [], rendered.console  # nothing refused by the CSP either: nothing tried
    marks = re.search(r'data-rendered-marks="(\d+)"', rendered.dom)
    assert marks and int(marks.group(1)) > 0, "the page's own script did not run"
    assert "&lt;img src=x onerror=" in rendered.dom  # the hostile name is on the page, as text


@requires_chromium
def test_csp_stops_markup_that_escaping_missed(hostile, tmp_path):
    """The second defence on its own: a payload put into the page unescaped, as a forgotten
    escape would, is refused by the policy, and the page's own script still runs."""
    _, html = hostile["report-a"]
    planted = tmp_path / "planted.html"
    planted.write_text(html.replace("<body>", f"<body>{IMG}{CLOSE}{ATTR}", 1), encoding="utf-8")
    rendered = render(planted, tmp_path, screenshot=False)
    pwned = re.search(r'data-pwned="([^"]*)"', rendered.dom)
    assert pwned is None, f"payload {pwned.group(1)} ran despite the policy"
    assert any("Content Security Policy" in line for line in rendered.console), rendered.console
    marks = re.search(r'data-rendered-marks="(\d+)"', rendered.dom)
    assert marks and int(marks.group(1)) > 0, "the page's own script did not run"


def test_terminal_prints_names_that_look_like_console_markup(tmp_path, capsys):
    """rich reads ``[/b]`` as a closing tag: a run directory named so made ``report`` and
    ``compare`` die with a MarkupError traceback. The consoles take every string literally."""
    spec = small_spec(tmp_path / "spec", trials=4)
    run = tmp_path / "[/b]run[bold red]"
    code, _, err = run_cli(["search", spec, "--out", run, "--quiet"], capsys)
    assert code == 0, err
    other = tmp_path / "[/]other"
    shutil.copytree(run, other)
    code, out, err = run_cli(["report", other], capsys)
    assert code == 0, err
    assert "[/]other" in out.replace("\n", "")
    code, out, err = run_cli(["compare", run, other, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, err
