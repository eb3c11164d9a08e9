"""fp8 (E4M3) weights, a format added through the registry alone (``autoquant/formats/fp8.py``
and its registration): labelled, simulated, sized, searched, exported as ``DequantizeLinear``
of FLOAT8E4M3FN codes and validated in ONNX Runtime, excluded with a reason by backends."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import run_cli, write, write_profile

from autoquant.space.values import LayerInfo, QuantChoice, QuantConfig

FP8 = "wf8cs-a32"
LAYER = LayerInfo("fc", "linear", (16, 32), (1, 32), (1, 16), 512, 16 * 32 + 16, True)


def test_label_names_its_own_format_and_leaves_older_labels_and_hashes_alone():
    fp8 = QuantChoice.from_label(FP8)
    assert (fp8.weight_format, fp8.weight_bits, fp8.granularity) == ("fp8e4m3", 8, "per_channel")
    assert fp8.label == FP8 and QuantChoice.from_label("wf8ts-a16").label == "wf8ts-a16"
    assert fp8 != QuantChoice.from_label("w8cs-a32") and not fp8.weight_is_int
    config = QuantConfig((("fc", fp8),))
    assert QuantConfig.from_json(config.to_json()) == config
    # int8 weights still carry no format name: their dicts, and configs' hashes, stand
    assert "weight_format" not in QuantChoice.from_label("w8cs-a32").to_dict()
    with pytest.raises(ValueError, match="not a choice label"):
        QuantChoice.from_label("wf8ca-a32")  # no asymmetric fp8


def test_simulation_maps_each_channels_largest_weight_to_448_and_rounds_to_e4m3():
    from autoquant.quant.fake import fake_quantize_weight

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero channel keeps scale 1 and stays zero
    out = fake_quantize_weight(w, QuantChoice.from_label(FP8))
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    scale[3] = 1.0
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(out, expected) and not torch.equal(out, w)
    # 448 is an E4M3 value: each channel's largest weight comes back (to float32 rounding)
    assert torch.allclose(out.abs().amax(dim=1), w.abs().amax(dim=1), rtol=1e-6, atol=0)
    # E4M3 keeps 3 mantissa bits: a relative error of at most 2^-4 on normal values
    big = w.abs() > scale * 2**-6
    assert ((out - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-7).all()


def test_size_is_one_byte_per_weight_plus_float32_scales():
    from autoquant.space.cost import layer_weight_bytes

    assert layer_weight_bytes(LAYER, QuantChoice.from_label(FP8)) == 16 * 32 + 16 * 4 + 16 * 4
    assert layer_weight_bytes(LAYER, QuantChoice.from_label("wf8ts-a32")) == 16 * 32 + 4 + 16 * 4


def test_space_excludes_what_fp8_cannot_run_with_its_reason():
    from autoquant.space.searchspace import why_invalid

    assert why_invalid(LAYER, QuantChoice.from_label(FP8)) is None
    assert "int8 activations" in why_invalid(LAYER, QuantChoice(8, 8, weight_format="fp8e4m3"))
    grouped = QuantChoice(8, 32, "per_group", 16, weight_format="fp8e4m3")
    assert "per_tensor or per_channel" in why_invalid(LAYER, grouped)


def test_latency_backends_exclude_fp8_for_want_of_a_kernel(tmp_path):
    pytest.importorskip("onnxruntime")
    from autoquant.backends.registry import backend_for

    profile = {
        "version": 1,
        "name": "test-ort",
        "target": {"kind": "llvm"},
        "device": {"where": "local"},
        "runtime": "onnxruntime",
        "threads": 1,
        "batch_size": 1,
    }
    with backend_for(write_profile(tmp_path, profile)) as backend:
        reason = backend.exclusion(LAYER, QuantChoice.from_label(FP8))
        assert reason is not None and "fp8_weight_only" in reason
        timing = backend.measure(LAYER, QuantChoice.from_label(FP8))
        assert (timing.status, timing.error) == ("excluded", reason)
        assert backend.exclusion(LAYER, QuantChoice.from_label("w8cs-a32")) is None


def test_search_then_export_fp8_validated_in_onnx_runtime(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    write(
        tmp_path / "space.yaml",
        f"version: 1\nrules:\n  - match: {{}}\n    choices: [f32-a32, {FP8}]\n",
    )
    spec = write(
        tmp_path / "spec.yaml",
        "version: 1\nname: fp8\ntask: digits-mlp\nspace: space.yaml\n"
        "search: {sampler: random, trials: 8, seed: 0}\n",
    )
    run = tmp_path / "run"
    code, _, err = run_cli(["search", spec, "--out", run, "--quiet"], capsys)
    assert code == 0, err
    trials = pd.read_parquet(run / "trials.parquet")
    layers = [c for c in trials.columns if c.startswith("layer:")]
    assert (trials[layers] == FP8).any(axis=None)  # searched: fp8 layers were measured
    front = pd.read_csv(run / "pareto.csv")
    smallest = front.loc[front["size_bytes"].idxmin()]
    config = QuantConfig.from_json(smallest["config"])
    assert {c.label for _, c in config.choices} == {FP8}  # every layer fp8: the smallest

    out = tmp_path / "export"
    pick = f"trial={int(smallest['trial'])}"
    code, _, err = run_cli(
        ["export", run, "--pick", pick, "--out", out, "--latency-repeats", "5"], capsys
    )
    assert code == 0, err
    model = onnx.load(str(out / "model.onnx"))
    f8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in f8]
    assert len(f8) == len(layers) == len(dq)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"], manifest["failures"]
    assert {row["form"] for row in manifest["layers"]} == {"fp8-dq"}
    checks = {c["name"]: c for c in manifest["checks"]}
    assert checks["agreement_enable_all"]["ok"] and checks["accuracy"]["ok"]
    assert checks["weight_dequantize"]["value"] == len(layers)  # the format's form, per call
