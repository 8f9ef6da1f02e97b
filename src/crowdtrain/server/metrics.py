"""Training history: one JSON line per version (rounds), and the Evaluator's scores in the
database."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select

from crowdtrain.db import Database, Evaluation
from crowdtrain.files import write_atomic

log = logging.getLogger(__name__)


class HistoryLog:
    """An append-only JSONL file mirrored in memory. Each record has a `version`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict) and isinstance(record.get("version"), int):
                    self.records.append(record)
                else:  # a line torn by a crash (or edited by hand): skip it, keep the rest
                    log.warning("%s: skipping an unreadable line", self.path.name)
            if len(self.records) != len(lines):  # rewrite so appends follow whole lines
                self._rewrite()

    def _rewrite(self) -> None:
        write_atomic(self.path, "".join(_line(r) for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        line = _line(record)
        with self._lock:
            self.records.append(record)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

    def truncate_after(self, version: int) -> None:
        """Forget records past `version` (the server resumed from an older checkpoint)."""
        with self._lock:
            kept = [r for r in self.records if r["version"] <= version]
            changed = len(kept) != len(self.records)
            self.records = kept
            if changed:
                self._rewrite()

    def since(self, version: int, limit: int = 10_000) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r["version"] > version][:limit]

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self.records[-1] if self.records else None


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


class EvaluationLog:
    """The Evaluator's history in the database, with HistoryLog's interface. A run's older
    `evals.jsonl` (from before the database) is taken over once."""

    FIELDS = ("version", "time", "valid_loss", "valid_perplexity", "eval_s", "dataset")

    def __init__(self, db: Database, legacy: Path | None = None):
        self.db = db
        if legacy is not None and legacy.exists():
            with self.db.transaction() as session:
                if not session.scalar(select(func.count()).select_from(Evaluation)):
                    for record in HistoryLog(legacy).records:
                        session.add(self._row({"dataset": "", "sample_tokens": 0, **record}))
            kept = legacy.with_suffix(".jsonl.imported")
            if not kept.exists():  # the first takeover's copy stays; a later file stays put
                legacy.rename(kept)

    @staticmethod
    def _row(record: dict[str, Any]) -> Evaluation:
        return Evaluation(
            version=record["version"],
            time=record["time"],
            valid_loss=record["valid_loss"],
            valid_perplexity=record["valid_perplexity"],
            eval_s=record.get("eval_s", 0.0),
            dataset=record.get("dataset", ""),
            sample_tokens=record.get("sample_tokens", 0),
        )

    @classmethod
    def _record(cls, row: Evaluation) -> dict[str, Any]:
        return {**{k: getattr(row, k) for k in cls.FIELDS}, "sample_tokens": row.sample_tokens}

    def append(self, record: dict[str, Any]) -> None:
        with self.db.transaction() as session:
            session.add(self._row(record))

    def truncate_after(self, version: int) -> None:
        with self.db.transaction() as session:
            session.execute(delete(Evaluation).where(Evaluation.version > version))

    def since(self, version: int, limit: int = 10_000) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Evaluation)
                .where(Evaluation.version > version)
                .order_by(Evaluation.version, Evaluation.id)
                .limit(limit)
            )
            return [self._record(r) for r in rows]

    def last(self) -> dict[str, Any] | None:
        with self.db.session() as session:
            row = session.scalar(select(Evaluation).order_by(Evaluation.id.desc()).limit(1))
            return None if row is None else self._record(row)
