"""The ``autoquant`` command: thin typer commands over the library."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from autoquant.errors import UserError
from autoquant.search.samplers import SamplerName, sampler_help

app = typer.Typer(
    name="autoquant",
    help="Search per-layer quantization configs for the accuracy / latency / size Pareto front.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(markup=False)  # names come from run directories: never markup
err_console = Console(stderr=True, markup=False)


@app.command()
def search(
    *,  # typer passes every parameter by name
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
    sampler: Annotated[SamplerName | None, typer.Option(help=sampler_help())] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    workers: Annotated[
        int, typer.Option(min=0, help="worker processes sharing the study (0: this process)")
    ] = 0,
    storage: Annotated[
        str | None,
        typer.Option(help="shared study database, postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or ~/.pgpass) [default: the spec's storage, else RUN/study.db]"),
    ] = None,
) -> None:
    """Run (or resume) a search; write the run directory; print the Pareto front."""
    from autoquant.rundir import owner_lock
    from autoquant.spec import load_spec

    overrides = {
        "trials": trials,
        "timeout_s": timeout,
        "seed": seed,
        "sampler": sampler.value if sampler else None,
    }
    # The run directory is owned before the task loads, so a second search on it is refused
    # at once; the spec is checked first, so a bad one creates no directory.
    name = load_spec(spec)[0].name
    run_dir = out if out is not None else Path("results") / name
    with owner_lock(run_dir, "autoquant search", key="--out"):
        _search_owned(spec, run_dir, overrides, quiet=quiet, workers=workers, storage=storage)


def _search_owned(
    spec: Path, run_dir: Path, overrides: dict, *, quiet: bool, workers: int, storage: str | None
) -> None:
    """``search`` once it owns ``run_dir``: load, record the spec, measure, then the tables,
    checks, report and summary."""
    from autoquant.search.objectives import objectives_for
    from autoquant.search.run import prepare

    with console.status("loading the task (built-in tasks train once, then load from cache)") as st:
        run = prepare(spec, overrides=overrides, searching=True, status=st.update)
    shared = storage is not None or run.spec.storage is not None
    _record_spec(run, run_dir, shared=shared)
    if workers or shared:
        from autoquant.commands.workers import search_with_workers

        search_with_workers(
            run, run_dir, storage=storage, n_workers=workers or 1, overrides=overrides, quiet=quiet
        )
        return
    objectives = objectives_for(run.spec.objectives)
    outcome = _measure(run, run_dir, objectives, quiet=quiet)
    _finish_search(run, run_dir, objectives, outcome)


def _record_spec(run, run_dir: Path, *, shared: bool) -> None:
    """Refuse a run directory this run cannot resume, then write its resolved spec (and, with
    latency objectives, how far the predicted latency can be trusted)."""
    from autoquant.rundir import atomic_write_text
    from autoquant.search.driver import check_resumable
    from autoquant.search.ledger import check_ledger
    from autoquant.spec import dump_yaml

    resolved = run.resolved_spec()
    check_resumable(run, run_dir, resolved)
    if not shared:  # a shared storage is checked by the workers (the study's fingerprint)
        check_ledger(run_dir, {ls.layer.name for ls in run.space.layers})
    atomic_write_text(run_dir / "spec.yaml", dump_yaml(resolved))
    if run.latency:
        from autoquant.search.latency import write_fidelity

        write_fidelity(run_dir, run.latency)


def _write_tables(run_dir: Path, objectives):
    """trials.parquet and pareto.csv from the ledger (the source of truth): (frame, front)."""
    from autoquant.report.results import write_tables
    from autoquant.search.ledger import entries, open_study, sqlite_url

    study = open_study(sqlite_url(run_dir), [o.direction for o in objectives], None)
    return write_tables(run_dir, entries(study), objectives)


def _measure(run, run_dir: Path, objectives, *, quiet: bool):
    """The search loop behind a progress bar; the tables and report refreshed as it goes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autoquant.report.html import write_report
    from autoquant.report.rundata import load_run
    from autoquant.search.driver import run_search

    last_refresh = [0.0]

    def refresh() -> None:
        # The tables are rewritten every few seconds so a long run can be inspected while it
        # goes, and once more at the end.
        if time.monotonic() - last_refresh[0] < 5.0:
            return
        last_refresh[0] = time.monotonic()
        _write_tables(run_dir, objectives)
        write_report(load_run(run_dir))

    console.print(
        f"{run.spec.name}: task {run.task.name}, {len(run.space.layers)} layers, "
        f"{run.space.size:,} configs in the space, sampler {run.spec.search.sampler}, "
        f"budget {run.spec.search.trials} trials"
        + (f" / {run.spec.search.timeout_s:g} s" if run.spec.search.timeout_s else "")
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as progress:
        bar = progress.add_task("measuring configs", total=run.spec.search.trials)
        return run_search(
            run,
            run_dir,
            on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            after_trial=refresh,
            on_status=lambda text: progress.update(bar, description=text),
        )


def _finish_search(run, run_dir: Path, objectives, outcome) -> None:
    """The final tables, the run info, the fastest front point timed end to end, the report;
    then the summary on the terminal."""
    from autoquant.report.html import write_report
    from autoquant.report.results import write_run_info
    from autoquant.report.rundata import load_run

    frame, front = _write_tables(run_dir, objectives)
    write_run_info(run_dir, outcome)
    checks = []
    if run.latency and not front.empty:  # is the fastest point really faster? measure it
        from autoquant.search.latency import check_front

        with console.status("timing the fastest front point and float32 end to end") as st:
            checks = check_front(
                run_dir, run.latency, run.task, layers=run.space.layer_infos, front=front,
                frame=frame, status=st.update,
            )
    report_path = write_report(load_run(run_dir))
    _print_outcome(outcome, frame, front)
    if run.latency:
        from autoquant.search.latency import front_check_line, summary_line

        for lat in run.latency:
            console.print(summary_line(lat))
        for check in checks:
            console.print(front_check_line(check))
    console.print(f"run directory: {run_dir}  (spec.yaml, study.db, trials.parquet, pareto.csv)")
    console.print(f"report: {report_path}")


def _print_outcome(outcome, frame, front) -> None:
    """What the search did this time, and the front (with the references it dominates)."""
    from autoquant.report.terminal import front_table, run_front_table

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
        console.print(run_front_table(front, frame))
        refs = frame[frame["reference"].notna() & ~frame["on_front"]]
        if not refs.empty:
            console.print(front_table(refs, title="references not on the front (dominated)"))


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
    """Show the layers a spec's task has, the choices its search space gives each, the size,
    and a dry run of the ONNX export (each layer's node, or why it stays float)."""
    from rich.table import Table

    from autoquant.export.command import export_dry_run_lines
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
        console.print(f"{ls.layer.name}: " + " ".join(c.label for c in ls.choices))
    reasons: dict[str, int] = {}
    for e in run.space.exclusions:
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
    console.print(
        f"space size: {run.space.size:,} configs; {len(run.space.exclusions)} choices excluded"
    )
    if run.space.size == 1:
        console.print("warning: a single config: autoquant search refuses a space with nothing to search")
    for reason, count in sorted(reasons.items()):
        console.print(f"  excluded x{count}: {reason}")
    if exclusions:
        for e in run.space.exclusions:
            console.print(f"  {e.layer} {e.choice}: {e.reason}")
    console.print(
        "labels: w<bits><c|t|g<size>><s|a> = integer weights per-channel/tensor/group, "
        "symmetric/asymmetric; f16/f32 = float weights; -a<bits> = activations"
    )
    with console.status("exporting the fp32 ONNX graph (dry run of autoquant export)"):
        lines = export_dry_run_lines(run, spec)
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="a run directory, e.g. results/digits-cnn")],
    open_: Annotated[bool, typer.Option("--open", help="open the page in a browser")] = False,
) -> None:
    """Write RUN/report.html (one self-contained page) and print the front."""
    from autoquant.report.html import report_data, write_report
    from autoquant.report.rundata import load_run
    from autoquant.report.terminal import front_table
    from autoquant.rundir import owner_lock

    with owner_lock(run, "autoquant report", create=False):
        data = load_run(run)
        path = write_report(data)
    info = report_data(data)
    if not data.front.empty:
        console.print(front_table(data.front, title=f"{data.name}: Pareto front ({len(data.front)} points"
                                  + (f", knee = trial {info.knee_trial})" if info.knee_trial is not None else ")")))
    console.print(f"report: {path}")
    if open_:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run directories")],
    out: Annotated[Path | None, typer.Option(help="output directory [default: results/compare]")] = None,
) -> None:
    """Overlay the fronts of several runs; hypervolume, dominance and budgets per run."""
    from autoquant.report.compare import compare_runs, write_compare
    from autoquant.report.rundata import load_run
    from autoquant.report.terminal import compare_tables

    if len(runs) < 2:
        raise UserError(f"bad value {[str(r) for r in runs]}: got {len(runs)} run; allowed: two or more run directories", key="RUNS")
    out_dir = out if out is not None else Path("results") / "compare"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"bad value {str(out_dir)!r}: exists and is not a directory; allowed: a directory path", key="--out")
    comparison = compare_runs([load_run(r) for r in runs])
    for note in comparison.notes:
        console.print(f"note: {note}")
    for t in compare_tables(comparison):
        console.print(t)
    for p in comparison.pairs:
        for b in p.budgets:
            lim = b["budget"][p.cost.figure]
            console.print(f"{p.cost.figure} <= {lim:.4g}: best front " + (", ".join(b["winners"]) or "none fits"))
    html_path, json_path = write_compare(comparison, out_dir)
    console.print(f"comparison: {html_path}  {json_path}")


def _register_leaf_commands() -> None:
    # The command functions live beside the code they drive; their heavy imports stay inside.
    from autoquant.commands.profile import hw, profile
    from autoquant.commands.tables import profile_merge
    from autoquant.commands.workers import collect, worker
    from autoquant.export.command import export

    app.command("export")(export)
    app.command("profile")(profile)
    app.command("profile-merge")(profile_merge)
    app.command("hw")(hw)
    app.command("worker")(worker)
    app.command("collect")(collect)


_register_leaf_commands()


def main() -> None:
    from autoquant.errors import exit_code_for

    try:
        app(standalone_mode=True)
    except Exception as exc:
        # The command boundary: bad input (2) and failures of the machine or a dependency (1)
        # are one line; anything else is a bug and keeps its traceback.
        known = exit_code_for(exc)
        if known is None:
            raise
        code, line = known
        err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":  # python -m autoquant.cli
    main()
