"""Hand-scheduled TVM kernels (TE + ``s_tir.Schedule``) for every ``KernelSpec``.

One template per family, all on a ``[M, K] x [Np/16, K, 16]`` blocked layout:

* float accumulate (``fp32``, ``fp16``, ``weight_only``, and per-group uint8 activations): tiles
  of ``mfac x 16`` outputs, the reduction outside the register tile, vectorized over 16 output
  channels. Integer weights are unpacked and dequantized into a ``[K, 16]`` float tile per block
  of 16 output channels (computed inside the matmul's outer loop, so each weight is decoded once
  per kernel call, not once per row) when M >= 4, and inline in the inner loop otherwise.
* int32 accumulate (uint8 activations, per-tensor/channel integer weights) without VNNI: the same
  tiling on ``(a - za) * (q - zq)`` products, requantized to uint8.
* int8 VNNI (AVX-512 ``vpdpbusd``, u8 x s8 -> s32, 16 lanes x 4): ``[Np/16, Kp/4, 16, 4]`` weights,
  zero-point corrections from precomputed weight sums, requantized to uint8.

Convolutions add an im2col stage (in the same function) in front of the dense core. Kernels
below the profile's ``schedule.parallel_min_macs`` run on one thread; larger ones split over the
profile's threads.

The VNNI intrinsic is registered here with ``uint8x64``/``int8x64`` operands: TVM 0.27's built-in
``dot_16x4_vnni`` passes ``<16 x i32>`` and fails LLVM 22's verifier. Its description is written
out here too, because importing ``tvm.s_tir.tensor_intrin`` takes 30-55 s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autoquant.hardware._tvm import load_tvm
from autoquant.hardware.kernels import LANES, KernelSpec, input_dtype, output_dtype
from autoquant.hardware.profile import ScheduleSpec

VNNI_INTRIN = "autoquant_dot_16x4_u8i8i32_vnni"
MADD16_INTRIN = "autoquant_dot_16x2_i16i8i32_avx2"
# A profile's ``schedule.parallel_min_macs`` when none is given (the machine constant lives in
# the profile schema: where one thread beats the pool depends on the machine).
DEFAULT_PARALLEL_MIN_MACS = ScheduleSpec().parallel_min_macs
_REGISTERED: set[str] = set()


def _dot_desc(steps: int, a_dtype: str, b_dtype: str) -> Any:
    """What both integer intrinsics compute: ``C[16] += sum_k int32(A[k]) * int32(B[16, k])``
    over ``steps`` reduction steps, the activation operand shared by the 16 lanes."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((steps,), a_dtype, offset_factor=1),
        B: T.Buffer((16, steps), b_dtype, offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:steps], B[0:16, 0:steps])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, steps):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _register(name: str, desc: Any, impl: Any) -> str:
    from tvm.s_tir import TensorIntrin

    try:
        TensorIntrin.register(name, desc, impl)
    except Exception:  # already registered in this process by an earlier import
        TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


def register_vnni() -> str:
    """Register the LLVM-22-valid VNNI intrinsic once per process; returns its name."""
    if VNNI_INTRIN in _REGISTERED:
        return VNNI_INTRIN
    load_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(A_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    return _register(VNNI_INTRIN, _dot_desc(4, "uint8", "int8"), impl)


def register_madd16() -> str:
    """Register the AVX2 ``vpmaddwd`` intrinsic once per process; returns its name.

    16 output lanes x 2 reduction steps: the activation pair (int16) is broadcast to every lane,
    the int8 weight pairs are widened to int16, and two 256-bit ``vpmaddwd`` give 16 int32 sums.
    """
    if MADD16_INTRIN in _REGISTERED:
        return MADD16_INTRIN
    load_tvm()
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((16, 2), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            a16 = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                a16,
                T.cast(B.vload([0, 0], dtype="int8x16"), "int16x16"),
                dtype="int32x8",
            )
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                a16,
                T.cast(B.vload([8, 0], dtype="int8x16"), "int16x16"),
                dtype="int32x8",
            )

    return _register(MADD16_INTRIN, _dot_desc(2, "int16", "int8"), impl)


def _m_factor(m: int) -> int:
    for f in (4, 5, 6, 3, 7, 2):
        if m % f == 0:
            return f
    return 1


@dataclass
class _Args:
    """The PrimFunc's arguments in declaration order: the kernel's calling convention."""

    tensors: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def add(self, name: str, shape: tuple[int, ...], dtype: str) -> Any:
        from tvm import te

        tensor = te.placeholder(shape, dtype, name=name)
        self.tensors.append(tensor)
        self.names.append(name)
        return tensor


@dataclass(frozen=True)
class _Operands:
    """The kernel's input tensors (None where the format has no such operand)."""

    x: Any
    w: Any
    wsum: Any  # VNNI: per-output-channel weight sums
    scale: Any
    zero: Any
    bias: Any
    aq: Any  # uint8 activations: [input scale, input zero, output scale, output zero]


def _declare_operands(spec: KernelSpec, args: _Args) -> _Operands:
    """The inputs as placeholders, in argument order: x, w, [wsum], [scale], [zero], [bias], [aq]."""
    nb, np_ = spec.np_ // LANES, spec.np_
    if spec.conv is None:
        x = args.add("x", (spec.m, spec.kp), input_dtype(spec))
    else:
        g = spec.conv
        x = args.add("x", (g.batch, g.height, g.width, spec.cp), input_dtype(spec))
    wsum = None
    if spec.fmt in ("fp32", "fp16"):
        w = args.add("w", (nb, spec.k, LANES), "float32" if spec.fmt == "fp32" else "float16")
    elif spec.madd16:
        w = args.add("w", (nb, spec.kp // 2, LANES, 2), "int8")
    elif spec.vnni:
        w = args.add("w", (nb, spec.kp // 4, LANES, 4), "int8")
        wsum = args.add("wsum", (np_,), "int32")
    else:
        from autoquant.hardware.kernels import packed_k_bytes

        w = args.add("w", (nb, packed_k_bytes(spec.k, spec.weight_bits), LANES), "uint8")
    scale = zero = None
    if spec.fmt in ("weight_only", "w8a8", "wNa8"):
        per_tensor = spec.granularity == "per_tensor"
        scale = args.add("scale", (1,) if per_tensor else (nb, spec.n_groups, LANES), "float32")
        if not spec.symmetric:
            zdt = "int32" if spec.vnni or spec.madd16 else "uint8"
            zero = args.add("zero", (1,) if per_tensor else (nb, spec.n_groups, LANES), zdt)
    bias = args.add("bias", (np_,), "float32") if spec.has_bias else None
    aq = args.add("aq", (4,), "float32") if spec.act_bits == 8 else None
    return _Operands(x, w, wsum, scale, zero, bias, aq)


def _im2col_at(spec: KernelSpec, src: Any, mm: Any, kk: Any, pad: Any) -> Any:
    """Element (mm, kk) of the conv input's im2col matrix (K ordered kh, kw, c); ``pad``
    outside the image."""
    from tvm import te, tirx

    g, cp = spec.conv, spec.cp
    b = mm // (g.out_h * g.out_w)
    r = mm % (g.out_h * g.out_w)
    oy, ox = r // g.out_w, r % g.out_w
    ky, kx, c = kk // (g.kw * cp), (kk // cp) % g.kw, kk % cp
    iy = oy * g.stride + ky - g.pad
    ix = ox * g.stride + kx - g.pad
    inside = tirx.all(iy >= 0, iy < g.height, ix >= 0, ix < g.width)
    return te.if_then_else(inside, src[b, iy, ix, c], pad)


def _activation_operand(spec: KernelSpec, ops: _Operands) -> Any:
    """The ``[M, Kp]`` activations the matmul reads: the input itself (dense), its im2col stage
    (conv; padded with the activation zero point for uint8), or int16 ``a - za`` (madd16)."""
    from tvm import te, tirx

    if spec.madd16:
        return _madd16_activations(spec, ops)
    if spec.conv is None:
        return ops.x
    pad = ops.aq[1].astype("uint8") if spec.act_bits == 8 else tirx.const(0, input_dtype(spec))
    return te.compute(
        (spec.m, spec.kp), lambda mm, kk: _im2col_at(spec, ops.x, mm, kk, pad), name="col"
    )


def _madd16_activations(spec: KernelSpec, ops: _Operands) -> Any:
    """(a - za) as int16, K padded to even with zeros: the operand ``vpmaddwd`` multiplies."""
    from tvm import te, tirx

    aq = ops.aq

    def quantize_shift(xv: Any) -> Any:
        q = tirx.nearbyint(xv / aq[0]) + aq[1]
        q = te.max(te.min(q, tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))
        return (q - aq[1]).astype("int16")

    if spec.conv is not None:  # quantize each input once, before im2col repeats it
        xq = te.compute(ops.x.shape, lambda *idx: quantize_shift(ops.x[idx]), name="xq")

    def shifted(mm: Any, kk: Any) -> Any:
        if spec.conv is None:
            v = quantize_shift(ops.x[mm, kk])
        else:
            v = _im2col_at(spec, xq, mm, kk, tirx.const(0, "int16"))
        if spec.kp == spec.k:
            return v
        return te.if_then_else(kk < spec.k, v, tirx.const(0, "int16"))

    return te.compute((spec.m, spec.kp), shifted, name="col")


@dataclass(frozen=True)
class _Matmul:
    """What every accumulator template reads: the spec, its operands, the ``[M, Kp]``
    activations and the reduction axis; and how a stored weight decodes."""

    spec: KernelSpec
    ops: _Operands
    a: Any
    red: Any

    @property
    def wdq_cached(self) -> bool:
        """Whether integer weights are decoded once into a ``[K, 16]`` tile per block (M >= 4)."""
        spec = self.spec
        return spec.fmt in ("weight_only", "wNa8", "w8a8") and not spec.vnni and spec.m >= 4

    def group(self, kk: Any) -> Any:
        return kk // self.spec.group_size if self.spec.granularity == "per_group" else 0

    def scale(self, nn: Any, kk: Any) -> Any:
        if self.spec.granularity == "per_tensor":
            return self.ops.scale[0]
        return self.ops.scale[nn // LANES, self.group(kk), nn % LANES]

    def code(self, nn: Any, kk: Any) -> Any:
        """Unsigned stored weight code at (n, k), as int32."""
        from tvm import tirx

        w, bits = self.ops.w, self.spec.weight_bits
        if bits == 3:
            pos = kk * 3
            lo = w[nn // LANES, pos // 8, nn % LANES].astype("uint16")
            hi = w[nn // LANES, pos // 8 + 1, nn % LANES].astype("uint16")
            word = lo | (hi << tirx.const(8, "uint16"))
            return ((word >> (pos % 8).astype("uint16")) & tirx.const(7, "uint16")).astype("int32")
        per = 8 // bits
        byte = w[nn // LANES, kk // per, nn % LANES]
        if per == 1:
            return byte.astype("int32")
        shift = ((kk % per) * bits).astype("uint8")
        return ((byte >> shift) & tirx.const((1 << bits) - 1, "uint8")).astype("int32")

    def zero(self, nn: Any, kk: Any) -> Any:
        from tvm import tirx

        if self.spec.symmetric:
            return tirx.const(1 << (self.spec.weight_bits - 1), "int32")
        if self.spec.granularity == "per_tensor":
            return self.ops.zero[0].astype("int32")
        return self.ops.zero[nn // LANES, self.group(kk), nn % LANES].astype("int32")

    def channel_zero(self, j: Any) -> Any:
        """The (per-tensor or per-channel) weight zero point of output channel ``j``."""
        if self.spec.granularity == "per_tensor":
            return self.ops.zero[0]
        return self.ops.zero[j // LANES, 0, j % LANES]

    def a_float(self, mm: Any, kk: Any) -> Any:
        aq = self.ops.aq
        if self.spec.act_bits == 8:
            return (self.a[mm, kk].astype("float32") - aq[1]) * aq[0]
        return self.a[mm, kk].astype("float32")

    def activation_row_sums(self) -> Any:
        """sum_k a[i, k] as int32: the zero-point correction of asymmetric integer weights."""
        from tvm import te

        r2 = te.reduce_axis((0, self.spec.kp), name="k2")
        return te.compute(
            (self.spec.m,), lambda i: te.sum(self.a[i, r2].astype("int32"), axis=r2), name="asum"
        )


def _packed_int8_accumulate(mm: _Matmul, pair: int) -> Any:
    """``acc[i, j] = sum_k a[i, k] * q[j, k]`` on weights packed ``[Np/16, Kp/pair, 16, pair]``
    (``pair`` 2: madd16, 4: VNNI)."""
    from tvm import te

    w, a, red = mm.ops.w, mm.a, mm.red
    return te.compute(
        (mm.spec.m, mm.spec.np_),
        lambda i, j: te.sum(
            a[i, red].astype("int32") * w[j // LANES, red // pair, j % LANES, red % pair].astype("int32"),
            axis=red,
        ),
        name="acc",
    )


def _madd16_template(mm: _Matmul) -> Callable[[Any, Any], Any]:
    """int16 ``(a - za)`` x int8 weights (``vpmaddwd``); ``corrected(i, j)`` as float32."""
    acc = _packed_int8_accumulate(mm, 2)
    # sum (a - za)(q - zq) = acc - zq * sum (a - za)
    asum = None if mm.spec.symmetric else mm.activation_row_sums()

    def corrected(i: Any, j: Any) -> Any:
        v = acc[i, j]
        if asum is not None:
            v = v - mm.channel_zero(j) * asum[i]
        return v.astype("float32") * (mm.ops.aq[0] * mm.scale(j, 0))

    return corrected


def _vnni_template(mm: _Matmul) -> Callable[[Any, Any], Any]:
    """uint8 activations x int8 weights (``vpdpbusd``), zero points corrected from the weight
    sums (and the activation row sums for asymmetric weights)."""
    from tvm import tirx

    acc = _packed_int8_accumulate(mm, 4)
    aq, kp = mm.ops.aq, mm.spec.kp
    za = aq[1].astype("int32")
    asum = None if mm.spec.symmetric else mm.activation_row_sums()

    def corrected(i: Any, j: Any) -> Any:
        v = acc[i, j] - za * mm.ops.wsum[j]
        if asum is not None:
            zq = mm.channel_zero(j)
            v = v - zq * asum[i] + tirx.const(kp, "int32") * za * zq
        return v.astype("float32") * (aq[0] * mm.scale(j, 0))

    return corrected


def _int32_template(mm: _Matmul) -> Callable[[Any, Any], Any]:
    """``(a - za) * (q - zq)`` in int32 without VNNI or madd16."""
    from tvm import te

    spec, aq, a, red = mm.spec, mm.ops.aq, mm.a, mm.red
    if mm.wdq_cached:
        wq = te.compute(
            (spec.np_ // LANES, spec.k, LANES),
            lambda b, kk, lane: mm.code(b * LANES + lane, kk) - mm.zero(b * LANES + lane, kk),
            name="wdq",
        )

        def w_int(j: Any, kk: Any) -> Any:
            return wq[j // LANES, kk, j % LANES]
    else:

        def w_int(j: Any, kk: Any) -> Any:
            return mm.code(j, kk) - mm.zero(j, kk)

    acc = te.compute(
        (spec.m, spec.np_),
        lambda i, j: te.sum((a[i, red].astype("int32") - aq[1].astype("int32")) * w_int(j, red), axis=red),
        name="acc",
    )

    def corrected(i: Any, j: Any) -> Any:
        return acc[i, j].astype("float32") * (aq[0] * mm.scale(j, 0))

    return corrected


def _float_template(mm: _Matmul) -> Callable[[Any, Any], Any]:
    """Float accumulation: float32/float16 weights, or integer weights dequantized."""
    from tvm import te

    spec, w = mm.spec, mm.ops.w

    def w_float_inline(j: Any, kk: Any) -> Any:
        if spec.fmt == "fp32":
            return w[j // LANES, kk, j % LANES]
        if spec.fmt == "fp16":
            return w[j // LANES, kk, j % LANES].astype("float32")
        return (mm.code(j, kk) - mm.zero(j, kk)).astype("float32") * mm.scale(j, kk)

    w_float = w_float_inline
    if mm.wdq_cached:
        wd = te.compute(
            (spec.np_ // LANES, spec.k, LANES),
            lambda b, kk, lane: w_float_inline(b * LANES + lane, kk),
            name="wdq",
        )

        def w_float(j: Any, kk: Any) -> Any:
            return wd[j // LANES, kk, j % LANES]

    acc = te.compute(
        (spec.m, spec.np_),
        lambda i, j: te.sum(mm.a_float(i, mm.red) * w_float(j, mm.red), axis=mm.red),
        name="acc",
    )
    return lambda i, j: acc[i, j]


def _epilogue(spec: KernelSpec, ops: _Operands, corrected: Callable[[Any, Any], Any]) -> Any:
    """Bias, then requantization to uint8 (dequantized again for madd16) or the output cast."""
    from tvm import te, tirx

    aq = ops.aq

    def epilogue(i: Any, j: Any) -> Any:
        y = corrected(i, j)
        if ops.bias is not None:
            y = y + ops.bias[j]
        if spec.act_bits == 8:
            q = tirx.nearbyint(y / aq[2]) + aq[3]
            q = te.max(te.min(q, tirx.const(255.0, "float32")), tirx.const(0.0, "float32"))
            if spec.madd16:
                return (q - aq[3]) * aq[2]
            return q.astype("uint8")
        return y.astype(output_dtype(spec))

    return te.compute((spec.m, spec.np_), epilogue, name="out")


def build_prim_func(spec: KernelSpec) -> tuple[Any, list[str]]:
    """The TE definition of ``spec`` as a PrimFunc, and its argument names in order."""
    load_tvm()
    from tvm import te

    args = _Args()
    ops = _declare_operands(spec, args)
    a = _activation_operand(spec, ops)
    red = te.reduce_axis((0, spec.kp if spec.vnni or spec.madd16 else spec.k), name="k")
    mm = _Matmul(spec, ops, a, red)
    if spec.madd16:
        corrected = _madd16_template(mm)
    elif spec.vnni:
        corrected = _vnni_template(mm)
    elif spec.int_accumulate:
        corrected = _int32_template(mm)
    else:
        corrected = _float_template(mm)
    out = _epilogue(spec, ops, corrected)
    args.tensors.append(out)
    args.names.append("out")
    return te.create_prim_func(args.tensors), args.names


@dataclass(frozen=True)
class _Scheduling:
    """What every schedule step shares: the schedule, the spec, the row tile and the
    threading decisions."""

    sch: Any
    spec: KernelSpec
    mfac: int  # rows per register tile
    parallel_n: bool  # parallel over blocks of 16 output channels (else over row tiles)
    use_threads: bool
    tensorize: bool

    def parallel(self, loop: Any) -> None:
        if self.use_threads:
            self.sch.parallel(loop)


def schedule(
    spec: KernelSpec,
    func: Any,
    *,
    threads: int,
    tensorize: bool = True,
    parallel_min_macs: int = DEFAULT_PARALLEL_MIN_MACS,
) -> Any:
    """Apply the hand schedule for ``spec`` to its PrimFunc; returns the IRModule.

    ``tensorize=False`` keeps the VNNI data layout and loop structure but leaves the 16x4 inner
    product to LLVM: it runs on any CPU, so tests can check the VNNI layout and zero-point
    corrections on hosts without AVX-512 VNNI (the instruction itself is checked in the asm).
    """
    load_tvm()
    from tvm import s_tir

    mfac = _m_factor(spec.m)
    ctx = _Scheduling(
        sch=s_tir.Schedule(func),
        spec=spec,
        mfac=mfac,
        # Parallel over blocks of 16 output channels when there are enough of them, else rows.
        parallel_n=spec.np_ // LANES >= 2 * threads or spec.m // mfac < 2,
        # Waking the thread pool costs microseconds: small kernels run on one thread.
        use_threads=threads > 1 and spec.m * spec.np_ * spec.k >= parallel_min_macs,
        tensorize=tensorize,
    )
    if spec.madd16:
        _schedule_packed_int8(ctx, pair=2, intrin=register_madd16)
    elif spec.vnni:
        _schedule_packed_int8(ctx, pair=4, intrin=register_vnni)
    else:
        _schedule_tiled(ctx)
    if spec.madd16 and spec.conv is not None:
        _schedule_input_quantization(ctx)
    _schedule_activations(ctx)
    return ctx.sch.mod


def _schedule_packed_int8(ctx: _Scheduling, *, pair: int, intrin: Callable[[], str]) -> None:
    """madd16 (``pair`` 2) and VNNI (``pair`` 4): ``mfac x 16`` tiles whose 16 x ``pair`` inner
    product is tensorized with ``intrin``."""
    sch, spec = ctx.sch, ctx.spec
    blk = sch.get_sblock("acc")
    i, j, kk = sch.get_loops(blk)
    io, ii = sch.split(i, [None, ctx.mfac])
    jo, ji = sch.split(j, [None, LANES])
    ko, ki = sch.split(kk, [None, pair])
    sch.reorder(jo, io, ko, ii, ji, ki)
    if not ctx.tensorize:
        sch.reorder(ki, ji)
        sch.vectorize(ji)
    out = sch.get_sblock("out")
    if spec.symmetric:
        sch.reverse_compute_at(out, io)
    else:
        # Asymmetric weights need the activations' row sums, a second producer of the
        # epilogue; TVM cannot move a consumer of two root-level producers into a tile, so
        # the int32 accumulator is written in full and the epilogue runs as its own pass.
        ctx.parallel(sch.get_loops(sch.get_sblock("asum"))[0])
        oi, oj = sch.get_loops(out)
        ctx.parallel(oi)
        lanes = sch.split(oj, [None, LANES])[1]
        if spec.vnni:
            sch.vectorize(lanes)
    ctx.parallel(jo if ctx.parallel_n else io)
    init = sch.decompose_reduction(blk, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    if ctx.tensorize:
        sch.tensorize(ji, intrin())
    if spec.madd16 or spec.symmetric:
        sch.vectorize(sch.get_loops(out)[-1])


def _schedule_tiled(ctx: _Scheduling) -> None:
    """Float and plain int32 accumulation: ``mfac x 16`` register tiles, the reduction outside
    them, integer weights decoded once per block of 16 output channels where cached."""
    sch = ctx.sch
    blk = sch.get_sblock("acc")
    i, j, kk = sch.get_loops(blk)
    io, ii = sch.split(i, [None, ctx.mfac])
    jo, ji = sch.split(j, [None, LANES])
    sch.reorder(jo, io, kk, ii, ji)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, io)
    try:
        wdq = sch.get_sblock("wdq")
    except Exception:
        wdq = None
    if wdq is not None:
        sch.compute_at(wdq, jo)
        sch.vectorize(sch.get_loops(wdq)[-1])
    ctx.parallel(jo if ctx.parallel_n else io)
    if ctx.mfac > 1:
        sch.unroll(ii)
    sch.vectorize(ji)
    init = sch.decompose_reduction(blk, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(out)[-1])


def _schedule_input_quantization(ctx: _Scheduling) -> None:
    """The madd16 conv's ``xq`` stage (each input quantized once): one flat vectorized loop."""
    sch, spec = ctx.sch, ctx.spec
    xq = sch.get_sblock("xq")
    flat = sch.fuse(*sch.get_loops(xq))
    size = spec.conv.batch * spec.conv.height * spec.conv.width * spec.cp
    if size % 8 == 0:
        sch.vectorize(sch.split(flat, [None, 8])[1])


def _schedule_activations(ctx: _Scheduling) -> None:
    """The ``col`` stage: im2col of a convolution, or the int16 activations of madd16."""
    sch, spec = ctx.sch, ctx.spec
    if spec.conv is not None and spec.kp == spec.conv.kh * spec.conv.kw * spec.cp:
        # Split the im2col loops along (b, oy, ox) x (ky, kx, c) so the index arithmetic is
        # affine (no division per element) and the channel copy vectorizes.
        g = spec.conv
        col = sch.get_sblock("col")
        mm, kk = sch.get_loops(col)
        _, oy, ox = sch.split(mm, [g.batch, g.out_h, g.out_w])
        _, _, c = sch.split(kk, [g.kh, g.kw, spec.cp])
        ctx.parallel(sch.fuse(*sch.get_loops(col)[:2]))
        if spec.cp % 4 == 0:
            sch.vectorize(c)
    elif spec.madd16:  # the int16 activation stage of a dense layer (or an odd-K conv)
        mm, kk = sch.get_loops(sch.get_sblock("col"))
        ctx.parallel(mm)
        if spec.conv is None and spec.kp % 8 == 0:
            sch.vectorize(sch.split(kk, [None, 8])[1])


def build(
    spec: KernelSpec,
    target: Any,
    *,
    threads: int,
    tensorize: bool = True,
    parallel_min_macs: int = DEFAULT_PARALLEL_MIN_MACS,
) -> tuple[Any, list[str]]:
    """Compile ``spec`` for ``target`` (a ``tvm.target.Target``): (Executable, argument names)."""
    tvm = load_tvm()
    func, names = build_prim_func(spec)
    mod = schedule(
        spec, func, threads=threads, tensorize=tensorize, parallel_min_macs=parallel_min_macs
    )
    return tvm.compile(mod, target=target), names
