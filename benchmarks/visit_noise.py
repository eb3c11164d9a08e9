"""How much two ways of timing whole models move a comparison between configs, side by side.

    python benchmarks/visit_noise.py [--profile hw_profiles/cpu-local.yaml] [--task digits-wide]
        [--window-s 5] [--windows 8] [--also-visit-ms MS] [--json PATH]

Compiles four configs of the task's model (float32, every layer w8a8, every layer w4 weight-only,
and a mix) and times them ``--windows`` times over for ``--window-s`` seconds each way, the two
ways alternating window by window so both see the same machine:

- ``rounds``: what autoquant did before ``interleave``: each config in turn takes one round,
  ``end_to_end.repeat`` samples of at least ``min_repeat_ms``, and the cycle repeats;
- ``visits``: what it does now: each config in turn takes one short visit of ``visit_ms``;
- with ``--also-visit-ms``, a third way: visits of that many milliseconds instead.

For each window and way, a config's figure is the median of its samples; the comparison is its
ratio to float32's. The noise of a way is the std over the windows of that ratio (relative to
its mean), per config; the last column divides the two. A ranking of configs rests on such
ratios, so a way whose ratios move less ranks configs more reproducibly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="hw_profiles/cpu-local.yaml")
    parser.add_argument("--task", default="digits-wide")
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--also-visit-ms", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile
    from autoquant.measure.timing import KernelTiming
    from autoquant.space.discovery import discover_layers
    from autoquant.space.values import QuantChoice, QuantConfig
    from autoquant.tasks import load_task

    task = load_task(args.task, file="command line", spec_dir=Path.cwd())
    layers = tuple(discover_layers(task.model, task.input_shape))
    names = [layer.name for layer in layers]
    w8a8 = QuantChoice.from_label("w8cs-a8")
    w4 = QuantChoice.from_label("w4cs-a32")
    half = len(names) // 2
    configs = {
        "fp32": QuantConfig.uniform(layers, QuantChoice()),
        "w8a8": QuantConfig.uniform(layers, w8a8),
        "w4": QuantConfig.uniform(layers, w4),
        "mix": QuantConfig.from_mapping(
            {n: (w8a8 if i < half else w4) for i, n in enumerate(names)}
        ),
    }
    profile = load_profile(Path(args.profile))
    visit_s = profile.spec.measure.visit_ms / 1000.0
    with backend_for(profile) as backend:
        prepared = {}
        for name, config in configs.items():
            handle = backend.prepare_model(task.model, task.input_shape, layers, config)
            if isinstance(handle, KernelTiming):
                raise SystemExit(f"{name}: {handle.error}")
            prepared[name] = handle
        ways = {
            "rounds": lambda h: h.time(),
            "visits": lambda h: [h.visit(visit_s)],
        }
        if args.also_visit_ms:
            other_s = args.also_visit_ms / 1000.0
            ways[f"{args.also_visit_ms:g} ms"] = lambda h: [h.visit(other_s)]
        medians: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for window in range(args.windows):
            for way, take in ways.items():
                samples: dict[str, list[float]] = {name: [] for name in prepared}
                start = time.monotonic()
                while time.monotonic() - start < args.window_s:
                    for name, handle in prepared.items():
                        samples[name] += take(handle)
                medians[way].append({n: statistics.median(s) * 1e6 for n, s in samples.items()})
                print(
                    f"window {window + 1}/{args.windows} {way:7s} "
                    + " ".join(f"{n} {m:7.1f} us" for n, m in medians[way][-1].items()),
                    flush=True,
                )
        for handle in prepared.values():
            handle.close()

    def noise(way: str, name: str) -> float:
        ratios = [m[name] / m["fp32"] for m in medians[way]]
        return statistics.pstdev(ratios) / statistics.fmean(ratios)

    print(
        f"\nstd over {args.windows} windows of a config's median / float32's ({profile.name}, "
        f"{args.task}, {args.window_s:g} s windows, visits of {visit_s * 1e3:g} ms)"
    )
    print(f"{'config':8s} " + " ".join(f"{w:>8s}" for w in ways) + f" {'rounds/visits':>14s}")
    result = {}
    for name in configs:
        if name == "fp32":
            continue
        result[name] = {way: noise(way, name) for way in ways}
        a, b = result[name]["rounds"], result[name]["visits"]
        print(
            f"{name:8s} "
            + " ".join(f"{v * 100:7.2f}%" for v in result[name].values())
            + f" {a / b if b else float('inf'):13.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"medians_us": medians, "noise": result}, indent=1))


if __name__ == "__main__":
    main()
