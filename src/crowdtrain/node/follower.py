"""The Follower: a background thread that fetches what the server publishes.

It long-polls for each new version, downloads and decodes the delta chain (or a snapshot when
deltas cannot reach it), and queues the result. The trainer applies the queue between steps, so
downloads and decoding never sit on the compute path and the replica stays bit-exact.

While the node's WebSocket session is up, the session's version pushes replace the long poll:
the Follower fetches as soon as a version is announced (and checks over HTTP every
PUSH_FALLBACK_S in case a push was lost). While a node that keeps a session has it down, it
long-polls for SESSION_DOWN_POLL_S at a time, so that it takes up pushes soon after the session
is back (and a stop never waits long on an open poll). What it fetches, and how, is the same.
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
PUSH_FALLBACK_S = 30.0  # with a session up, fetch at least this often without a push
SESSION_DOWN_POLL_S = 5.0  # the long poll of a node whose session is down for now


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
        pushes: Callable[[], bool] | None = None,
    ):
        """`pushes`: whether the node's session announces new versions now (node/session.py);
        None for a node without a session."""
        self.client = client
        self.manifest = manifest
        self.version = version  # the newest version fetched (applied or queued)
        self.lineage = lineage
        self.stop = stop
        self.pushes = pushes
        self._announced: tuple[int, str] | None = None  # the last push not yet acted on
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

    def announce(self, version: int, lineage: str) -> None:
        """The session says the server is at `version` of `lineage`: fetch it if it is new."""
        with self._cond:
            self._announced = (version, lineage)
            self._cond.notify_all()

    def wake(self) -> None:
        """The session came up or went down: switch between pushes and long polls."""
        with self._cond:
            self._cond.notify_all()

    def _wait_for_news(self) -> float:
        """With a session up, wait for a push of a version newer than ours (or for
        PUSH_FALLBACK_S); the seconds the next fetch may long-poll: none after a push, a full
        long poll without a session."""
        if self.pushes is None:
            return LONG_POLL_S
        deadline = time.monotonic() + PUSH_FALLBACK_S
        with self._cond:
            while self.pushes() and not self.stop():
                if self._announced is not None:
                    (version, lineage), self._announced = self._announced, None
                    if lineage != self.lineage or version > self.version:
                        return 0.0
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return 0.0
                self._cond.wait(min(remaining, 0.5))  # short: notice a stop in time
            return 0.0 if self.stop() else SESSION_DOWN_POLL_S

    def _push(self, item: Published) -> None:
        with self._cond:
            self._queue.append(item)
            self.version, self.lineage = item.version, item.lineage
            self._cond.notify_all()

    def _run(self) -> None:
        while not self.stop():
            try:
                wait = self._wait_for_news()
                if self.stop():
                    return
                chain = self.client.deltas(self.version, self.lineage, self.manifest, wait=wait)
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
