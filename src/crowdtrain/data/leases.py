"""Shard leases and the epoch ledger: which node trains on which shard, until when, and proof
that every shard of an epoch was completed exactly once.

A lease lends one shard of one epoch to one node until `expires_at`; the node renews it while
it works. Its life:

    active --(the update that finished the shard is accepted)--> submitted
    submitted --(that update's round is applied)--> completed   (a row in the ledger)
    submitted --(the update is refused, or the server restarts first)--> active / returned
    active --(not renewed in time)--> expired;  active --(the node gives it back)--> returned

An expired or returned lease's shard goes back to the pool and is issued again. The ledger
(`completions`) has one row per (epoch, shard), guarded by a unique constraint, so a shard can
never count twice. Nodes run ahead into the next epochs while the current one waits for its
last shards (nodes hold them), up to `lookahead` epochs open at once: a node that waits for a
shard while holding a finished one would otherwise stall an epoch that needs its update.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from crowdtrain.data.shards import ShardInfo, TokenizationInfo
from crowdtrain.db import Completion, Database, Epoch, Lease

log = logging.getLogger(__name__)

LEASE_ID_PATTERN = r"^[0-9a-f]{32}$"
HELD = ("active", "submitted")
LOOKAHEAD = 16  # epochs open at once, at most: beyond, a node waits for a shard


class LeaseError(Exception):
    """A lease request that cannot be honoured: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class LeaseGrant:
    id: str
    shard: ShardInfo
    epoch: int
    expires_at: float
    ttl_s: float


class LeaseBook:
    """Leases over one tokenization's shards. Thread-safe; each call is one transaction."""

    def __init__(
        self,
        db: Database,
        tokenization: TokenizationInfo,
        ttl_s: float,
        seed: int = 0,
        lookahead: int = LOOKAHEAD,
        clock: Callable[[], float] = time.time,
        max_per_node: int | None = None,
    ):
        """`max_per_node`: active leases one node may hold at once (None: no cap)."""
        if not tokenization.shards:
            raise ValueError(f"{tokenization.dataset}/{tokenization.split} has no shards")
        self.db = db
        self.tokenization = tokenization
        self.shards = {s.id: s for s in tokenization.shards}
        self.ttl_s = ttl_s
        self.seed = seed
        self.lookahead = lookahead
        self.clock = clock
        self.max_per_node = max_per_node
        self._lock = threading.Lock()
        self._freed_listeners: list[Callable[[int], None]] = []
        with self.db.transaction() as session:
            # their updates were queued in memory by the last process and are gone
            lost = session.execute(
                update(Lease)
                .where(Lease.epoch_id.in_(self._epoch_ids(session)), Lease.state == "submitted")
                .values(state="returned", ended_at=self.clock())
            ).rowcount
            if lost:
                log.warning(
                    "%d shard(s) whose update was not applied before the restart "
                    "go back to the pool",
                    lost,
                )

    def rollback_after(self, version: int) -> int:
        """The server resumed at `version`: completions by updates applied after it are void
        (the weights no longer hold them), so their shards go back to the pool and their
        epochs reopen. Versions count for the whole run, so this covers every dataset the run
        trained on, not only this book's. Returns how many were voided."""
        with self._lock, self.db.transaction() as session:
            void = session.scalars(select(Completion).where(Completion.version > version)).all()
            now = self.clock()
            for completion in void:
                lease = session.get(Lease, completion.lease_id)
                lease.state, lease.ended_at = "returned", now
                epoch = session.get(Epoch, completion.epoch_id)
                epoch.completed_at = None
                session.delete(completion)
        if void:
            log.warning(
                "%d shard(s) completed after version %d go back to the pool", len(void), version
            )
        return len(void)

    def on_freed(self, listener: Callable[[int], None]) -> None:
        """Call `listener(count)` when shards go back to the pool (released, found expired) or
        a new epoch opens: a hint for waiting nodes (the server's sessions offer them). It runs
        under the book's lock, so it must only hand the news on."""
        self._freed_listeners.append(listener)

    def _freed(self, count: int) -> None:
        for listener in self._freed_listeners:
            try:
                listener(count)
            except Exception:  # a hint that failed must not fail the lease call
                log.exception("a lease listener failed")

    # ---- helpers ------------------------------------------------------------------------

    def _epoch_ids(self, session: Session):
        return select(Epoch.id).where(Epoch.tokenization_id == self.tokenization.id)

    def _order(self, number: int) -> list[int]:
        """The order shards are handed out in epoch `number`: a fixed shuffle per epoch."""
        ids = sorted(self.shards)
        rng = np.random.default_rng([self.seed, number])
        return [ids[i] for i in rng.permutation(len(ids))]

    def _expire(self, session: Session) -> None:
        now = self.clock()
        expired = session.execute(
            update(Lease)
            .where(
                Lease.epoch_id.in_(self._epoch_ids(session)),
                Lease.state == "active",
                Lease.expires_at < now,
            )
            .values(state="expired", ended_at=now)
        ).rowcount
        if expired:
            log.info("%d lease(s) expired; their shards go back to the pool", expired)
            self._freed(expired)

    def _open_epochs(self, session: Session) -> list[Epoch]:
        """The oldest open epoch and the `lookahead` - 1 after it (created when a lease needs
        one): leases go to the first epoch with a free shard."""
        current = session.scalar(
            select(Epoch)
            .where(Epoch.tokenization_id == self.tokenization.id, Epoch.completed_at.is_(None))
            .order_by(Epoch.number)
            .limit(1)
        )
        if current is None:
            last = session.scalar(
                select(func.max(Epoch.number)).where(Epoch.tokenization_id == self.tokenization.id)
            )
            current = Epoch(
                tokenization_id=self.tokenization.id, number=0 if last is None else last + 1
            )
            session.add(current)
            session.flush()
        epochs = [current]
        for number in range(current.number + 1, current.number + self.lookahead):
            epoch = session.scalar(
                select(Epoch).where(
                    Epoch.tokenization_id == self.tokenization.id, Epoch.number == number
                )
            )
            epochs.append(epoch)  # None: created only when a lease needs it
        return epochs

    def _lease(self, session: Session, lease_id: str, node: str) -> Lease:
        lease = session.get(Lease, lease_id)
        if lease is None or lease.shard_id not in self.shards:
            raise LeaseError(404, "unknown_lease", f"no lease {lease_id!r} on this server")
        if lease.node != node:
            raise LeaseError(403, "not_your_lease", f"lease {lease_id} belongs to another node")
        return lease

    # ---- what nodes do ------------------------------------------------------------------

    def acquire(self, node: str) -> LeaseGrant | None:
        """A lease on the next free shard, or None when every shard of the open epochs is
        leased or done (ask again later)."""
        with self._lock, self.db.transaction() as session:
            self._expire(session)
            self._check_cap(session, node)
            previous: Epoch | None = None
            for epoch in self._open_epochs(session):
                if epoch is None:
                    epoch = Epoch(tokenization_id=self.tokenization.id, number=previous.number + 1)
                    session.add(epoch)
                    session.flush()
                previous = epoch
                taken = set(
                    session.scalars(
                        select(Lease.shard_id).where(
                            Lease.epoch_id == epoch.id, Lease.state.in_(HELD)
                        )
                    )
                ) | set(
                    session.scalars(
                        select(Completion.shard_id).where(Completion.epoch_id == epoch.id)
                    )
                )
                free = next((s for s in self._order(epoch.number) if s not in taken), None)
                if free is None:
                    continue
                now = self.clock()
                lease = Lease(
                    id=uuid.uuid4().hex,
                    epoch_id=epoch.id,
                    shard_id=free,
                    node=node,
                    state="active",
                    issued_at=now,
                    expires_at=now + self.ttl_s,
                )
                session.add(lease)
                return LeaseGrant(
                    lease.id, self.shards[free], epoch.number, lease.expires_at, self.ttl_s
                )
            return None

    def _check_cap(self, session, node: str) -> None:
        """Refuse a node that already holds `max_per_node` active leases: one node must not
        take every free shard (a node normally holds one, plus those its next update ends)."""
        if self.max_per_node is None:
            return
        held = session.scalar(
            select(func.count())
            .select_from(Lease)
            .where(Lease.node == node, Lease.state == "active")
        )
        if held >= self.max_per_node:
            raise LeaseError(
                429,
                "too_many_leases",
                f"this node holds {held} active leases, the most one node may hold "
                f"(max_leases_per_node); finish or release some first",
            )

    def renew(self, lease_id: str, node: str) -> float:
        """Push the expiry out by ttl; the new expiry. A lease that already ended is lost."""
        with self._lock, self.db.transaction() as session:
            self._expire(session)
            lease = self._lease(session, lease_id, node)
            if lease.state not in HELD:
                raise LeaseError(
                    409,
                    "lease_lost",
                    f"lease {lease_id} is {lease.state}; its shard went back to the pool. "
                    "Stop training on it and take a new lease",
                )
            lease.expires_at = self.clock() + self.ttl_s
            return lease.expires_at

    def release(self, lease_id: str, node: str) -> None:
        """The node gives the shard back unfinished (it is shutting down)."""
        with self._lock, self.db.transaction() as session:
            lease = self._lease(session, lease_id, node)
            if lease.state == "active":
                lease.state, lease.ended_at = "returned", self.clock()
                self._freed(1)

    # ---- what the server does around an update ------------------------------------------

    def hold(
        self, lease_ids: list[str], node: str, update_id: str, resend: bool = False
    ) -> dict[str, str]:
        """Mark the leases an update completes as submitted, before the update is queued.
        Answers per lease: "submitted", or why it was not (the update is still accepted).
        With `resend` (the server already has this update_id) nothing changes: only leases
        the first sending submitted are answered "submitted"."""
        answers: dict[str, str] = {}
        with self._lock, self.db.transaction() as session:
            self._expire(session)
            for lease_id in lease_ids:
                try:
                    lease = self._lease(session, lease_id, node)
                except LeaseError as error:
                    answers[lease_id] = error.code
                    continue
                if lease.state in ("submitted", "completed") and lease.update_id == update_id:
                    answers[lease_id] = "submitted"  # a resent update: counted once already
                elif lease.state != "active":
                    answers[lease_id] = f"lease_{lease.state}"
                elif resend:  # another update's id: these leases are not in that update
                    answers[lease_id] = "not_in_update"
                else:
                    lease.state, lease.update_id = "submitted", update_id
                    answers[lease_id] = "submitted"
        return answers

    def unhold(self, update_id: str) -> None:
        """The update was refused after `hold`: its leases are the node's again."""
        if not update_id:
            return
        with self._lock, self.db.transaction() as session:
            session.execute(
                update(Lease)
                .where(Lease.update_id == update_id, Lease.state == "submitted")
                .values(state="active", update_id=None, expires_at=self.clock() + self.ttl_s)
            )

    def applied(self, update_ids: list[str], version: int) -> int:
        """The round of these updates became `version`: their leases enter the ledger."""
        if not update_ids:
            return 0
        completed = 0
        with self._lock, self.db.transaction() as session:
            leases = session.scalars(
                select(Lease).where(Lease.update_id.in_(update_ids), Lease.state == "submitted")
            ).all()
            now = self.clock()
            for lease in leases:
                done = session.scalar(  # cannot be while leases are checked; never count twice
                    select(Completion.id).where(
                        Completion.epoch_id == lease.epoch_id,
                        Completion.shard_id == lease.shard_id,
                    )
                )
                if done is not None:
                    log.error("shard %d was already completed in its epoch", lease.shard_id)
                    lease.state, lease.ended_at = "returned", now
                    continue
                session.add(
                    Completion(
                        epoch_id=lease.epoch_id,
                        shard_id=lease.shard_id,
                        lease_id=lease.id,
                        node=lease.node,
                        update_id=lease.update_id,
                        version=version,
                        completed_at=now,
                    )
                )
                session.flush()  # the unique constraint, checked inside this transaction
                lease.state, lease.ended_at = "completed", now
                completed += 1
            if completed:
                self._close_epochs(session, now)
        return completed

    def _close_epochs(self, session: Session, now: float) -> None:
        open_epochs = session.scalars(
            select(Epoch).where(
                Epoch.tokenization_id == self.tokenization.id, Epoch.completed_at.is_(None)
            )
        ).all()
        for epoch in open_epochs:
            done = session.scalar(
                select(func.count()).select_from(Completion).where(Completion.epoch_id == epoch.id)
            )
            if done == len(self.shards):
                epoch.completed_at = now
                log.info("epoch %d complete: all %d shards trained once", epoch.number, done)
                self._freed(len(self.shards))  # the next epoch past the lookahead opens

    # ---- reports ------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock, self.db.transaction() as session:
            self._expire(session)
            epochs = session.scalars(
                select(Epoch)
                .where(Epoch.tokenization_id == self.tokenization.id)
                .order_by(Epoch.number)
            ).all()
            current = next((e for e in epochs if e.completed_at is None), None)
            active = session.scalar(
                select(func.count())
                .select_from(Lease)
                .where(Lease.epoch_id.in_(self._epoch_ids(session)), Lease.state.in_(HELD))
            )
            done = 0
            if current is not None:
                done = session.scalar(
                    select(func.count())
                    .select_from(Completion)
                    .where(Completion.epoch_id == current.id)
                )
            number = current.number if current is not None else len(epochs)  # next to open
            return {
                "dataset": self.tokenization.dataset,
                "split": self.tokenization.split,
                "shards": len(self.shards),
                "tokens": self.tokenization.tokens,
                "lease_ttl_s": self.ttl_s,
                "epoch": number,
                "epoch_completed_shards": done,
                "completed_epochs": sum(e.completed_at is not None for e in epochs),
                "active_leases": active,
            }

    def coverage(self, number: int) -> dict:
        """Epoch `number`'s ledger: which lease completed each shard, which are missing, and
        which (never, by the unique constraint) were completed more than once."""
        with self.db.session() as session:
            epoch = session.scalar(
                select(Epoch).where(
                    Epoch.tokenization_id == self.tokenization.id, Epoch.number == number
                )
            )
            if epoch is None:
                raise LeaseError(404, "unknown_epoch", f"epoch {number} has not started")
            rows = session.scalars(
                select(Completion).where(Completion.epoch_id == epoch.id).order_by(Completion.id)
            ).all()
            counts: dict[int, int] = {}
            for row in rows:
                counts[row.shard_id] = counts.get(row.shard_id, 0) + 1
            leases = session.execute(
                select(Lease.state, func.count())
                .where(Lease.epoch_id == epoch.id)
                .group_by(Lease.state)
            ).all()
            holders = session.scalars(
                select(Lease)
                .where(Lease.epoch_id == epoch.id, Lease.state.in_(HELD))
                .order_by(Lease.issued_at)
            ).all()
            return {
                "epoch": number,
                "started_at": epoch.started_at,
                "completed_at": epoch.completed_at,
                "shards": len(self.shards),
                "completed": len(counts),
                "missing": sorted(self.shards[s].index for s in self.shards if s not in counts),
                "duplicates": sorted(self.shards[s].index for s, n in counts.items() if n > 1),
                "leases": dict(leases),
                "held": [
                    {
                        "shard": self.shards[lease.shard_id].index,
                        "lease": lease.id,
                        "node": lease.node,
                        "state": lease.state,
                        "expires_at": lease.expires_at,
                    }
                    for lease in holders
                ],
                "ledger": [
                    {
                        "shard": self.shards[row.shard_id].index,
                        "lease": row.lease_id,
                        "node": row.node,
                        "update_id": row.update_id,
                        "version": row.version,
                        "completed_at": row.completed_at,
                    }
                    for row in rows
                ],
            }
