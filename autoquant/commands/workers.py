"""``autoquant worker`` and ``autoquant collect``, and ``autoquant search --workers N``: searches
whose study is shared by several worker processes (on one machine or many).

Workers never write into a run directory; the process that owns the run directory (``search``
or ``collect``) writes its tables from the shared ledger. Every URL shown is redacted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from autoquant.errors import MachineError, UserError
from autoquant.search.samplers import SamplerName, sampler_help

console = Console(markup=False)  # names come from run directories: never markup
err_console = Console(stderr=True, markup=False)

SamplerOption = Annotated[SamplerName | None, typer.Option(help=sampler_help())]


def worker(
    spec: Annotated[Path, typer.Argument(help="run spec YAML (the same on every worker)")],
    *,
    storage: Annotated[
        str | None,
        typer.Option(help="shared study database, postgresql://USER@HOST:PORT/DB [default: the spec's storage]"),
    ] = None,
    index: Annotated[int, typer.Option(min=0, help="this worker's number: seeds its sampler")] = 0,
    study: Annotated[str | None, typer.Option(hidden=True)] = None,
    trials: Annotated[int | None, typer.Option(min=2, help="distinct configs, all workers together")] = None,
    timeout: Annotated[float | None, typer.Option(min=0.001, help="seconds for this worker")] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed")] = None,
    sampler: SamplerOption = None,
    hardware: Annotated[
        list[str] | None,
        typer.Option(
            "--hardware",
            metavar="PROFILE",
            help="this machine's own profile (name or YAML path) in place of the spec's profile "
            "of the same name: a local device, or the same board through its own RPC tracker; "
            "repeatable. It must be the target the study's latency was measured on",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="only the final line")] = False,
) -> None:
    """Measure configs of a shared study until its budget is spent (run it on any number of
    machines; the password comes from PGPASSWORD or ~/.pgpass)."""
    from autoquant.search.run import prepare
    from autoquant.search.targets import recorded_targets
    from autoquant.search.workers import run_worker, storage_of, worker_name
    from autoquant.spec import read_spec
    from autoquant.storage import redact

    overrides = {
        "trials": trials,
        "timeout_s": timeout,
        "seed": seed,
        "sampler": sampler.value if sampler else None,
    }
    loaded = read_spec(spec)
    url, name = storage_of(loaded.spec, spec, storage, None)
    # what the study already holds of each profile (its target, its model) is not profiled again
    recorded = recorded_targets(url, study or name, _settings(loaded.spec.model_dump(mode="json")))
    run = prepare(spec, overrides=overrides, hardware=hardware or (), recorded=recorded)
    shown = redact(url)

    def status(text: str) -> None:
        err_console.print(f"storage {shown}: retrying ({text[:200]})", markup=False, highlight=False)

    def progress(held: int, total: int) -> None:
        if not quiet:
            console.print(f"{held}/{total} configs claimed", markup=False, highlight=False)

    outcome = run_worker(run, url, study or name, index=index, on_progress=progress, on_status=status)
    console.print(
        f"worker {worker_name()}: {outcome.new_measurements} configs measured here, "
        f"{outcome.reused} proposals answered or skipped; study {study or name!r} on {shown}; "
        f"stopped: {outcome.stopped_because}; {outcome.elapsed_s:.1f} s",
        markup=False,
        highlight=False,
    )


def _resolved_spec(run_dir: Path) -> dict:
    from autoquant.spec import read_run_spec

    path = run_dir / "spec.yaml"
    if not path.is_file():
        raise UserError(
            f"bad value {str(run_dir)!r}: no spec.yaml in it; allowed: a run directory written "
            "by autoquant search",
            key="RUN",
        )
    return read_run_spec(path)


def _settings(resolved: dict):
    from autoquant.spec import WorkerSettings
    from autoquant.storage import StorageSettings

    w = WorkerSettings.model_validate(resolved.get("workers") or {})
    return StorageSettings(w.heartbeat_interval_s, w.grace_period_s, w.retry_s)


def _outcome(ledger: list, started: float, stopped: str) -> Any:
    from autoquant.search.driver import SearchOutcome
    from autoquant.search.ledger import is_measured

    measured = [e for e in ledger if is_measured(e)]
    return SearchOutcome(
        run_dir=Path("."),
        measured=sum(1 for e in measured if e.state == "COMPLETE"),
        failed=sum(1 for e in measured if e.state == "FAIL"),
        new_measurements=len(measured),
        reused=sum(1 for e in ledger if e.reused_from is not None or e.skipped),
        interrupted_before=sum(1 for e in ledger if e.state == "FAIL" and not is_measured(e) and not e.skipped),
        stopped_because=stopped,
        elapsed_s=time.monotonic() - started,
    )


def write_from_ledger(run_dir: Path, url: str, name: str, resolved: dict, *, started: float, stopped: str):
    """Tables, run.json and the report of ``run_dir`` from the shared ledger; returns
    (trials frame, front frame, outcome)."""
    from autoquant.report.html import write_report
    from autoquant.report.results import write_run_info, write_tables
    from autoquant.report.rundata import load_run
    from autoquant.search.workers import collect as collect_ledger

    shared, objectives, ledger = collect_ledger(run_dir, url, name, resolved, _settings(resolved))
    frame, front = write_tables(run_dir, ledger, objectives)
    outcome = _outcome(ledger, started, stopped)
    running = sum(1 for e in ledger if e.state == "RUNNING")
    write_run_info(
        run_dir, outcome, {"storage": shared.shown, "study": name, "running_trials": running}
    )
    if not frame.empty:  # nothing measured yet: no report to draw
        write_report(load_run(run_dir))
    return frame, front, outcome


def _storage_of(run_dir: Path, resolved: dict, storage: str | None) -> tuple[str, str]:
    from autoquant.search.ledger import STUDY_NAME, sqlite_url
    from autoquant.storage import check_url

    given = storage if storage is not None else resolved.get("storage")
    if given is not None:
        return check_url(given, file=None, key="--storage"), resolved["name"]
    if not (run_dir / "study.db").is_file():
        raise UserError(
            f"bad value {str(run_dir)!r}: no study.db and no storage in its spec.yaml; "
            "allowed: --storage URL",
            key="--storage",
        )
    return sqlite_url(run_dir), STUDY_NAME


def collect(
    run: Annotated[Path, typer.Argument(help="the run directory to write (its spec.yaml names the search)")],
    storage: Annotated[
        str | None, typer.Option(help="shared study database [default: the run's storage]")
    ] = None,
) -> None:
    """Write RUN's trials.parquet, pareto.csv, run.json and report from the shared ledger (at any
    time: running trials are left out; stale ones are failed and their configs freed)."""
    from autoquant.report.terminal import run_front_table
    from autoquant.storage import redact

    started = time.monotonic()
    resolved = _resolved_spec(run)
    url, name = _storage_of(run, resolved, storage)
    frame, front, outcome = write_from_ledger(
        run, url, name, resolved, started=started, stopped="collected"
    )
    console.print(
        f"{outcome.measured} configs measured, {outcome.failed} failed (study {name!r} on "
        f"{redact(url)})",
        markup=False,
        highlight=False,
    )
    if not front.empty:
        console.print(run_front_table(front, frame))
    console.print(f"run directory: {run}")


def _worker_command(run: Any, url: str, name: str, overrides: dict) -> list[str]:
    """``autoquant worker`` for this run, with the search's command-line overrides."""
    command = [sys.executable, "-m", "autoquant.cli", "worker", str(run.spec_path)]
    command += ["--storage", url, "--study", name, "--quiet"]
    flags = {"trials": "--trials", "timeout_s": "--timeout", "seed": "--seed", "sampler": "--sampler"}
    for key, flag in flags.items():
        if overrides.get(key) is not None:
            command += [flag, str(overrides[key])]
    return command


def _watch(procs: list[subprocess.Popen], *, every_s: float, tick: Any) -> None:
    """Wait for ``procs``, calling ``tick()`` every ``every_s`` seconds; on any interruption
    stop them all before passing it on."""
    last = time.monotonic()
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            if time.monotonic() - last >= every_s:
                last = time.monotonic()
                tick()
    except BaseException:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise


def search_with_workers(
    run: Any,
    run_dir: Path,
    *,
    storage: str | None,
    n_workers: int,
    overrides: dict,
    quiet: bool,
) -> None:
    """``autoquant search --workers N``: N worker processes on this machine measure into the
    study (the run's study.db, or the shared storage); this process, which owns the run
    directory, rewrites its tables as they go and once more at the end."""
    from autoquant.report.terminal import run_front_table
    from autoquant.search.objectives import objectives_for
    from autoquant.search.targets import check_latency_targets
    from autoquant.search.workers import (
        open_shared,
        resolve_storage,
        storage_settings,
        worker_name,
    )
    from autoquant.storage import spec_fingerprint

    started = time.monotonic()
    url, name = resolve_storage(run, storage, run_dir)
    objectives = objectives_for(run.spec.objectives)
    resolved = run.resolved_spec()
    # bad URL, password or another spec's study: refused here, before any worker starts
    shared = open_shared(
        url,
        name,
        [o.direction for o in objectives],
        spec_fingerprint(resolved),
        settings=storage_settings(run),
        worker=worker_name(),
    )
    # this process records its targets and latency models first: the workers predict with them
    check_latency_targets(shared.study, run.latency, spec_file=str(run.spec_path))
    console.print(
        f"{run.spec.name}: {n_workers} workers, study {name!r} on {shared.shown}, "
        f"budget {run.spec.search.trials} distinct configs",
        highlight=False,
    )
    command = _worker_command(run, url, name, overrides)
    procs = [subprocess.Popen([*command, "--index", str(i)]) for i in range(n_workers)]

    def rewrite() -> None:
        try:
            write_from_ledger(run_dir, url, name, resolved, started=started, stopped="running")
        except MachineError:
            pass  # the workers retry on their own; the final write says what is lost
        if not quiet:
            console.print(f"{shared.claims.count()}/{run.spec.search.trials} configs claimed", highlight=False)

    _watch(procs, every_s=5.0, tick=rewrite)
    codes = [p.returncode for p in procs]
    frame, front, outcome = write_from_ledger(
        run_dir, url, name, resolved, started=started, stopped="workers finished"
    )
    console.print(
        f"{outcome.measured} configs measured, {outcome.failed} failed, by {n_workers} workers; "
        f"{outcome.elapsed_s:.1f} s",
        highlight=False,
    )
    if not front.empty:
        console.print(run_front_table(front, frame))
    console.print(f"run directory: {run_dir}  (spec.yaml, trials.parquet, pareto.csv, report.html)")
    failed = [c for c in codes if c != 0]
    if failed:
        raise MachineError(
            f"{len(failed)} of {n_workers} workers failed (exit codes {sorted(set(failed))}); the "
            f"tables hold every trial they finished; study {name!r} on {shared.shown}"
        )
