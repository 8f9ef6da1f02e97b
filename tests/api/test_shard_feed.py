"""The node's side of server-shared data (node/data.py) against the real app in-process:
ShardFeed leases, downloads, verifies, reads and hands on shards; ShardCache keeps them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from crowdtrain.node.client import CoordinatorClient, Refused
from crowdtrain.node.credentials import NodeLogin
from crowdtrain.node.data import MAX_CARRIES, ShardCache, ShardFeed
from crowdtrain.protocol.update import MAX_LEASES_PER_UPDATE

SERVER_SETTINGS = {"shard_tokens": 1024}
# the node's client passes per-request timeouts, which Starlette's TestClient ignores and flags
pytestmark = pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
BATCH = 3


@pytest.fixture
def make_feed(server, tmp_path):
    feeds: list[ShardFeed] = []
    stop = threading.Event()

    def make(name: str, cache_bytes: int = 1 << 30) -> ShardFeed:
        # a node identity of its own, registered through the real login path
        login = NodeLogin(tmp_path / "config", "http://testserver", name, server.enrollment_token())
        client = CoordinatorClient("http://testserver", login, should_stop=stop.is_set)
        client._http.close()
        # the real app, in-process, as this node. Uncompressed: Starlette's TestClient hands
        # back bodies without undoing Content-Encoding (real nodes get zstd; the e2e tests)
        client._http = TestClient(server.client.app, headers={"Accept-Encoding": "identity"})
        client.connect()
        block = server.runtime.config.block_size
        feed = ShardFeed(
            client, ShardCache(tmp_path / name, cache_bytes), BATCH, block, stop.is_set
        )
        feeds.append(feed)
        return feed

    yield make
    stop.set()
    for feed in feeds:
        feed.close()


def shard_tokens(server, lease: str) -> np.ndarray:
    """The token ids of the shard a lease is on, read from the server's files."""
    held = server.get("/data/epochs/0").json()["held"]
    index = next(h["shard"] for h in held if h["lease"] == lease)
    shard = next(s for s in server.runtime.leases.shards.values() if s.index == index)
    return np.fromfile(shard.path, dtype=server.runtime.train_data.dtype)


def test_batches_are_full_and_cover_a_shard_before_its_lease_is_handed_on(server, make_feed):
    feed = make_feed("reader")
    block = server.runtime.config.block_size
    x, y = feed.next()
    first = feed._reading
    tokens = shard_tokens(server, first)
    windows = (len(tokens) - 2) // block + 1  # windows of block + 1 tokens, stepping block
    rows = [x]
    while feed.shards_read == 0:
        assert feed.take_finished() == []
        x, y = feed.next()
        assert x.shape == y.shape == (BATCH, block)  # topped up across the shard boundary
        rows.append(x)
    assert feed.take_finished() == [first]
    inputs = np.concatenate([r.numpy() for r in rows])
    # the first shard's windows, in order, then the next shard's first rows fill the batch
    for i in range(windows - 1):
        assert np.array_equal(inputs[i], tokens[i * block : (i + 1) * block])
    assert len(inputs) >= windows and len(inputs) - windows < BATCH
    assert feed._reading is not None and feed._reading != first


def test_finished_leases_wait_for_an_accepted_update(server, make_feed):
    feed = make_feed("carrier")
    while feed.shards_read == 0:
        feed.next()
    finished = feed.take_finished()
    assert len(finished) == 1 and finished[0] in feed._held
    feed.give_back(finished)  # the update was refused: the next one carries the lease
    assert feed.take_finished() == finished
    feed.settled({finished[0]: "submitted"})  # accepted: no more renewing
    assert finished[0] not in feed._held
    assert (
        server.client.post(
            f"/api/v1/leases/{finished[0]}/renew", headers=feed.client.auth_headers()
        ).status_code
        == 200
    )  # still the node's until its update applies, but no longer renewed


def test_a_lost_lease_is_left_for_another_shard(server, make_feed):
    feed = make_feed("sleeper")
    feed.next()
    lost = feed._reading
    # the server lets it expire (the node seemed gone); the next renewal finds out
    server.client.delete(f"/api/v1/leases/{lost}", headers=feed.client.auth_headers())
    with feed._lock:
        feed._held[lost] = 0.0
    deadline = time.monotonic() + 10
    while lost not in feed._lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost in feed._lost
    feed.next()
    assert feed._reading != lost
    while feed.shards_read == 0:
        feed.next()
    assert lost not in feed.take_finished()


def test_a_shard_the_server_no_longer_serves_is_skipped(server, make_feed):
    feed = make_feed("unlucky")
    real = feed.client.shard
    calls = []

    def gone_once(shard_id: int) -> bytes:
        calls.append(shard_id)
        if len(calls) == 1:
            raise Refused(404, {"error": "unknown_shard", "detail": "gone"})
        return real(shard_id)

    feed.client.shard = gone_once
    x, _ = feed.next()
    assert x.shape[0] == BATCH and len(calls) == 2
    assert len(feed._lost) == 1 and feed._reading not in feed._lost


def test_a_corrupt_cached_shard_is_dropped_from_the_cache(server, make_feed, tmp_path):
    feed = make_feed("cacher")
    feed.next()
    (cached,) = list(feed.cache.directory.glob("*.bin"))
    sha = cached.stem
    assert feed.cache.get(sha) == cached
    cached.write_bytes(b"\0" * cached.stat().st_size)  # a flipped disk, a bad copy
    assert feed.cache.get(sha) is None and not cached.exists()


def test_the_cache_evicts_the_oldest_shards_past_its_size(tmp_path):
    cache = ShardCache(tmp_path, max_bytes=250)
    paths = []
    for i in range(4):
        paths.append(cache.put(f"{i:064x}", bytes([i]) * 100))
        time.sleep(0.01)  # distinct modification times
    kept = sorted(p.name for p in cache.directory.glob("*.bin"))
    assert kept == sorted(p.name for p in paths[2:])


def test_a_lease_refused_too_often_is_given_back(server, make_feed):
    feed = make_feed("refused")
    while feed.shards_read == 0:
        feed.next()
    (finished,) = feed.take_finished()
    for _ in range(MAX_CARRIES):
        feed.give_back([finished])
        assert feed.take_finished() == [finished]
    feed.give_back([finished])  # one refusal too many: the shard goes back to the pool
    assert feed.take_finished() == [] and finished in feed._lost
    leases = server.get("/data/epochs/0").json()["leases"]
    assert leases.get("returned", 0) >= 1


def test_an_update_carries_at_most_the_leases_the_server_takes(make_feed):
    feed = make_feed("hoarder")
    with feed._lock:
        feed._finished = [f"{i:032x}" for i in range(MAX_LEASES_PER_UPDATE + 6)]
    assert len(feed.take_finished()) == MAX_LEASES_PER_UPDATE
    assert feed.take_finished() == [
        f"{i:032x}" for i in range(MAX_LEASES_PER_UPDATE, MAX_LEASES_PER_UPDATE + 6)
    ]
