"""Agreement of ORT with the simulation: strict in output steps, or small against the config's
own quantization error for deep nets whose rounding flips propagate."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from autoquant.export.validate import (
    ExpectedOutputs,
    Tolerances,
    Validation,
    _check_outputs,
    agreement,
    open_session,
)


def _identity_session(tmp_path, width: int):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "id.onnx"
    onnx.save(model, str(path))
    return open_session(path, "enable_all")


def _check(tmp_path, ort_out, sim, fp32, step=0.01):
    v = Validation()
    _check_outputs(
        v,
        _identity_session(tmp_path, ort_out.shape[1]),
        "enable_all",
        ExpectedOutputs(
            eval_inputs=ort_out.astype(np.float32),
            eval_targets=torch.zeros(len(ort_out)),
            metric=lambda out, targets: 1.0,
            sim_outputs=sim,
            output_step=step,
            tolerances=Tolerances(),
            batch_size=64,
            fp32_outputs=fp32,
        ),
    )
    return v.checks[-1]


def test_a_few_diverging_samples_pass_when_small_against_the_quantization_error(tmp_path):
    rng = np.random.default_rng(0)
    fp32 = rng.standard_normal((100, 8))
    sim = fp32 + 0.2 * rng.standard_normal((100, 8))  # the config's quantization error
    ort = sim.copy()
    ort[:10] += 0.1 * rng.standard_normal((10, 8))  # 10 samples off by flips, far over 3 steps
    ag = agreement(ort, sim, 0.01, fp32)
    assert ag["max_steps"] > 3 and ag["samples_within_3_steps"] == 0.9
    assert ag["relative_rms"] < 0.5
    check = _check(tmp_path, ort, sim, fp32)
    assert check.ok and "quantization error" in check.message


def test_a_wrong_form_fails_even_with_the_relative_rule(tmp_path):
    rng = np.random.default_rng(1)
    fp32 = rng.standard_normal((100, 8))
    sim = fp32 + 0.05 * rng.standard_normal((100, 8))
    ort = fp32 * 1.3  # e.g. a wrong scale: as large as the signal
    assert agreement(ort, sim, 0.01, fp32)["relative_rms"] > 1
    assert not _check(tmp_path, ort, sim, fp32).ok


def test_without_fp32_outputs_only_the_step_rule_applies(tmp_path):
    sim = np.zeros((4, 3))
    ort = sim + 0.05  # 5 steps
    assert "relative_rms" not in agreement(ort, sim, 0.01)
    assert not _check(tmp_path, ort, sim, None).ok
    assert _check(tmp_path, sim + 0.02, sim, None).ok
