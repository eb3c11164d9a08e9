"""``profile-merge``: latency tables measured on several machines merged into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from autoquant.errors import UserError

console = Console(markup=False, highlight=False)  # paths and hashes: never markup


def profile_merge(
    into: Annotated[Path, typer.Argument(metavar="INTO", help="latency table to merge into (created if new)")],
    sources: Annotated[
        list[Path],
        typer.Argument(metavar="FROM...", help="latency tables of other machines (opened read-only)", show_default=False),
    ],
) -> None:
    """Merge other machines' latency tables into one, by target fingerprint; never overwrite a
    measurement (conflicts are counted, the target's record kept)."""
    from autoquant.latency.merge import merge_table
    from autoquant.latency.table import LatencyTable

    for source in sources:
        if source.exists() and into.exists() and source.samefile(into):
            raise UserError(
                f"bad value {str(source)!r}: it is the table merged into; allowed: another table",
                key="FROM",
            )
    with LatencyTable(into) as target:
        for source in sources:
            with LatencyTable(source, read_only=True) as other:
                counts = merge_table(target, other)
            if not counts:
                console.print(f"{source}: no records", soft_wrap=True)
            for count in counts:
                console.print(count.line(source), soft_wrap=True)
        total = len(target)
    console.print(f"{into}: {total} records", soft_wrap=True)
