"""Claims: a config is claimed in the storage before any worker measures it.

One table beside Optuna's, in the same database: ``autoquant_claims(study_id, config_hash, slot,
trial_id, worker)`` with two unique keys. ``(study_id, config_hash)``: two workers proposing the
same config cannot both win it. ``(study_id, slot)`` with ``slot < trials``: the budget is one slot
per distinct config, so however many workers race for the last slot, one gets it and the budget is
met exactly, never passed.

A claim lives as long as its trial: it stands while the trial runs, completes or fails as a
measurement (a failed config is data, counted in the budget), and returns to the pool when the
trial ended without a measurement: failed by the heartbeat (the worker was killed or cut off) or
skipped. Such claims are released by the heartbeat's failure callback and, should the process that
failed the trial die before it released them, by the next worker that meets them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

TABLE = "autoquant_claims"


class Outcome(enum.Enum):
    WON = "won"
    TAKEN = "taken"  # another trial holds the config
    FULL = "full"  # every budget slot is held


@dataclass(frozen=True)
class Claim:
    outcome: Outcome
    holder_trial_id: int | None = None


def _table(metadata: Any):
    import sqlalchemy as sa

    return sa.Table(
        TABLE,
        metadata,
        sa.Column("study_id", sa.Integer, primary_key=True),
        sa.Column("config_hash", sa.String(64), primary_key=True),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("trial_id", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.UniqueConstraint("study_id", "slot", name=f"{TABLE}_slot"),
    )


class Claims:
    """The claims of one study, through the Optuna storage's own SQLAlchemy engine."""

    def __init__(self, storage: Any, study_id: int, worker: str) -> None:
        import sqlalchemy as sa

        self.storage = storage
        self.engine = storage.engine
        self.study_id = study_id
        self.worker = worker[:200]
        self.table = _table(sa.MetaData())
        try:
            self.table.create(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:
            # two workers creating it at once: one wins, the other finds it made
            if not sa.inspect(self.engine).has_table(TABLE):
                raise

    def rows(self) -> list[tuple[str, int, int]]:
        """(config_hash, slot, trial_id) of every standing claim."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.select(t.c.config_hash, t.c.slot, t.c.trial_id).where(
                    t.c.study_id == self.study_id
                )
            )
            return [(h, s, tid) for h, s, tid in result]

    def count(self) -> int:
        return len(self.rows())

    def release(self, trial_id: int) -> int:
        """Drop the claim(s) of a trial that ended without a measurement."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.delete(t).where((t.c.study_id == self.study_id) & (t.c.trial_id == trial_id))
            )
            return result.rowcount or 0

    def claim(self, config_hash: str, trial_id: int, budget: int | None) -> Claim:
        """Claim ``config_hash`` for ``trial_id`` in the lowest free slot below ``budget``
        (None: unbounded, for adopting measurements made before claims existed)."""
        import sqlalchemy as sa

        t = self.table
        for _ in range(100):
            rows = self.rows()
            holder = next((tid for h, _, tid in rows if h == config_hash), None)
            if holder is not None:
                if holder == trial_id:
                    return Claim(Outcome.WON, trial_id)
                if self._stands(holder):
                    return Claim(Outcome.TAKEN, holder)
                self._drop(config_hash, holder)
                continue
            used = {slot for _, slot, _ in rows}
            limit = budget if budget is not None else len(used) + 1
            free = next((s for s in range(limit) if s not in used), None)
            if free is None:
                return Claim(Outcome.FULL)
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        sa.insert(t).values(
                            study_id=self.study_id,
                            config_hash=config_hash,
                            slot=free,
                            trial_id=trial_id,
                            worker=self.worker,
                        )
                    )
                return Claim(Outcome.WON, trial_id)
            except sa.exc.IntegrityError:
                continue  # another worker took the slot or the config: look again
        raise RuntimeError("claims: 100 lost races in a row")  # pragma: no cover - livelock

    def _stands(self, trial_id: int) -> bool:
        """A claim stands unless its trial ended without a measurement."""
        from autoquant.search.ledger import entry_from_trial, is_measured

        trial = self.storage.get_trial(trial_id)
        if trial.state.name == "RUNNING":
            return True
        return is_measured(entry_from_trial(trial))

    def _drop(self, config_hash: str, trial_id: int) -> None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(t).where(
                    (t.c.study_id == self.study_id)
                    & (t.c.config_hash == config_hash)
                    & (t.c.trial_id == trial_id)
                )
            )

    def unsettled(self) -> int:
        """Claims whose trial still runs (or is not yet known to have died)."""
        return sum(
            1 for _, _, tid in self.rows() if self.storage.get_trial(tid).state.name == "RUNNING"
        )
