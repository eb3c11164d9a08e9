"""Search-space resolution and exact costs."""

from __future__ import annotations

import math

import pytest

from autoquant.errors import UserError
from autoquant.space import QuantChoice, QuantConfig, build_space, config_cost, layer_weight_bytes
from autoquant.space.values import LayerInfo
from autoquant.spec import SearchSpaceSpec

FC = LayerInfo("fc", "linear", (128, 512), (1, 512), (1, 128), 65536, 65664, True, 0)
CONV = LayerInfo("conv", "conv", (16, 1, 3, 3), (1, 1, 8, 8), (1, 16, 8, 8), 9216, 160, True, 1)
OUT = LayerInfo("out", "linear", (10, 128), (1, 128), (1, 10), 1280, 1290, True, 2)
LAYERS = (FC, CONV, OUT)


def space(rules):
    return build_space(LAYERS, SearchSpaceSpec.model_validate({"rules": rules}))


def test_rules_override_in_order_and_positions():
    s = space(
        [
            {"match": {}, "weight_bits": [4, 8], "act_bits": [32], "granularity": ["per_channel"]},
            {"match": {"position": ["last"]}, "weight_bits": [8]},
            {"match": {"name": "^conv$"}, "pin": {"weight_bits": 32}},
        ]
    )
    assert {c.weight_bits for c in s.layer("fc").choices} == {4, 8}
    assert [c.label for c in s.layer("out").choices] == ["w8cs-a32"]
    assert [c.label for c in s.layer("conv").choices] == ["f32-a32"] and s.layer("conv").pinned
    assert s.size == 2


def test_unmatched_layers_stay_fp32():
    s = space([{"match": {"kind": ["conv"]}, "weight_bits": [8]}])
    assert [c.label for c in s.layer("fc").choices] == ["f32-a32"]


def test_exclusions_have_reasons():
    s = space(
        [
            {
                "match": {},
                "weight_bits": [4, 16],
                "act_bits": [8, 16, 32],
                "granularity": ["per_group"],
                "group_sizes": [32, 128],
            }
        ]
    )
    reasons = {(e.layer, e.choice): e.reason for e in s.exclusions}
    assert "does not divide the input dimension 1" in reasons[("conv", "w4g32s-a8")]
    assert "covers the whole input dimension 128" in reasons[("out", "w4g128s-a32")]
    assert "int8 activations need integer weights" in reasons[("fc", "f16-a8")]
    assert {c.label for c in s.layer("fc").choices} == {
        "w4g32s-a8",
        "w4g32s-a16",
        "w4g32s-a32",
        "w4g128s-a8",
        "w4g128s-a16",
        "w4g128s-a32",
        "f16-a16",
        "f16-a32",
    }


def test_no_valid_choice_is_a_user_error():
    with pytest.raises(UserError, match="'conv'.*no valid choice.*does not divide"):
        space(
            [{"match": {}, "weight_bits": [4], "granularity": ["per_group"], "group_sizes": [32]}]
        )


def test_float_choices_are_normalised_and_deduplicated():
    s = space(
        [
            {
                "match": {},
                "weight_bits": [16, 32],
                "granularity": ["per_tensor", "per_channel"],
                "symmetric": [True, False],
            }
        ]
    )
    assert [c.label for c in s.layer("fc").choices] == ["f32-a32", "f16-a32"]


def test_reference_configs_respect_pins():
    s = space(
        [
            {
                "match": {},
                "weight_bits": [8, 32],
                "act_bits": [8, 32],
                "granularity": ["per_channel"],
            },
            {"match": {"position": ["first"]}, "pin": {"weight_bits": 32}},
        ]
    )
    ref = s.reference(QuantChoice(8, 8, "per_channel"))
    assert ref["fc"] == QuantChoice() and ref["out"] == QuantChoice(8, 8, "per_channel")
    assert s.contains(ref)


def test_exact_bytes_by_granularity():
    w = 128 * 512
    bias = 128 * 4
    assert layer_weight_bytes(FC, QuantChoice()) == w * 4 + bias
    assert layer_weight_bytes(FC, QuantChoice(16, 32)) == w * 2 + bias
    assert layer_weight_bytes(FC, QuantChoice(8, 32, "per_tensor")) == w + 4 + bias
    assert layer_weight_bytes(FC, QuantChoice(8, 32, "per_channel")) == w + 128 * 4 + bias
    assert (
        layer_weight_bytes(FC, QuantChoice(8, 32, "per_channel", None, False)) == w + 128 * 5 + bias
    )
    groups = 128 * (512 // 32)
    assert layer_weight_bytes(FC, QuantChoice(4, 32, "per_group", 32)) == w // 2 + groups * 4 + bias
    assert layer_weight_bytes(FC, QuantChoice(4, 32, "per_group", 32, False)) == (
        w // 2 + groups * 4 + groups // 2 + bias
    )
    assert (
        layer_weight_bytes(FC, QuantChoice(3, 8, "per_channel"))
        == math.ceil(w * 3 / 8) + 128 * 4 + bias + 10
    )
    conv_groups = 16 * 1 * 9  # one scale per output channel, block and kernel position
    assert (
        layer_weight_bytes(CONV, QuantChoice(2, 32, "per_group", 1))
        == 144 * 2 // 8 + conv_groups * 4 + 64
    )


def test_config_cost_mean_bits_and_bops():
    config = QuantConfig.from_mapping(
        {
            "fc": QuantChoice(4, 8, "per_channel"),
            "conv": QuantChoice(),
            "out": QuantChoice(8, 8, "per_channel"),
        }
    )
    cost = config_cost(LAYERS, config, other_param_bytes=100)
    numel = 128 * 512 + 144 + 1280
    assert cost.mean_weight_bits == pytest.approx((128 * 512 * 4 + 144 * 32 + 1280 * 8) / numel)
    assert cost.bops == 65536 * 4 * 8 + 9216 * 32 * 32 + 1280 * 8 * 8
    assert cost.size_bytes == 100 + sum(
        layer_weight_bytes(layer, config[layer.name]) for layer in LAYERS
    )


def test_config_hash_is_stable_and_order_free():
    a = QuantConfig.from_mapping({"fc": QuantChoice(4, 8, "per_channel"), "out": QuantChoice()})
    b = QuantConfig.from_mapping({"out": QuantChoice(), "fc": QuantChoice(4, 8, "per_channel")})
    assert a.hash == b.hash and len(a.hash) == 16
    assert QuantConfig.from_json(a.to_json()) == a
    with pytest.raises(ValueError, match="version"):
        QuantConfig.from_dict({**a.to_dict(), "_version": 99})
    labels = {
        c.label
        for c in (
            QuantChoice(4, 8, "per_group", 32, False),
            QuantChoice(4, 8, "per_group", 64, False),
        )
    }
    assert len(labels) == 2


def test_labels_round_trip_through_from_label():
    choices = [
        QuantChoice(),
        QuantChoice(16, 32),
        QuantChoice(16, 16),
        QuantChoice(8, 8, "per_channel"),
        QuantChoice(4, 8, "per_group", 32, False),
        QuantChoice(2, 32, "per_tensor"),
        QuantChoice(3, 16, "per_channel", None, False),
    ]
    for choice in choices:
        assert QuantChoice.from_label(choice.label) == choice
    with pytest.raises(ValueError, match="not a choice label"):
        QuantChoice.from_label("w5cs-a8")


# --- dynamic int8 activations (-a8d) and explicit ``choices`` rules -------------------------------

A8D = QuantChoice(8, 8, "per_channel", None, True, act_dynamic=True)


def test_dynamic_label_round_trips_and_orders():
    assert A8D.label == "w8cs-a8d"
    for label in ["w8cs-a8d", "w8ts-a8d", "w4g32a-a8d", "f32-a8d"]:
        assert QuantChoice.from_label(label).label == label
    assert QuantChoice.from_label("w8cs-a8d") == A8D
    assert QuantChoice.from_label("w8cs-a8") == QuantChoice(8, 8, "per_channel")
    for bad in ["w8cs-a16d", "w8cs-a32d", "w8cs-ad", "w8cs-a8dd"]:
        with pytest.raises(ValueError, match="not a choice label"):
            QuantChoice.from_label(bad)
    with pytest.raises(ValueError, match="act_dynamic needs act_bits 8"):
        QuantChoice(8, 32, "per_channel", act_dynamic=True)
    assert sorted([A8D, QuantChoice(8, 8, "per_channel"), QuantChoice()]) == [
        QuantChoice(8, 8, "per_channel"),
        A8D,
        QuantChoice(),
    ]


def test_dynamic_choice_dict_and_old_hashes_unchanged():
    # hashes written by autoquant before dynamic activations existed
    a = QuantConfig.from_mapping({"fc": QuantChoice(4, 8, "per_channel"), "out": QuantChoice()})
    b = QuantConfig.from_mapping(
        {
            "a": QuantChoice(8, 8, "per_channel"),
            "b": QuantChoice(4, 32, "per_group", 32, False),
            "c": QuantChoice(16, 16),
            "d": QuantChoice(8, 32, "per_tensor"),
        }
    )
    assert (a.hash, b.hash) == ("0ec365140e46b362", "8eaa96073743f7aa")
    assert "act_dynamic" not in QuantChoice(8, 8, "per_channel").to_dict()
    assert A8D.to_dict()["act_dynamic"] is True
    assert QuantChoice.from_dict(A8D.to_dict()) == A8D
    assert QuantChoice.from_dict(QuantChoice(8, 8).to_dict()) == QuantChoice(8, 8)
    dyn = QuantConfig.from_mapping({"fc": A8D, "out": QuantChoice()})
    static = QuantConfig.from_mapping(
        {"fc": QuantChoice(8, 8, "per_channel"), "out": QuantChoice()}
    )
    assert dyn.hash != static.hash and QuantConfig.from_json(dyn.to_json()) == dyn


def test_dynamic_validity_reasons():
    from autoquant.space import why_invalid

    assert why_invalid(FC, A8D) is None
    assert why_invalid(FC, QuantChoice(8, 8, "per_tensor", act_dynamic=True)) is None
    assert "only on linear layers" in why_invalid(CONV, A8D)
    assert "ConvInteger" in why_invalid(CONV, A8D)
    assert "8-bit integer weights" in why_invalid(
        FC, QuantChoice(4, 8, "per_channel", act_dynamic=True)
    )
    grouped = QuantChoice(8, 8, "per_group", 32, True, act_dynamic=True)
    assert "per_tensor or per_channel" in why_invalid(FC, grouped)
    asym = QuantChoice(8, 8, "per_channel", None, False, act_dynamic=True)
    assert "symmetric weights" in why_invalid(FC, asym)
    assert "integer weights" in why_invalid(FC, QuantChoice(32, 8, act_dynamic=True))


def test_dynamic_activations_rule_expands_int8_only():
    s = space(
        [
            {
                "match": {},
                "weight_bits": [8, 32],
                "act_bits": [8, 32],
                "granularity": ["per_channel"],
                "dynamic_activations": [False, True],
            }
        ]
    )
    assert [c.label for c in s.layer("fc").choices] == [
        "f32-a32",
        "w8cs-a32",
        "w8cs-a8",
        "w8cs-a8d",
    ]
    assert "w8cs-a8d" not in s.layer("conv").by_label()
    reasons = {(e.layer, e.choice): e.reason for e in s.exclusions}
    assert "only on linear layers" in reasons[("conv", "w8cs-a8d")]
    only = space(
        [
            {"match": {}, "weight_bits": [8], "act_bits": [8], "dynamic_activations": [True]},
            {"match": {"kind": ["conv"]}, "dynamic_activations": [False]},
        ]
    )
    assert [c.label for c in only.layer("out").choices] == ["w8cs-a8d"]
    assert [c.label for c in only.layer("conv").choices] == ["w8cs-a8"]
    pinned = space(
        [
            {"match": {}, "pin": {"weight_bits": 8, "act_bits": 8, "dynamic_activations": True}},
            {"match": {"kind": ["conv"]}, "pin": {"weight_bits": 8, "act_bits": 8}},
        ]
    )
    assert [c.label for c in pinned.layer("fc").choices] == ["w8cs-a8d"]
    assert pinned.layer("fc").pinned


def test_dynamic_on_conv_only_is_a_user_error():
    with pytest.raises(UserError, match="'conv'.*no valid choice.*only on linear layers"):
        space([{"match": {}, "weight_bits": [8], "act_bits": [8], "dynamic_activations": [True]}])


def test_choices_rule_lists_choices_outright():
    s = space(
        [
            {"match": {}, "weight_bits": [4], "act_bits": [8]},
            {
                "match": {"kind": ["linear"]},
                "choices": ["w8cs-a8d", "w4g32s-a32", "f32-a32", "f32-a32"],
            },
        ]
    )
    assert [c.label for c in s.layer("fc").choices] == ["f32-a32", "w8cs-a8d", "w4g32s-a32"]
    assert [c.label for c in s.layer("conv").choices] == ["w4cs-a8"]
    assert s.layer("out").choices == s.layer("fc").choices and not s.exclusions
    # a later rule that sets fields goes back to the product; a later choices rule unpins
    later = space(
        [
            {"match": {}, "choices": ["w8cs-a8d", "f32-a32"]},
            {"match": {"position": ["last"]}, "weight_bits": [8]},
            {"match": {"kind": ["conv"]}, "pin": {"weight_bits": 32}},
            {"match": {"name": "^conv$"}, "choices": ["w8cs-a8", "w8ts-a8"]},
        ]
    )
    assert [c.label for c in later.layer("out").choices] == ["w8cs-a32"]
    assert [c.label for c in later.layer("conv").choices] == ["w8cs-a8", "w8ts-a8"]
    assert not later.layer("conv").pinned
    ref = later.reference(A8D)
    assert ref["fc"] == A8D and ref["out"] == QuantChoice(8, 32, "per_channel")


def test_choices_rule_exclusions_and_empty_layer():
    s = space([{"match": {}, "choices": ["w8cs-a8d", "w8cs-a8"]}])
    assert [c.label for c in s.layer("conv").choices] == ["w8cs-a8"]
    assert {(e.layer, e.choice) for e in s.exclusions} == {("conv", "w8cs-a8d")}
    with pytest.raises(UserError, match="'conv'.*no valid choice.*only on linear layers"):
        space([{"match": {}, "choices": ["w8cs-a8d"]}])


def test_dynamic_costs():
    static = QuantChoice(8, 8, "per_channel")
    assert layer_weight_bytes(FC, A8D) == layer_weight_bytes(FC, static) - 10
    assert layer_weight_bytes(FC, A8D) == layer_weight_bytes(FC, QuantChoice(8, 32, "per_channel"))
    config = QuantConfig.from_mapping({"fc": A8D, "conv": QuantChoice(), "out": static})
    assert config_cost(LAYERS, config).bops == 65536 * 8 * 8 + 9216 * 32 * 32 + 1280 * 8 * 8
