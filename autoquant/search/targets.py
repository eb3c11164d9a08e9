"""One target per latency objective of a shared study, whichever machine a worker runs on.

Each worker predicts ``latency@<profile>`` from its own profile (the spec's, or its own given
with ``autoquant worker --hardware``: a device on its machine, the same board through its own
RPC tracker). Figures of two targets in one objective would make a front of nothing: so the
first process to open the study records, per profile, the target fingerprint its latency
model was measured on (CPU or RPC key, runtime and its version, threads, batch, kernel forms),
and a worker whose profile is another target is refused before it measures anything.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from autoquant.errors import UserError

TARGET_ATTR = "latency_target@"  # + profile name: a study user attribute
SHOWN_KEYS = ("host_cpu", "rpc_key", "target", "runtime", "runtime_version", "threads", "batch")


def target_of(fidelity: dict[str, Any]) -> dict[str, Any]:
    """What the study records of one profile's latency model: its target fingerprint."""
    return {
        "fingerprint_hash": fidelity.get("fingerprint_hash"),
        "fingerprint": fidelity.get("fingerprint") or {},
    }


def describe(fingerprint: dict[str, Any]) -> str:
    """The fingerprint's distinguishing fields on one line (``cpu ..., runtime ...``)."""
    parts = [f"{k} {fingerprint[k]}" for k in SHOWN_KEYS if fingerprint.get(k) not in (None, "")]
    return ", ".join(parts) or "no fingerprint"


def check_latency_targets(
    study: Any,
    latency: Sequence[Any],
    *,
    spec_file: str,
    overridden: Collection[str] = (),
) -> None:
    """Record each ``RunLatency``'s target in ``study`` (first comer), or refuse this process's
    profile when it is another target than the recorded one: ``UserError`` naming the profile
    (``--hardware`` when this worker gave its own, else the spec's ``hardware[i]``)."""
    attrs = study.user_attrs
    for i, run_latency in enumerate(latency):
        name = run_latency.profile
        mine = target_of(run_latency.fidelity)
        stored = attrs.get(TARGET_ATTR + name)
        if stored is None:
            study.set_user_attr(TARGET_ATTR + name, mine)
            continue
        if stored.get("fingerprint_hash") == mine["fingerprint_hash"]:
            continue
        given = name in overridden
        raise UserError(
            f"bad value {name!r}: this worker's profile {name} is another target "
            f"({describe(mine['fingerprint'])}; fingerprint {mine['fingerprint_hash']}) than the "
            f"one the study's latency@{name} was measured on ({describe(stored.get('fingerprint') or {})}; "
            f"fingerprint {stored.get('fingerprint_hash')}); allowed: a profile of that same target "
            "(same CPU or RPC key, runtime, threads and batch), or another study",
            file=None if given else spec_file,
            key="--hardware" if given else f"hardware[{i}]",
        )
