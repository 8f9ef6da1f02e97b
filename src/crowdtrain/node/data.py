"""Where a node's batches come from: shards leased from the server, or its own files.

`ShardFeed` leases a shard, downloads it (or takes it from the cache, verified by sha256),
reads it front to back, and renews the lease from a background thread while it works. The
lease of a shard whose last batch went into an update is handed to that update
(`take_finished`), which tells the server to count the shard as done once the update is
applied. A lease the server says is lost (it expired) is dropped: that shard is someone
else's now.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from crowdtrain.data.batches import SequentialBatches
from crowdtrain.files import write_atomic
from crowdtrain.node.client import CoordinatorClient, Refused, Stopped
from crowdtrain.protocol.update import MAX_LEASES_PER_UPDATE

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
MAX_CARRIES = 3  # new updates a finished lease is carried into after its first one is refused
DOWNLOAD_ATTEMPTS = 3  # downloads of a shard, in all, before a failed sha256 check stops the node


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crowdtrain"


class ShardCache:
    """Downloaded shards by sha256, at most `max_bytes` of them (the oldest go first)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory) / "shards"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.bin"

    def get(self, sha256: str) -> Path | None:
        """The cached file, if present and still intact. Other nodes may share the folder
        and evict it at any moment: a file that vanishes is simply not cached."""
        path = self.path(sha256)
        try:
            if _sha256_file(path) != sha256:
                log.warning("cached shard %s is corrupt; downloading it again", path.name)
                path.unlink(missing_ok=True)
                return None
            os.utime(path)  # recently used: evicted last
        except FileNotFoundError:
            return None
        return path

    def put(self, sha256: str, data: bytes) -> Path:
        path = self.path(sha256)
        write_atomic(path, data)
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        files = []
        for path in self.directory.glob("*.bin"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another node evicted it just now
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path != keep:
                total -= size
                path.unlink(missing_ok=True)


class ShardFeed:
    """Batches from leased shards, with the `next()` of a sampler."""

    def __init__(
        self,
        client: CoordinatorClient,
        cache: ShardCache,
        batch_size: int,
        block_size: int,
        should_stop: Callable[[], bool],
    ):
        self.client = client
        self.cache = cache
        self.batch_size = batch_size
        self.block_size = block_size
        self.should_stop = should_stop
        self._lock = threading.Lock()
        self._held: dict[str, float] = {}  # lease id -> when to renew it next
        self._lost: set[str] = set()
        self._finished: list[str] = []  # read to the end, not yet in an accepted update
        self._carries: dict[str, int] = {}  # refused updates each finished lease rode on
        self._reading: str | None = None
        self._reader: SequentialBatches | None = None
        self._pending: tuple[str, torch.Tensor, torch.Tensor] | None = None  # rows not yet used
        self.shards_read = 0
        self.waiting = False  # for a free shard (the node's session reports it)
        self._offered = threading.Event()  # the server's session said a shard was freed
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="leases", daemon=True)
        self._renewer.start()

    # ---- the sampler --------------------------------------------------------------------

    def next(self) -> Batch:
        """A full batch of `batch_size` rows; the rows of a shard's short last batch are
        topped up from the next shard, so every step weighs the same."""
        xs, ys, rows = [], [], 0
        while rows < self.batch_size:
            if self._pending is None or self._pending[0] in self._lost:
                self._pending = self._next_from_a_shard()
            lease, x, y = self._pending
            need = self.batch_size - rows
            xs.append(x[:need])
            ys.append(y[:need])
            rows += min(need, len(x))
            self._pending = None if len(x) <= need else (lease, x[need:], y[need:])
        if len(xs) == 1:
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)

    def _next_from_a_shard(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        """The next batch of the shard being read (and the lease it is read under)."""
        while True:
            if self._reader is not None and self._reading in self._lost:
                log.warning("lease %s was lost; leaving its shard", self._reading)
                self._reader = self._reading = None
            if self._reader is None:
                self._open_next()
            batch = self._reader.next()
            if batch is not None:
                return (self._reading, *batch)
            with self._lock:
                self._finished.append(self._reading)
            self.shards_read += 1
            self._reader = self._reading = None

    def _open_next(self) -> None:
        while True:
            self._offered.clear()  # an offer from now on wakes the wait below
            offer = self.client.lease()
            if offer["lease"] is None:
                self._wait(float(offer.get("retry_after_s") or 5.0))
                continue
            lease, shard = offer["lease"], offer["shard"]
            with self._lock:
                self._held[lease] = time.monotonic() + offer["ttl_s"] / 3
            try:
                tokens, mask = self._load(shard)
            except Refused as error:  # the server no longer serves it (it restarted on new data)
                log.warning(
                    "shard %s of lease %s is gone (%s); taking another", shard["id"], lease, error
                )
                with self._lock:
                    self._held.pop(lease, None)
                    self._lost.add(lease)
                continue
            break
        self._reading = lease
        self._reader = SequentialBatches(tokens, self.batch_size, self.block_size, mask=mask)

    def offer(self) -> None:
        """A shard went back to the server's pool: a node waiting for one asks at once."""
        self._offered.set()

    def _wait(self, seconds: float) -> None:
        log.info("no shard free right now; asking again in %.0f s", seconds)
        end = time.monotonic() + seconds
        self.waiting = True
        try:
            while time.monotonic() < end:
                if self.should_stop():
                    raise Stopped()
                if self._offered.wait(min(0.1, max(0.0, end - time.monotonic()))):
                    return
        finally:
            self.waiting = False

    def _load(self, shard: dict) -> tuple[np.ndarray, np.ndarray | None]:
        dtype = np.dtype(shard["dtype"]).newbyteorder("<")
        count = int(shard["tokens"])
        size = count * dtype.itemsize + (count if shard["masked"] else 0)
        path = self.cache.get(shard["sha256"])
        for attempt in range(DOWNLOAD_ATTEMPTS if path is None else 0):
            data = self.client.shard(shard["id"])
            if len(data) == size and hashlib.sha256(data).hexdigest() == shard["sha256"]:
                path = self.cache.put(shard["sha256"], data)
                break
            log.warning(
                "shard %s arrived corrupted (%d bytes, expected %d, or a wrong sha256); "
                "download %d of %d",
                shard["id"],
                len(data),
                size,
                attempt + 1,
                DOWNLOAD_ATTEMPTS,
            )
        if path is None:
            raise RuntimeError(
                f"shard {shard['id']} failed its sha256 check {DOWNLOAD_ATTEMPTS} times; "
                "something between this node and the server alters downloads"
            )
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
        mask = None
        if shard["masked"]:
            mask = np.memmap(path, dtype=np.uint8, mode="r", offset=count * dtype.itemsize)
        return tokens, mask

    # ---- what the update carries --------------------------------------------------------

    def take_finished(self) -> list[str]:
        """Leases whose shards were read to the end: they go into the next update (at most
        MAX_LEASES_PER_UPDATE; the rest wait for the one after)."""
        with self._lock:
            finished = self._finished[:MAX_LEASES_PER_UPDATE]
            self._finished = self._finished[MAX_LEASES_PER_UPDATE:]
            return finished

    def settled(self, answers: dict[str, str]) -> None:
        """The server's answer per lease of an accepted update: done with them either way
        ("submitted": it counts once its round is applied; otherwise the lease was lost)."""
        with self._lock:
            for lease, answer in answers.items():
                self._held.pop(lease, None)
                self._carries.pop(lease, None)
                if answer != "submitted":
                    log.warning("shard lease %s was not counted: %s", lease, answer)

    def give_back(self, leases: list[str]) -> None:
        """The update was refused: the next one carries these leases instead. After
        MAX_CARRIES refusals in a row a lease is given back to the server, so that a node whose
        updates never land does not keep a shard from its epoch."""
        with self._lock:
            carried, released = [], []
            for lease in leases:
                if lease in self._lost:
                    continue
                self._carries[lease] = self._carries.get(lease, 0) + 1
                (released if self._carries[lease] > MAX_CARRIES else carried).append(lease)
            for lease in released:
                self._held.pop(lease, None)
                self._lost.add(lease)
            self._finished = carried + self._finished
        for lease in released:
            log.warning(
                "lease %s: the updates finishing it were refused %d times; giving it back",
                lease,
                MAX_CARRIES + 1,
            )
            self.client.release(lease)

    def close(self) -> None:
        """Stop renewing; hand back the shard being read (finished ones just expire)."""
        self._stop.set()
        # joined, not left running: a daemon thread writing to stderr while the interpreter
        # shuts down aborts the process
        self._renewer.join(timeout=30)
        reading = self._reading
        if reading is not None and reading not in self._lost:
            self.client.release(reading)

    # ---- renewal ------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                due = [lease for lease, at in self._held.items() if at <= now]
            for lease in due:
                try:
                    expires_at = self.client.renew(lease)
                except Refused as error:
                    log.warning("lease %s: %s", lease, error)
                    with self._lock:
                        self._held.pop(lease, None)
                        self._lost.add(lease)
                        self._finished = [x for x in self._finished if x != lease]
                    continue
                except Stopped:
                    return
                except Exception:  # the server may be restarting; the next turn retries
                    log.exception("renewing lease %s failed", lease)
                    continue
                with self._lock:
                    if lease in self._held:
                        ttl = max(1.0, expires_at - time.time())
                        self._held[lease] = time.monotonic() + ttl / 3


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
