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


def build_prim_func(spec: KernelSpec) -> tuple[Any, list[str]]:
    """The TE definition of ``spec`` as a PrimFunc, and its argument names in order."""
    load_tvm()
    from tvm import te, tirx

    f32, i32 = "float32", "int32"
    m, k, np_ = spec.m, spec.k, spec.np_
    nb = np_ // LANES
    kp = spec.kp
    args: list[Any] = []
    names: list[str] = []

    def arg(name: str, shape: tuple[int, ...], dtype: str):
        t = te.placeholder(shape, dtype, name=name)
        args.append(t)
        names.append(name)
        return t

    act_dtype = input_dtype(spec)
    if spec.conv is None:
        X = arg("x", (m, kp), act_dtype)
        a = X
    else:
        g = spec.conv
        cp = spec.cp
        X = arg("x", (g.batch, g.height, g.width, cp), act_dtype)
        pad_value = tirx.const(0, act_dtype)
        if spec.act_bits == 8 and not spec.madd16:
            pad_value = None  # filled from the zero point below, once aq exists

        def col_fn(mm, kk, _pad=None, src=X):
            b = mm // (g.out_h * g.out_w)
            r = mm % (g.out_h * g.out_w)
            oy, ox = r // g.out_w, r % g.out_w
            ky, kx, c = kk // (g.kw * cp), (kk // cp) % g.kw, kk % cp
            iy = oy * g.stride + ky - g.pad
            ix = ox * g.stride + kx - g.pad
            inside = tirx.all(iy >= 0, iy < g.height, ix >= 0, ix < g.width)
            return te.if_then_else(inside, src[b, iy, ix, c], _pad)

    # weight operand(s)
    if spec.fmt in ("fp32", "fp16"):
        W = arg("w", (nb, k, LANES), "float32" if spec.fmt == "fp32" else "float16")
    elif spec.madd16:
        W = arg("w", (nb, kp // 2, LANES, 2), "int8")
    elif spec.vnni:
        W = arg("w", (nb, kp // 4, LANES, 4), "int8")
        WSUM = arg("wsum", (np_,), i32)
    else:
        from autoquant.hardware.kernels import packed_k_bytes

        W = arg("w", (nb, packed_k_bytes(k, spec.weight_bits), LANES), "uint8")
    S = Z = None
    if spec.fmt in ("weight_only", "w8a8", "wNa8"):
        per_tensor = spec.granularity == "per_tensor"
        S = arg("scale", (1,) if per_tensor else (nb, spec.n_groups, LANES), f32)
        if not spec.symmetric:
            zdt = i32 if spec.vnni or spec.madd16 else "uint8"
            Z = arg("zero", (1,) if per_tensor else (nb, spec.n_groups, LANES), zdt)
    BIAS = arg("bias", (np_,), f32) if spec.has_bias else None
    AQ = arg("aq", (4,), f32) if spec.act_bits == 8 else None

    if spec.madd16:
        # (a - za) as int16, K padded to even with zeros: the operand vpmaddwd multiplies
        def quantize_shift(xv):
            q = tirx.nearbyint(xv / AQ[0]) + AQ[1]
            q = te.max(te.min(q, tirx.const(255.0, f32)), tirx.const(0.0, f32))
            return (q - AQ[1]).astype("int16")

        if spec.conv is not None:  # quantize each input once, before im2col repeats it
            xq = te.compute(X.shape, lambda *idx: quantize_shift(X[idx]), name="xq")

        def shifted(mm, kk):
            if spec.conv is None:
                v = quantize_shift(X[mm, kk])
            else:
                v = col_fn(mm, kk, tirx.const(0, "int16"), src=xq)
            if kp == k:
                return v
            return te.if_then_else(kk < k, v, tirx.const(0, "int16"))

        a = te.compute((m, kp), shifted, name="col")
    elif spec.conv is not None:
        pad = pad_value if pad_value is not None else AQ[1].astype("uint8")
        col = te.compute((m, kp), lambda mm, kk: col_fn(mm, kk, pad), name="col")
        a = col

    def group(kk):
        return kk // spec.group_size if spec.granularity == "per_group" else 0

    def scale(nn, kk):
        if spec.granularity == "per_tensor":
            return S[0]
        return S[nn // LANES, group(kk), nn % LANES]

    def code(nn, kk):
        """Unsigned stored weight code at (n, k), as int32."""
        bits = spec.weight_bits
        if bits == 3:
            pos = kk * 3
            lo = W[nn // LANES, pos // 8, nn % LANES].astype("uint16")
            hi = W[nn // LANES, pos // 8 + 1, nn % LANES].astype("uint16")
            word = lo | (hi << tirx.const(8, "uint16"))
            return ((word >> (pos % 8).astype("uint16")) & tirx.const(7, "uint16")).astype(i32)
        per = 8 // bits
        byte = W[nn // LANES, kk // per, nn % LANES]
        if per == 1:
            return byte.astype(i32)
        shift = ((kk % per) * bits).astype("uint8")
        return ((byte >> shift) & tirx.const((1 << bits) - 1, "uint8")).astype(i32)

    def zero(nn, kk):
        if spec.symmetric:
            return tirx.const(1 << (spec.weight_bits - 1), i32)
        if spec.granularity == "per_tensor":
            return Z[0].astype(i32)
        return Z[nn // LANES, group(kk), nn % LANES].astype(i32)

    def a_float(mm, kk):
        if spec.act_bits == 8:
            return (a[mm, kk].astype(f32) - AQ[1]) * AQ[0]
        return a[mm, kk].astype(f32)

    red = te.reduce_axis((0, kp if spec.vnni or spec.madd16 else k), name="k")
    stages: dict[str, Any] = {}
    wdq_cached = spec.fmt in ("weight_only", "wNa8", "w8a8") and not spec.vnni and m >= 4

    if spec.madd16:
        acc = te.compute(
            (m, np_),
            lambda i, j: te.sum(
                a[i, red].astype(i32) * W[j // LANES, red // 2, j % LANES, red % 2].astype(i32),
                axis=red,
            ),
            name="acc",
        )
        if not spec.symmetric:  # sum (a - za)(q - zq) = acc - zq * sum (a - za)
            r2 = te.reduce_axis((0, kp), name="k2")
            asum = te.compute((m,), lambda i: te.sum(a[i, r2].astype(i32), axis=r2), name="asum")
            stages["asum"] = asum

        def corrected(i, j):
            v = acc[i, j]
            if not spec.symmetric:
                zq = Z[0] if spec.granularity == "per_tensor" else Z[j // LANES, 0, j % LANES]
                v = v - zq * stages["asum"][i]
            return v.astype(f32) * (AQ[0] * scale(j, 0))
    elif spec.vnni:
        acc = te.compute(
            (m, np_),
            lambda i, j: te.sum(
                a[i, red].astype(i32) * W[j // LANES, red // 4, j % LANES, red % 4].astype(i32),
                axis=red,
            ),
            name="acc",
        )
        za = AQ[1].astype(i32)
        if not spec.symmetric:
            r2 = te.reduce_axis((0, kp), name="k2")
            asum = te.compute((m,), lambda i: te.sum(a[i, r2].astype(i32), axis=r2), name="asum")
            stages["asum"] = asum

        def corrected(i, j):
            v = acc[i, j] - za * WSUM[j]
            if not spec.symmetric:
                zq = Z[0] if spec.granularity == "per_tensor" else Z[j // LANES, 0, j % LANES]
                v = v - zq * stages["asum"][i] + tirx.const(kp, i32) * za * zq
            return v.astype(f32) * (AQ[0] * scale(j, 0))
    elif spec.int_accumulate:
        if wdq_cached:
            wq = te.compute(
                (nb, k, LANES),
                lambda b, kk, lane: code(b * LANES + lane, kk) - zero(b * LANES + lane, kk),
                name="wdq",
            )
            stages["wdq"] = wq

            def w_int(j, kk):
                return wq[j // LANES, kk, j % LANES]
        else:

            def w_int(j, kk):
                return code(j, kk) - zero(j, kk)

        acc = te.compute(
            (m, np_),
            lambda i, j: te.sum(
                (a[i, red].astype(i32) - AQ[1].astype(i32)) * w_int(j, red), axis=red
            ),
            name="acc",
        )

        def corrected(i, j):
            return acc[i, j].astype(f32) * (AQ[0] * scale(j, 0))
    else:

        def w_float_inline(j, kk):
            if spec.fmt == "fp32":
                return W[j // LANES, kk, j % LANES]
            if spec.fmt == "fp16":
                return W[j // LANES, kk, j % LANES].astype(f32)
            return (code(j, kk) - zero(j, kk)).astype(f32) * scale(j, kk)

        if wdq_cached:
            wd = te.compute(
                (nb, k, LANES), lambda b, kk, lane: w_float_inline(b * LANES + lane, kk), name="wdq"
            )
            stages["wdq"] = wd

            def w_float(j, kk):
                return wd[j // LANES, kk, j % LANES]
        else:
            w_float = w_float_inline
        acc = te.compute(
            (m, np_), lambda i, j: te.sum(a_float(i, red) * w_float(j, red), axis=red), name="acc"
        )

        def corrected(i, j):
            return acc[i, j]

    def epilogue(i, j):
        y = corrected(i, j)
        if BIAS is not None:
            y = y + BIAS[j]
        if spec.act_bits == 8:
            q = tirx.nearbyint(y / AQ[2]) + AQ[3]
            q = te.max(te.min(q, tirx.const(255.0, f32)), tirx.const(0.0, f32))
            if spec.madd16:
                return (q - AQ[3]) * AQ[2]
            return q.astype("uint8")
        return y.astype(output_dtype(spec))

    out = te.compute((m, np_), epilogue, name="out")
    args.append(out)
    names.append("out")
    return te.create_prim_func(args), names


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

    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("acc")
    nb = spec.np_ // LANES
    mfac = _m_factor(spec.m)
    # Parallel over blocks of 16 output channels when there are enough of them, else over rows.
    parallel_n = nb >= 2 * threads or spec.m // mfac < 2
    # Waking the thread pool costs microseconds: small kernels run on one thread.
    use_threads = threads > 1 and spec.m * spec.np_ * spec.k >= parallel_min_macs

    def parallel(loop: Any) -> None:
        if use_threads:
            sch.parallel(loop)

    if spec.madd16:
        i, j, kk = sch.get_loops(blk)
        io, ii = sch.split(i, [None, mfac])
        jo, ji = sch.split(j, [None, LANES])
        ko, ki = sch.split(kk, [None, 2])
        sch.reorder(jo, io, ko, ii, ji, ki)
        if not tensorize:
            sch.reorder(ki, ji)
            sch.vectorize(ji)
        out = sch.get_sblock("out")
        if spec.symmetric:
            sch.reverse_compute_at(out, io)
        else:  # a second producer of the epilogue: its own pass, as in the VNNI template
            parallel(sch.get_loops(sch.get_sblock("asum"))[0])
            oi, oj = sch.get_loops(out)
            parallel(oi)
            sch.split(oj, [None, LANES])
        parallel(jo if parallel_n else io)
        init = sch.decompose_reduction(blk, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        if tensorize:
            sch.tensorize(ji, register_madd16())
        sch.vectorize(sch.get_loops(out)[-1])
    elif spec.vnni:
        i, j, kk = sch.get_loops(blk)
        io, ii = sch.split(i, [None, mfac])
        jo, ji = sch.split(j, [None, LANES])
        ko, ki = sch.split(kk, [None, 4])
        sch.reorder(jo, io, ko, ii, ji, ki)
        if not tensorize:
            sch.reorder(ki, ji)
            sch.vectorize(ji)
        out = sch.get_sblock("out")
        if spec.symmetric:
            sch.reverse_compute_at(out, io)
        else:
            # Asymmetric weights need the activations' row sums, a second producer of the
            # epilogue; TVM cannot move a consumer of two root-level producers into a tile, so
            # the int32 accumulator is written in full and the epilogue runs as its own pass.
            asum = sch.get_sblock("asum")
            parallel(sch.get_loops(asum)[0])
            oi, oj = sch.get_loops(out)
            parallel(oi)
            sch.vectorize(sch.split(oj, [None, LANES])[1])
        parallel(jo if parallel_n else io)
        init = sch.decompose_reduction(blk, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        if tensorize:
            sch.tensorize(ji, register_vnni())

        if spec.symmetric:
            sch.vectorize(sch.get_loops(out)[-1])
    else:
        i, j, kk = sch.get_loops(blk)
        io, ii = sch.split(i, [None, mfac])
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
        parallel(jo if parallel_n else io)
        if mfac > 1:
            sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(blk, kk)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(out)[-1])
    if spec.madd16 and spec.conv is not None:
        xq = sch.get_sblock("xq")
        flat = sch.fuse(*sch.get_loops(xq))
        size = spec.conv.batch * spec.conv.height * spec.conv.width * spec.cp
        if size % 8 == 0:
            sch.vectorize(sch.split(flat, [None, 8])[1])
    if spec.conv is not None and spec.kp == spec.conv.kh * spec.conv.kw * spec.cp:
        # Split the im2col loops along (b, oy, ox) x (ky, kx, c) so the index arithmetic is
        # affine (no division per element) and the channel copy vectorizes.
        g = spec.conv
        col = sch.get_sblock("col")
        mm, kk = sch.get_loops(col)
        _, oy, ox = sch.split(mm, [g.batch, g.out_h, g.out_w])
        _, _, c = sch.split(kk, [g.kh, g.kw, spec.cp])
        parallel(sch.fuse(*sch.get_loops(col)[:2]))
        if spec.cp % 4 == 0:
            sch.vectorize(c)
    elif spec.madd16:  # the int16 activation stage of a dense layer (or an odd-K conv)
        mm, kk = sch.get_loops(sch.get_sblock("col"))
        parallel(mm)
        if spec.conv is None and spec.kp % 8 == 0:
            sch.vectorize(sch.split(kk, [None, 8])[1])
    return sch.mod


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
