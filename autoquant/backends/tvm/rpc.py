"""Reaching devices behind a TVM RPC tracker, with deadlines.

TVM's own ``connect_tracker`` retries a refused connection for 60 s and ``request`` waits for a
free device without limit. Here both go over our own socket with deadlines: ``probe_tracker``
asks for the tracker's summary (so ``autoquant hw`` answers quickly when a tracker is down) and
``request_session`` asks for a free server and gives up after ``device.request_timeout_s``.

Security: an RPC server runs whatever code it is sent. Bind trackers and servers to loopback or
a trusted network only.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from autoquant.hardware._tvm import load_tvm


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


def _tracker_socket(host: str, port: int, timeout_s: float) -> socket.socket:
    """A socket to the tracker past the magic handshake (raises OSError or ValueError)."""
    from tvm.rpc import base

    sock = socket.create_connection((host, port), timeout=timeout_s)
    try:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        if magic != base.RPC_TRACKER_MAGIC:
            raise ValueError(f"{host}:{port} is not a TVM RPC tracker")
    except BaseException:
        sock.close()
        raise
    return sock


def probe_tracker(host: str, port: int, *, timeout_s: float = 3.0) -> TrackerStatus:
    """The tracker's registered keys, or why it could not be asked (never raises)."""
    load_tvm()
    from tvm.rpc import base

    try:
        with _tracker_socket(host, port, timeout_s) as sock:
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            value = base.recvjson(sock)
    except ValueError as exc:
        return TrackerStatus(False, str(exc))
    except (OSError, struct.error) as exc:
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
    host: str,
    port: int,
    key: str,
    *,
    session_timeout_s: float,
    connect_timeout_s: float,
    request_timeout_s: float = 120.0,
) -> Any:
    """An RPC session on a device under ``key``; raises RuntimeError with the reason.

    The tracker answers a request only when a server under the key is free; TVM's
    ``TrackerSession.request`` waits for that without limit. Here the request goes over our own
    socket with a deadline: when it passes, the socket closes, and the tracker drops the request
    (its callback sees the closed connection and keeps the server for others).
    """
    status = probe_tracker(host, port, timeout_s=connect_timeout_s)
    if not status.has(key):
        raise RuntimeError(status.describe(key))
    tvm = load_tvm()
    from tvm.rpc import base

    try:
        with _tracker_socket(host, port, connect_timeout_s) as sock:
            sock.settimeout(request_timeout_s)
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
            try:
                value = base.recvjson(sock)
            except TimeoutError:
                raise RuntimeError(
                    f"no server under key {key!r} became free within {request_timeout_s:g} s "
                    f"(device.request_timeout_s; {status.describe(key)})"
                ) from None
    except (OSError, ValueError, struct.error) as exc:
        raise RuntimeError(f"tracker {host}:{port}: {type(exc).__name__}: {exc}") from None
    if not value or value[0] != base.TrackerCode.SUCCESS:
        raise RuntimeError(f"tracker {host}:{port} answered {value!r}")
    url, server_port, match_key = value[1]
    return tvm.rpc.connect(url, server_port, match_key, session_timeout=session_timeout_s)
