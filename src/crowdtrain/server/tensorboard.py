"""The optional TensorBoard sink (setting `tensorboard_dir`): per-version scalars and validation
losses, written on a thread of its own so that a slow disk never holds up a round."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from crowdtrain.settings import SettingsError

if TYPE_CHECKING:
    from crowdtrain.server.coordinator import RoundResult
    from crowdtrain.server.metrics import EvaluationLog

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'crowdtrain[tensorboard]'"
POLL_S = 1.0  # how often new validation losses are looked for
MAX_QUEUED = 10_000  # rounds waiting to be written; past that, a round's scalars are skipped
# round record key -> the scalar's tag
ROUND_SCALARS = {
    "train_loss": "train/loss",
    "lr": "train/learning_rate",
    "updates": "round/updates",
    "nodes": "round/nodes",
    "tokens": "round/tokens",
    "samples": "round/samples",
    "wire_bytes": "round/update_wire_bytes",
    "round_s": "round/duration_s",
}


class ScalarWriter(Protocol):
    """What the sink needs of torch.utils.tensorboard.SummaryWriter (tests pass a fake)."""

    def add_scalar(self, tag: str, value: float, global_step: int, walltime: float) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def summary_writer_class(log_dir: Path) -> type:
    """torch's SummaryWriter; a clear SettingsError when the tensorboard package is missing
    (checked first at start, before the long set-up)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package
        raise SettingsError(
            f"tensorboard_dir is set to {log_dir}, but the tensorboard package is not "
            f"installed: run {INSTALL_HINT}, or unset tensorboard_dir"
        ) from None
    return SummaryWriter


class TensorBoardSink:
    """Takes round results (a coordinator listener) and polls the evaluation log; a thread
    writes both. `stop` writes what is queued, flushes and closes the writer."""

    def __init__(self, writer: ScalarWriter, evals: EvaluationLog, evaluated: int = -1):
        self.writer = writer
        self.evals = evals
        self.evaluated = evaluated  # the newest version whose validation loss is written
        self._queue: queue.Queue[tuple[int, float, dict[str, float]] | None] = queue.Queue(
            MAX_QUEUED
        )
        self._thread: threading.Thread | None = None
        self._skipped = 0
        self._last_round_at: float | None = None  # tokens/s counts from the previous round

    def on_round(self, result: RoundResult) -> None:
        """A coordinator listener: queue the round's scalars, never wait."""
        record = result.record
        scalars = {tag: record[key] for key, tag in ROUND_SCALARS.items() if key in record}
        since_last = record["time"] - (self._last_round_at or record["time"])
        if since_last > 0:
            scalars["train/tokens_per_s"] = record["tokens"] / since_last
        self._last_round_at = record["time"]
        try:
            self._queue.put_nowait((result.version, record["time"], scalars))
        except queue.Full:
            self._skipped += 1
            if self._skipped == 1 or self._skipped % 1000 == 0:
                log.warning("TensorBoard writes fall behind: %d rounds skipped", self._skipped)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tensorboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._write_evaluations()
        self.writer.flush()
        self.writer.close()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                item = (-1, 0.0, {})  # nothing new: look for validation losses only
            try:
                if item is not None:
                    version, walltime, scalars = item
                    for tag, value in scalars.items():
                        self.writer.add_scalar(tag, float(value), version, walltime)
                self._write_evaluations()
            except Exception:  # a full disk must not end the server: say so and go on
                log.exception("writing TensorBoard scalars failed")
            if item is None:
                return

    def _write_evaluations(self) -> None:
        for record in self.evals.since(self.evaluated):
            self.writer.add_scalar(
                "valid/loss", float(record["valid_loss"]), record["version"], record["time"]
            )
            self.evaluated = max(self.evaluated, record["version"])
