"""What ONNX Runtime's thread pools do to interleaved timings, side by side.

    python benchmarks/ort_thread_pool.py [--profile hw_profiles/cpu-local-ort.yaml]
        [--task digits-wide] [--cycles 40] [--json PATH]

The ORT backend measures eight one-layer graphs of the task (its own sessions, in the
exporter's form), each first alone (the backend's first round), then all of them visited in
turn for ``--cycles`` cycles (``autoquant.measure.interleave``: ``visit_ms`` visits, as the later
kernel rounds and every whole-model round are timed). Two ways, each in a child process (a
process has one or the other):

- ``own``: every session with an intra-op pool of its own, ORT's default (what the backend did
  before ``export.validate.share_thread_pool``);
- ``shared``: every session on one process-wide pool of the profile's threads (what it does).

Per kernel and way: the median visit's time per call over the time alone. 1.0 means a visit
times what a lone run takes; more means the sessions not running slowed the one visited.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PICKS = (
    ("conv2", "f16-a32"),
    ("conv3", "f32-a32"),
    ("conv4", "f32-a32"),
    ("conv4", "w8cs-a8"),
    ("conv5", "f32-a32"),
    ("conv5", "w4cs-a32"),
    ("fc1", "f32-a32"),
    ("fc1", "w4g32s-a32"),
)


def child(args: argparse.Namespace) -> None:
    from autoquant.backends.registry import backend_for
    from autoquant.export import validate
    from autoquant.hardware.profile import load_profile
    from autoquant.space.discovery import discover_layers
    from autoquant.space.values import QuantChoice
    from autoquant.tasks import load_task

    if args.child == "own":  # the backend before the shared pool
        validate.share_thread_pool = lambda threads: None
    task = load_task(args.task, file="command line", spec_dir=Path.cwd())
    layers = {layer.name: layer for layer in discover_layers(task.model, task.input_shape)}
    profile = load_profile(Path(args.profile))
    seconds = profile.spec.measure.visit_ms / 1000.0
    alone, visits, visitors = {}, {}, {}
    with backend_for(profile) as backend:
        for name, label in PICKS:
            key = f"{name} {label}"
            timing = backend.measure(layers[name], QuantChoice.from_label(label))
            if not timing.ok:
                raise SystemExit(f"{key}: {timing.error}")
            alone[key] = timing.median_us
            visitors[key] = backend.kernel_visitor(
                layers[name], QuantChoice.from_label(label), seconds
            )
            visits[key] = []
        for _ in range(args.cycles):
            for key, visit in visitors.items():
                visits[key].append(visit() * 1e6)
    print(json.dumps({k: (alone[k], statistics.median(v)) for k, v in visits.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="hw_profiles/cpu-local-ort.yaml")
    parser.add_argument("--task", default="digits-wide")
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("own", "shared"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = {}
    for way in ("own", "shared"):
        command = [
            sys.executable,
            __file__,
            "--child",
            way,
            "--profile",
            args.profile,
            "--task",
            args.task,
            "--cycles",
            str(args.cycles),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{way}: {out.stderr.strip().splitlines()[-1:]}")
        results[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{'kernel':22}{'own: alone µs':>15}{'visits/alone':>14}"
        f"{'shared: alone µs':>18}{'visits/alone':>14}"
    )
    ratios: dict[str, list[float]] = {"own": [], "shared": []}
    for key in results["own"]:
        cells = []
        for way in ("own", "shared"):
            alone, visited = results[way][key]
            ratios[way].append(visited / alone)
            cells.append(f"{alone:>{15 if way == 'own' else 18}.1f}{visited / alone:>14.2f}")
        print(f"{key:22}" + "".join(cells))
    for way, r in ratios.items():
        print(
            f"{way}: visits over alone, median {statistics.median(r):.2f} "
            f"(range {min(r):.2f}-{max(r):.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
