"""Bad input: one line naming file, key, value and what is allowed; exit code 2; no traceback."""

from __future__ import annotations

import pytest
from conftest import ROOT, SMALL_SPACE, run_cli, write

GOOD = "version: 1\nname: t\ntask: digits-mlp\nspace: space.yaml\n"


def _error_line(
    tmp_path, capsys, spec_text: str, space_text: str = SMALL_SPACE, cmd: str = "space"
):
    write(tmp_path / "space.yaml", space_text)
    spec = write(tmp_path / "spec.yaml", spec_text)
    code, out, err = run_cli([cmd, spec], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_key_names_key_and_allowed(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, GOOD + "search: {sampler: nsga2, trails: 5}\n")
    assert "spec.yaml" in line and "search.trails" in line
    assert "unknown key 'trails'" in line and "trials" in line and "sampler" in line


def test_wrong_type(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, GOOD + "search: {trials: many}\n")
    assert "search.trials" in line and "'many'" in line and "integer" in line


def test_bad_sampler_lists_allowed(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, GOOD + "search: {sampler: genetic}\n")
    assert "search.sampler" in line and "'genetic'" in line
    assert "nsga2" in line and "tpe" in line and "random" in line


def test_bits_outside_allowed_set(tmp_path, capsys):
    space = SMALL_SPACE.replace("[4, 8, 32]", "[4, 5, 32]")
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "space.yaml" in line and "rules[0].weight_bits[1]" in line and "5" in line
    assert "2, 3, 4, 8, 16 or 32" in line


def test_missing_spec_file(tmp_path, capsys):
    code, _, err = run_cli(["search", tmp_path / "nope.yaml"], capsys)
    assert code == 2 and "nope.yaml" in err and "file not found" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_space_file(tmp_path, capsys):
    spec = write(tmp_path / "spec.yaml", GOOD.replace("space.yaml", "other.yaml"))
    code, _, err = run_cli(["space", spec], capsys)
    assert code == 2 and "key: space" not in err
    assert "spec.yaml: space:" in err and "'other.yaml'" in err and "allowed" in err


def test_task_function_that_does_not_import(tmp_path, capsys):
    line = _error_line(
        tmp_path, capsys, GOOD.replace("task: digits-mlp", "task: {function: 'no_such_mod:make'}")
    )
    assert "task.function" in line and "'no_such_mod:make'" in line and "does not import" in line
    assert "allowed" in line


def test_task_function_malformed(tmp_path, capsys):
    line = _error_line(
        tmp_path, capsys, GOOD.replace("task: digits-mlp", "task: {function: 'os.system'}")
    )
    assert "task.function" in line and "package.module:function" in line


def test_unknown_builtin_task(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, GOOD.replace("digits-mlp", "imagenet"))
    assert "key: task" not in line and ": task: " in line and "'imagenet'" in line
    assert "digits-cnn" in line


def test_space_with_no_valid_choice_for_a_layer(tmp_path, capsys):
    # Group size 7 divides none of the MLP's input dimensions (64, 256, 128).
    space = (
        "version: 1\nrules:\n  - match: {}\n    weight_bits: [4]\n"
        "    granularity: [per_group]\n    group_sizes: [7]\n"
    )
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "space.yaml" in line and "rules[0]" in line and "'hidden.0'" in line
    assert "group size 7 does not divide the input dimension 64" in line


def test_invalid_yaml(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, "version: 1\nname: [unclosed\n")
    assert "spec.yaml" in line and "not valid YAML" in line


def test_yaml_is_safe_loaded(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, "!!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML" in line


def test_oversized_yaml_refused(tmp_path, capsys):
    line = _error_line(tmp_path, capsys, GOOD + "# " + "x" * (1 << 20) + "\n")
    assert "at most" in line


def test_bad_regex_in_match(tmp_path, capsys):
    space = "version: 1\nrules:\n  - match: {name: '(['}\n    weight_bits: [8]\n"
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "rules[0].match.name" in line and "regular expression" in line


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_parse(path):
    from autoquant.spec import load_spec

    load_spec(path)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_spaces_parse(path):
    from autoquant.spec import load_space

    load_space(path)


def test_choices_rule_bad_label_names_key_value_and_examples(tmp_path, capsys):
    space = "version: 1\nrules:\n  - match: {}\n    choices: [w8cs-a8d, w9cs-a8, f32-a32]\n"
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "space.yaml" in line and "rules[0].choices[1]" in line and "'w9cs-a8'" in line
    assert "not a choice label" in line and "w8cs-a8d" in line and "w4g32s-a32" in line


def test_choices_rule_with_product_keys_is_refused(tmp_path, capsys):
    space = "version: 1\nrules:\n  - match: {}\n    weight_bits: [8]\n    choices: [w8cs-a8d]\n"
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "rules[0].choices" in line and "also sets weight_bits" in line
    assert "allowed: choices alone" in line


def test_dynamic_activations_bad_value_and_without_int8(tmp_path, capsys):
    space = SMALL_SPACE + "    dynamic_activations: [maybe]\n"
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "rules[0].dynamic_activations[0]" in line and "'maybe'" in line and "boolean" in line
    space = SMALL_SPACE.replace("[8, 32]", "[32]") + "    dynamic_activations: [true]\n"
    line = _error_line(tmp_path, capsys, GOOD, space)
    assert "rules[0].dynamic_activations" in line and "act_bits is 32" in line
    assert "allowed" in line


def test_dynamic_activations_on_the_mlp_space(tmp_path, capsys):
    from conftest import run_cli, write

    write(tmp_path / "space.yaml", SMALL_SPACE + "    dynamic_activations: [false, true]\n")
    spec = write(tmp_path / "spec.yaml", GOOD)
    code, out, err = run_cli(["space", spec, "--exclusions"], capsys)
    assert code == 0, err
    assert "hidden.0: f32-a32 w8cs-a32 w8cs-a8 w8cs-a8d w4cs-a32 w4cs-a8\n" in out
    assert "hidden.0 w4cs-a8d: dynamic int8 activations need 8-bit" in out


def test_new_space_keys_left_out_of_resolved_spaces_when_unset():
    from autoquant.spec import SearchSpaceSpec

    rule = {"match": {}, "weight_bits": [8], "pin": {"weight_bits": 8, "act_bits": 8}}
    dumped = SearchSpaceSpec.model_validate({"rules": [rule]}).model_dump(mode="json")
    assert "dynamic_activations" not in dumped["rules"][0]
    assert "choices" not in dumped["rules"][0]
    assert "dynamic_activations" not in dumped["rules"][0]["pin"]
    listed = {"rules": [{"match": {}, "choices": ["w8cs-a8d"]}]}
    dumped = SearchSpaceSpec.model_validate(listed).model_dump(mode="json")
    assert dumped["rules"][0]["choices"] == ["w8cs-a8d"]
    assert SearchSpaceSpec.model_validate(dumped) == SearchSpaceSpec.model_validate(listed)
