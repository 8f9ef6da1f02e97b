"""The audit log: who did what, kept in the database (table `audit_events`).

Admin actions and registrations are written in the same transaction as the change they
describe (`add`), so a token never exists without its record. Frequent events (refused
submissions, failed logins) go through a queue that a background thread writes in batches
(`record`), off the request path.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from crowdtrain.db import Database
from crowdtrain.db.models import AuditEvent

log = logging.getLogger(__name__)

BATCH = 256
FLUSH_EVERY_S = 1.0
MAX_QUEUED = 10_000  # past this a flood of refusals is counted, not stored one by one


def _event(actor: str, action: str, target: str, detail: dict | None, address: str) -> dict:
    return dict(
        time=time.time(),
        actor=actor[:100],
        action=action[:40],
        target=str(target)[:100],
        detail=json.dumps(detail or {}, sort_keys=True, default=str)[:4000],
        address=(address or "")[:64],
    )


def event_public(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "time": event.time,
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "detail": json.loads(event.detail or "{}"),
        "address": event.address,
    }


class AuditLog:
    def __init__(self, db: Database):
        self.db = db
        self._queue: queue.Queue[dict | threading.Event | None] = queue.Queue()
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    @staticmethod
    def add(
        session: Session,
        actor: str,
        action: str,
        target: str = "",
        detail: dict | None = None,
        address: str = "",
    ) -> None:
        """Record an event inside the caller's transaction."""
        session.add(AuditEvent(**_event(actor, action, target, detail, address)))

    def record(
        self,
        actor: str,
        action: str,
        target: str = "",
        detail: dict | None = None,
        address: str = "",
    ) -> None:
        """Record an event soon (batched by the writer thread); never blocks the caller."""
        if self._queue.qsize() >= MAX_QUEUED:
            self._dropped += 1
            return
        self._queue.put(_event(actor, action, target, detail, address))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event recorded so far is in the database."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def query(
        self,
        limit: int = 100,
        before: int | None = None,
        action: str | None = None,
        actor: str | None = None,
    ) -> list[dict[str, Any]]:
        """The newest events first; `before` pages back by id."""
        statement = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if before is not None:
            statement = statement.where(AuditEvent.id < before)
        if action:
            statement = statement.where(AuditEvent.action == action)
        if actor:
            statement = statement.where(AuditEvent.actor == actor)
        with self.db.session() as session:
            return [event_public(e) for e in session.scalars(statement)]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[dict] = []
            waiters: list[threading.Event] = []
            try:
                item = self._queue.get(timeout=FLUSH_EVERY_S)
            except queue.Empty:
                continue
            while True:
                if item is None:
                    stopping = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)
            for waiter in waiters:
                waiter.set()

    def _write(self, batch: list[dict]) -> None:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            batch.append(_event("server", "audit.dropped", "", {"events": dropped}, ""))
        if not batch:
            return
        for attempt in range(3):
            try:
                with self.db.transaction() as session:
                    session.add_all([AuditEvent(**fields) for fields in batch])
                return
            except Exception as error:  # a busy database: try again, then give up loudly
                log.warning("writing %d audit events failed (%s)", len(batch), error)
                time.sleep(0.5 * (attempt + 1))
        log.error("%d audit events were not recorded", len(batch))
