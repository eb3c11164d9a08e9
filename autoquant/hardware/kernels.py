"""What one per-layer kernel computes, its packed data layout, and a numpy reference.

Pure numpy: no TVM here. ``backends.tvm.kernels`` builds the same computation as a scheduled TVM kernel,
and the tests (and the backend's optional check) compare the two on random data.

Every layer becomes a dense problem ``out[M, N] = act(A[M, K] @ W[N, K]^T + bias)``:

* linear: ``M = batch x rows``, ``K = in_features``, ``N = out_features``;
* conv2d: im2col inside the kernel (a scheduled stage of the same TVM function, so its cost is
  in the timing): ``M = batch x OH x OW``, ``K = KH x KW x C`` ordered ``(kh, kw, c)``, NHWC
  input. Stride and padding are not part of ``LayerInfo``; they are inferred from the input and
  output shapes (dilation 1). Grouped and depthwise convolutions have no kernel yet.

Weights are pre-packed in blocks of 16 output channels (the vector width of the schedules);
``N`` is padded to ``Np``, a multiple of 16, and the kernel writes ``[M, Np]`` (the padding
columns are zero-weight outputs; a deployed graph pads the same way).

Formats (``KernelFormat``), from a ``QuantChoice``:

* ``fp32``: float32 weights ``[Np/16, K, 16]``;
* ``fp16``: float16 weights, same layout, widened to float32 in the inner loop; float16
  activations when ``act_bits == 16``;
* ``weight_only``: 2/3/4/8-bit integer weights with float activations, packed along K into bytes
  (``[Np/16, ceil(K*bits/8)(+1 for 3 bits), 16]`` uint8, stored as ``q + 2^(bits-1)``), float32
  scales per tensor/channel/group and uint8 zero points; dequantized inside the matmul;
* ``w8a8``: int8 weights and uint8 activations, int32 accumulation, requantized to uint8 output.
  With AVX-512 VNNI (``vpdpbusd``) weights are ``[Np/16, Kp/4, 16, 4]`` int8 (``Kp`` = K padded
  to 4, padding filled with the activation zero point); otherwise a plain int32 schedule;
* ``wNa8``: 2/3/4-bit weights with uint8 activations, int32 accumulation (per-tensor/channel);
* ``w8a8_dynamic``: int8 weights with uint8 activations quantized at run time (ONNX Runtime's
  DynamicQuantizeMatMul): no TVM template yet, so ``kernel_spec`` gives the reason.

``madd16`` (AVX2 without VNNI; per-tensor/channel ``w8a8`` and ``wNa8``): signed weight codes
as int8 ``[Np/16, Kp/2, 16, 2]`` (``Kp`` = K padded to 2 with zero weights; asymmetric weights
subtract ``zero x`` the activations' row sums after the dot product); float32 input
quantized to uint8 codes and shifted by the zero point into int16 inside the kernel (fused with
im2col), the output requantized to uint8 codes and dequantized to float32 in the epilogue, so a
whole model needs no separate quantize / dequantize operators around the layer (on small models
those calls cost more than the integer arithmetic saves); pairs along K are multiplied and
summed into int32 by ``vpmaddwd`` (16 multiply-adds per instruction, twice float32 FMA's 8). Exact: the
products are at most 255 x 128 and a pair's sum fits int32, unlike ``vpmaddubsw``'s saturating
int16 sums. Low-bit codes are stored one per byte here: on this path the kernel's speed, not its
storage, is what the table records (the model's size objective counts the configured bits).

Per-group scales with uint8 activations (``w8a8`` or ``wNa8`` per-group) accumulate in float32
after dequantizing both operands in the inner loop (``impl`` says so): there is no int32
per-group template yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from autoquant import formats
from autoquant.space.values import LayerInfo, QuantChoice

KERNEL_TEMPLATE_VERSION = 4  # bump when a schedule changes: old table entries stop matching
LANES = 16

KernelFormat = Literal["fp32", "fp16", "weight_only", "w8a8", "wNa8", "w8a8_dynamic"]
FORMATS: tuple[KernelFormat, ...] = ("fp32", "fp16", "weight_only", "w8a8", "wNa8", "w8a8_dynamic")


def kernel_format(choice: QuantChoice) -> KernelFormat:
    """The kernel family a choice needs (its weight format says). A family outside
    ``FORMATS`` has no template here, and no profile can list it: backends exclude it."""
    return formats.weight_format(choice).kernel_family(choice)  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    batch: int
    height: int
    width: int
    channels: int
    kh: int
    kw: int
    stride: int
    pad: int
    out_h: int
    out_w: int


def infer_conv_geometry(layer: LayerInfo, batch: int) -> ConvGeometry | str:
    """Stride and padding from the shapes (dilation 1), or the reason there is no kernel."""
    o, i_per_group, kh, kw = layer.weight_shape
    _, c, h, w = layer.input_shape
    _, oc, oh, ow = layer.output_shape
    if c != i_per_group:
        return f"grouped convolution (groups={c // max(i_per_group, 1)}) has no kernel template yet"
    for stride in range(1, max(kh, kw, 2) + 1):
        for pad in range(0, max(kh, kw)):
            if (h + 2 * pad - kh) // stride + 1 == oh and (w + 2 * pad - kw) // stride + 1 == ow:
                return ConvGeometry(batch, h, w, c, kh, kw, stride, pad, oh, ow)
    return (
        f"cannot infer stride/padding of a {kh}x{kw} conv from {h}x{w} -> {oh}x{ow} "
        "(dilated convolutions have no kernel template yet)"
    )


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: the dense problem, the formats of its operands, and the conv geometry."""

    op: Literal["dense", "conv"]
    m: int
    n: int
    k: int
    fmt: KernelFormat
    weight_bits: int
    act_bits: int
    granularity: str
    group_size: int | None
    symmetric: bool
    has_bias: bool
    conv: ConvGeometry | None = None
    vnni: bool = False
    madd16: bool = False

    @property
    def np_(self) -> int:
        return -(-self.n // LANES) * LANES

    @property
    def kp(self) -> int:
        """K as stored: padded to 4 for VNNI (conv pads channels), to 2 for ``madd16``, else K."""
        if self.madd16:
            return -(-self.k // 2) * 2
        if not self.vnni:
            return self.k
        if self.conv is not None:
            return self.conv.kh * self.conv.kw * self.cp
        return -(-self.k // 4) * 4

    @property
    def cp(self) -> int:
        assert self.conv is not None
        return -(-self.conv.channels // 4) * 4 if self.vnni else self.conv.channels

    @property
    def n_groups(self) -> int:
        if self.granularity == "per_group":
            assert self.group_size is not None
            return self.k // self.group_size
        return 1

    @property
    def int_accumulate(self) -> bool:
        return self.fmt in ("w8a8", "wNa8") and self.granularity != "per_group"

    @property
    def impl(self) -> str:
        """A name for the template used, recorded with every timing."""
        parts = [self.op, self.fmt]
        if self.fmt in ("weight_only", "w8a8", "wNa8"):
            parts.append(f"w{self.weight_bits}")
            parts.append(
                {"per_tensor": "t", "per_channel": "c"}.get(self.granularity, f"g{self.group_size}")
            )
            parts.append("sym" if self.symmetric else "asym")
        parts.append(f"a{self.act_bits}")
        if self.fmt in ("w8a8", "wNa8"):
            if self.vnni:
                parts.append("vnni")
            elif self.madd16:
                parts.append("madd16")
            else:
                parts.append("i32" if self.int_accumulate else "f32acc")
        return "-".join(parts)

    @property
    def stored_weight_bytes(self) -> int:
        """Bytes of the packed weight array (padding included)."""
        if self.fmt == "fp32":
            return self.np_ * self.k * 4
        if self.fmt == "fp16":
            return self.np_ * self.k * 2
        if self.vnni or self.madd16:
            return self.np_ * self.kp
        return self.np_ * packed_k_bytes(self.k, self.weight_bits)


def packed_k_bytes(k: int, bits: int) -> int:
    if bits == 3:
        return -(-k * 3 // 8) + 1  # one spare byte: the 3-bit reader loads two bytes at a time
    return -(-k * bits // 8)


def kernel_spec(
    layer: LayerInfo, choice: QuantChoice, batch: int, *, vnni: bool, avx2: bool = False
) -> KernelSpec | str:
    """The kernel for a layer and choice at a batch size, or the reason there is none.

    ``vnni``: whether the target has AVX-512 VNNI (only ``w8a8`` per-tensor/channel uses it).
    ``avx2``: whether it has AVX2; then per-tensor/channel ``w8a8`` and ``wNa8`` without VNNI
    use the ``madd16`` template (``vpmaddwd``).
    """
    if batch < 1:
        return f"batch size {batch} must be >= 1"
    fmt = kernel_format(choice)
    if fmt == "w8a8_dynamic":
        return "dynamic int8 activations have no TVM kernel template yet"
    if fmt == "fp32" and choice.act_bits != 32:
        return f"float32 weights with {choice.act_bits}-bit activations have no kernel"
    if fmt == "fp16" and choice.act_bits == 8:
        return "float16 weights with int8 activations have no kernel"
    common = dict(
        fmt=fmt,
        weight_bits=choice.weight_bits,
        act_bits=choice.act_bits,
        granularity=choice.granularity if choice.weight_is_int else "per_tensor",
        group_size=choice.group_size if choice.granularity == "per_group" else None,
        symmetric=choice.symmetric if choice.weight_is_int else True,
        has_bias=layer.has_bias,
    )
    use_vnni = vnni and fmt == "w8a8" and choice.granularity != "per_group"
    common["madd16"] = (
        avx2 and not use_vnni and fmt in ("w8a8", "wNa8") and choice.granularity != "per_group"
    )
    if layer.kind == "linear":
        n, k = layer.weight_shape
        rows = math.prod(layer.input_shape[1:-1]) if len(layer.input_shape) > 2 else 1
        spec = KernelSpec("dense", batch * rows, n, k, vnni=use_vnni, **common)
    else:
        geo = infer_conv_geometry(layer, batch)
        if isinstance(geo, str):
            return geo
        n = layer.weight_shape[0]
        spec = KernelSpec(
            "conv",
            batch * geo.out_h * geo.out_w,
            n,
            geo.kh * geo.kw * geo.channels,
            conv=geo,
            vnni=use_vnni,
            **common,
        )
        if spec.granularity == "per_group" and geo.channels % (spec.group_size or 1):
            return f"group size {spec.group_size} does not divide the {geo.channels} input channels"
    if spec.granularity == "per_group" and spec.k % (spec.group_size or 1):
        return f"group size {spec.group_size} does not divide K={spec.k}"
    return spec


# --- data: random operands in the packed layouts, and the numpy reference -----------------------


@dataclass
class KernelData:
    """Logical operands (for the reference) and packed arrays (the kernel's arguments)."""

    inputs: dict[str, np.ndarray]  # kernel argument name -> array, in argument order
    x: np.ndarray  # the logical input: [M, K] for dense, [B, H, W, C] (NHWC) for conv
    w: np.ndarray  # the logical (dequantized) weight [N, K], K ordered (kh, kw, c) for conv
    bias: np.ndarray | None
    act: dict[str, float]  # sa, za, so, zo for uint8 activations


def _pack_blocks(w: np.ndarray, np_: int) -> np.ndarray:
    """[N, K] -> [Np/16, K, 16] (zero-padded output channels)."""
    n, k = w.shape
    out = np.zeros((np_, k), dtype=w.dtype)
    out[:n] = w
    return np.ascontiguousarray(out.reshape(np_ // LANES, LANES, k).transpose(0, 2, 1))


def pack_bits(u: np.ndarray, bits: int, np_: int) -> np.ndarray:
    """Unsigned codes [N, K] (< 2^bits) -> [Np/16, packed K bytes, 16] uint8, little-endian bit
    order along K: code k sits at bit ``k*bits`` of the row's bit stream."""
    n, k = u.shape
    nbytes = packed_k_bytes(k, bits)
    rows = np.zeros((np_, nbytes), dtype=np.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        for j in range(per):
            part = u[:, j::per].astype(np.uint8) << np.uint8(j * bits)
            rows[:n, : part.shape[1]] |= part
    else:
        stream = np.zeros((n, nbytes * 8), dtype=np.uint8)
        for b in range(bits):
            stream[:, np.arange(k) * bits + b] = (u >> b) & 1
        rows[:n] = np.packbits(stream, axis=1, bitorder="little")
    return np.ascontiguousarray(rows.reshape(np_ // LANES, LANES, nbytes).transpose(0, 2, 1))


def _group_blocks(values: np.ndarray, np_: int) -> np.ndarray:
    """[N, G] per-channel/group parameters -> [Np/16, G, 16] (padding: 1 for scales is not
    needed, padded weights are zero)."""
    n, g = values.shape
    out = np.zeros((np_, g), dtype=values.dtype)
    out[:n] = values
    return np.ascontiguousarray(out.reshape(np_ // LANES, LANES, g).transpose(0, 2, 1))


def make_data(spec: KernelSpec, seed: int = 0) -> KernelData:
    """Random operands for ``spec``: full-range integer codes, positive scales."""
    rng = np.random.default_rng(seed)  # drawn in order: activations, weights, bias
    act = {"sa": 0.02, "za": 7.0, "so": 0.05, "zo": 128.0}
    inputs: dict[str, np.ndarray] = {}
    x, inputs["x"] = _random_activations(spec, rng, act)
    if spec.fmt in ("fp32", "fp16"):
        w = _random_float_weights(spec, rng, inputs)
    else:
        w = _random_integer_weights(spec, rng, inputs)
    bias = None
    if spec.has_bias:
        bias = rng.standard_normal(spec.n).astype(np.float32) * 0.1
        padded = np.zeros(spec.np_, dtype=np.float32)
        padded[: spec.n] = bias
        inputs["bias"] = padded
    if spec.act_bits == 8:
        inputs["aq"] = np.array([act["sa"], act["za"], act["so"], act["zo"]], dtype=np.float32)
    return KernelData(inputs=inputs, x=x, w=w, bias=bias, act=act)


def _random_activations(
    spec: KernelSpec, rng: np.random.Generator, act: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(the logical input, the kernel's ``x`` argument): float for madd16 (the kernel quantizes
    it back to exactly these codes), K or C padded with the zero point for VNNI."""
    m, k = spec.m, spec.k
    x_shape = (
        (m, k)
        if spec.conv is None
        else (spec.conv.batch, spec.conv.height, spec.conv.width, spec.conv.channels)
    )
    if spec.act_bits == 8:
        x = rng.integers(0, 256, size=x_shape, dtype=np.uint8)
    elif spec.act_bits == 16:
        x = rng.standard_normal(x_shape).astype(np.float16)
    else:
        x = rng.standard_normal(x_shape).astype(np.float32)
    x_arg = x
    if spec.madd16:
        x_arg = ((x.astype(np.float32) - np.float32(act["za"])) * np.float32(act["sa"])).astype(
            np.float32
        )
    if spec.vnni:
        if spec.conv is None:
            x_arg = np.full((m, spec.kp), int(act["za"]), dtype=np.uint8)
            x_arg[:, :k] = x
        else:
            x_arg = np.full((*x_shape[:3], spec.cp), int(act["za"]), dtype=np.uint8)
            x_arg[..., : spec.conv.channels] = x
    return x, np.ascontiguousarray(x_arg)


def _random_float_weights(
    spec: KernelSpec, rng: np.random.Generator, inputs: dict[str, np.ndarray]
) -> np.ndarray:
    """float32 or float16 weights: the logical ``[N, K]`` float32 weight; ``inputs['w']`` packed."""
    n, k = spec.n, spec.k
    if spec.fmt == "fp32":
        w = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
        inputs["w"] = _pack_blocks(w, spec.np_)
        return w
    w16 = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float16)
    inputs["w"] = _pack_blocks(w16, spec.np_)
    return w16.astype(np.float32)


def _random_integer_weights(
    spec: KernelSpec, rng: np.random.Generator, inputs: dict[str, np.ndarray]
) -> np.ndarray:
    """Signed integer codes with their scales and zero points: the logical (dequantized) weight;
    ``inputs`` gets ``w`` (and ``wsum``) packed for the template, ``scale`` and ``zero``."""
    n, k = spec.n, spec.k
    half = 1 << (spec.weight_bits - 1)
    q = rng.integers(-half, half, size=(n, k))  # signed codes
    if spec.granularity == "per_tensor":
        s = np.full((n, 1), 0.7 / (half * math.sqrt(k)), dtype=np.float32)
        z = np.full((n, 1), 0 if spec.symmetric else int(rng.integers(-half, half)))
    else:
        groups = spec.n_groups
        s = (rng.uniform(0.5, 1.5, size=(n, groups)) / (half * math.sqrt(k))).astype(np.float32)
        z = (
            np.zeros((n, groups), dtype=np.int64)
            if spec.symmetric
            else rng.integers(-half, half, size=(n, groups))
        )
    gsize = k // (1 if spec.granularity == "per_tensor" else spec.n_groups)
    s_full = np.repeat(s, gsize, axis=1)
    z_full = np.repeat(z, gsize, axis=1)
    w = ((q - z_full) * s_full.astype(np.float64)).astype(np.float32)
    _pack_integer_weights(spec, q, inputs)
    signed = spec.vnni or spec.madd16  # signed codes, int32 zero points
    if spec.granularity == "per_tensor":
        inputs["scale"] = s[:1, 0].copy()
        if not spec.symmetric:
            inputs["zero"] = (z[:1, 0] + (0 if signed else half)).astype(
                np.int32 if signed else np.uint8
            )
    else:
        inputs["scale"] = _group_blocks(s, spec.np_)
        if not spec.symmetric:
            zz = z + (0 if signed else half)
            inputs["zero"] = _group_blocks(zz.astype(np.int32 if signed else np.uint8), spec.np_)
    return w


def _pack_integer_weights(spec: KernelSpec, q: np.ndarray, inputs: dict[str, np.ndarray]) -> None:
    """Signed codes ``[N, K]`` in the template's layout: int8 ``[Np/16, Kp/4, 16, 4]`` and
    weight sums (VNNI), int8 ``[Np/16, Kp/2, 16, 2]`` (madd16), else bit-packed unsigned."""
    n, k, np_ = spec.n, spec.k, spec.np_
    if spec.vnni:
        q8 = np.zeros((np_, spec.kp), dtype=np.int8)
        if spec.conv is None:
            q8[:n, :k] = q
        else:  # K ordered (kh, kw, c): pad c to cp
            kk = spec.conv.kh * spec.conv.kw
            q8[:n].reshape(n, kk, spec.cp)[:, :, : spec.conv.channels] = q.reshape(
                n, kk, spec.conv.channels
            )
        inputs["w"] = np.ascontiguousarray(
            q8.reshape(np_ // LANES, LANES, spec.kp // 4, 4).transpose(0, 2, 1, 3)
        )
        wsum = np.zeros(np_, dtype=np.int32)
        wsum[:n] = q8[:n].astype(np.int64).sum(axis=1)
        inputs["wsum"] = wsum
    elif spec.madd16:
        q8 = np.zeros((np_, spec.kp), dtype=np.int8)
        q8[:n, :k] = q
        inputs["w"] = np.ascontiguousarray(
            q8.reshape(np_ // LANES, LANES, spec.kp // 2, 2).transpose(0, 2, 1, 3)
        )
    else:
        half = 1 << (spec.weight_bits - 1)
        inputs["w"] = pack_bits((q + half).astype(np.int64), spec.weight_bits, np_)


def im2col(x: np.ndarray, geo: ConvGeometry, pad_value: float) -> np.ndarray:
    """NHWC [B, H, W, C] -> [B*OH*OW, KH*KW*C] with K ordered (kh, kw, c)."""
    p = geo.pad
    xp = np.full(
        (geo.batch, geo.height + 2 * p, geo.width + 2 * p, geo.channels), pad_value, dtype=x.dtype
    )
    xp[:, p : p + geo.height, p : p + geo.width] = x
    cols = np.empty((geo.batch, geo.out_h, geo.out_w, geo.kh, geo.kw, geo.channels), dtype=x.dtype)
    for a in range(geo.kh):
        for b in range(geo.kw):
            cols[:, :, :, a, b] = xp[
                :,
                a : a + geo.stride * geo.out_h : geo.stride,
                b : b + geo.stride * geo.out_w : geo.stride,
            ]
    return cols.reshape(geo.batch * geo.out_h * geo.out_w, -1)


def input_dtype(spec: KernelSpec) -> str:
    if spec.madd16:  # quantized inside the kernel
        return "float32"
    return {8: "uint8", 16: "float16", 32: "float32"}[spec.act_bits]


def output_dtype(spec: KernelSpec) -> str:
    if spec.madd16:  # requantized and dequantized inside the kernel
        return "float32"
    return {8: "uint8", 16: "float16", 32: "float32"}[spec.act_bits]


def reference(spec: KernelSpec, data: KernelData) -> np.ndarray:
    """The exact result in float64 (before the output cast), ``[M, N]``."""
    x = data.x
    if spec.act_bits == 8:
        xf = (x.astype(np.float64) - data.act["za"]) * data.act["sa"]
    else:
        xf = x.astype(np.float64)
    if spec.conv is not None:
        xf = im2col(xf.astype(np.float64), spec.conv, 0.0)
    y = xf @ data.w.astype(np.float64).T
    if data.bias is not None:
        y = y + data.bias
    return y


def check_output(spec: KernelSpec, data: KernelData, out: np.ndarray) -> str | None:
    """None when the kernel output matches the reference, else what is wrong."""
    exact = reference(spec, data)
    got = out[:, : spec.n]
    if spec.madd16:  # dequantized output: back to its codes
        got = np.round(got.astype(np.float64) / data.act["so"] + data.act["zo"])
    if spec.act_bits == 8:
        want = np.clip(np.round(exact / data.act["so"]) + data.act["zo"], 0, 255)
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        # float rounding can flip a value that sits on a rounding boundary by one code
        bad = int((diff > 1).sum())
        if bad:
            return f"{bad} of {diff.size} uint8 outputs differ by more than 1 from the reference"
        return None
    tol = 2e-2 if spec.act_bits == 16 or spec.fmt == "fp16" else 2e-3
    scale = max(1.0, float(np.abs(exact).max()))
    err = float(np.abs(got.astype(np.float64) - exact).max()) / scale
    if not np.isfinite(err) or err > tol:
        return f"max relative error {err:.3g} exceeds {tol:g}"
    return None
