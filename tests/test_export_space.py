"""``autoquant space SPEC``'s dry run of the export (every layer's node, or why it stays float;
a model whose fp32 export fails is one line, exit 2), and the export's slower-than-fp32
warning."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from conftest import ROOT, run_cli, write  # noqa: E402

from autoquant.export.command import slower_than_fp32_warnings  # noqa: E402
from autoquant.export.validate import Timing, slower_in_every_round  # noqa: E402

TASK_MODULE = '''
import torch
from torch import nn
from autoquant.tasks.base import Task, top1_accuracy


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + torch.linalg.svdvals(x.reshape(-1, 2, 2)).sum()


class Partly(nn.Module):
    """fc runs twice (one weight, two nodes): it cannot be written quantized."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(self.a(x)))))


def _task(model):
    x = torch.rand(64, 4)
    return Task(name="t", model=model.eval(), calibration_inputs=x, eval_inputs=x,
                eval_targets=torch.zeros(64, dtype=torch.long), metric=top1_accuracy,
                input_shape=(1, 4))


def unexportable():
    return _task(Unexportable())


def partly():
    return _task(Partly())
'''


def spec_for(tmp_path: Path, function: str) -> Path:
    write(tmp_path / "dryrun_tasks.py", TASK_MODULE)
    return write(
        tmp_path / f"{function}.yaml",
        f"version: 1\nname: {function}\ntask: {{function: dryrun_tasks:{function}}}\n"
        f"space: {ROOT / 'search_spaces' / 'default.yaml'}\n",
    )


def test_space_maps_every_layer_of_the_default_example_to_its_node(capsys):
    code, out, err = run_cli(["space", ROOT / "examples" / "digits-cnn.yaml"], capsys)
    assert code == 0, err
    assert "ONNX export (dry run): fp32 graph of" in out and "4 of 4 layers map" in out
    assert "conv1: Conv /conv1/Conv" in out and "fc2: Gemm /fc2/Gemm" in out


def test_space_says_which_layer_stays_float_and_why(tmp_path, capsys):
    code, out, err = run_cli(["space", spec_for(tmp_path, "partly")], capsys)
    assert code == 0, err
    dry_run = out[out.index("ONNX export (dry run)") :]
    line = next(line for line in dry_run.splitlines() if line.strip().startswith("fc:"))
    assert "stays float" in line and "called more than once" in line
    assert "warning: the space gives it" in line  # the default space quantizes it
    assert "2 of 3 layers map" in out


def test_a_model_whose_fp32_export_fails_is_one_line_exit_2(tmp_path, capsys):
    code, out, err = run_cli(["space", spec_for(tmp_path, "unexportable")], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "float32 ONNX export failed" in lines[0] and "linalg_svdvals" in lines[0]
    assert "unexportable.yaml: task:" in lines[0]


def timing(*rounds: float) -> Timing:
    return Timing(sorted(rounds)[len(rounds) // 2], min(rounds), max(rounds), 10, 2, 1, 1, rounds)


def test_slower_means_slower_in_every_interleaved_round():
    assert slower_in_every_round(timing(1.1, 1.2, 1.3), timing(1.0, 1.0, 1.0))
    assert not slower_in_every_round(timing(1.1, 0.9, 1.3), timing(1.0, 1.0, 1.0))
    assert not slower_in_every_round(Timing(1, 1, 1, 1, 1, 1, 1), Timing(0.5, 0.5, 0.5, 1, 1, 1, 1))


def test_export_warns_when_the_point_is_measured_slower_than_fp32():
    def result(trial: int, slower: bool):
        export, fp32 = timing(0.30, 0.31, 0.32), timing(0.02, 0.02, 0.02)
        latency = {
            "export": export.to_dict(),
            "fp32": fp32.to_dict(),
            "speedup_vs_fp32": 0.02 / 0.31,
            "slower_than_fp32": slower,
        }
        return SimpleNamespace(trial=trial, validation=SimpleNamespace(latency=latency, kernels=[]))

    lines = slower_than_fp32_warnings([result(29, True), result(30, False)])
    assert len(lines) == 1
    assert lines[0].startswith("warning: trial 29 runs slower than the fp32 graph")
    assert "0.310 ms vs 0.020 ms" in lines[0] and "all 3 interleaved rounds" in lines[0]
