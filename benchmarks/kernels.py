"""Per-kernel latency of autoquant's hand-scheduled TVM kernels on this machine's CPU.

    python benchmarks/kernels.py [--threads 2] [--min-repeat-ms 200] [--repeat 7] [--quick]

One row per kernel: median µs, interquartile spread / median, effective GFLOP/s (2*M*N*K / time)
and build seconds. Every kernel is checked against numpy before it is timed. The ``torch`` rows
are the same float32 shapes through torch's CPU kernels, timed the same way (median of repeats,
each averaging calls over >= min_repeat_ms) *before* TVM starts its thread pool, so the two pools
never compete. On a shared machine trust ratios within one run, not the microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def torch_time(fn, min_repeat_ms: float, repeat: int) -> list[float]:
    fn()
    samples = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while (time.perf_counter() - start) * 1000 < min_repeat_ms or n == 0:
            fn()
            n += 1
        samples.append((time.perf_counter() - start) / n)
    return samples


def shapes():
    from autoquant.space.values import LayerInfo

    # LayerInfo shapes carry batch 1; the rows of a linear layer sit between batch and features
    dense = LayerInfo(
        "dense",
        "linear",
        (1536, 384),
        (1, 16, 384),
        (1, 16, 1536),
        16 * 1536 * 384,
        1536 * 384,
        False,
    )
    gemv = LayerInfo(
        "gemv", "linear", (1536, 384), (1, 384), (1, 1536), 1536 * 384, 1536 * 384, False
    )
    conv = LayerInfo(
        "conv3x3",
        "conv",
        (64, 64, 3, 3),
        (1, 64, 56, 56),
        (1, 64, 56, 56),
        64 * 64 * 9 * 56 * 56,
        64 * 64 * 9,
        False,
    )
    return dense, gemv, conv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-repeat-ms", type=float, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="dense shapes only")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads for the torch rows (on the shared 2-vCPU machine torch's "
        "OpenMP pool with 2 threads ran ~7x slower than with 1)",
    )
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import torch
    import torch.nn.functional as F

    from autoquant.space.values import QuantChoice

    dense, gemv, conv = shapes()
    torch.set_num_threads(args.torch_threads)
    baselines = []
    for layer in (dense, gemv):
        x, w = torch.randn(layer.input_shape), torch.randn(layer.weight_shape)
        s = torch_time(lambda x=x, w=w: F.linear(x, w), args.min_repeat_ms, args.repeat)
        baselines.append((layer.name, "torch F.linear", statistics.median(s)))
    if not args.quick:
        x, w = torch.randn(conv.input_shape), torch.randn(conv.weight_shape)
        s = torch_time(lambda: F.conv2d(x, w, padding=1), args.min_repeat_ms, args.repeat)
        baselines.append((conv.name, "torch F.conv2d", statistics.median(s)))

    import yaml

    from autoquant.backends.tvm.backend import TvmBackend
    from autoquant.hardware.profile import HardwareProfileSpec, resolve

    spec = HardwareProfileSpec.model_validate(
        yaml.safe_load(f"""
        name: bench
        target: {{kind: llvm, mcpu: auto}}
        threads: {args.threads}
        measure: {{warmup: 2, number: 1, repeat: {args.repeat},
                   min_repeat_ms: {args.min_repeat_ms}, timeout_s: 300}}
    """)
    )
    backend = TvmBackend(resolve(spec))
    fp = backend.fingerprint()
    print(
        f"# target {backend.profile.target}, threads {fp['threads']}, VNNI {backend.vnni}, "
        f"host {fp.get('host_cpu')}, tvm {fp['runtime_version']}"
    )
    C = QuantChoice
    choices = [
        C(32, 32),
        C(16, 32),
        C(16, 16),
        C(8, 8, "per_channel"),
        C(8, 32, "per_channel"),
        C(4, 8, "per_channel"),
        C(4, 32, "per_channel"),
        C(4, 32, "per_group", 32),
        C(4, 32, "per_group", 128),
        C(3, 32, "per_group", 32),
        C(2, 32, "per_group", 32),
        C(8, 8, "per_group", 32),
    ]
    cases = [(layer, ch) for layer in (dense, gemv) for ch in choices]
    if not args.quick:
        cases += [(conv, ch) for ch in (C(32, 32), C(8, 8, "per_channel"), C(4, 32, "per_channel"))]
    print(
        f"{'layer':8s} {'M':>5s} {'choice':12s} {'kernel':36s} {'median us':>10s} {'spread':>7s} "
        f"{'GFLOP/s':>8s} {'build s':>7s}"
    )
    for layer, choice in cases:
        timing = backend.measure(layer, choice)
        d = timing.details
        if not timing.ok:
            print(f"{layer.name:8s} {'':5s} {choice.label:12s} {timing.status}: {timing.error}")
            continue
        gflops = 2 * d["m"] * d["n"] * d["k"] / (timing.median_us * 1e3)
        print(
            f"{layer.name:8s} {d['m']:5d} {choice.label:12s} {timing.impl:36s} "
            f"{timing.median_us:10.1f} {timing.spread:7.0%} {gflops:8.1f} {timing.build_s:7.2f}"
        )
        sys.stdout.flush()
    for name, what, seconds in baselines:
        what = f"{what} ({args.torch_threads} thr)"
        print(f"{name:8s} {'':5s} {'f32-a32':12s} {what:36s} {seconds * 1e6:10.1f}")
    backend.close()


if __name__ == "__main__":
    main()
