"""User tasks: imported from where the user put them, recorded by the search, checked later."""

from __future__ import annotations

import sys
import uuid

import pytest
import yaml
from conftest import SMALL_SPACE, run_cli, write

TASK_MODULE = """\
from autoquant.tasks.digits import digits_mlp


def make(scale=1.0):
    return digits_mlp()


def broken():
    raise ValueError("the data folder is missing")


def bad_forward():
    import dataclasses

    import torch

    task = digits_mlp()
    return dataclasses.replace(task, input_shape=(1, 3, 5))
"""


@pytest.fixture()
def user_task(tmp_path):
    """A spec folder with a task module of a fresh name (so no earlier import is reused)."""
    name = f"usertask_{uuid.uuid4().hex[:8]}"
    write(tmp_path / "proj" / f"{name}.py", TASK_MODULE)
    write(tmp_path / "proj" / "space.yaml", SMALL_SPACE)
    yield tmp_path / "proj", name
    sys.modules.pop(name, None)


def _spec(folder, function, args=""):
    return write(
        folder / "spec.yaml",
        f"version: 1\nname: u\ntask: {{function: '{function}'{args}}}\nspace: space.yaml\n",
    )


def _one_line(capsys, args):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_search_records_where_the_task_came_from_and_later_loads_refuse_a_change(user_task):
    from autoquant.search.run import prepare

    folder, name = user_task
    run = prepare(_spec(folder, f"{name}:make", ", args: {scale: 2.0}"), with_evaluator=False)
    origin = run.spec.task.origin
    assert origin.search_dir == str(folder.resolve())
    assert origin.module_file == str((folder / f"{name}.py").resolve())
    resolved = run.resolved_spec()
    assert resolved["task"]["origin"]["sha256"] == origin.sha256

    # a run directory elsewhere, as `autoquant search` writes it
    run_dir = folder.parent / "results" / "u"
    write(run_dir / "spec.yaml", yaml.safe_dump(resolved))
    write(run_dir / "study.db", "")
    sys.modules.pop(name, None)
    again = prepare(run_dir / "spec.yaml", with_evaluator=False)  # from the recorded folder
    assert again.spec.task.origin == origin

    (folder / f"{name}.py").write_text(TASK_MODULE + "\n# edited\n")
    sys.modules.pop(name, None)
    from autoquant.errors import UserError

    with pytest.raises(UserError, match="changed since the search"):
        prepare(run_dir / "spec.yaml", with_evaluator=False)


def test_module_planted_in_a_run_directory_is_never_imported(tmp_path, capsys):
    run_dir = tmp_path / "sent"
    marker = tmp_path / "ran"
    name = f"evil_{uuid.uuid4().hex[:8]}"
    write(run_dir / f"{name}.py", f"open({str(marker)!r}, 'w').write('x')\ndef make():\n    pass\n")
    write(run_dir / "space.yaml", SMALL_SPACE)
    write(run_dir / "study.db", "")
    spec = _spec(run_dir, f"{name}:make")
    err = _one_line(capsys, ["space", spec])
    assert "does not import" in err and not marker.exists()


@pytest.mark.parametrize("target", ["os:system", "subprocess:run", "builtins:eval", "json:loads"])
def test_standard_library_targets_are_refused_before_anything_runs(tmp_path, capsys, target):
    write(tmp_path / "space.yaml", SMALL_SPACE)
    spec = _spec(tmp_path, target, ", args: {command: 'touch pwned'}")
    err = _one_line(capsys, ["space", spec])
    assert "standard library" in err and "task.function" in err
    assert not (tmp_path / "pwned").exists()


def test_imported_function_is_refused(user_task, capsys):
    folder, name = user_task
    err = _one_line(capsys, ["space", _spec(folder, f"{name}:digits_mlp")])
    assert "not a function defined in module" in err


def test_a_bug_in_the_task_function_is_reported_as_one(user_task, capsys):
    folder, name = user_task
    err = _one_line(capsys, ["space", _spec(folder, f"{name}:broken")])
    assert "raised ValueError: the data folder is missing" in err
    assert f"{name}.py:" in err and "bug in that function" in err


def test_wrong_arguments_are_named(user_task, capsys):
    folder, name = user_task
    err = _one_line(capsys, ["space", _spec(folder, f"{name}:make", ", args: {sclae: 2}")])
    assert "task.args" in err and "does not take these arguments" in err


def test_forward_failing_on_the_declared_input_names_the_task_and_shape(user_task, capsys):
    folder, name = user_task
    err = _one_line(capsys, ["space", _spec(folder, f"{name}:bad_forward")])
    assert "forward fails" in err and "(1, 3, 5)" in err
