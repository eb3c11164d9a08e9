"""Every kernel family computes what numpy computes, on small random data.

Kernels are built for this machine's CPU and run once; the reference is float64 numpy on the
same packed data (uint8 outputs may differ by one code where float rounding sits on a boundary).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tvm_or_skip

from autoquant.hardware.kernels import (
    check_output,
    im2col,
    infer_conv_geometry,
    kernel_format,
    kernel_spec,
    make_data,
    output_dtype,
    pack_bits,
)
from autoquant.space.values import LayerInfo, QuantChoice

pytestmark = pytest.mark.requires_tvm

DENSE = LayerInfo("fc", "linear", (40, 64), (1, 64), (1, 40), 40 * 64, 40 * 64 + 40, True)
DENSE_NOBIAS = LayerInfo("fc", "linear", (24, 30), (1, 30), (1, 24), 24 * 30, 24 * 30, False)
CONV = LayerInfo(
    "c", "conv", (16, 8, 3, 3), (1, 8, 6, 6), (1, 16, 6, 6), 16 * 72 * 36, 16 * 72 + 16, True
)
CONV_S2 = LayerInfo(
    "c2", "conv", (8, 3, 3, 3), (1, 3, 9, 9), (1, 8, 5, 5), 8 * 27 * 25, 8 * 27 + 8, True
)

C = QuantChoice
CHOICES = [
    C(32, 32),
    C(16, 32),
    C(16, 16),
    C(8, 32, "per_tensor", None, True),
    C(4, 32, "per_channel", None, False),
    C(4, 32, "per_group", 8, True),
    C(3, 32, "per_group", 8, False),
    C(3, 16, "per_channel", None, True),
    C(2, 32, "per_group", 8, False),
    C(8, 8, "per_channel", None, True),
    C(8, 8, "per_tensor", None, False),
    C(4, 8, "per_channel", None, False),
    C(2, 8, "per_tensor", None, True),
    C(8, 8, "per_group", 8, True),
    C(3, 8, "per_group", 8, False),
]


@pytest.fixture(scope="module")
def host():
    tvm_or_skip()
    from autoquant.hardware._tvm import load_tvm

    tvm = load_tvm(2)
    import tvm.target.codegen as codegen

    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2}
    )
    return tvm, target


def run_kernel(host, spec, *, tensorize=True, **schedule):
    from autoquant.backends.tvm import kernels as tvm_kernels

    tvm, target = host
    ex, names = tvm_kernels.build(spec, target, threads=2, tensorize=tensorize, **schedule)
    data = make_data(spec, seed=3)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(data.inputs[n], dev) for n in names[:-1]]
    args.append(tvm.runtime.tensor(np.zeros((spec.m, spec.np_), output_dtype(spec)), dev))
    ex(*args)
    return data, args[-1].numpy()


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c.label)
@pytest.mark.parametrize(
    ("layer", "batch"), [(DENSE, 1), (DENSE, 6), (CONV, 1)], ids=["dense-b1", "dense-b6", "conv"]
)
def test_kernel_matches_numpy(host, layer, batch, choice):
    if layer.kind == "conv" and choice.granularity == "per_group":
        choice = C(choice.weight_bits, choice.act_bits, "per_group", 4, choice.symmetric)
    spec = kernel_spec(layer, choice, batch, vnni=False)
    assert not isinstance(spec, str), spec
    assert kernel_format(choice) == spec.fmt
    data, out = run_kernel(host, spec)
    assert out.dtype == np.dtype(output_dtype(spec))
    assert check_output(spec, data, out) is None


@pytest.mark.parametrize(
    "choice",
    [C(32, 32), C(8, 8, "per_channel", None, False), C(4, 32, "per_channel", None, True)],
    ids=lambda c: c.label,
)
@pytest.mark.parametrize("layer", [DENSE_NOBIAS, CONV_S2], ids=["odd-k-nobias", "conv-stride2-c3"])
def test_odd_shapes(host, layer, choice):
    spec = kernel_spec(layer, choice, 2, vnni=False)
    data, out = run_kernel(host, spec)
    assert check_output(spec, data, out) is None


@pytest.mark.parametrize(
    "choice",
    [
        C(8, 8, "per_channel", None, True),
        C(8, 8, "per_tensor", None, False),
        C(8, 8, "per_channel", None, False),
    ],
    ids=lambda c: c.label,
)
@pytest.mark.parametrize("layer", [DENSE_NOBIAS, CONV_S2], ids=["dense-k30", "conv-c3"])
def test_vnni_layout_and_corrections(host, layer, choice):
    """The VNNI data layout (K padded to 4 with the zero point) and zero-point corrections,
    with the 16x4 dot product left to LLVM so it runs on any CPU."""
    spec = kernel_spec(layer, choice, 3, vnni=True)
    assert spec.vnni and spec.kp % 4 == 0 and spec.kp > spec.k
    data, out = run_kernel(host, spec, tensorize=False)
    assert check_output(spec, data, out) is None


def test_vnni_emits_vpdpbusd(host):
    """Cross-compiled for Zen 4: the registered intrinsic passes LLVM 22's verifier."""
    from autoquant.backends.tvm import kernels as tvm_kernels

    tvm, _ = host
    znver4 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    spec = kernel_spec(DENSE, C(8, 8, "per_channel", None, True), 4, vnni=True)
    ex, _ = tvm_kernels.build(spec, znver4, threads=2)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


def test_vnni_runs_where_the_cpu_has_it(host):
    import tvm.target.codegen as codegen

    tvm, target = host
    if not codegen.llvm_cpu_has_features(["avx512vnni"], target):
        pytest.skip(f"this CPU ({target.attrs['mcpu']}) has no AVX-512 VNNI")
    for layer in (DENSE, CONV_S2):
        spec = kernel_spec(layer, C(8, 8, "per_channel", None, True), 4, vnni=True)
        data, out = run_kernel(host, spec)
        assert check_output(spec, data, out) is None


MADD16_CHOICES = [
    C(8, 8, "per_channel", None, True),
    C(8, 8, "per_tensor", None, True),
    C(4, 8, "per_channel", None, True),
    C(2, 8, "per_tensor", None, True),
    C(8, 8, "per_channel", None, False),
    C(8, 8, "per_tensor", None, False),
    C(3, 8, "per_channel", None, False),
]


def has_avx2(host) -> bool:
    import tvm.target.codegen as codegen

    return bool(codegen.llvm_cpu_has_features(["avx2"], host[1]))


@pytest.mark.parametrize("choice", MADD16_CHOICES, ids=lambda c: c.label)
@pytest.mark.parametrize(
    ("layer", "batch"),
    [(DENSE, 1), (DENSE, 6), (CONV, 1), (DENSE_NOBIAS, 2), (CONV_S2, 2)],
    ids=["dense-b1", "dense-b6", "conv", "dense-k30-nobias", "conv-k27-stride2"],
)
def test_madd16_matches_numpy(host, layer, batch, choice):
    """Float in, float out: quantize, int16 pairs, requantize and dequantize in one kernel;
    K padded to even (27 -> 28) with zero weights; asymmetric weights corrected with the
    activations' row sums."""
    spec = kernel_spec(layer, choice, batch, vnni=False, avx2=True)
    assert spec.madd16 and spec.kp % 2 == 0 and "madd16" in spec.impl
    assert output_dtype(spec) == "float32"
    data, out = run_kernel(host, spec, tensorize=False)  # the layout, on any CPU
    assert check_output(spec, data, out) is None
    if has_avx2(host):
        data, out = run_kernel(host, spec)
        assert check_output(spec, data, out) is None


def test_madd16_is_exact_where_vpmaddubsw_saturates(host):
    """Extreme codes: u8 x s8 pair sums of 248 x -128 x 2 overflow int16 (the saturating
    ``vpmaddubsw`` path would clip them); ``vpmaddwd`` keeps them exact."""
    if not has_avx2(host):
        pytest.skip("no AVX2")
    spec = kernel_spec(DENSE, C(8, 8, "per_tensor", None, True), 2, vnni=False, avx2=True)
    data = make_data(spec, seed=0)
    sa, za = data.act["sa"], data.act["za"]
    data.x[:] = 255
    data.inputs["x"][:] = np.float32((255 - za) * sa)
    data.inputs["w"][:] = -128
    s = float(data.inputs["scale"][0])
    data.w[:] = np.float32(-128 * s)
    data.act["so"] = (255 - za) * sa * 128 * s * spec.k / 100.0  # outputs land inside uint8
    data.act["zo"] = 200.0
    data.inputs["aq"] = np.array([sa, za, data.act["so"], data.act["zo"]], dtype=np.float32)
    from autoquant.backends.tvm import kernels as tvm_kernels

    tvm, target = host
    ex, names = tvm_kernels.build(spec, target, threads=2)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(data.inputs[n], dev) for n in names[:-1]]
    args.append(tvm.runtime.tensor(np.zeros((spec.m, spec.np_), "float32"), dev))
    ex(*args)
    assert check_output(spec, data, args[-1].numpy()) is None
    assert "vpmaddwd" in ex.mod.inspect_source("asm")


def test_kernel_spec_picks_madd16_only_where_it_applies():
    sym8, sym4 = C(8, 8, "per_channel", None, True), C(4, 8, "per_tensor", None, True)
    assert kernel_spec(DENSE, sym8, 1, vnni=False, avx2=True).madd16
    assert kernel_spec(CONV, sym4, 1, vnni=False, avx2=True).madd16
    assert not kernel_spec(DENSE, sym8, 1, vnni=False).madd16  # no AVX2
    assert not kernel_spec(DENSE, sym8, 1, vnni=True, avx2=True).madd16  # VNNI wins
    assert kernel_spec(DENSE, C(8, 8, "per_tensor", None, False), 1, vnni=False, avx2=True).madd16
    for other in (C(8, 8, "per_group", 8, True), C(8, 32), C(4, 32, "per_channel", None, True)):
        assert not kernel_spec(DENSE, other, 1, vnni=False, avx2=True).madd16


def test_check_output_catches_wrong_results(host):
    spec = kernel_spec(DENSE, C(4, 32, "per_group", 8, True), 2, vnni=False)
    data, out = run_kernel(host, spec)
    bad = out.copy()
    bad[0, 0] += 1.0
    assert check_output(spec, data, bad) is not None


def test_pack_bits_roundtrip():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        u = rng.integers(0, 1 << bits, size=(5, 21))
        packed = pack_bits(u, bits, 16)  # [1, bytes, 16]
        rows = packed.transpose(0, 2, 1).reshape(16, -1)[:5]
        stream = np.unpackbits(rows, axis=1, bitorder="little")
        got = sum(stream[:, np.arange(21) * bits + b].astype(np.int64) << b for b in range(bits))
        np.testing.assert_array_equal(got, u)


def test_conv_geometry_and_exclusions():
    geo = infer_conv_geometry(CONV_S2, 1)
    assert (geo.stride, geo.pad, geo.out_h) == (2, 1, 5)
    x = np.arange(1 * 9 * 9 * 3, dtype=np.float64).reshape(1, 9, 9, 3)
    cols = im2col(x, geo, 0.0)
    assert cols.shape == (25, 27) and cols[0, 0] == 0.0  # top-left tap is padding
    depthwise = LayerInfo("dw", "conv", (8, 1, 3, 3), (1, 8, 6, 6), (1, 8, 6, 6), 0, 0, False)
    assert "grouped" in kernel_spec(depthwise, C(32, 32), 1, vnni=False)
    assert "group size" in kernel_spec(CONV_S2, C(4, 32, "per_group", 2, True), 1, vnni=False)
    assert "activations" in kernel_spec(DENSE, C(32, 8), 1, vnni=False)


@pytest.mark.parametrize(
    "choice",
    [
        C(32, 32),
        C(4, 32, "per_group", 8, False),
        C(8, 8, "per_channel", None, True),
        C(3, 8, "per_group", 8, True),
    ],
    ids=lambda c: c.label,
)
@pytest.mark.parametrize(("layer", "batch"), [(DENSE, 6), (CONV, 2)], ids=["dense", "conv"])
def test_multithreaded_schedules(host, layer, batch, choice):
    """Small kernels run single-threaded; force the parallel schedules on the same shapes (a
    profile's ``schedule.parallel_min_macs: 0``)."""
    parallel = {"parallel_min_macs": 0}
    if layer.kind == "conv" and choice.granularity == "per_group":
        choice = C(choice.weight_bits, choice.act_bits, "per_group", 4, choice.symmetric)
    spec = kernel_spec(layer, choice, batch, vnni=False)
    data, out = run_kernel(host, spec, **parallel)
    assert check_output(spec, data, out) is None
    if choice.act_bits == 8 and choice.granularity != "per_group":
        vnni_spec = kernel_spec(layer, choice, batch, vnni=True)
        data, out = run_kernel(host, vnni_spec, tensorize=False, **parallel)
        assert check_output(vnni_spec, data, out) is None
    if choice.act_bits == 8 and choice.granularity != "per_group":
        madd_spec = kernel_spec(layer, choice, batch, vnni=False, avx2=True)
        data, out = run_kernel(host, madd_spec, tensorize=has_avx2(host), **parallel)
        assert check_output(madd_spec, data, out) is None
