"""Workers sharing a study: configs measured per minute with 1 and with 2 worker processes (each
worker one torch thread), and the hypervolume each reached in the same measuring time, side by
side in one run.

Both runs are the real ``autoquant search SPEC --workers N --timeout T`` (worker subprocesses,
claims, heartbeats) on the same spec: a built-in task (digits-mlp by default), a 3-choice space,
the given sampler. The study lives in the run directory's SQLite file in WAL mode by default, or
in two PostgreSQL databases, one per run, given as ``--storage URL1 --storage URL2`` (password
from PGPASSWORD or ~/.pgpass). ``T`` counts from each worker's start of measuring;
a worker's start-up (importing torch, loading the task, calibrating) is not in it. The hypervolume
is of (accuracy, size) over each run's measured front, with one reference point for both runs
(the worst accuracy and the largest size either run measured).

    python benchmarks/workers.py                       # 2 x 120 s of measuring, SQLite
    python benchmarks/workers.py --seconds 60 --sampler nsga2   # or guided
    python benchmarks/workers.py --storage postgresql://me@host/a --storage postgresql://me@host/b
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
version: 1
rules:
  - match: {}
    weight_bits: [2, 3, 4, 8, 32]
    act_bits: [8, 32]
    granularity: [per_channel, per_tensor]
"""


def run(n_workers: int, folder: Path, args, storage: str | None) -> tuple[Path, float]:
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(SPACE)
    spec = folder / "spec.yaml"
    spec.write_text(
        f"version: 1\nname: workers{n_workers}\ntask: {args.task}\nspace: space.yaml\n"
        f"search: {{sampler: {args.sampler}, trials: 100000, seed: 0, population_size: 8}}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "autoquant.cli", "search", str(spec), "--out",
               str(folder / "run"), "--workers", str(n_workers), "--timeout", str(args.seconds),
               "--quiet"]
    if storage:
        command += ["--storage", storage]
    start = time.monotonic()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return folder / "run", time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    from autoquant.pareto import hypervolume

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measuring time per worker")
    parser.add_argument("--task", default="digits-mlp")
    from autoquant.search.samplers import SAMPLERS

    parser.add_argument("--sampler", default="random", choices=list(SAMPLERS))
    parser.add_argument("--storage", action="append", default=[], help="two PostgreSQL URLs")
    args = parser.parse_args(argv)
    if args.storage and len(args.storage) != 2:
        parser.error("--storage: give two databases, one per run")
    tmp = Path(tempfile.mkdtemp(prefix="aq-workers-bench-"))
    results = {}
    for i, n in enumerate((1, 2)):
        storage = args.storage[i] if args.storage else None
        run_dir, wall = run(n, tmp / f"w{n}", args, storage)
        frame = pd.read_parquet(run_dir / "trials.parquet")
        results[n] = (frame, wall)
    directions = ["maximize", "minimize"]
    done = {n: f[f["state"] == "COMPLETE"] for n, (f, _) in results.items()}
    both = pd.concat(done.values())
    reference = [float(both["accuracy"].min()) - 1e-9, float(both["size_bytes"].max()) + 1.0]
    where = "PostgreSQL" if args.storage else "SQLite (WAL) in the run directory"
    print(f"{args.task}, sampler {args.sampler}, {args.seconds:g} s of measuring per worker, "
          f"study in {where}, {os.cpu_count()} cores, each worker 1 torch thread")
    print(f"{'workers':>7} {'configs':>8} {'per min':>8} {'hypervolume':>12} {'wall s':>7}")
    for n, (frame, wall) in results.items():
        measured = len(frame)
        values = done[n][["accuracy", "size_bytes"]].to_numpy(dtype=float)
        hv = hypervolume(values, directions, reference) if len(values) else 0.0
        per_min = measured / (args.seconds / 60.0)
        print(f"{n:>7} {measured:>8} {per_min:>8.1f} {hv:>12.1f} {wall:>7.1f}")
    ratio = len(results[2][0]) / max(1, len(results[1][0]))
    print(f"2 workers measured {ratio:.2f}x the configs of 1 in the same measuring time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
