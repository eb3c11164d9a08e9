"""A run spec's ``hardware`` entries, found and validated once: ``resolve_hardware()``.

Each entry is a built-in profile name (``hw_profiles/<name>.yaml``) or a YAML path relative to
the spec. The YAML is read and validated here only; everything downstream (objective names, the
latency model, the front check) takes the ``ResolvedProfile`` instead of a path. Imports no TVM:
``mcpu: auto`` and ``threads: auto`` are filled in by ``ResolvedProfile.hardware()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autoquant.errors import UserError, show
from autoquant.hardware.profile import (
    PROFILES_DIR,
    HardwareProfile,
    HardwareProfileSpec,
    builtin_profiles,
    load_profile_spec,
    resolve,
)


@dataclass(frozen=True)
class ResolvedProfile:
    """One ``hardware`` entry: as written, its file, and its validated profile spec."""

    entry: str
    path: Path
    spec: HardwareProfileSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stored_entry(self) -> str:
        """The entry as a resolved spec (run/spec.yaml) records it: a built-in name as given, a
        file as an absolute path (run/spec.yaml lives in another directory than the spec the
        path was relative to)."""
        builtin = self.entry == self.path.stem and "/" not in self.entry
        return self.entry if builtin else str(self.path.resolve())

    def hardware(self) -> HardwareProfile:
        """The profile with every ``auto`` filled in for this machine (imports TVM for
        ``mcpu: auto``)."""
        return resolve(self.spec, path=str(self.path))


def resolve_hardware(entries: Sequence[str], spec_path: Path) -> tuple[ResolvedProfile, ...]:
    """Each entry's profile file, read and validated, with distinct profile names.

    Raises ``UserError`` naming ``spec_path`` and ``hardware[i]`` for a file that is missing, a
    name that is no built-in profile, or a name another entry already gives; a bad profile file
    names itself and its key."""
    out = []
    for i, entry in enumerate(entries):
        path = _profile_file(entry, spec_path, key=f"hardware[{i}]")
        out.append(ResolvedProfile(entry, path, load_profile_spec(path)))
    names = [r.name for r in out]
    for i, resolved in enumerate(out):
        first = names.index(resolved.name)
        if first != i:
            raise UserError(
                f"bad value {resolved.entry!r}: profile name {resolved.name!r} is already given "
                f"by hardware[{first}]; allowed: profiles with distinct names",
                file=str(spec_path),
                key=f"hardware[{i}]",
            )
    return tuple(out)


def _profile_file(entry: str, spec_path: Path, *, key: str) -> Path:
    candidate = Path(entry)
    if not candidate.is_absolute():
        candidate = spec_path.parent / candidate
    if candidate.suffix in (".yaml", ".yml") or "/" in entry or _is_file(candidate):
        if not _is_file(candidate):
            raise UserError(
                f"bad value {show(entry)}: profile file not found (looked at {show(str(candidate))}); allowed: "
                "a built-in profile name or a YAML path relative to the spec",
                file=str(spec_path),
                key=key,
            )
        return candidate
    path = PROFILES_DIR / f"{entry}.yaml"
    if not _is_file(path):
        known = ", ".join(p.stem for p in builtin_profiles()) or "none"
        raise UserError(
            f"bad value {show(entry)}: no such hardware profile; allowed: one of {known}, "
            "or a YAML path relative to the spec",
            file=str(spec_path),
            key=key,
        )
    return path


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system refuses (too long, say)."""
    try:
        return path.is_file()
    except OSError:
        return False
