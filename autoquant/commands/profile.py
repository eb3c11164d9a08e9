"""Typer-compatible commands: ``profile`` (per-layer latency on a device) and ``hw`` (profiles).

Register them with ``app.command()(profile)`` and ``app.command()(hw)``; they raise
``UserError`` for bad input (the CLI's one-line error and exit code 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from autoquant.errors import UserError
from autoquant.latency.fidelity import fidelity_line
from autoquant.latency.validation import strict_json
from autoquant.space.values import QuantChoice

console = Console(markup=False)  # names come from run directories: never markup


def _task_layers(task: str):
    from autoquant.space.discovery import discover_layers
    from autoquant.spec import UserTaskSpec
    from autoquant.tasks import load_task

    task_spec = UserTaskSpec(function=task) if ":" in task else task
    loaded = load_task(task_spec, file="command line", spec_dir=Path.cwd())
    layers = discover_layers(loaded.model, loaded.example_inputs())
    if not layers:
        raise UserError(f"task {task!r}: the model has no Linear or Conv2d layer", key="TASK")
    return loaded, layers


def _spec_work(spec: Path):
    """(task, layers, work) of a run spec: its task (a user task with its args, imported from
    the spec's folder) and, per layer, the choices its search space gives, as ``autoquant
    search`` resolves them (``search.run.prepare``, which profiles nothing without an
    evaluator)."""
    from autoquant.search.run import prepare

    run = prepare(spec, with_evaluator=False)
    layers = run.space.layer_infos
    return run.task, layers, [(ls.layer, list(ls.choices)) for ls in run.space.layers]


def _work(layers, choices: str | None, space: Path | None):
    from autoquant.latency.profiling import DEFAULT_CHOICES, parse_label

    if choices and space:
        raise UserError("give --choices or --space, not both", key="--choices")
    if space is not None:
        from autoquant.space import build_space
        from autoquant.spec import load_space

        resolved = build_space(layers, load_space(space), file=str(space))
        return [(ls.layer, ls.choices) for ls in resolved.layers]
    labels = [c for c in (choices.split(",") if choices else DEFAULT_CHOICES) if c.strip()]
    picked = [parse_label(label) for label in labels]
    return [(layer, picked) for layer in layers]


def _task_and_work(task: str | None, spec: Path | None, choices: str | None, space: Path | None):
    """(task, layers, work) from ``--task`` (with ``--choices`` or ``--space``) or ``--spec``."""
    if task is None and spec is None:
        raise UserError(
            "no task given; allowed: --task (a built-in task or package.module:function) or "
            "--spec (a run spec YAML)",
            key="--task",
        )
    if task is not None and spec is not None:
        raise UserError(
            f"bad value {task!r} with --spec {str(spec)!r}: both name a task; allowed: one of "
            "--task and --spec",
            key="--task",
        )
    if spec is not None:
        given = [flag for flag, value in (("--choices", choices), ("--space", space)) if value]
        if given:
            raise UserError(
                f"bad value {given[0]} with --spec: the spec's search space gives the choices; "
                "allowed: --spec alone, or --task with --choices or --space",
                key=given[0],
            )
        with console.status("loading the spec's task"):
            return _spec_work(spec)
    with console.status("loading the task"):
        loaded, layers = _task_layers(task)
    return loaded, layers, _work(layers, choices, space)


# The options of ``profile``, named so its signature reads as a list of settings.
HwProfileArg = Annotated[
    Path, typer.Argument(help="hardware profile YAML, or a built-in name such as cpu-local")
]
TaskOption = Annotated[
    str | None,
    typer.Option(help="built-in task (see autoquant tasks) or package.module:function; or --spec"),
]
SpecOption = Annotated[
    Path | None,
    typer.Option(
        help="run spec YAML: profile its task (with its args, from the spec's folder) "
        "over the choices its search space gives; instead of --task"
    ),
]
ValidateOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="random configs whose measured end-to-end latency is compared with the "
        "latency model",
    ),
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="write every timing as JSON here")]
ChoicesOption = Annotated[
    str | None,
    typer.Option(help="comma-separated choice labels, e.g. f32-a32,w8cs-a8,w4g32s-a32"),
]
SpaceOption = Annotated[
    Path | None,
    typer.Option(help="search space YAML: profile every choice it gives each layer"),
]
TableOption = Annotated[
    Path | None,
    typer.Option(help="latency table file [default: $AUTOQUANT_CACHE_DIR/latency.sqlite]"),
]
BatchSizeOption = Annotated[
    int | None, typer.Option(min=1, help="override the profile's batch size")
]
MinRepeatOption = Annotated[
    float | None, typer.Option(min=0, help="override measure.min_repeat_ms")
]
RepeatOption = Annotated[int | None, typer.Option(min=3, help="override measure.repeat")]
StatisticOption = Annotated[
    str | None,
    typer.Option(
        help="override measure.statistic (min or median): which sample stands for a "
        "timing; every sample is kept, so this re-measures nothing"
    ),
]
RetryFailedOption = Annotated[
    bool, typer.Option(help="measure again the kernels that failed before")
]
QuietOption = Annotated[bool, typer.Option(help="print only the summary line")]
RpcTrackerOption = Annotated[
    str | None, typer.Option(help="HOST:PORT of a TVM RPC tracker: overrides the profile's")
]
RpcKeyOption = Annotated[
    str | None,
    typer.Option(help="device key registered at the tracker: overrides the profile's"),
]


def profile(
    hw_profile: HwProfileArg,
    *,
    task: TaskOption = None,
    spec: SpecOption = None,
    validate: ValidateOption = 0,
    json_path: JsonOption = None,
    choices: ChoicesOption = None,
    space: SpaceOption = None,
    table: TableOption = None,
    batch_size: BatchSizeOption = None,
    min_repeat_ms: MinRepeatOption = None,
    repeat: RepeatOption = None,
    statistic: StatisticOption = None,
    retry_failed: RetryFailedOption = False,
    quiet: QuietOption = False,
    rpc_tracker: RpcTrackerOption = None,
    rpc_key: RpcKeyOption = None,
) -> None:
    """Measure each layer's kernel for each choice on the profile's device; reuse the table."""
    from autoquant.backends.registry import backend_for
    from autoquant.hardware.profile import load_profile

    prof = load_profile(hw_profile).with_overrides(
        batch_size=batch_size,
        min_repeat_ms=min_repeat_ms,
        repeat=repeat,
        statistic=statistic,
        rpc_tracker=rpc_tracker,
        rpc_key=rpc_key,
    )
    loaded, layers, work = _task_and_work(task, spec, choices, space)
    if validate:  # the float32 config anchors the calibration
        fp32 = QuantChoice()
        work = [(layer, [*cs, fp32] if fp32 not in cs else list(cs)) for layer, cs in work]
    with console.status(f"starting the {prof.spec.runtime} backend for {prof.name}"):
        backend = backend_for(prof)
    try:
        result = _profile_kernels(backend, work, table=table, retry_failed=retry_failed)
        checked = None
        if validate:
            checked = _check_model(backend, loaded, layers, work, result, validate=validate, table=table)
    finally:
        backend.close()
    _report(prof, result, checked, quiet=quiet, json_path=json_path)


def _profile_kernels(backend, work, *, table: Path | None, retry_failed: bool):
    from autoquant.latency.profiling import profile_layers
    from autoquant.latency.table import LatencyTable

    with LatencyTable(table) as tab, console.status("profiling") as status:

        def progress(entry) -> None:
            status.update(f"profiling {entry.layer.name} {entry.choice.label}")

        return profile_layers(
            backend,
            work,
            tab,
            retry_failed=retry_failed,
            on_result=progress,
            status=status.update,
        )


def _check_model(backend, loaded, layers, work, result, *, validate: int, table: Path | None):
    """``--validate``: the latency model fitted and checked on ``validate`` held-out configs."""
    from autoquant.backends.inputs import task_inputs
    from autoquant.latency.table import LatencyTable, model_signature
    from autoquant.latency.validation import check_latency_model

    lookup = result.lookup()
    options = {
        layer.name: [c for c in cs if lookup[(layer.name, c.label)].ok] for layer, cs in work
    }
    broken = [
        f"{layer.name} ({lookup[(layer.name, 'f32-a32')].error})"
        for layer, _ in work
        if not lookup[(layer.name, "f32-a32")].ok
    ]
    if broken:
        raise UserError(
            f"bad value {validate}: no float32 kernel timing for {', '.join(broken)}, "
            "so there is no model to check; allowed: 0",
            key="--validate",
        )
    inputs = task_inputs(loaded, backend.profile.spec.batch_size)
    with LatencyTable(table) as tab, console.status("end-to-end timing") as status:
        try:
            return check_latency_model(
                backend,
                loaded.model,
                inputs,
                layers,
                lookup,
                options=options,
                n_validate=validate,
                table=tab,
                model_key=model_signature(loaded.model, inputs, layers),
                status=status.update,
            )
        except RuntimeError as exc:
            raise UserError(f"bad value {validate}: {exc}; allowed: 0", key="--validate") from None


def _report(prof, result, checked, *, quiet: bool, json_path: Path | None) -> None:
    """The tables and summary lines on the terminal; every timing as JSON with ``--json``."""
    if not quiet:
        console.print(timing_table(result))
    if checked is not None:
        console.print(validation_table(checked))
        console.print(model_line(checked.model))
        if checked.model.note:
            console.print(f"warning: {checked.model.note}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        data = result.to_dict()
        if checked is not None:
            data["validation"] = checked.to_dict()
        from autoquant.rundir import atomic_write_text

        atomic_write_text(json_path, json.dumps(strict_json(data), indent=1))
    console.print(
        f"{prof.name}: {result.measured_now} kernels measured now, "
        f"{result.count(reused=True)} reused from {result.table_path}, "
        f"{result.count(status='failed')} failed, {result.count(status='excluded')} excluded; "
        f"target {prof.target_json()}, {result.fingerprint.get('threads')} threads, batch "
        f"{prof.spec.batch_size}; {result.elapsed_s:.1f} s"
    )
    if checked is not None:
        console.print(
            f"end to end: {checked.measured_now} configs measured now, {checked.reused} reused "
            f"from the table ({checked.rounds} interleaved rounds); {checked.elapsed_s:.1f} s"
        )


def timing_table(result):
    from rich.table import Table

    table = Table(
        title=f"per-layer kernel latency on {result.profile} (median of samples and visits; "
        "spread = interquartile range / median)"
    )
    for col in ("layer", "choice", "kernel", "min µs", "median µs", "spread", "source"):
        table.add_column(col, justify="right" if col.endswith(("µs", "spread")) else "left")
    for e in result.entries:
        t = e.timing
        if t.ok:
            source = "table" if e.reused else "measured"
            table.add_row(
                e.layer.name,
                e.choice.label,
                t.impl,
                f"{t.min_us:.2f}",
                f"{t.median_us:.2f}",
                f"{t.spread:.0%}" if not math.isnan(t.spread) else "-",
                source,
            )
        else:
            table.add_row(
                e.layer.name, e.choice.label, t.impl or "-", "-", "-", "-", f"{t.status}: {t.error}"
            )
    return table


def validation_table(checked):
    from rich.table import Table

    summary = checked.summary()
    model = checked.model
    table = Table(
        title=f"latency model vs measured end to end on {len(checked.rows)} held-out configs "
        f"(model fitted on {len(checked.calibration)} others; float32 end to end "
        f"{checked.fp32_e2e_us:.1f} µs measured; intercept {model.intercept_us:+.1f} µs)"
    )
    for col in ("config", "kernel sum ms", "predicted ms", "measured ms", "spread", "error"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for row in checked.rows:
        labels = " ".join(c.label for _, c in row.config.choices)
        if row.error:
            table.add_row(labels, "-", "-", "-", "-", row.error)
            continue
        table.add_row(
            labels,
            f"{row.plain_sum_ms:.4f}",
            f"{row.predicted_ms:.4f}",
            f"{row.measured_ms:.4f}",
            f"{row.measured_spread:.0%}",
            f"{row.rel_error:+.0%}",
        )
    table.caption = fidelity_line(summary)
    return table


def model_line(model) -> str:
    """Which form the calibration chose, its terms, and why (the leave-one-out errors)."""
    scales = "scales " + ", ".join(f"{cls} {v:.3f}" for cls, v in model.class_scale.items())
    if not model.class_scale:
        scales = "kernels at their measured times"
    why = ", ".join(f"{form} {mape:.2%}" for form, mape in model.loo_mape.items())
    described = {
        "transitions": lambda us: f"{us * 1000:.2f} ns per activation element crossing a change "
        "between integer and float kernels",
        "changes": lambda us: f"{us:+.1f} µs per change between integer and float kernels",
        "integer_pairs": lambda us: f"{us:+.1f} µs per pair of consecutive integer kernels",
    }
    transitions = "".join(f"; {described[t](us)}" for t, us in model.term_us.items())
    return (
        f"latency model: {model.form} (intercept {model.intercept_us:+.1f} µs; {scales}"
        f"{f'; {len(model.kernel_correction)} kernel corrections' if model.kernel_correction else ''}"
        f"{transitions})"
        + (f"; leave-one-out MAPE on the calibration configs: {why}" if why else "")
    )


def hw(
    directory: Annotated[
        Path | None, typer.Option(help="profiles directory [default: hw_profiles/]")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="seconds to wait for each RPC tracker")
    ] = 2.0,
) -> None:
    """List the hardware profiles and whether each device can be reached now."""
    from rich.table import Table

    from autoquant.hardware.profile import builtin_profiles, load_profile_spec

    if directory is not None and not directory.is_dir():
        raise UserError("not a directory", file=str(directory))
    paths = builtin_profiles(directory)
    table = Table(title="hardware profiles")
    for col in ("name", "runtime", "target", "device", "reachable now"):
        table.add_column(col)
    for path in paths:
        try:
            spec = load_profile_spec(path)
        except UserError as exc:
            table.add_row(path.stem, "-", "-", "-", f"invalid: {exc}")
            continue
        device = (
            "local"
            if spec.device.where == "local"
            else f"rpc {spec.device.tracker} key {spec.device.key}"
        )
        table.add_row(
            spec.name,
            spec.runtime,
            json.dumps(spec.target),
            device,
            reachability(spec, timeout_s=timeout),
        )
    console.print(table)


def reachability(spec, *, timeout_s: float = 2.0) -> str:
    """'yes ...' or 'no: why', without raising."""
    import importlib.util

    if spec.runtime == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "no: onnxruntime is not installed"
        if spec.device.where != "local":
            return "no: ONNX Runtime profiles run locally only"
        return "yes (local onnxruntime)"
    if importlib.util.find_spec("tvm") is None:
        return "no: apache-tvm is not installed (pip install autoquant[tvm])"
    if spec.device.where == "local":
        return "yes (local)"
    from autoquant.backends.tvm.rpc import probe_tracker

    host, port = spec.device.host_port
    status = probe_tracker(host, port, timeout_s=timeout_s)
    key = str(spec.device.key)
    return ("yes: " if status.has(key) else "no: ") + status.describe(key)
