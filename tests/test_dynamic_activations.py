"""Dynamic int8 activations (``-a8d``) outside the space and the simulation: the predictor's
features, the kernel formats of the hardware profiles."""

from __future__ import annotations

import numpy as np

from autoquant.space import QuantChoice, QuantConfig, build_space
from autoquant.space.values import LayerInfo
from autoquant.spec import SearchSpaceSpec

FC = LayerInfo("fc", "linear", (128, 512), (1, 512), (1, 128), 65536, 65664, True, 0)
OUT = LayerInfo("out", "linear", (10, 128), (1, 128), (1, 10), 1280, 1290, True, 1)
CONV = LayerInfo("conv", "conv", (16, 1, 3, 3), (1, 1, 8, 8), (1, 16, 8, 8), 9216, 160, True, 2)
A8D = QuantChoice.from_label("w8cs-a8d")
A8 = QuantChoice.from_label("w8cs-a8")


def _encoder():
    from autoquant.predict.features import FeatureEncoder
    from autoquant.predict.sensitivity import ChoiceSensitivity, LayerSensitivity

    rules = {"rules": [{"match": {}, "choices": ["f32-a32", "w8cs-a32", "w8cs-a8", "w8cs-a8d"]}]}
    space = build_space((FC, OUT), SearchSpaceSpec.model_validate(rules))
    figures = {
        ls.layer.name: {
            c.label: ChoiceSensitivity(0.1, 0.0, 0.1, 0.0, None, "estimated") for c in ls.choices
        }
        for ls in space.layers
    }
    sensitivity = LayerSensitivity("x", figures, {}, 0.0, 0)
    return FeatureEncoder(space, sensitivity)


def test_features_tell_dynamic_from_static_int8():
    encoder = _encoder()
    names = encoder.feature_names
    assert "fc:a_dynamic" in names and "n_act8_dynamic" in names
    configs = [
        QuantConfig.from_mapping({"fc": A8D, "out": A8}),
        QuantConfig.from_mapping({"fc": A8, "out": A8}),
        QuantConfig.from_mapping({"fc": A8D, "out": A8D}),
    ]
    X = encoder.encode(configs)
    col = {name: X[:, i] for i, name in enumerate(names)}
    assert col["fc:a_bits"].tolist() == [8, 8, 8]
    assert col["fc:a_dynamic"].tolist() == [1, 0, 1]
    assert col["n_act8"].tolist() == [1, 2, 0]
    assert col["n_act8_dynamic"].tolist() == [1, 0, 2]
    # the exact figures agree with config_cost: no stored activation parameters, int8 BOPs
    from autoquant.space import config_cost

    exact = encoder.exact(encoder.indices(configs))
    for i, config in enumerate(configs):
        cost = config_cost((FC, OUT), config)
        assert exact["size_bytes"][i] == cost.size_bytes and exact["bops"][i] == cost.bops
    assert np.isfinite(X).all()


def test_kernel_format_and_class_of_dynamic_choices():
    from autoquant.hardware.kernels import FORMATS, kernel_format, kernel_spec
    from autoquant.latency.model import kernel_class

    assert kernel_format(A8D) == "w8a8_dynamic" and "w8a8_dynamic" in FORMATS
    assert kernel_format(A8) == "w8a8"
    assert kernel_class(A8D) == "integer"
    reason = kernel_spec(FC, A8D, 1, vnni=True, avx2=True)
    assert isinstance(reason, str) and "no TVM kernel" in reason
    assert not isinstance(kernel_spec(FC, A8, 1, vnni=True, avx2=True), str)


def test_ort_profile_lists_dynamic_format_and_tvm_profiles_do_not():
    from autoquant.hardware.profile import PROFILES_DIR, load_profile_spec

    assert "w8a8_dynamic" in load_profile_spec(PROFILES_DIR / "cpu-local-ort.yaml").formats
    assert "w8a8_dynamic" not in load_profile_spec(PROFILES_DIR / "cpu-local.yaml").formats
