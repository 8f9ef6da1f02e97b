"""The Follower: a background thread that fetches what the server publishes.

It long-polls for each new version, downloads and decodes the delta chain (or a snapshot when
deltas cannot reach it), and queues the result. The trainer applies the queue between steps, so
downloads and decoding never sit on the compute path and the replica stays bit-exact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from crowdtrain.node.client import CoordinatorClient, DeltaChain, Stopped
from crowdtrain.protocol.manifest import Manifest

log = logging.getLogger(__name__)

LONG_POLL_S = 30.0


@dataclass
class Published:
    """One thing to apply, in order: a delta chain, or a whole snapshot (params set)."""

    version: int
    lineage: str
    chain: DeltaChain | None = None
    params: dict[str, torch.Tensor] | None = None


class Follower:
    def __init__(
        self,
        client: CoordinatorClient,
        manifest: Manifest,
        version: int,
        lineage: str,
        stop: Callable[[], bool],
    ):
        self.client = client
        self.manifest = manifest
        self.version = version  # the newest version fetched (applied or queued)
        self.lineage = lineage
        self.stop = stop
        self.snapshots = 0
        self._queue: list[Published] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the thread to end (once `stop()` is true): a daemon thread still decoding
        with torch when the interpreter exits aborts the process."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def take(self) -> list[Published]:
        """Everything fetched since the last call, oldest first."""
        with self._cond:
            items, self._queue = self._queue, []
            return items

    def wait_beyond(self, version: int, timeout: float) -> None:
        """Block until something newer than `version` was fetched, or `timeout` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self.version > version or self.stop(), timeout)

    def _push(self, item: Published) -> None:
        with self._cond:
            self._queue.append(item)
            self.version, self.lineage = item.version, item.lineage
            self._cond.notify_all()

    def _run(self) -> None:
        while not self.stop():
            try:
                chain = self.client.deltas(
                    self.version, self.lineage, self.manifest, wait=LONG_POLL_S
                )
                if chain is None:
                    version, lineage, params = self.client.snapshot(self.manifest)
                    self.snapshots += 1
                    self._push(Published(version, lineage, params=params))
                elif chain:
                    self._push(Published(chain.last_version, self.lineage, chain=chain))
            except Stopped:
                return
            except Exception as exc:  # a bad download: log it, try again shortly
                if self.stop():
                    return
                log.warning("fetching the newest version failed (%s); retrying", exc)
                time.sleep(1.0)
