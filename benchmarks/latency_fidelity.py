"""Latency-model fidelity on this machine, locally and through a loopback TVM RPC tracker.

    python benchmarks/latency_fidelity.py [--task digits-wide] [--validate 30]
        [--profile hw_profiles/cpu-local.yaml] [--out /tmp/autoquant-fidelity] [--no-rpc | --no-local]

Runs ``autoquant profile PROFILE --task T --validate N`` twice in one program: first on the
local device, then on the same CPU reached as a remote board through a real TVM RPC tracker and
server started here on 127.0.0.1 (``--rpc-tracker`` / ``--rpc-key``). Each run gets a fresh
latency table, so both measure every kernel and every end-to-end config themselves. Prints the
fidelity figures side by side (share of held-out configs within ±10 %, MAPE, Spearman of the
calibrated model and of the plain per-layer kernel sum) and the float32 end-to-end latency of
each, and writes both JSON reports under ``--out``. The runs are sequential, never concurrent:
on 2 cores two timers would measure each other.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile(args: argparse.Namespace, out: Path, name: str, extra: list[str]) -> dict:
    table = out / f"{name}.sqlite"
    table.unlink(missing_ok=True)
    report = out / f"{name}.json"
    cmd = [
        sys.executable, "-m", "autoquant.cli", "profile", args.profile, "--task", args.task,
        "--validate", str(args.validate), "--table", str(table), "--json", str(report),
        "--quiet", *extra,
    ]
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    data = json.loads(report.read_text())
    data["wall_s"] = time.monotonic() - start
    return data


def loopback_device(threads: int) -> tuple[list[subprocess.Popen], int, str]:
    """A tracker and one RPC server registered under ``loopback`` (both on 127.0.0.1)."""
    from autoquant.backends.tvm.rpc import probe_tracker

    port, key = free_port(), "loopback"
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    tracker = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
         "--tracker", f"127.0.0.1:{port}", "--key", key],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not probe_tracker("127.0.0.1", port, timeout_s=1.0).has(key):
        if time.monotonic() > deadline:
            for p in (server, tracker):
                p.terminate()
            raise SystemExit("the loopback RPC server never registered with the tracker")
        time.sleep(0.5)
    return [server, tracker], port, key


def figures(data: dict) -> dict:
    v = data["validation"]
    s, plain = v["validation"]["summary"], v["validation"]["summary"].get("plain_sum", {})
    return {
        "kernels measured": data["counts"]["measured_now"],
        "fp32 end to end ms": v["fp32_e2e_us"] / 1000,
        "held-out configs": s.get("measured"),
        "model within ±10%": s.get("within_10pct"),
        "model MAPE": s.get("mape"),
        "model Spearman": s.get("spearman"),
        "plain sum within ±10%": plain.get("within_10pct"),
        "plain sum MAPE": plain.get("mape"),
        "plain sum Spearman": plain.get("spearman"),
        "e2e config vs others, round to round": s.get("end_to_end_round_spread"),
        "e2e machine drift, round to round": s.get("end_to_end_round_drift"),
        "e2e split-half Spearman": s.get("end_to_end_repeat_spearman"),
        "exact predictor's Spearman": s.get("spearman_ceiling"),
        "wall s": data["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits-wide")
    parser.add_argument("--validate", type=int, default=30)
    parser.add_argument("--profile", default="hw_profiles/cpu-local.yaml")
    parser.add_argument("--out", type=Path, default=Path("/tmp/autoquant-fidelity"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-rpc", action="store_true")
    parser.add_argument("--no-local", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {} if args.no_local else {"local": profile(args, args.out, "local", [])}
    if not args.no_rpc:
        procs, port, key = loopback_device(args.threads)
        try:
            runs["loopback rpc"] = profile(
                args, args.out, "rpc", ["--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", key]
            )
        finally:
            for p in procs:
                p.terminate()
    table = {name: figures(data) for name, data in runs.items()}
    names = list(table)
    width = max(len(row) for n in names for row in table[n]) + 2
    print(f"\n{'':{width}}" + "".join(f"{n:>16}" for n in names))
    for row in table[names[0]]:
        cells = []
        for n in names:
            v = table[n][row]
            cells.append(f"{v:>16.3f}" if isinstance(v, float) else f"{v!s:>16}")
        print(f"{row:{width}}" + "".join(cells))
    (args.out / "summary.json").write_text(json.dumps(table, indent=1))
    reports = {"local": "local.json", "loopback rpc": "rpc.json"}
    print("\nreports: " + ", ".join(f"{args.out}/{reports[n]}" for n in names))


if __name__ == "__main__":
    main()
