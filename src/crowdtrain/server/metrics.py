"""Training history: one JSON line per version (rounds) and per evaluation, kept on disk."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from crowdtrain.files import write_atomic


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
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line after a crash: everything before it is good
            if len(self.records) != len(lines):  # drop the torn tail so appends stay readable
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            self.records.append(record)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()

    def truncate_after(self, version: int) -> None:
        """Forget records past `version` (the server resumed from an older checkpoint)."""
        with self._lock:
            kept = [r for r in self.records if r["version"] <= version]
            if len(kept) != len(self.records):
                write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept

    def since(self, version: int, limit: int = 10_000) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r["version"] > version][:limit]

    def last(self) -> dict[str, Any] | None:
        with self._lock:
            return self.records[-1] if self.records else None
