"""Remote devices: a real TVM RPC tracker and server on 127.0.0.1, no mocks.

The server runs whatever it is sent, so it binds to loopback only. The loopback test takes
~15 s (the server's worker imports TVM), inside the default budget.
"""

from __future__ import annotations

import socket
import time

import pytest
import yaml
from conftest import tvm_or_skip

from autoquant.latency.table import LatencyTable
from autoquant.space.values import LayerInfo, QuantChoice

pytestmark = pytest.mark.requires_tvm

LAYER = LayerInfo("fc", "linear", (48, 64), (1, 64), (1, 48), 48 * 64, 48 * 64 + 48, True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracker_answers_fast():
    tvm_or_skip()
    from autoquant.backends.tvm.rpc import probe_tracker

    start = time.monotonic()
    status = probe_tracker("127.0.0.1", free_port(), timeout_s=1.0)
    assert not status.reachable and "refused" in status.error.lower()
    assert time.monotonic() - start < 3
    assert "unreachable" in status.describe("k")


class SilentListener:
    """A socket that accepts connections and never answers: a tracker that hangs."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("tracker", ["silent", "closed"])
def test_unreachable_tracker_is_one_failure_for_the_profile(tmp_path, capsys, tracker):
    """Once per batch, within the connect deadline: exit 1 with one line, and nothing stored
    (the same kernels behind another tracker address must not be "reused" as failed)."""
    tvm_or_skip()
    from conftest import run_cli

    listener = SilentListener() if tracker == "silent" else None
    port = listener.port if listener else free_port()
    profile = remote_profile(port, "nobody")
    profile["device"]["connect_timeout_s"] = 2
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(profile))
    table = tmp_path / "lat.sqlite"
    try:
        start = time.monotonic()
        code, _, err = run_cli(
            ["profile", path, "--task", "digits-mlp", "--choices", "f32-a32,w8cs-a8",
             "--table", table, "--quiet"], capsys,
        )
        elapsed = time.monotonic() - start
    finally:
        if listener:
            listener.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "cannot be reached" in lines[0] and "tracker unreachable" in lines[0]
    assert elapsed < 30, elapsed  # the task load and one 2 s probe, not a wait per kernel
    with LatencyTable(table) as tab:
        assert len(tab) == 0


def test_lost_device_mid_batch_stops_and_stores_nothing_for_it(tmp_path):
    """The tracker answers the batch's first question, then is gone: the first kernel that
    needs a session ends the batch; no record of the failure is kept."""
    tvm_or_skip()
    from autoquant.backends.registry import backend_for
    from autoquant.errors import MachineError
    from autoquant.hardware.profile import load_profile
    from autoquant.latency.profiling import profile_layers

    path = tmp_path / "remote.yaml"
    profile = remote_profile(free_port(), "nobody")
    profile["device"]["connect_timeout_s"] = 1
    path.write_text(yaml.safe_dump(profile))
    with backend_for(load_profile(path)) as backend, LatencyTable(tmp_path / "t.sqlite") as table:
        backend.device_problem = lambda: None  # reachable when asked, lost right after
        with pytest.raises(MachineError, match="cannot be reached: tracker unreachable"):
            profile_layers(backend, [(LAYER, [QuantChoice(), QuantChoice(8, 8, "per_channel")])], table)
        assert len(table) == 0


def test_unreachable_device_is_a_failed_timing(tmp_path):
    tvm_or_skip()
    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile

    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(remote_profile(free_port(), "nobody")))
    with backend_for(load_profile(path)) as backend:
        timing = backend.measure(LAYER, QuantChoice())
    assert timing.status == "failed" and "tracker unreachable" in timing.error
    assert timing.device_unreachable  # a failure of the device, never stored for the kernel


def remote_profile(port: int, key: str) -> dict:
    import tvm.target.codegen as codegen

    return {
        "version": 1,
        "name": "loopback",
        "runtime": "tvm",
        "threads": 2,
        "batch_size": 2,
        "target": {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": 2},
        "device": {
            "where": "rpc",
            "tracker": f"127.0.0.1:{port}",
            "key": key,
            "session_timeout_s": 60,
            "connect_timeout_s": 2,
        },
        "measure": {"warmup": 1, "number": 1, "repeat": 3, "min_repeat_ms": 5, "timeout_s": 60},
    }


def test_profile_over_rpc_on_loopback(tmp_path, capsys):
    """Tracker + server in-process on 127.0.0.1: reachability, a remote timing, the table."""
    tvm_or_skip()
    for extra in ("tornado", "psutil", "cloudpickle"):  # the tracker's undeclared dependencies
        pytest.importorskip(extra)
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    from autoquant.backends.registry import backend_for
    from autoquant.backends.tvm.rpc import probe_tracker
    from autoquant.commands.profile import reachability
    from autoquant.hardware.profile import load_profile, load_profile_spec
    from autoquant.latency.profiling import profile_layers

    base = free_port()
    tracker = Tracker(host="127.0.0.1", port=base, port_end=base + 10, silent=True)
    server = None
    try:
        sport = free_port()
        server = Server(
            host="127.0.0.1",
            port=sport,
            port_end=sport + 10,
            tracker_addr=("127.0.0.1", tracker.port),
            key="loopback-cpu",
            silent=True,
        )
        deadline = time.monotonic() + 30
        while not probe_tracker("127.0.0.1", tracker.port).has("loopback-cpu"):
            assert time.monotonic() < deadline, "server never registered with the tracker"
            time.sleep(0.2)
        status = probe_tracker("127.0.0.1", tracker.port)
        assert "1 server(s)" in status.describe("loopback-cpu")
        assert "no server registered under key 'other'" in status.describe("other")

        path = tmp_path / "loopback.yaml"
        path.write_text(yaml.safe_dump(remote_profile(tracker.port, "loopback-cpu")))
        assert reachability(load_profile_spec(path)).startswith("yes: 1 server(s)")
        prof = load_profile(path)
        choices = [QuantChoice(), QuantChoice(8, 8, "per_channel")]
        with backend_for(prof) as backend, LatencyTable(tmp_path / "lat.sqlite") as table:
            assert backend.fingerprint()["rpc_key"] == "loopback-cpu"
            first = profile_layers(backend, [(LAYER, choices)], table)
            assert first.count(status="measured") == 2, [e.timing.error for e in first.entries]
            assert all(e.timing.median_us > 0 for e in first.entries)
            again = profile_layers(backend, [(LAYER, choices)], table)
            assert again.measured_now == 0
        # Whole models end to end through the same tracker: the latency model is calibrated
        # and checked on the remote device. A short session_timeout_s makes the configs go in
        # batches of two models per session (the server would end a longer session); the
        # second batch re-times the first config as its anchor and is scaled by it.
        from autoquant.latency.validation import check_latency_model
        from autoquant.space.discovery import discover_layers
        from autoquant.tasks.digits import DigitsMLP

        e2e = remote_profile(tracker.port, "loopback-cpu")
        e2e["device"]["session_timeout_s"] = 50
        e2e["end_to_end"] = {"calibration_configs": 2, "rounds": 2}
        path.write_text(yaml.safe_dump(e2e))
        mlp = DigitsMLP().eval()
        layers = discover_layers(mlp, (1, 1, 8, 8))
        choices = [QuantChoice(), QuantChoice(8, 32, "per_channel")]
        with backend_for(load_profile(path)) as backend, LatencyTable(tmp_path / "e2e.sqlite") as t:
            assert backend.models_per_session() == 2
            profiled = profile_layers(backend, [(layer, choices) for layer in layers], t)
            checked = check_latency_model(
                backend, mlp, (1, 1, 8, 8), layers, profiled.lookup(),
                options={layer.name: choices for layer in layers}, n_validate=1, table=t,
                model_key="mlp",
            )
            last = t.get_model(backend.fingerprint_hash(), "mlp", checked.rows[0].config.hash)
        assert checked.measured_now == 3 and checked.fp32_e2e_us > 0
        assert all(r.error is None and r.measured_ms > 0 for r in checked.rows), checked.rows
        assert last.hit and last.timing.details["session_factor"] > 0
        # The CLI's --rpc-tracker / --rpc-key turn the local profile into this remote one.
        from typer.testing import CliRunner

        from autoquant.cli import app

        result = CliRunner().invoke(app, [
            "profile", "cpu-local", "--task", "digits-mlp", "--choices", "f32-a32",
            "--rpc-tracker", f"127.0.0.1:{tracker.port}", "--rpc-key", "loopback-cpu",
            "--table", str(tmp_path / "cli.sqlite"), "--min-repeat-ms", "5", "--quiet",
        ])
        assert result.exit_code == 0, result.output
        assert "3 kernels measured now" in result.output, result.output
        # Every server busy: the request gives up at its deadline instead of queueing forever,
        # and the tracker forgets it (the freed server goes to the next request).
        import gc

        from autoquant.backends.tvm.rpc import request_session

        held = request_session(
            "127.0.0.1", tracker.port, "loopback-cpu", session_timeout_s=60, connect_timeout_s=2
        )
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="no server under key 'loopback-cpu' became free"):
            request_session(
                "127.0.0.1", tracker.port, "loopback-cpu",
                session_timeout_s=60, connect_timeout_s=2, request_timeout_s=1.0,
            )
        assert time.monotonic() - start < 10
        del held
        gc.collect()
        again = request_session(
            "127.0.0.1", tracker.port, "loopback-cpu",
            session_timeout_s=60, connect_timeout_s=2, request_timeout_s=30,
        )
        assert again.cpu(0) is not None
        del again
        gc.collect()
        missing = remote_profile(tracker.port, "no-such-board")
        path.write_text(yaml.safe_dump(missing))
        with backend_for(load_profile(path)) as backend:
            timing = backend.measure(LAYER, QuantChoice())
        assert timing.status == "failed" and "no server registered" in timing.error
        # through the command: one failure for the whole profile, nothing stored
        from conftest import run_cli

        code, _, err = run_cli([
            "profile", path, "--task", "digits-mlp", "--choices", "f32-a32",
            "--table", tmp_path / "nokey.sqlite", "--quiet",
        ], capsys)
        assert code == 1 and "no server registered under key 'no-such-board'" in err, err
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
        with LatencyTable(tmp_path / "nokey.sqlite") as nokey:
            assert len(nokey) == 0
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()
