"""Everything a search needs, resolved from a spec: the task, its layers, the space, calibration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError

from autoquant.errors import UserError, show
from autoquant.space import QuantChoice, QuantConfig, SearchSpace, build_space
from autoquant.space.searchspace import check_searchable
from autoquant.spec import LoadedSpec, RunSpec, SearchSettings, SearchSpaceSpec, read_spec


@dataclass(frozen=True)
class PreparedRun:
    spec: RunSpec
    space_spec: SearchSpaceSpec
    spec_path: Path
    task: object
    space: SearchSpace
    evaluator: object
    latency: tuple = ()  # autoquant.search.latency.RunLatency, one per hardware profile
    own_hardware: frozenset[str] = frozenset()  # profile names given by ``worker --hardware``

    def references(self) -> list[tuple[str, QuantConfig]]:
        """fp32 first, then uniform int8 (weights per-channel symmetric, activations int8) as far
        as the space allows it, and uniform int8 with dynamic activations (ONNX Runtime's
        ``quantize_dynamic``, the usual transformer baseline) where the space has it."""
        refs = [("fp32", self.space.reference(QuantChoice()))]
        refs.append(("int8", self.space.reference(QuantChoice(8, 8, "per_channel", None, True))))
        dynamic = QuantChoice(8, 8, "per_channel", None, True, act_dynamic=True)
        refs.append(("int8-dynamic", self.space.reference(dynamic)))
        return [(name, cfg) for name, cfg in refs if cfg is not None]

    def resolved_spec(self) -> dict:
        data = self.spec.model_dump(mode="json")
        data["space"] = self.space_spec.model_dump(mode="json")
        return data


def space_file(spec: RunSpec, spec_path: Path) -> str:
    return (
        str(spec_path)
        if isinstance(spec.space, SearchSpaceSpec)
        else str(spec_path.parent / spec.space)
    )


def prepare(
    spec_path: str | Path,
    *,
    overrides: dict | None = None,
    with_evaluator: bool = True,
    searching: bool = False,
    status=None,
    hardware: Sequence[str] = (),
    recorded: Mapping[str, dict] | None = None,
) -> PreparedRun:
    """Load the spec, its task and space; calibrate. Raises ``UserError`` for bad input.

    With ``hardware`` profiles in the spec (and ``with_evaluator``), each profile's latency
    model is prepared (``autoquant.search.latency``): the space loses the choices a profile
    has no kernel for, and the evaluator predicts ``latency_ms@<profile>`` for every config.
    The spec's ``latency`` objective becomes one ``latency@<profile>`` objective per profile.
    ``status(text)`` is told what is going on (profiling can take minutes the first time).
    ``searching``: the space is to be searched, so a space of a single config is refused.
    ``hardware``: this machine's own profiles, each replacing the spec's profile of its name
    (``autoquant worker --hardware``); ``recorded``: the targets and latency models a shared
    study holds, by profile name (``autoquant.search.targets.recorded_targets``): a profile
    found there is not profiled again."""
    from autoquant.space.discovery import other_param_bytes
    from autoquant.tasks import load_task
    from autoquant.tasks.base import with_eval_samples

    spec_path = Path(spec_path)
    loaded, own = _with_own_hardware(read_spec(spec_path), hardware)
    spec, space_spec = loaded.spec, loaded.space
    if overrides:
        spec = spec.model_copy(update={"search": _overridden(spec.search, overrides)})
    task, origin = load_task(
        spec.task, file=str(spec_path), spec_dir=spec_path.parent.resolve(), with_origin=True
    )
    task = with_eval_samples(task, spec.evaluation.eval_samples, file=str(spec_path))
    if origin is not None:  # recorded in run/spec.yaml: later commands import from there
        spec = spec.model_copy(update={"task": spec.task.model_copy(update={"origin": origin})})
    layers = _discover(task, spec_path)
    if not layers:
        raise UserError(
            f"task {task.name!r}: the model has no Linear or Conv2d layer to quantize",
            file=str(spec_path),
            key="task",
        )
    space = build_space(layers, space_spec, file=space_file(spec, spec_path))
    if searching:
        check_searchable(space, file=space_file(spec, spec_path))
    latency: tuple = ()
    if spec.hardware:
        spec, space, latency = _prepare_hardware(
            spec, spec_path, loaded.hardware, task, space,
            profile=with_evaluator, status=status, recorded=recorded or {},
        )  # fmt: skip
        if searching:  # the profiles may have taken choices away
            check_searchable(space, file=space_file(spec, spec_path))
    evaluator = None
    if with_evaluator:
        from autoquant.model_inputs import take
        from autoquant.quant import calibrate
        from autoquant.search.evaluator import Evaluator

        calib = take(task.calibration_inputs, spec.evaluation.calibration_samples)
        evaluator = Evaluator(
            task=task,
            layers=layers,
            calibration=calibrate(task.model, calib, batch_size=spec.evaluation.batch_size),
            other_param_bytes=other_param_bytes(task.model, layers),
            batch_size=spec.evaluation.batch_size,
            latency=latency,
        )
    return PreparedRun(spec, space_spec, spec_path, task, space, evaluator, latency, own)


def _with_own_hardware(loaded: LoadedSpec, hardware: Sequence[str]) -> tuple[LoadedSpec, frozenset[str]]:
    """``loaded`` with this machine's own profiles in place of the spec's of the same names, and
    those names."""
    if not hardware:
        return loaded, frozenset()
    from autoquant.hardware import override_hardware

    mine = override_hardware(loaded.hardware, hardware, cwd=Path.cwd())
    own = frozenset(r.name for r, theirs in zip(mine, loaded.hardware) if r is not theirs)
    return replace(loaded, hardware=mine), own


def _overridden(search: SearchSettings, overrides: dict) -> SearchSettings:
    """The spec's search settings with the command line's options, validated like the spec's."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SearchSettings.model_validate({**search.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        option = {"timeout_s": "--timeout"}.get(name, "--" + name.replace("_", "-"))
        raise UserError(f"bad value {show(first.get('input'))}: {first['msg']}", key=option) from None


def _discover(task, spec_path: Path):
    """The task's layers; a forward that fails on the task's own inputs is the task's fault."""
    from autoquant.model_inputs import shapes
    from autoquant.space.discovery import discover_layers

    probe = task.example_inputs()
    try:
        return discover_layers(task.model, probe)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"task {task.name!r}: the model's forward fails on its example input "
            f"{shapes(probe)} ({type(exc).__name__}: {message[:200]}); allowed: a model that "
            "runs on the task's input_shape / calibration inputs",
            file=str(spec_path),
            key="task",
        ) from None


def _prepare_hardware(
    spec: RunSpec,
    spec_path: Path,
    hardware: tuple,
    task,
    space: SearchSpace,
    *,
    profile: bool,
    status,
    recorded: Mapping[str, dict],
):
    """(spec with ``latency`` expanded per profile, restricted space, RunLatency per profile);
    ``hardware``: the spec's ``ResolvedProfile``s (``autoquant.hardware.resolve_hardware``)."""
    from autoquant.search.objectives import expand_objectives

    names = [resolved.name for resolved in hardware]
    expanded = expand_objectives(list(spec.objectives), names)
    for name in expanded:
        if name.startswith("latency@") and name.removeprefix("latency@") not in names:
            raise UserError(
                f"bad value {name!r}: no hardware profile of that name; allowed: latency, or "
                f"latency@ one of {', '.join(names)}",
                file=str(spec_path),
                key="objectives",
            )
    if len(set(expanded)) != len(expanded):
        raise UserError(
            f"bad value {list(spec.objectives)!r}: a latency objective is given twice; allowed: "
            "latency once (one objective per profile)",
            file=str(spec_path),
            key="objectives",
        )
    stored = [resolved.stored_entry for resolved in hardware]
    spec = spec.model_copy(update={"objectives": expanded, "hardware": stored})
    if not profile:
        return spec, space, ()
    from autoquant.search.latency import prepare_run_latency

    latency = []
    for i, resolved in enumerate(hardware):
        run_latency, space = prepare_run_latency(
            resolved,
            task,
            space,
            n_validate=spec.hardware_validation,
            seed=spec.search.seed,
            file=str(spec_path),
            key=f"hardware[{i}]",
            status=status,
            recorded=recorded.get(resolved.name),
        )
        latency.append(run_latency)
    return spec, space, tuple(latency)
