"""Property: any spec or space file, however mangled, gets exit 0 or one line and exit 2.

The files are mutations of the shipped examples and spaces: wrong types, unknown and missing
keys, out-of-range numbers, hostile strings (long, NUL, paths, markup, catastrophic regexes,
module targets), anchors and aliases (shared values, alias bombs), deep nesting, duplicate keys
and raw text damage. A spec the loader refuses goes through ``autoquant search --out RUN`` in-process
(it must refuse before loading anything); one it accepts goes through ``autoquant space``. No
traceback, nothing written outside the run directory.

The task is always the small built-in digits-mlp (cached after its first use): the examples'
own tasks train for minutes, and which task a valid spec names does not change what is checked.
Mutations that leave a spec valid take the slow path (the task loaded, the space built, an fp32
export dry run), so most examples carry at least one damaging mutation.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import typer.main
import yaml
from conftest import ROOT, run_cli_captured

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CHEAP_TASK = "digits-mlp"
OTHER_BUILTIN_TASKS = {"digits-cnn", "digits-wide", "digits-resnet", "minilm-embed"}


def _seeds(folder: str) -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / folder).glob("*.yaml"))]


SPECS = [{**spec, "task": CHEAP_TASK} for spec in _seeds("examples")]
SPACES = _seeds("search_spaces")

HOSTILE_STRINGS = [
    "",
    " ",
    "x" * 5000,
    "\x00",
    "a\x00b",
    "\u202egnp.exe",
    "é" * 300,
    "a\nb\nc",
    "\t",
    "../../../../etc/passwd",
    "../outside.yaml",
    "/etc/passwd",
    "/dev/zero",
    "/dev/stdin",
    "/proc/self/mem",
    "/proc/self/environ",
    "/",
    ".",
    "..",
    "spec.yaml",
    "space.yaml",
    "p" * 4097,
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<!--",
    "</script>",
    "'; DROP TABLE trials; --",
    "$(touch pwned)",
    "`touch pwned`",
    "%s%n%x",
    "{0.__class__}",
    "(a+)+$",
    "(.*a){25}",
    "(a|a)*b",
    r"(\w+\s?)+$",
    "(.?){12}(.?){12}(.?){12}x",
    "a+.a*a+(?:a{2}){10}^$",
    "(a)\\1",
    "[",
    "a" * 201,
    "os:system",
    "subprocess:run",
    "builtins:eval",
    "autoquant.cli:main",
    "no_such_module:make",
    "latency@../x",
    "latency@" + "z" * 3000,
    "NaN",
    "yes",
    "0x1F",
    "1e9999",
    "*a",
    "&a",
    "!!python/object/apply:os.system ['touch pwned']",
    "results",
    "cpu-local",
    "w8cs-a8d",
    "w99cs-a8",
    "w4g1s-a32",
    "f32-a32",
]
PLAUSIBLE = [
    2, 3, 4, 5, 7, 8, 16, 32, 64, 0.05, 1, 0, "per_group", "per_tensor", "per_channel",
    "nsga2", "tpe", "random", "guided", "genetic", "accuracy", "size", "latency", "first",
    "last", "linear", "conv", ["linear"], ["first"], [8, 32], [4, 8, 32], [32], [True, False],
    ["accuracy", "size"], ["accuracy"], {"weight_bits": 8}, {"kind": ["conv"]}, {"name": "out"},
    {"name": "hidden"}, {}, [], ["f32-a32", "w8cs-a8"], "cpu-local", ["cpu-local"], 1000, 100_000,
]
NUMBERS = [-1, 0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, 10**30, -(10**30), 1e308, -0.0]
KEYS = ["x", "extra", "trails", "weigth_bits", "origin", "<<", "name", "version", "match", "pin"]

values = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(NUMBERS),
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 40), max_size=4),
    st.dictionaries(st.sampled_from(KEYS), st.integers(-2, 40), max_size=3),
)

keys = st.one_of(st.text(max_size=10), st.integers(), st.floats(), st.booleans(), st.none())


def _paths(node, path=(), seen=None):
    """Every position in a YAML tree: (path, value); a shared value (a bomb) is entered once."""
    seen = set() if seen is None else seen
    yield path, node
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key), seen)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i), seen)


def _replaced(tree, path, value):
    if not path:
        return value
    tree = copy.copy(tree)
    tree[path[0]] = _replaced(tree[path[0]], path[1:], value)
    return tree


def _bomb(levels: int) -> list:
    """Nine-fold shared lists: the dumper writes each level once, as an anchor and aliases."""
    node: list = ["x"] * 9
    for _ in range(levels - 1):
        node = [node] * 9
    return node


DEEP = "__deep_{}__"  # replaced in the text: the dumper cannot write 100,000 levels


@st.composite
def mutated(draw, tree):
    positions = list(_paths(tree))
    keyed = [(path, node) for path, node in positions if path and isinstance(path[-1], str)]
    # a mapping's value more often than a list item: most keys have a rule of their own
    path, node = draw(st.sampled_from(keyed if keyed and draw(st.integers(0, 2)) else positions))
    op = draw(
        st.sampled_from(
            ["replace", "replace", "replace", "add_key", "drop_key", "share", "bomb", "deep"]
        )
    )
    if op == "add_key":
        holder = node if isinstance(node, dict) else {}
        key = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(HOSTILE_STRINGS), keys))
        return _replaced(tree, path, {**holder, key: draw(values)})
    if op == "drop_key" and isinstance(node, dict) and node:
        key = draw(st.sampled_from(list(node)))
        return _replaced(tree, path, {k: v for k, v in node.items() if k != key})
    if op == "share":  # the same object twice: an anchor and an alias in the file
        other = draw(st.sampled_from(positions))[1]
        return _replaced(tree, path, other)
    if op == "bomb":
        return _replaced(tree, path, _bomb(draw(st.integers(1, 9))))
    if op == "deep":
        return _replaced(tree, path, DEEP.format(draw(st.sampled_from([3, 40, 100_000]))))
    return _replaced(tree, path, draw(values))


def _dump(tree) -> str:
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=4096)
    for depth in (3, 40, 100_000):
        text = text.replace(DEEP.format(depth), "[" * depth + "]" * depth)
    return text


JUNK = [":", "&a", "*a", "!", "\t", "{", "[", "'", '"', "%", "@", "`", "|", ">", "- ", "#", "\\"]


@st.composite
def damaged(draw, text: str) -> bytes:
    op = draw(st.sampled_from(["dup_line", "junk", "truncate", "bytes", "tag", "anchor"]))
    lines = text.splitlines(keepends=True) or ["\n"]
    at = draw(st.integers(0, len(lines) - 1))
    if op == "dup_line":  # a key given twice, at any level
        lines.insert(at + 1, lines[at])
    elif op == "junk":
        line = lines[at]
        col = draw(st.integers(0, len(line)))
        lines[at] = line[:col] + draw(st.sampled_from(JUNK)) + line[col:]
    elif op == "truncate":
        return text[: draw(st.integers(0, len(text)))].encode()
    elif op == "bytes":
        return draw(st.sampled_from([b"\xff\xfe", b"\x00", b"\xef\xbb\xbf", b"\x80abc"])) + text.encode()
    elif op == "tag":
        lines.insert(at, "evil: !!python/object/apply:os.system ['touch pwned']\n")
    else:  # anchors and aliases between top-level values
        lines.insert(at, "shared: &s {weight_bits: [8], act_bits: [8, 32]}\nagain: *s\n")
    return "".join(lines).encode()


@st.composite
def cases(draw) -> dict[str, bytes]:
    spec = copy.deepcopy(draw(st.sampled_from(SPECS)))
    space = copy.deepcopy(draw(st.sampled_from(SPACES)))
    if draw(st.integers(0, 3)) == 0:
        trees = {"spec.yaml": {**spec, "space": space}}
    else:
        trees = {"spec.yaml": {**spec, "space": "space.yaml"}, "space.yaml": space}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(trees)))
        trees[name] = draw(mutated(trees[name]))
    spec = trees["spec.yaml"]
    if isinstance(spec, dict) and isinstance(spec.get("task"), str):
        if spec["task"] in OTHER_BUILTIN_TASKS:  # they train for minutes at first use
            trees["spec.yaml"] = {**spec, "task": CHEAP_TASK}
    files = {name: _dump(tree).encode() for name, tree in trees.items()}
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(files)))
        files[name] = draw(damaged(files[name].decode()))
    return files


def _snapshot(*roots: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if Path(folder, d) != skip]
            for name in files:
                stat = Path(folder, name).lstat()
                out[str(Path(folder, name))] = (stat.st_size, stat.st_mtime_ns)
            out[folder] = (0, 0)
    return out


def _check_refusal(code: int, out: str, err: str, what: str) -> None:
    assert code in (0, 2), (what, code, out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, (what, err[-3000:])
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, err[:3000])
        assert len(lines[0]) <= 1000, (what, lines[0][:3000])


def test_mutated_specs_and_spaces_exit_0_or_one_line_2(tmp_path, monkeypatch):
    from autoquant.errors import UserError
    from autoquant.spec import load_spec
    from autoquant.tasks import load_task

    load_task(CHEAP_TASK)  # trained and cached once, before any snapshot
    # typer builds the click command anew on every call (tens of milliseconds of signature
    # inspection); built once, the thousand runs measure autoquant rather than typer
    monkeypatch.setattr(typer.main, "get_command", functools.cache(typer.main.get_command))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # a stray relative write (results/..., .hypothesis/) shows here
    codes: Counter = Counter()

    @settings(
        max_examples=1000,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def check(files: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            case = Path(folder)
            for name, data in files.items():
                (case / name).write_bytes(data)
            run_dir = case / "run"
            before = _snapshot(case, workdir, skip=run_dir)
            spec = case / "spec.yaml"
            try:
                load_spec(spec)
                refused = False
            except UserError:
                refused = True
            if refused:  # search reads the files first: it must refuse before it loads anything
                code, out, err = run_cli_captured(["search", str(spec), "--out", str(run_dir), "--quiet"])
                _check_refusal(code, out, err, "search")
                assert code == 2, (out[-2000:], err)
            else:  # the task loaded, the space built, the export's dry run
                code, out, err = run_cli_captured(["space", str(spec)])
                _check_refusal(code, out, err, "space")
            codes[code] += 1
            after = _snapshot(case, workdir, skip=run_dir)
            assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]

    check()
    assert sum(codes.values()) >= 1000
    assert codes[0] >= 10 and codes[2] >= 500, codes  # both paths were exercised
