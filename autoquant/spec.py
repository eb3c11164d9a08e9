"""Pydantic models of the YAML files, and ``load_spec()``: the only YAML reader.

Every error a user can make in a file comes out as one ``UserError`` line naming the file, the
key path, the bad value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from autoquant import formats
from autoquant.errors import UserError, show
from autoquant.sampler_names import DEFAULT_SAMPLER, MAX_SEED, SAMPLER_DESCRIPTIONS
from autoquant.yamlfile import parse_model, read_yaml

SPEC_VERSION = 1


def _weight_bits(value: int) -> int:
    allowed = formats.bits_formats()  # the widths that name a weight format alone
    if value not in allowed:
        *most, last = map(str, allowed)
        raise ValueError(f"not a weight width; allowed: {', '.join(most)} or {last}")
    return value


WeightBits = Annotated[StrictInt, AfterValidator(_weight_bits)]
ActBits = Literal[8, 16, 32]
GranularityName = Literal["per_tensor", "per_channel", "per_group"]
# the registry's names (autoquant.search.samplers), checked as a Literal is
SamplerName = Literal[tuple(SAMPLER_DESCRIPTIONS)]  # type: ignore[valid-type]
ObjectiveName = Literal["accuracy", "size", "latency"]
# latency@<profile name>: what ``latency`` becomes per profile in a resolved spec (run/spec.yaml)
ResolvedLatency = Annotated[str, Field(pattern=r"^latency@[A-Za-z0-9][A-Za-z0-9_.-]*$")]
TARGET_PATTERN = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- search spaces -------------------------------------------------------------------------------


class LayerMatch(_Strict):
    """Which layers a rule applies to; every given field must match (an empty match matches all)."""

    kind: list[Literal["linear", "conv"]] | None = None
    name: str | None = Field(
        default=None, description="regular expression, searched in the layer name"
    )
    position: list[Literal["first", "last"]] | None = None

    @field_validator("name")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            from autoquant.space.namepattern import name_pattern

            name_pattern(value)  # ValueError: not a valid one, or one that can take unbounded time
        return value


LABEL_EXAMPLES = (
    "labels such as f32-a32, f16-a32, w8cs-a32, w8cs-a8, w8cs-a8d, w8ts-a8, w4g32s-a32, w4ca-a8 "
    f"({formats.label_help()})"
)


def _choice_label(value: str) -> str:
    fields = formats.parse_label(value)  # every registered weight format reads its own labels
    if fields is None:
        raise ValueError(f"not a choice label; allowed: {LABEL_EXAMPLES}")
    group = fields.get("group_size")
    if group is not None and group < 2:
        raise ValueError(f"group size {group} is below 2; allowed: {LABEL_EXAMPLES}")
    return value


ChoiceLabel = Annotated[str, AfterValidator(_choice_label)]


def _needs_int8_acts(dynamic: bool, act_bits: Any) -> None:
    if dynamic and act_bits is not None and 8 not in act_bits:
        shown = act_bits[0] if len(act_bits) == 1 else list(act_bits)
        raise ValueError(
            f"dynamic activations are int8 ones, but act_bits is {shown}; allowed: "
            "act_bits with 8, or dynamic_activations false"
        )


class PinnedChoice(_Strict):
    weight_bits: WeightBits
    act_bits: ActBits = 32
    granularity: GranularityName = "per_channel"
    group_size: int | None = Field(default=None, ge=2)
    symmetric: bool = True
    dynamic_activations: bool = False

    @field_validator("dynamic_activations")
    @classmethod
    def _dynamic_needs_int8(cls, value: bool, info: ValidationInfo) -> bool:
        _needs_int8_acts(value, [info.data["act_bits"]] if "act_bits" in info.data else None)
        return value

    @model_serializer(mode="wrap")
    def _omit_static(self, handler: Any) -> dict[str, Any]:
        # pins written before dynamic activations existed resolve (and resume) unchanged
        data = handler(self)
        if data.get("dynamic_activations") is False:
            del data["dynamic_activations"]
        return data


_PRODUCT_KEYS = (
    "weight_bits",
    "act_bits",
    "granularity",
    "group_sizes",
    "symmetric",
    "dynamic_activations",
    "pin",
)


class SpaceRule(_Strict):
    """Sets the allowed values for the layers it matches: the product of its fields, or the
    explicit ``choices`` (labels). Later rules override what they set; ``pin`` fixes one
    choice."""

    match: LayerMatch = LayerMatch()
    weight_bits: list[WeightBits] | None = Field(default=None, min_length=1)
    act_bits: list[ActBits] | None = Field(default=None, min_length=1)
    granularity: list[GranularityName] | None = Field(default=None, min_length=1)
    group_sizes: list[Annotated[int, Field(ge=2)]] | None = Field(default=None, min_length=1)
    symmetric: list[bool] | None = Field(default=None, min_length=1)
    dynamic_activations: list[bool] | None = Field(
        default=None,
        min_length=1,
        description="int8 activations calibrated (false) or quantized at run time (true)",
    )
    pin: PinnedChoice | None = None
    choices: list[ChoiceLabel] | None = Field(
        default=None,
        min_length=1,
        description="choice labels (w8cs-a8d, w4g32s-a32, f32-a32...): instead of the product",
    )

    @field_validator("dynamic_activations")
    @classmethod
    def _dynamic_needs_int8(cls, value: list[bool] | None, info: ValidationInfo):
        if value is not None:
            _needs_int8_acts(True in value, info.data.get("act_bits"))
        return value

    @field_validator("choices")
    @classmethod
    def _choices_alone(cls, value: list[str] | None, info: ValidationInfo):
        if value is not None:
            also = [key for key in _PRODUCT_KEYS if info.data.get(key) is not None]
            if also:
                raise ValueError(
                    f"choices lists the layer's choices outright, but this rule also sets "
                    f"{', '.join(also)}; allowed: choices alone, or the product keys "
                    f"({', '.join(_PRODUCT_KEYS)}) without choices"
                )
        return value

    @model_serializer(mode="wrap")
    def _omit_unset_new_keys(self, handler: Any) -> dict[str, Any]:
        # a resolved space leaves out the keys added later when unset, so the spec.yaml of a
        # run directory written before them still matches its resolved space (and resumes)
        data = handler(self)
        for key in ("dynamic_activations", "choices"):
            if data.get(key, 0) is None:
                del data[key]
        return data


class SearchSpaceSpec(_Strict):
    version: Literal[1] = 1
    description: str = ""
    rules: list[SpaceRule] = Field(min_length=1)


# --- run specs -----------------------------------------------------------------------------------


class TaskOrigin(_Strict):
    """Where a search imported its task's module from, written by the search into the run's
    spec.yaml: later commands (export, report, profile) import the module from the same place
    and refuse when its source changed. Never written by users."""

    search_dir: str | None = Field(
        default=None, description="the spec's folder the module was found in; None: installed"
    )
    module_file: str = Field(description="the module's source file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UserTaskSpec(_Strict):
    function: str = Field(description="package.module:function returning an autoquant Task")
    args: dict[str, Any] = Field(default_factory=dict)
    origin: TaskOrigin | None = None

    @field_validator("function")
    @classmethod
    def _is_target(cls, value: str) -> str:
        if not TARGET_PATTERN.match(value):
            raise ValueError("must look like package.module:function")
        return value


class ConstraintsSpec(_Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    max_size_bytes: int | None = Field(default=None, gt=0)
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="predicted latency limit, applied on every profile"
    )


class SearchSettings(_Strict):
    sampler: SamplerName = DEFAULT_SAMPLER
    trials: int = Field(default=100, ge=2, le=100_000)
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    population_size: int = Field(default=20, ge=2)


class WorkerSettings(_Strict):
    """Workers sharing a study (``storage``): Optuna's heartbeat, and how long a worker keeps
    retrying a storage that went away before it gives up (exit 1, its finished trials safe)."""

    heartbeat_interval_s: int = Field(default=10, ge=1, le=3600)
    grace_period_s: int = Field(
        default=30, ge=1, le=86400, description="a running trial without a heartbeat this long is failed and its config returns to the pool"
    )
    retry_s: float = Field(default=120.0, ge=0, le=86400)

    @field_validator("grace_period_s")
    @classmethod
    def _grace_after_beats(cls, value: int, info: ValidationInfo) -> int:
        beat = info.data.get("heartbeat_interval_s")
        if beat is not None and value <= beat:
            raise ValueError(f"must exceed heartbeat_interval_s ({beat}), or live trials fail")
        return value


class EvaluationSettings(_Strict):
    """How configs are calibrated and measured.

    ``eval_samples``: how many of the task's held-out samples the metric is measured on, the
    first N; None (the default) is all of them. More than the task has is an error naming how
    many it has (never silently clamped). A resolved spec leaves out ``eval_samples: null``, so
    run directories written before the setting existed still resume.
    """

    calibration_samples: int = Field(default=256, ge=1)
    batch_size: int = Field(default=512, ge=1)
    eval_samples: int | None = Field(
        default=None,
        ge=1,
        description="the first N held-out samples the metric is measured on; null = all",
    )

    @model_serializer(mode="wrap")
    def _omit_default_eval_samples(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("eval_samples", 0) is None:
            del data["eval_samples"]
        return data


class RunSpec(_Strict):
    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    task: Union[str, UserTaskSpec]  # noqa: UP007 - pydantic reports the union members by name
    space: Union[str, SearchSpaceSpec]  # noqa: UP007
    objectives: list[ObjectiveName | ResolvedLatency] = Field(
        default_factory=lambda: ["accuracy", "size"]
    )
    constraints: ConstraintsSpec = ConstraintsSpec()
    search: SearchSettings = SearchSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    storage: str | None = Field(
        default=None,
        description="the study's database: none = RUN/study.db; sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DB, the password from PGPASSWORD or ~/.pgpass",
    )
    workers: WorkerSettings = WorkerSettings()
    hardware: list[str] = Field(
        default_factory=list,
        description="hardware profiles (built-in names or YAML paths relative to the spec); "
        "each adds a latency@<profile> objective when objectives lists latency",
    )
    hardware_validation: int = Field(
        default=4,
        ge=0,
        le=1000,
        description="random configs of the space whose end-to-end latency is measured to check "
        "the latency model (latency_fidelity.json)",
    )

    @field_validator("hardware")
    @classmethod
    def _hardware_ok(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a profile")
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives_ok(cls, value: list[str]) -> list[str]:
        if "accuracy" not in value:
            raise ValueError("must include 'accuracy'")
        if len(set(value)) != len(value):
            raise ValueError("must not repeat an objective")
        if len(value) < 2:
            raise ValueError(
                "needs accuracy and at least one cost objective, e.g. [accuracy, size]"
            )
        return value


# --- reading -------------------------------------------------------------------------------------


def load_space(path: Path) -> SearchSpaceSpec:
    return parse_model(SearchSpaceSpec, read_yaml(path), file=str(path))


@dataclass(frozen=True)
class LoadedSpec:
    """A run spec as read: the spec, its search space, and its hardware profiles (found and
    validated once, ``autoquant.hardware.resolve_hardware``)."""

    spec: RunSpec
    space: SearchSpaceSpec
    hardware: tuple  # autoquant.hardware.ResolvedProfile, one per ``hardware`` entry


def load_spec(path: str | Path) -> tuple[RunSpec, SearchSpaceSpec]:
    """Read a run spec and the search space it names (a path relative to the spec, or inline)."""
    loaded = read_spec(path)
    return loaded.spec, loaded.space


def read_spec(path: str | Path) -> LoadedSpec:
    """``load_spec`` with the spec's hardware profiles, each read and validated once."""
    from autoquant.hardware import resolve_hardware

    path = Path(path)
    spec: RunSpec = parse_model(RunSpec, read_yaml(path), file=str(path))
    _latency_needs_hardware(spec, path)
    hardware = resolve_hardware(spec.hardware, path)
    if spec.storage is not None:
        from autoquant.storage import check_url

        check_url(spec.storage, file=str(path), key="storage")
    if isinstance(spec.space, SearchSpaceSpec):
        return LoadedSpec(spec, spec.space, hardware)
    space_path = Path(spec.space)
    if not space_path.is_absolute():
        space_path = path.parent / space_path
    if not _is_file(space_path):
        raise UserError(
            f"search space file {show(spec.space)} not found (looked at {show(str(space_path))}); "
            "allowed: a path relative to the spec, or an inline mapping with rules",
            file=str(path),
            key="space",
        )
    return LoadedSpec(spec, load_space(space_path), hardware)


def read_run_spec(path: Path) -> dict:
    """The resolved spec a run directory holds (``RUN/spec.yaml``, as the search wrote it), read
    within the YAML limits and validated as a spec (``UserError`` naming the file and key): a
    run directory someone sent is input like any other. The mapping, as written."""
    from autoquant.safeyaml import read_mapping

    data = read_mapping(path)
    parse_model(RunSpec, data, file=str(path))
    return data


def _latency_needs_hardware(spec: RunSpec, spec_path: Path) -> None:
    """A latency objective or limit without hardware profiles is the spec's mistake. The
    profiles themselves are found and validated by ``autoquant.hardware.resolve_hardware``."""
    if spec.hardware:
        return
    latency = [i for i, o in enumerate(spec.objectives) if o.startswith("latency")]
    if latency:
        raise UserError(
            f"bad value {show(spec.objectives[latency[0]])}: the latency objective needs "
            "hardware profiles; allowed: add hardware: [cpu-local] (or another profile), or "
            "drop latency",
            file=str(spec_path),
            key=f"objectives[{latency[0]}]",
        )
    if spec.constraints.max_latency_ms is not None:
        raise UserError(
            f"bad value {spec.constraints.max_latency_ms!r}: a latency limit needs hardware "
            "profiles; allowed: add hardware: [cpu-local] (or another profile)",
            file=str(spec_path),
            key="constraints.max_latency_ms",
        )


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the system refuses (too long, say)."""
    try:
        return path.is_file()
    except OSError:
        return False


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
