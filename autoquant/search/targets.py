"""One target and one latency model per latency objective of a shared study, whichever
machine a worker runs on.

Each worker profiles ``latency@<profile>`` with its own profile (the spec's, or its own given
with ``autoquant worker --hardware``: a device on its machine, the same board through its own
RPC tracker). Figures of two targets in one objective would make a front of nothing: so the
first process to open the study records, per profile, the target fingerprint its latency
model was measured on (CPU or RPC key, runtime and its version, threads, batch, kernel forms)
and the model itself; a worker whose profile is another target is refused before it measures
anything, and one of the same target predicts with the recorded model, not its own fit, so
every config of the study is predicted by one model. (Two workers that start at the same
moment may both record; each then reads back and uses whichever record won.)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from autoquant.errors import UserError
from autoquant.latency.model import model_from_state, model_state

TARGET_ATTR = "latency_target@"  # + profile name: a study user attribute
SHOWN_KEYS = ("host_cpu", "rpc_key", "target", "runtime", "runtime_version", "threads", "batch")


def target_of(fidelity: dict[str, Any]) -> dict[str, Any]:
    """What the study records of one profile's latency model: its target fingerprint."""
    return {
        "fingerprint_hash": fidelity.get("fingerprint_hash"),
        "fingerprint": fidelity.get("fingerprint") or {},
    }


def recorded_targets(url: str, study_name: str, settings: Any) -> dict[str, dict]:
    """The targets and latency models study ``study_name`` holds, by profile name ({} while no
    such study exists): a worker joining it need not profile what the study already has."""
    from autoquant.storage import open_storage, retrying

    storage = open_storage(url, settings)

    def read() -> dict[str, Any]:
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            return {}
        return storage.get_study_user_attrs(study_id)

    attrs = retrying(read, url=url, retry_s=settings.retry_s)
    return {
        key.removeprefix(TARGET_ATTR): value
        for key, value in attrs.items()
        if key.startswith(TARGET_ATTR) and isinstance(value, dict)
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
) -> tuple[Any, ...]:
    """Each ``RunLatency`` as the study has it: this process's target and model recorded when
    the study has none for its profile; the recorded model when the target matches; a
    ``UserError`` naming the profile (``--hardware`` when this worker gave its own, else the
    spec's ``hardware[i]``) when it is another target. A record that is not a model (a study is
    input like any other) is a ``UserError`` too."""
    out = []
    for i, run_latency in enumerate(latency):
        name = run_latency.profile
        mine = target_of(run_latency.fidelity)
        stored = study.user_attrs.get(TARGET_ATTR + name)
        if stored is None:
            study.set_user_attr(TARGET_ATTR + name, {**mine, "model": model_state(run_latency.model)})
            stored = study.user_attrs.get(TARGET_ATTR + name)  # another worker may have won
        given = name in overridden
        where = {"file": None if given else spec_file, "key": "--hardware" if given else f"hardware[{i}]"}
        if not isinstance(stored, dict) or stored.get("fingerprint_hash") != mine["fingerprint_hash"]:
            theirs = stored if isinstance(stored, dict) else {}
            raise UserError(
                f"bad value {name!r}: this worker's profile {name} is another target "
                f"({describe(mine['fingerprint'])}; fingerprint {mine['fingerprint_hash']}) than "
                f"the one the study's latency@{name} was measured on "
                f"({describe(theirs.get('fingerprint') or {})}; fingerprint "
                f"{theirs.get('fingerprint_hash')}); allowed: a profile of that same target "
                "(same CPU or RPC key, runtime, threads and batch), or another study",
                **where,
            )
        try:
            model = model_from_state(run_latency.model.layers, stored["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"bad value {name!r}: the study's latency model for latency@{name} cannot be read "
                f"({type(exc).__name__}: {str(exc)[:100]}); allowed: a study written by autoquant",
                **where,
            ) from None
        out.append(replace(run_latency, model=model))
    return tuple(out)
