"""The Evaluator: validation loss of new versions on the server's own held-out data.

It runs in its own thread on its own copy of the model, so it never blocks a round. It scores
every `every`-th version, and the newest version once training pauses.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from crowdtrain.model.evaluate import validation_loss
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.server.metrics import EvaluationLog

log = logging.getLogger(__name__)

IDLE_S = 1.0  # evaluate the newest version once no new version has come for this long


class Evaluator:
    def __init__(
        self,
        config: GPTConfig,
        tokens: np.ndarray,
        snapshot: Callable[[], tuple[int, dict[str, torch.Tensor]]],
        history: EvaluationLog,
        every: int,
        batches: int,
        batch_size: int,
        dataset: str = "",
    ):
        self.model = GPT(config)
        self.dataset = dataset
        self.tokens = tokens
        self.snapshot = snapshot
        self.history = history
        self.every = every
        self.batches = batches
        self.batch_size = batch_size
        last = history.last()
        self.evaluated = last["version"] if last else -1
        self._latest = -1
        self._latest_at = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self, version: int) -> None:
        self._latest, self._latest_at = version, time.monotonic()
        self._wake.set()

    def start(self, current_version: int) -> None:
        self.notify(current_version)
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _due(self) -> bool:
        if self._latest <= self.evaluated:
            return False
        if self.evaluated < 0 or self._latest - self.evaluated >= self.every:
            return True
        return time.monotonic() - self._latest_at >= IDLE_S

    def _run(self) -> None:
        torch.set_num_threads(1)  # leave the cores to the coordinator and the request handlers
        while not self._stop.is_set():
            self._wake.wait(timeout=IDLE_S / 2)
            self._wake.clear()
            if self._due():
                try:
                    self.evaluate_now()
                except Exception:
                    log.exception("evaluation failed")
                    time.sleep(IDLE_S)

    def evaluate_now(self) -> dict:
        version, params = self.snapshot()
        self.model.load_state_dict(params, strict=False)
        started = time.perf_counter()
        loss = validation_loss(
            self.model,
            self.tokens,
            batch_size=self.batch_size,
            block_size=self.model.config.block_size,
            num_batches=self.batches,
            seed=0,
        )
        record = {
            "version": version,
            "time": time.time(),
            "valid_loss": loss,
            "valid_perplexity": math.exp(min(loss, 50.0)),
            "eval_s": round(time.perf_counter() - started, 4),
            "dataset": self.dataset,
            "sample_tokens": self.batches * self.batch_size * self.model.config.block_size,
        }
        if version > self.evaluated:
            self.history.append(record)
            self.evaluated = version
        return record
