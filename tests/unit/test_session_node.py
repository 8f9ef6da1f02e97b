"""The node's side of its session, without a server: the Follower fetches on pushes (and polls
without them), a lease offer ends a wait for a shard, and pushes reach the node's parts."""

from __future__ import annotations

import threading
import time

import pytest

from crowdtrain.node.client import DeltaChain
from crowdtrain.node.data import ShardCache, ShardFeed
from crowdtrain.node.follower import LONG_POLL_S, SESSION_DOWN_POLL_S, Follower
from crowdtrain.node.session import NodeSession, SessionBridge
from crowdtrain.protocol.session import (
    DensityBudget,
    LeaseOffer,
    RoundDeadline,
    SessionError,
    Shutdown,
    VersionPublished,
)


class FakeClient:
    """Records each deltas() call's wait; answers 'nothing newer' at once."""

    base_url = "http://127.0.0.1:9"
    verify = True

    def __init__(self):
        self.waits: list[float] = []
        self.called = threading.Event()

    def deltas(self, since, lineage, manifest, wait=0.0):
        self.waits.append(wait)
        self.called.set()
        time.sleep(0.02)
        return DeltaChain([])


@pytest.fixture
def follow():
    followers = []
    stop = threading.Event()

    def make(pushes):
        client = FakeClient()
        follower = Follower(client, None, 5, "lineage-a", stop.is_set, pushes=pushes)
        followers.append(follower)
        follower.start()
        return follower, client

    yield make
    stop.set()
    for follower in followers:
        follower.wake()
        follower.join(5)


def test_without_a_session_the_follower_long_polls(follow):
    _, client = follow(None)
    assert client.called.wait(5)
    assert client.waits[0] == LONG_POLL_S


def test_with_a_session_up_the_follower_fetches_on_pushes_only(follow):
    up = threading.Event()
    up.set()
    follower, client = follow(up.is_set)
    time.sleep(0.3)
    assert client.waits == []  # nothing announced: no request
    follower.announce(5, "lineage-a")  # not newer: still none
    time.sleep(0.3)
    assert client.waits == []
    follower.announce(6, "lineage-a")
    assert client.called.wait(5)
    assert client.waits == [0.0]  # fetched at once, no long poll
    client.called.clear()
    follower.announce(5, "lineage-b")  # another lineage (the server restarted): fetch
    assert client.called.wait(5)
    assert client.waits == [0.0, 0.0]


def test_while_the_session_is_down_the_follower_polls_briefly(follow):
    up = threading.Event()
    up.set()
    follower, client = follow(up.is_set)
    time.sleep(0.2)
    up.clear()
    follower.wake()
    assert client.called.wait(5)
    assert client.waits[0] == SESSION_DOWN_POLL_S


def test_a_lease_offer_ends_the_wait_for_a_shard(tmp_path):
    feed = ShardFeed(FakeClient(), ShardCache(tmp_path, 1 << 20), 2, 8, lambda: False)
    try:
        waited = threading.Thread(target=feed._wait, args=(30.0,))
        started = time.monotonic()
        waited.start()
        time.sleep(0.2)
        assert feed.waiting
        feed.offer()
        waited.join(5)
        assert not waited.is_alive() and time.monotonic() - started < 5
        assert not feed.waiting
    finally:
        feed.close()


class Recorder(SessionBridge):
    def __init__(self):
        self.calls: list[tuple] = []

    def on_version(self, version, lineage):
        self.calls.append(("version", version, lineage))

    def on_density(self, max_density):
        self.calls.append(("density", max_density))

    def on_lease_offer(self):
        self.calls.append(("lease_offer",))

    def on_revoked(self, detail):
        self.calls.append(("revoked", detail))


def test_pushes_reach_the_bridge():
    bridge = Recorder()
    session = NodeSession(FakeClient(), bridge, max_backoff_s=30.0)
    session._dispatch(VersionPublished(version=7, lineage="l"))
    session._dispatch(DensityBudget(max_density=0.1))
    session._dispatch(LeaseOffer(free=1))
    session._dispatch(RoundDeadline(version=8, closes_in_s=4.0))
    assert bridge.calls == [("version", 7, "l"), ("density", 0.1), ("lease_offer",)]
    assert session.round[0] == 8


def test_how_a_session_ends_sets_the_next_wait():
    bridge = Recorder()
    session = NodeSession(FakeClient(), bridge, max_backoff_s=30.0)
    wait = session._on_end(Shutdown(reason="restart", retry_after_s=4.0))
    assert 4.0 <= wait <= 6.0
    assert session._on_end(SessionError(code="session_replaced", detail="")) == 30.0
    assert session._on_end(SessionError(code="heartbeat_timeout", detail="")) is None
    assert bridge.calls == []
    assert session._on_end(SessionError(code="node_revoked", detail="banned")) == 0.0
    assert bridge.calls == [("revoked", "banned")]
    assert session._stop.is_set()  # a banned node does not reconnect
