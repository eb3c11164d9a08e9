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
        path = _profile_file(entry, spec_path.parent, file=str(spec_path), key=f"hardware[{i}]")
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


def override_hardware(
    resolved: tuple[ResolvedProfile, ...], entries: Sequence[str], *, cwd: Path, key: str = "--hardware"
) -> tuple[ResolvedProfile, ...]:
    """The spec's profiles with some replaced by this machine's own: each entry (a built-in
    name or a YAML path relative to ``cwd``) takes the place of the spec's profile of the same
    ``name`` (a worker reaches the device its way: its own RPC tracker, its own local device).
    Raises ``UserError`` naming ``key`` for a profile whose name the spec has no entry for."""
    by_name = {r.name: r for r in resolved}
    given: dict[str, ResolvedProfile] = {}
    for entry in entries:
        # resolved against cwd: the command line's paths are the user's, not the spec's
        path = _profile_file(entry, cwd, file=None, key=key)
        mine = ResolvedProfile(entry, path, load_profile_spec(path))
        if mine.name not in by_name:
            raise UserError(
                f"bad value {show(entry)}: profile name {mine.name!r} is not one of the spec's "
                f"hardware; allowed: a profile named {' or '.join(by_name) or '(none: the spec has no hardware)'}",
                key=key,
            )
        if mine.name in given:
            raise UserError(
                f"bad value {show(entry)}: profile name {mine.name!r} is given twice; allowed: "
                "one profile per spec hardware entry",
                key=key,
            )
        given[mine.name] = mine
    return tuple(given.get(r.name, r) for r in resolved)


def _profile_file(entry: str, base: Path, *, file: str | None, key: str) -> Path:
    """The profile file an entry names: a path relative to ``base``, or a built-in name."""
    where = "the spec" if file else "the current directory"
    candidate = Path(entry)
    if not candidate.is_absolute():
        candidate = base / candidate
    if candidate.suffix in (".yaml", ".yml") or "/" in entry or _is_file(candidate):
        if not _is_file(candidate):
            raise UserError(
                f"bad value {show(entry)}: profile file not found (looked at {show(str(candidate))}); allowed: "
                f"a built-in profile name or a YAML path relative to {where}",
                file=file,
                key=key,
            )
        return candidate
    path = PROFILES_DIR / f"{entry}.yaml"
    if not _is_file(path):
        known = ", ".join(p.stem for p in builtin_profiles()) or "none"
        raise UserError(
            f"bad value {show(entry)}: no such hardware profile; allowed: one of {known}, "
            f"or a YAML path relative to {where}",
            file=file,
            key=key,
        )
    return path


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system refuses (too long, say)."""
    try:
        return path.is_file()
    except OSError:
        return False
