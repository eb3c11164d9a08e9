"""Reaching devices behind a TVM RPC tracker, with deadlines.

TVM's own ``connect_tracker`` retries a refused connection for 60 s and ``request`` waits for a
free device without limit; ``probe_tracker`` asks the tracker for its summary over a socket with
a short deadline instead, so ``autoquant hw`` answers quickly when a tracker is down.

Security: an RPC server runs whatever code it is sent. Bind trackers and servers to loopback or
a trusted network only.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from autoquant.hw._tvm import load_tvm


@dataclass(frozen=True)
class TrackerStatus:
    reachable: bool
    error: str | None = None
    servers: dict[str, int] = field(default_factory=dict)  # key -> registered servers
    free: dict[str, int] = field(default_factory=dict)  # key -> idle servers

    def describe(self, key: str) -> str:
        if not self.reachable:
            return f"tracker unreachable: {self.error}"
        if self.servers.get(key, 0) == 0:
            known = ", ".join(sorted(self.servers)) or "none"
            return f"no server registered under key {key!r} (keys there: {known})"
        return f"{self.servers[key]} server(s) under key {key!r}, {self.free.get(key, 0)} free"

    def has(self, key: str) -> bool:
        return self.reachable and self.servers.get(key, 0) > 0


def probe_tracker(host: str, port: int, *, timeout_s: float = 3.0) -> TrackerStatus:
    """The tracker's registered keys, or why it could not be asked (never raises)."""
    load_tvm()
    from tvm.rpc import base

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                return TrackerStatus(False, f"{host}:{port} is not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            value = base.recvjson(sock)
    except (OSError, struct.error, ValueError) as exc:
        return TrackerStatus(False, f"{host}:{port}: {type(exc).__name__}: {exc}")
    if not value or value[0] != base.TrackerCode.SUCCESS:
        return TrackerStatus(False, f"{host}:{port} answered {value!r}")
    summary = value[1]
    servers: dict[str, int] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", "")).split(":", 1)[-1]
        servers[key] = servers.get(key, 0) + 1
    free = {k: int(v.get("free", 0)) for k, v in summary.get("queue_info", {}).items()}
    return TrackerStatus(True, None, servers, free)


def request_session(
    host: str, port: int, key: str, *, session_timeout_s: float, connect_timeout_s: float
) -> Any:
    """An RPC session on a device under ``key``; raises RuntimeError with the reason."""
    status = probe_tracker(host, port, timeout_s=connect_timeout_s)
    if not status.has(key):
        raise RuntimeError(status.describe(key))
    tvm = load_tvm()
    tracker = tvm.rpc.connect_tracker(host, port)
    try:
        return tracker.request(key, priority=1, session_timeout=session_timeout_s, max_retry=2)
    finally:
        tracker.close()
