"""Hardware profiles: where and how per-layer latency is measured.

A profile is a YAML file (``hw_profiles/*.yaml``) validated by ``HardwareProfileSpec``; every
mistake comes out as one ``UserError`` line naming the file, the key, the bad value and what is
allowed. ``resolve()`` turns a spec into a ``HardwareProfile`` with the ``auto`` values filled in
for this machine (TVM is imported only for ``mcpu: auto``).

Example::

    version: 1
    name: cpu-local
    target: {kind: llvm, mcpu: auto}     # a TVM target as a dict; mcpu auto = this CPU
    device: {where: local}               # or {where: rpc, tracker: host:port, key: rasp4}
    runtime: tvm                         # or onnxruntime
    threads: auto                        # auto = this machine's CPU count (local only)
    batch_size: 1
    measure: {warmup: 1, number: 1, repeat: 3, min_repeat_ms: 200, timeout_s: 60, rounds: 5,
              visit_ms: 10, statistic: median}
    end_to_end: {calibration_configs: 10, rounds: 7, repeat: 3}   # whole-model timing, model fit
    tuning: {trials_per_kernel: 64, budget_s: 600, build_timeout_s: 180}   # optional
    schedule: {parallel_min_macs: 524288}   # hand schedules: one thread below this many MACs
    execution_provider: CPUExecutionProvider   # runtime onnxruntime: CUDA, OpenVINO, ... if built
    formats: [fp32, fp16, weight_only, w8a8, wNa8]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from autoquant.errors import UserError
from autoquant.hardware.kernels import FORMATS, KernelFormat
from autoquant.yamlfile import parse_model, read_yaml

PROFILE_VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parents[2] / "hw_profiles"
HOSTPORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
TARGET_KINDS = ("llvm", "cuda", "rocm", "vulkan", "metal", "opencl")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSpec(_Strict):
    where: Literal["local", "rpc"] = "local"
    tracker: str | None = Field(default=None, description="host:port of the TVM RPC tracker")
    key: str | None = Field(default=None, description="device key the RPC server registered")
    session_timeout_s: float = Field(
        default=600,
        gt=0,
        description="the server ends a session this old; autoquant opens a new one before a "
        "kernel or a batch of whole models would run past it",
    )
    connect_timeout_s: float = Field(default=5, gt=0)
    request_timeout_s: float = Field(
        default=120,
        gt=0,
        description="how long to wait for the tracker to hand out a free server under the key "
        "(every server busy, or a stale registration): then the measurement fails with the "
        "reason instead of waiting forever",
    )
    cross_compiler: str | None = Field(
        default=None,
        description="C++ compiler that links kernels for the remote, e.g. aarch64-linux-gnu-g++",
    )

    @field_validator("tracker")
    @classmethod
    def _hostport(cls, value: str | None) -> str | None:
        if value is not None:
            if not HOSTPORT.match(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
                raise ValueError("must be host:port with a port in 1-65535")
        return value

    @model_validator(mode="after")
    def _rpc_needs_tracker(self) -> DeviceSpec:
        if self.where == "rpc" and (self.tracker is None or self.key is None):
            raise ValueError("where: rpc needs tracker (host:port) and key")
        if self.where == "local" and (self.tracker is not None or self.key is not None):
            raise ValueError("tracker and key only go with where: rpc")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        assert self.tracker is not None
        host, port = self.tracker.rsplit(":", 1)
        return host, int(port)


class MeasureSpec(_Strict):
    warmup: int = Field(default=1, ge=0, le=1000)
    number: int = Field(default=1, ge=1, le=100_000)
    repeat: int = Field(
        default=3,
        ge=3,
        le=1000,
        description="samples per kernel per round; at least 3: median and spread",
    )
    min_repeat_ms: float = Field(default=200, ge=0, le=60_000)
    timeout_s: float = Field(default=60, gt=0, description="per kernel: build + run + timing")
    verify: bool = Field(default=True, description="check each kernel against numpy before timing")
    rounds: int = Field(
        default=5,
        ge=1,
        le=20,
        description="timing rounds per kernel, interleaved over all kernels profiled together. "
        "Several short rounds: on a shared machine a kernel's time drifts by several percent "
        "over minutes (the same kernel differed by 6% between two profiles, 1.5% within one), "
        "and a kernel's median over rounds spread across the whole profile follows the drift "
        "less than one over two rounds",
    )
    visit_ms: float = Field(
        default=10,
        gt=0,
        le=60_000,
        description="every kernel round after the first, and every whole-model round, is "
        "taken as short visits of about this long, cycling over everything timed together, so "
        "all of it samples the machine at the same moments (``interleave``): a round lasts "
        "what repeat samples of min_repeat_ms would. Remote devices pay a round trip per "
        "visit: give them longer visits",
    )
    statistic: Literal["min", "median"] = Field(
        default="median",
        description="which repeat stands for a timing in the latency model. The median: on a "
        "shared machine the fastest repeat (min) is sometimes one lucky window well below all "
        "the others, and a whole model's min moved more between runs than its median",
    )


class EndToEndSpec(_Strict):
    """How whole-model latency is measured to calibrate and check the latency model."""

    calibration_configs: int = Field(
        default=10, ge=1, le=1000, description="configs timed end to end to fit the model"
    )
    rounds: int = Field(
        default=7,
        ge=1,
        le=100,
        description="interleaved timing rounds over all configs (load drifts, rounds average it)",
    )
    repeat: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="a round of one config lasts what this many samples of "
        "measure.min_repeat_ms would, taken as visits of measure.visit_ms interleaved with "
        "the other configs'. Many short rounds beat few long ones: on a shared machine the "
        "noise comes in spells of seconds, and a round's samples share its spell",
    )


class TuningSpec(_Strict):
    """Opt-in meta_schedule tuning of the per-layer kernels (TVM runtime, local llvm profiles).

    Each kernel that measured fine with its hand schedule is tuned, the tuned kernel checked
    against numpy and timed the same way, and the faster one kept (``impl`` ``tuned:...``, both
    figures in ``details``). Tuning costs ~1-3 min per kernel on 2 cores, so ``budget_s`` bounds
    the total; kernels after it is used up keep their hand schedule. RPC profiles are never
    tuned (each timing's ``details`` says why). The settings are part of the latency table's
    fingerprint: tuned and untuned timings are never mixed.
    """

    trials_per_kernel: int = Field(
        default=64,
        ge=1,
        description="candidate schedules meta_schedule builds and times, per kernel",
    )
    budget_s: float = Field(
        default=600,
        gt=0,
        description="seconds of tuning over a whole profiling run; the kernel that runs past it "
        "is stopped and keeps its hand schedule",
    )
    build_timeout_s: float = Field(
        default=180,
        gt=0,
        description="seconds meta_schedule's builder gives one candidate: its default (30 s) can "
        "be shorter than a fresh builder worker's start on a slow machine. Part of the table's "
        "fingerprint only when set otherwise",
    )

    def fingerprint(self) -> dict[str, Any]:
        """The settings in the latency table's fingerprint: ``build_timeout_s`` only when it
        differs from its default, so tables of profiles written before it existed still hit."""
        default = TuningSpec.model_fields["build_timeout_s"].default
        return self.model_dump(
            exclude={"build_timeout_s"} if self.build_timeout_s == default else None
        )


class ScheduleSpec(_Strict):
    """Machine-tuned constants of the hand-written kernel schedules (TVM runtime)."""

    parallel_min_macs: int = Field(
        default=1 << 19,
        ge=0,
        description="below this many multiply-accumulates a kernel runs on one thread: waking "
        "the thread pool costs more than splitting a small kernel saves, and where the two "
        "cross depends on the machine (``benchmarks/kernels.py`` measures it)",
    )

    def fingerprint(self) -> dict[str, Any]:
        """The settings that differ from their defaults (empty for a default schedule, which
        the fingerprint of a profile written before these settings existed assumed)."""
        return self.model_dump(exclude_defaults=True)


class HardwareProfileSpec(_Strict):
    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    target: dict[str, Any]
    device: DeviceSpec = DeviceSpec()
    runtime: Literal["tvm", "onnxruntime"] = "tvm"
    threads: int | Literal["auto"] = "auto"
    batch_size: int = Field(default=1, ge=1, le=65536)
    measure: MeasureSpec = MeasureSpec()
    end_to_end: EndToEndSpec = EndToEndSpec()
    tuning: TuningSpec | None = None
    schedule: ScheduleSpec = ScheduleSpec()
    execution_provider: str = Field(
        default="CPUExecutionProvider",
        pattern=r"^[A-Za-z0-9]+ExecutionProvider$",
        description="the ONNX Runtime execution provider sessions run on (runtime: "
        "onnxruntime): CPUExecutionProvider, or one this onnxruntime build has, e.g. "
        "CUDAExecutionProvider or OpenVINOExecutionProvider",
    )
    formats: list[KernelFormat] = Field(default_factory=lambda: list(FORMATS), min_length=1)

    @field_validator("target")
    @classmethod
    def _target_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        kind = value.get("kind")
        if kind not in TARGET_KINDS:
            raise ValueError(f"target.kind must be one of {', '.join(TARGET_KINDS)} (got {kind!r})")
        if value.get("mcpu") == "native":
            raise ValueError(
                "mcpu: native silently means a generic CPU in TVM 0.27; use mcpu: auto"
            )
        return value

    @field_validator("threads")
    @classmethod
    def _threads_ok(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError("must be 1-1024 or auto")
        return value

    @model_validator(mode="after")
    def _auto_is_local(self) -> HardwareProfileSpec:
        if self.device.where == "rpc":
            if self.target.get("mcpu") == "auto":
                raise ValueError("target.mcpu: auto describes this machine; name the remote CPU")
            if self.threads == "auto":
                raise ValueError("threads: auto describes this machine; give the remote's count")
        return self

    @model_validator(mode="after")
    def _provider_is_ort(self) -> HardwareProfileSpec:
        default = HardwareProfileSpec.model_fields["execution_provider"].default
        if self.runtime != "onnxruntime" and self.execution_provider != default:
            raise ValueError("execution_provider goes with runtime: onnxruntime")
        return self


@dataclass(frozen=True)
class HardwareProfile:
    """A resolved profile: every ``auto`` filled in. ``target`` is the dict given to TVM."""

    spec: HardwareProfileSpec
    target: dict[str, Any]
    threads: int
    path: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_local(self) -> bool:
        return self.spec.device.where == "local"

    @property
    def target_kind(self) -> str:
        return str(self.target["kind"])

    def target_json(self) -> str:
        return json.dumps(self.target, sort_keys=True, separators=(",", ":"))

    def with_overrides(
        self,
        *,
        batch_size: int | None = None,
        rpc_tracker: str | None = None,
        rpc_key: str | None = None,
        **measure: Any,
    ) -> HardwareProfile:
        """A copy with the batch size, the RPC tracker / device key and/or measure settings
        replaced (validated again). A tracker turns a local profile into an RPC one with the
        target already resolved for this host.

        Raises ``UserError`` naming the setting when a value is out of range."""
        data = self.spec.model_dump()
        if batch_size is not None:
            data["batch_size"] = batch_size
        if rpc_tracker is not None or rpc_key is not None:
            device = data["device"]
            device["where"] = "rpc"
            device["tracker"] = rpc_tracker or device.get("tracker")
            device["key"] = rpc_key or device.get("key")
            data["target"] = dict(self.target)
            data["threads"] = self.threads
        data["measure"].update({k: v for k, v in measure.items() if v is not None})
        spec = parse_model(HardwareProfileSpec, data, file=self.path or self.name)
        return HardwareProfile(spec, self.target, self.threads, self.path)


def resolve(spec: HardwareProfileSpec, *, path: str | None = None) -> HardwareProfile:
    threads = spec.threads if isinstance(spec.threads, int) else (os.cpu_count() or 1)
    target = dict(spec.target)
    if target.get("mcpu") == "auto":
        from autoquant.hardware._tvm import load_tvm

        load_tvm(threads)
        import tvm.target.codegen as codegen

        target["mcpu"] = str(codegen.llvm_get_system_cpu())
    if target.get("num-cores") == "auto" or (
        target["kind"] == "llvm" and "num-cores" not in target
    ):
        target["num-cores"] = threads
    return HardwareProfile(spec, target, threads, path)


def load_profile_spec(path: str | Path) -> HardwareProfileSpec:
    path = Path(path)
    return parse_model(HardwareProfileSpec, read_yaml(path), file=str(path))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A profile by file path, or by the name of a file in ``hw_profiles/``."""
    path = find_profile(name_or_path)
    return resolve(load_profile_spec(path), path=str(path))


def find_profile(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(p.stem for p in builtin_profiles()) or "none"
    raise UserError(
        f"bad value {str(name_or_path)!r}: no such profile file or built-in profile; allowed: a "
        f"YAML path or one of {known}",
        key="hw_profile",
    )


def builtin_profiles(directory: Path | None = None) -> list[Path]:
    directory = directory or PROFILES_DIR
    return sorted(directory.glob("*.yaml")) if directory.is_dir() else []


def target_object(profile: HardwareProfile) -> Any:
    """The ``tvm.target.Target`` of a profile (imports TVM with the profile's thread count)."""
    from autoquant.hardware._tvm import load_tvm

    tvm = load_tvm(profile.threads)
    return tvm.target.Target(profile.target)


def has_cpu_feature(profile: HardwareProfile, feature: str) -> bool:
    """Whether the profile's x86 target CPU has ``feature`` (an LLVM feature name such as
    ``avx2`` or ``avx512vnni``), from the target, not this host."""
    if profile.target_kind != "llvm" or "x86" not in str(profile.target.get("mtriple", "x86_64")):
        return False
    from autoquant.hardware._tvm import load_tvm

    load_tvm(profile.threads)
    import tvm.target.codegen as codegen

    return bool(codegen.llvm_cpu_has_features([feature], target_object(profile)))


def has_vnni(profile: HardwareProfile) -> bool:
    return has_cpu_feature(profile, "avx512vnni")
