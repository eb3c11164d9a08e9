"""Hostile YAML and patterns: alias bombs, deep nesting, duplicate keys, catastrophic regexes,
long values, seeds at the edges, a space with nothing to search. Each is one line, exit 2."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from conftest import SMALL_SPACE, run_cli, write

GOOD = "version: 1\nname: t\ntask: digits-mlp\nspace: space.yaml\n"


def _bomb(levels: int = 9) -> str:
    """The 9**levels-item list of the issue, in about 40 bytes a level."""
    names = "abcdefghijklmnop"
    parts = ["&a [x,x,x,x,x,x,x,x,x]"]
    for i in range(1, levels):
        parts.append(f"&{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


def _one_line(capsys, args) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_alias_bomb_refused_in_milliseconds(tmp_path, capsys):
    from autoquant.errors import UserError
    from autoquant.safeyaml import MAX_VALUES, load_yaml

    text = GOOD.replace("name: t", f"name: {_bomb()}")
    assert len(text.encode()) < 450
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"more than {MAX_VALUES} values once aliases"):
        load_yaml(text, file="bomb.yaml")
    assert time.perf_counter() - start < 0.5
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", text)
    start = time.perf_counter()
    line = _one_line(capsys, ["space", spec])
    assert time.perf_counter() - start < 5
    assert "spec.yaml: refused at line 2" in line and "allowed: at most" in line


def test_a_small_bomb_within_the_limits_is_reported_with_a_short_value(tmp_path, capsys):
    # 9**4 values pass the loader; the error then quotes the value, cut to a short prefix
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD.replace("name: t", f"name: {_bomb(4)}"))
    line = _one_line(capsys, ["space", spec])
    assert "spec.yaml: name: bad value [[" in line and "...:" in line and len(line) < 300


def test_recursive_alias_refused(tmp_path, capsys):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD.replace("name: t", "name: &r [1, *r]"))
    assert "is used inside the value it names" in _one_line(capsys, ["space", spec])


def test_deep_nesting_is_one_line(tmp_path, capsys):
    spec = write(tmp_path / "spec.yaml", "name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    line = _one_line(capsys, ["space", spec])
    assert "spec.yaml: refused at line 1: nested deeper than 32 levels" in line


def test_aliases_of_small_values_still_load(tmp_path):
    from autoquant.safeyaml import load_yaml

    text = "a: &x {weight_bits: [8]}\nb: *x\nc: {<<: *x, act_bits: [8]}\n"
    data = load_yaml(text, file="f")
    assert data["b"] == {"weight_bits": [8]} and data["c"] == {"weight_bits": [8], "act_bits": [8]}


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("version: 1\nname: a\nname: b\n", "'name'", 3, 2),
        ("rules:\n  - match: {}\n    weight_bits: [8]\n    weight_bits: [4]\n", "'weight_bits'", 4, 3),
        ("search: {seed: 1, seed: 2}\n", "'seed'", 1, 1),
        ("a: {<<: {x: 1}, x: 2}\nb: 1\nb: 2\n", "'b'", 3, 2),  # a merged key may be overridden
    ],
)
def test_duplicate_keys_refused_naming_key_and_line(tmp_path, capsys, text, key, line, first):
    spec = write(tmp_path / "spec.yaml", text)
    message = _one_line(capsys, ["space", spec])
    assert f"spec.yaml: not valid YAML at line {line}: key {key} is given twice" in message
    assert f"first at line {first}" in message


def test_values_in_errors_are_cut_to_a_short_prefix(tmp_path, capsys):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD + "search: {sampler: " + "q" * 100_000 + "}\n")
    line = _one_line(capsys, ["space", spec])
    assert "search.sampler" in line and "'" + "q" * 59 + "..." in line and len(line) < 400
    spec = write(tmp_path / "spec.yaml", GOOD + "hardware: [" + "h" * 3000 + "]\n")
    line = _one_line(capsys, ["space", spec])
    assert "hardware[0]" in line and len(line) < 600


def test_unreadable_and_odd_files_are_one_line(tmp_path, capsys):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    for text in ("seed: 2001-13-45\n", "seed: " + "9" * 5000 + "\n", "\ufeff\x00"):
        spec = write(tmp_path / "spec.yaml", text)
        assert "spec.yaml: not valid YAML" in _one_line(capsys, ["space", spec])
    spec = write(tmp_path / "spec.yaml", GOOD.replace("space.yaml", "/proc/self/mem"))
    assert "cannot be read" in _one_line(capsys, ["space", spec])


@pytest.mark.parametrize("pattern", ["(a+)+$", "(.?){12}(.?){12}x", "(a|ab)*c", "(x)\\1", "a" * 201])
def test_catastrophic_name_pattern_refused_at_once(tmp_path, capsys, pattern):
    space = f"version: 1\nrules:\n  - match: {{name: '{pattern}'}}\n    weight_bits: [8, 32]\n"
    write(tmp_path / "space.yaml", space)
    spec = write(tmp_path / "spec.yaml", GOOD)
    start = time.perf_counter()
    line = _one_line(capsys, ["space", spec])
    assert time.perf_counter() - start < 5
    assert "space.yaml: rules[0].match.name: bad value" in line and "allowed: a regular" in line


def test_name_pattern_over_long_names_is_stopped_by_the_deadline():
    from autoquant.errors import UserError
    from autoquant.space import LayerInfo, build_space
    from autoquant.space.namepattern import MATCH_SECONDS, why_refused
    from autoquant.spec import SearchSpaceSpec

    pattern = "a+.a*a+(?:a{2}){10}^$"  # no nesting, few quantifiers: passes the static check
    assert why_refused(pattern) is None
    layers = tuple(
        LayerInfo("a" * 200 + str(i), "linear", (8, 8), (1, 8), (1, 8), 64, 72, True, index=i)
        for i in range(3)
    )
    spec = SearchSpaceSpec.model_validate(
        {"rules": [{"match": {"name": pattern}, "weight_bits": [8, 32]}]}
    )
    start = time.perf_counter()
    with pytest.raises(UserError, match="took more than") as info:
        build_space(layers, spec, file="space.yaml")
    assert time.perf_counter() - start < MATCH_SECONDS + 2
    assert "rules[0].match.name" in str(info.value)


def test_ordinary_name_patterns_still_select_layers(cnn_layers):
    from autoquant.space import build_space
    from autoquant.spec import SearchSpaceSpec

    spec = SearchSpaceSpec.model_validate(
        {
            "rules": [
                {"match": {}, "weight_bits": [32]},
                {"match": {"name": r"^(conv|fc)\d*(\.weight)?$|^features\.0$"}, "weight_bits": [8]},
            ]
        }
    )
    space = build_space(cnn_layers, spec)
    picked = {ls.layer.name for ls in space.layers if ls.matched_rules == (0, 1)}
    assert picked and all(ls.layer.name in picked or ls.matched_rules == (0,) for ls in space.layers)


@pytest.mark.parametrize("seed", ["-1", "4294967296", "18446744073709551616"])
def test_seed_outside_the_generators_range_refused(tmp_path, capsys, seed):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD + f"search: {{seed: {seed}}}\n")
    line = _one_line(capsys, ["space", spec])
    assert "search.seed" in line and seed[:20] in line
    good = write(tmp_path / "good.yaml", GOOD)
    line = _one_line(capsys, ["search", good, "--out", tmp_path / "run", "--seed", seed])
    assert line.startswith(f"error: --seed: bad value {seed[:20]}")
    assert "4294967295" in line or "greater than or equal to 0" in line
    assert not (tmp_path / "run").exists()


def test_largest_seed_searches_and_resumes(tmp_path, capsys):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(
        tmp_path / "spec.yaml",
        GOOD + "search: {sampler: random, trials: 3, seed: 4294967295}\n",
    )
    run_dir = tmp_path / "run"
    code, _, err = run_cli(["search", spec, "--out", run_dir, "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["search", spec, "--out", run_dir, "--quiet", "--trials", "5"], capsys)
    assert code == 0 and "2 new this time" in out, err
    assert len(pd.read_parquet(run_dir / "trials.parquet")) == 5


def test_derived_seed_wraps():
    from autoquant.search.samplers import derived_seed

    assert derived_seed(4294967295, 3) == 2 and derived_seed(7, 5) == 12


@pytest.mark.parametrize(
    "space",
    [
        "version: 1\nrules:\n  - match: {}\n    weight_bits: [32]\n",  # fp32 only
        "version: 1\nrules:\n  - match: {}\n    pin: {weight_bits: 8, act_bits: 8}\n",
    ],
)
def test_space_of_a_single_config_refused_by_search(tmp_path, capsys, space):
    write(tmp_path / "space.yaml", space)
    spec = write(tmp_path / "spec.yaml", GOOD)
    line = _one_line(capsys, ["search", spec, "--out", tmp_path / "run", "--quiet"])
    assert "space.yaml: rules: the space holds a single config" in line
    assert "nothing to search" in line and "allowed" in line
    assert not (tmp_path / "run").exists()
    code, out, _ = run_cli(["space", spec], capsys)
    assert code == 0 and "warning: a single config" in out


@pytest.mark.parametrize(
    ("planted", "key"),
    [
        ("objectives: 5\n", "objectives"),
        ("objectives: [accuracy, size]\nconstraints: {max_accuracy_drop: many}\n", "constraints.max_accuracy_drop"),
        ("objectives: [accuracy, size]\nsearch: [1, 2]\n", "search"),
    ],
)
def test_a_run_spec_that_is_no_spec_is_one_line_in_every_command(tmp_path, capsys, planted, key):
    """A run directory someone sent: its spec.yaml is valid YAML but not a spec autoquant
    writes. report, export, collect and a resuming search name the file and the key, exit 2."""
    run_dir = tmp_path / "run"
    space = "space: {version: 1, rules: [{match: {}, weight_bits: [8, 32]}]}\n"
    write(run_dir / "spec.yaml", "version: 1\nname: t\ntask: digits-mlp\n" + space + planted)
    write(run_dir / "trials.parquet", "")
    write(run_dir / "pareto.csv", "trial,config\n1,{}\n")
    for args in (["report", run_dir], ["export", run_dir], ["collect", run_dir]):
        line = _one_line(capsys, args)
        assert f"spec.yaml: {key}: bad value" in line, (args, line)
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD)
    line = _one_line(capsys, ["search", spec, "--out", run_dir, "--quiet"])
    assert f"spec.yaml: {key}: bad value" in line, line


def test_hostile_spec_yaml_in_a_run_directory_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    bomb = f"version: 1\nname: {_bomb()}\n"
    for name in ("trials.parquet", "pareto.csv"):
        write(run_dir / name, "")
    write(run_dir / "spec.yaml", bomb)
    line = _one_line(capsys, ["report", run_dir])
    assert "spec.yaml: refused at line 2" in line
    write(run_dir / "pareto.csv", "trial,config\n1,{}\n")
    line = _one_line(capsys, ["export", run_dir])
    assert "spec.yaml: refused at line 2" in line
    # a search resuming into it reads the stored spec with the same loader
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = write(tmp_path / "spec.yaml", GOOD)
    line = _one_line(capsys, ["search", spec, "--out", run_dir, "--quiet"])
    assert "spec.yaml: refused at line 2" in line
