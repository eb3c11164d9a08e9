"""The ``autoquant`` command: thin typer commands over the library."""

from __future__ import annotations

import enum
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from autoquant.errors import UserError

app = typer.Typer(
    name="autoquant",
    help="Search per-layer quantization configs for the accuracy / latency / size Pareto front.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


class SamplerName(str, enum.Enum):
    nsga2 = "nsga2"
    tpe = "tpe"
    random = "random"


@app.command()
def search(
    spec: Annotated[Path, typer.Argument(help="run spec YAML, e.g. examples/digits-cnn.yaml")],
    out: Annotated[
        Path | None, typer.Option(help="run directory [default: results/<name>]")
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=2, help="total configs to measure (resumes count)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.001, help="seconds for this invocation")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed")] = None,
    sampler: Annotated[SamplerName | None, typer.Option(help="search strategy")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Run (or resume) a search; write the run directory; print the Pareto front."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoquant.report.results import write_tables
    from autoquant.report.terminal import front_table
    from autoquant.search.driver import check_resumable, run_search
    from autoquant.search.ledger import entries, open_study, sqlite_url
    from autoquant.search.objectives import objectives_for
    from autoquant.search.run import prepare
    from autoquant.spec import dump_yaml

    overrides = {
        "trials": trials,
        "timeout_s": timeout,
        "seed": seed,
        "sampler": sampler.value if sampler else None,
    }
    with console.status("loading the task (built-in tasks train once, then load from cache)"):
        run = prepare(spec, overrides=overrides)
    run_dir = out if out is not None else Path("results") / run.spec.name
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(
            f"bad value {str(run_dir)!r}: exists and is not a directory; allowed: a directory path",
            key="--out",
        )
    resolved = run.resolved_spec()
    check_resumable(run, run_dir, resolved)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(dump_yaml(resolved))

    objectives = objectives_for(run.spec.objectives)
    storage = sqlite_url(run_dir)

    last_refresh = [0.0]

    def refresh() -> None:
        # The ledger is the source of truth; the tables are rewritten every few seconds so a
        # long run can be inspected while it goes, and once more at the end.
        if time.monotonic() - last_refresh[0] < 3.0:
            return
        last_refresh[0] = time.monotonic()
        write_tables(
            run_dir,
            entries(open_study(storage, [o.direction for o in objectives], None)),
            objectives,
        )

    console.print(
        f"[bold]{run.spec.name}[/]: task {run.task.name}, {len(run.space.layers)} layers, "
        f"{run.space.size:,} configs in the space, sampler {run.spec.search.sampler}, "
        f"budget {run.spec.search.trials} trials"
        + (f" / {run.spec.search.timeout_s:g} s" if run.spec.search.timeout_s else "")
    )
    with Progress(
        TextColumn("measuring configs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        bar = progress.add_task("search", total=run.spec.search.trials)
        outcome = run_search(
            run,
            run_dir,
            on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            after_trial=refresh,
        )
    frame, front = write_tables(
        run_dir, entries(open_study(storage, [o.direction for o in objectives], None)), objectives
    )
    if outcome.interrupted_before:
        console.print(
            f"resumed: {outcome.interrupted_before} interrupted trial(s) marked failed, none lost"
        )
    console.print(
        f"{outcome.measured} configs measured ({outcome.new_measurements} new this time), "
        f"{outcome.failed} failed, {outcome.reused} repeat proposals answered from the ledger; "
        f"stopped: {outcome.stopped_because}; {outcome.elapsed_s:.1f} s"
    )
    if not front.empty:
        console.print(
            front_table(front, title=f"Pareto front ({len(front)} of {len(frame)} configs)")
        )
        refs = frame[frame["reference"].notna() & ~frame["on_front"]]
        if not refs.empty:
            console.print(front_table(refs, title="references not on the front (dominated)"))
    console.print(f"run directory: {run_dir}  (spec.yaml, study.db, trials.parquet, pareto.csv)")


@app.command()
def tasks() -> None:
    """List the built-in tasks."""
    from rich.table import Table

    from autoquant.tasks import BUILTIN_TASKS

    table = Table(title="built-in tasks")
    table.add_column("name")
    table.add_column("description")
    for task in BUILTIN_TASKS.values():
        table.add_row(task.name, task.description)
    console.print(table)
    console.print("A task of your own: task: {function: package.module:function} (see README).")


@app.command()
def space(
    spec: Annotated[Path, typer.Argument(help="run spec YAML")],
    exclusions: Annotated[
        bool, typer.Option(help="list every excluded choice with its reason")
    ] = False,
) -> None:
    """Show the layers a spec's task has, the choices its search space gives each, and the size."""
    from rich.table import Table

    from autoquant.search.run import prepare

    with console.status("loading the task"):
        run = prepare(spec, with_evaluator=False)
    table = Table(title=f"{run.task.name}: search space")
    for col in ("layer", "kind", "weight", "MACs", "params", "choices", "rules"):
        table.add_column(col, justify="right" if col in ("MACs", "params", "choices") else "left")
    for ls in run.space.layers:
        layer = ls.layer
        table.add_row(
            layer.name,
            layer.kind,
            "x".join(map(str, layer.weight_shape)),
            f"{layer.macs:,}",
            f"{layer.params:,}",
            str(len(ls.choices)) + (" (pinned)" if ls.pinned else ""),
            ", ".join(f"rules[{i}]" for i in ls.matched_rules) or "none (fp32)",
        )
    console.print(table)
    for ls in run.space.layers:
        console.print(f"[bold]{ls.layer.name}[/]: " + " ".join(c.label for c in ls.choices))
    reasons: dict[str, int] = {}
    for e in run.space.exclusions:
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
    console.print(
        f"space size: {run.space.size:,} configs; {len(run.space.exclusions)} choices excluded"
    )
    for reason, count in sorted(reasons.items()):
        console.print(f"  excluded x{count}: {reason}")
    if exclusions:
        for e in run.space.exclusions:
            console.print(f"  {e.layer} {e.choice}: {e.reason}")
    console.print(
        "labels: w<bits><c|t|g<size>><s|a> = integer weights per-channel/tensor/group, "
        "symmetric/asymmetric; f16/f32 = float weights; -a<bits> = activations"
    )


def main() -> None:
    try:
        app(standalone_mode=True)
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # python -m autoquant.cli
    main()
