"""Everything a search needs, resolved from a spec: the task, its layers, the space, calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autoquant.errors import UserError
from autoquant.space import QuantChoice, QuantConfig, SearchSpace, build_space
from autoquant.spec import RunSpec, SearchSpaceSpec, load_spec


@dataclass(frozen=True)
class PreparedRun:
    spec: RunSpec
    space_spec: SearchSpaceSpec
    spec_path: Path
    task: object
    space: SearchSpace
    evaluator: object

    def references(self) -> list[tuple[str, QuantConfig]]:
        """fp32 first, then uniform int8 (weights per-channel symmetric, activations int8) as far
        as the space allows it."""
        refs = [("fp32", self.space.reference(QuantChoice()))]
        refs.append(("int8", self.space.reference(QuantChoice(8, 8, "per_channel", None, True))))
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
    spec_path: str | Path, *, overrides: dict | None = None, with_evaluator: bool = True
) -> PreparedRun:
    """Load the spec, its task and space; calibrate. Raises ``UserError`` for bad input."""
    from autoquant.space.discovery import discover_layers, other_param_bytes
    from autoquant.tasks import load_task

    spec_path = Path(spec_path)
    spec, space_spec = load_spec(spec_path)
    if overrides:
        search = spec.search.model_copy(
            update={k: v for k, v in overrides.items() if v is not None}
        )
        spec = spec.model_copy(update={"search": search})
    task = load_task(spec.task, file=str(spec_path), spec_dir=spec_path.parent.resolve())
    layers = discover_layers(task.model, task.input_shape)
    if not layers:
        raise UserError(
            f"task {task.name!r}: the model has no Linear or Conv2d layer to quantize",
            file=str(spec_path),
            key="task",
        )
    space = build_space(layers, space_spec, file=space_file(spec, spec_path))
    evaluator = None
    if with_evaluator:
        from autoquant.quant import calibrate
        from autoquant.search.evaluator import Evaluator

        calib = task.calibration_inputs[: spec.evaluation.calibration_samples]
        evaluator = Evaluator(
            task=task,
            layers=layers,
            calibration=calibrate(task.model, calib, batch_size=spec.evaluation.batch_size),
            other_param_bytes=other_param_bytes(task.model, layers),
            batch_size=spec.evaluation.batch_size,
        )
    return PreparedRun(spec, space_spec, spec_path, task, space, evaluator)
