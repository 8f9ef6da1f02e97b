"""Shard leases and the epoch ledger, driven by a fake clock: issue, renew, expiry, the
hold / applied / unhold cycle around an update, epoch closing and restarts."""

from __future__ import annotations

import pytest

from crowdtrain.data.leases import LOOKAHEAD, LeaseBook, LeaseError
from crowdtrain.data.shards import TokenizationInfo
from crowdtrain.data.store import DataStore
from crowdtrain.model.tokenizer import Tokenizer

TTL_S = 60.0
DOCUMENTS = [f"Lease test document {i}: a node trains on one shard at a time." for i in range(24)]


class FakeClock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(DOCUMENTS, vocab_size=300)


def tokenization(data_dir, tokenizer) -> tuple[DataStore, TokenizationInfo]:
    store = DataStore(data_dir)
    store.import_documents("docs", "train", DOCUMENTS, label="test")
    info = store.tokenized("docs", "train", tokenizer, shard_tokens=48)
    assert len(info.shards) >= 6
    return store, info


@pytest.fixture
def setup(tmp_path, tokenizer):
    store, info = tokenization(tmp_path / "data", tokenizer)
    yield store, info
    store.db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def book(setup, clock) -> LeaseBook:
    store, info = setup
    return LeaseBook(store.db, info, ttl_s=TTL_S, clock=clock)


def lease_error(call, *args) -> LeaseError:
    with pytest.raises(LeaseError) as caught:
        call(*args)
    return caught.value


def complete(book: LeaseBook, grant, node: str, update_id: str, version: int) -> None:
    assert book.hold([grant.id], node, update_id) == {grant.id: "submitted"}
    assert book.applied([update_id], version) == 1


# ---------------------------------------------------------------------------------- issuing


def test_a_node_holds_at_most_max_per_node_active_leases(setup, clock):
    store, info = setup
    book = LeaseBook(store.db, info, ttl_s=TTL_S, clock=clock, max_per_node=2)
    first, second = book.acquire("greedy"), book.acquire("greedy")
    error = lease_error(book.acquire, "greedy")
    assert (error.status, error.code) == (429, "too_many_leases")
    assert "max_leases_per_node" in error.message
    assert book.acquire("other") is not None  # the cap is per node
    # a submitted lease no longer counts: the node may take the next shard
    assert book.hold([first.id], "greedy", "u1") == {first.id: "submitted"}
    assert book.acquire("greedy") is not None
    book.release(second.id, "greedy")
    assert book.acquire("greedy") is not None


def test_acquire_hands_out_every_shard_once_per_epoch_then_runs_ahead(setup, clock):
    store, info = setup
    book = LeaseBook(store.db, info, ttl_s=TTL_S, lookahead=2, clock=clock)
    shard_ids = {s.id for s in info.shards}
    count = len(shard_ids)

    grants = [book.acquire(f"node-{i % 3}") for i in range(2 * count)]

    assert all(grant is not None for grant in grants)
    first, second = grants[:count], grants[count:]
    assert [g.epoch for g in first] == [0] * count
    assert {g.shard.id for g in first} == shard_ids
    assert [g.epoch for g in second] == [1] * count  # the next epoch starts early
    assert {g.shard.id for g in second} == shard_ids
    assert len({g.id for g in grants}) == 2 * count
    assert all(g.expires_at == clock.now + TTL_S and g.ttl_s == TTL_S for g in grants)
    assert book.acquire("node-9") is None
    status = book.status()
    assert (status["epoch"], status["active_leases"], status["shards"]) == (0, 2 * count, count)
    assert status["tokens"] == info.tokens


def test_lookahead_one_waits_for_the_current_epoch(setup, clock):
    store, info = setup
    book = LeaseBook(store.db, info, ttl_s=TTL_S, lookahead=1, clock=clock)
    grants = [book.acquire("node-a") for _ in info.shards]
    assert {g.epoch for g in grants} == {0}
    assert book.acquire("node-a") is None


def test_shard_order_is_fixed_by_the_seed_and_differs_between_epochs(tmp_path, tokenizer):
    def issue_order(directory, seed: int) -> list[list[int]]:
        store, info = tokenization(tmp_path / directory, tokenizer)
        book = LeaseBook(store.db, info, ttl_s=TTL_S, seed=seed, clock=FakeClock())
        order = [book.acquire("node-a").shard.index for _ in range(2 * len(info.shards))]
        store.db.close()
        count = len(info.shards)
        return [order[:count], order[count:]]

    epoch_0, epoch_1 = issue_order("a", seed=0)
    assert sorted(epoch_0) == sorted(epoch_1) == list(range(len(epoch_0)))
    assert epoch_0 != epoch_1
    assert issue_order("b", seed=0) == [epoch_0, epoch_1]
    assert issue_order("c", seed=1) != [epoch_0, epoch_1]


def test_a_book_needs_shards():
    empty = TokenizationInfo(1, "docs", "train", "v", 48, 1, 0, 0, "uint16", False, ())
    with pytest.raises(ValueError, match="docs/train has no shards"):
        LeaseBook(None, empty, ttl_s=TTL_S)


# ---------------------------------------------------------------------------- renew, expiry


def test_renew_pushes_the_expiry_out(book, clock):
    grant = book.acquire("node-a")
    clock.advance(TTL_S - 1)
    assert book.renew(grant.id, "node-a") == clock.now + TTL_S
    clock.advance(TTL_S - 1)  # past the first expiry, within the renewed one
    assert book.renew(grant.id, "node-a") == clock.now + TTL_S
    assert book.status()["active_leases"] == 1


def test_an_expired_lease_is_lost_and_its_shard_issued_again(book, clock):
    grant = book.acquire("node-a")
    clock.advance(TTL_S + 1)

    error = lease_error(book.renew, grant.id, "node-a")
    assert (error.status, error.code) == (409, "lease_lost")
    assert f"lease {grant.id} is expired" in error.message
    assert book.status()["active_leases"] == 0

    again = book.acquire("node-b")
    assert (again.shard.id, again.epoch) == (grant.shard.id, 0)
    assert again.id != grant.id
    assert book.coverage(0)["leases"] == {"expired": 1, "active": 1}


def test_another_nodes_lease_is_forbidden_and_an_unknown_one_not_found(book):
    grant = book.acquire("node-a")

    for call in (book.renew, book.release):
        error = lease_error(call, grant.id, "node-b")
        assert (error.status, error.code) == (403, "not_your_lease")
        error = lease_error(call, "0" * 32, "node-a")
        assert (error.status, error.code) == (404, "unknown_lease")
    assert book.hold([grant.id, "f" * 32], "node-b", "update-1") == {
        grant.id: "not_your_lease",
        "f" * 32: "unknown_lease",
    }
    # none of that touched node-a's lease
    assert book.renew(grant.id, "node-a") > 0
    assert book.coverage(0)["leases"] == {"active": 1}


def test_release_returns_the_shard_to_the_pool(book):
    grant = book.acquire("node-a")
    book.release(grant.id, "node-a")
    assert lease_error(book.renew, grant.id, "node-a").code == "lease_lost"
    assert book.acquire("node-b").shard.id == grant.shard.id
    book.release(grant.id, "node-a")  # releasing twice is harmless
    assert book.coverage(0)["leases"] == {"returned": 1, "active": 1}


# ------------------------------------------------------------------- hold, applied, unhold


def test_hold_then_applied_enters_the_ledger(book, setup, clock):
    _, info = setup
    grant = book.acquire("node-a")

    assert book.hold([grant.id], "node-a", "update-1") == {grant.id: "submitted"}
    assert book.hold([grant.id], "node-a", "update-1") == {grant.id: "submitted"}  # a resend
    assert book.hold([grant.id], "node-a", "update-2") == {grant.id: "lease_submitted"}
    assert book.status()["active_leases"] == 1  # submitted still holds the shard
    clock.advance(5)
    assert book.applied(["update-1"], version=7) == 1

    coverage = book.coverage(0)
    assert coverage["ledger"] == [
        {
            "shard": grant.shard.index,
            "lease": grant.id,
            "node": "node-a",
            "update_id": "update-1",
            "version": 7,
            "completed_at": clock.now,
        }
    ]
    assert coverage["completed"] == 1
    assert coverage["missing"] == sorted(s.index for s in info.shards if s.id != grant.shard.id)
    assert coverage["duplicates"] == []
    assert coverage["completed_at"] is None
    assert book.applied(["update-1"], version=8) == 0  # applying again counts nothing
    # the same update resent after its round applied: told it counted, counted once
    assert book.hold([grant.id], "node-a", "update-1") == {grant.id: "submitted"}
    assert book.hold([grant.id], "node-a", "update-3") == {grant.id: "lease_completed"}
    assert book.applied(["update-1"], version=9) == 0
    assert len(book.coverage(0)["ledger"]) == 1
    assert lease_error(book.renew, grant.id, "node-a").code == "lease_lost"
    status = book.status()
    assert (status["epoch_completed_shards"], status["active_leases"]) == (1, 0)


def test_unhold_gives_the_lease_back_to_its_node(book, clock):
    grant = book.acquire("node-a")
    book.hold([grant.id], "node-a", "update-1")
    clock.advance(10)

    book.unhold("update-1")

    assert book.renew(grant.id, "node-a") == clock.now + TTL_S
    assert book.applied(["update-1"], version=1) == 0
    coverage = book.coverage(0)
    assert (coverage["completed"], coverage["ledger"]) == (0, [])
    assert coverage["leases"] == {"active": 1}


def test_hold_of_an_expired_lease_never_completes_it(book, clock):
    grant = book.acquire("node-a")
    clock.advance(TTL_S + 1)

    assert book.hold([grant.id], "node-a", "update-1") == {grant.id: "lease_expired"}
    assert book.applied(["update-1"], version=1) == 0
    assert book.coverage(0)["completed"] == 0
    assert book.acquire("node-b").shard.id == grant.shard.id


def test_completing_every_shard_closes_the_epoch(book, setup, clock):
    _, info = setup
    count = len(info.shards)
    grants = [book.acquire(f"node-{i % 2}") for i in range(count)]
    ahead = book.acquire("node-a")  # a node runs ahead while epoch 0 waits for its last shards
    assert ahead.epoch == 1
    for number, grant in enumerate(grants):
        assert book.status()["epoch"] == 0
        complete(book, grant, f"node-{number % 2}", f"update-{number}", version=number + 1)

    status = book.status()
    assert (status["epoch"], status["completed_epochs"], status["epoch_completed_shards"]) == (
        1,
        1,
        0,
    )
    coverage = book.coverage(0)
    assert (coverage["completed"], coverage["missing"], coverage["duplicates"]) == (count, [], [])
    assert sorted(row["shard"] for row in coverage["ledger"]) == list(range(count))
    assert [row["version"] for row in coverage["ledger"]] == list(range(1, count + 1))
    assert coverage["completed_at"] == clock.now
    assert coverage["leases"] == {"completed": count}
    # epoch 1 is now the current one; the next ones start early as its shards are all held
    epochs = [book.acquire("node-b").epoch for _ in range(2 * count)]
    assert epochs == [1] * (count - 1) + [2] * count + [3]
    with pytest.raises(LeaseError, match="epoch 4 has not started"):
        book.coverage(4)


def test_status_shows_the_next_epoch_once_one_closes_without_run_ahead(book, setup):
    _, info = setup
    for number in range(len(info.shards)):
        complete(book, book.acquire("node-a"), "node-a", f"update-{number}", version=number + 1)

    status = book.status()
    assert status["completed_epochs"] == 1
    assert (status["epoch"], status["epoch_completed_shards"]) == (1, 0)


# ---------------------------------------------------------------------------------- restart


def test_a_restart_returns_submitted_leases_to_the_pool(book, setup, clock):
    store, info = setup
    submitted = book.acquire("node-a")
    working = book.acquire("node-b")
    book.hold([submitted.id], "node-a", "update-1")

    restarted = LeaseBook(store.db, info, ttl_s=TTL_S, clock=clock)

    error = lease_error(restarted.renew, submitted.id, "node-a")
    assert (error.status, error.code) == (409, "lease_lost")
    assert "is returned" in error.message
    assert restarted.applied(["update-1"], version=1) == 0
    assert restarted.renew(working.id, "node-b") == clock.now + TTL_S  # active ones survive
    again = restarted.acquire("node-c")
    assert (again.shard.id, again.epoch) == (submitted.shard.id, 0)
    assert restarted.coverage(0)["leases"] == {"returned": 1, "active": 2}


def test_a_resume_from_an_older_version_voids_later_completions(book, setup, clock):
    _, info = setup
    grants = [book.acquire("node-a") for _ in info.shards]
    for version, grant in enumerate(grants, start=1):
        complete(book, grant, "node-a", f"update-{version}", version)
    assert book.coverage(0)["completed_at"] is not None

    # the server resumed from a checkpoint at version 2: versions 3.. are gone from the weights
    assert book.rollback_after(2) == len(grants) - 2
    coverage = book.coverage(0)
    assert coverage["completed_at"] is None
    assert sorted(e["version"] for e in coverage["ledger"]) == [1, 2]
    voided = sorted(g.shard.index for g in grants[2:])
    assert coverage["missing"] == voided
    assert book.status()["epoch"] == 0
    reissued = {book.acquire("node-b").shard.index for _ in voided}
    assert reissued == set(voided)  # owed again, in the same epoch
    assert book.rollback_after(2) == 0


def test_by_default_nodes_run_ahead_rather_than_wait_on_held_shards(book, setup):
    """Nodes holding finished shards until their next update must not stall each other: with
    every shard of an epoch held, the next epoch opens, up to LOOKAHEAD of them."""
    _, info = setup
    count = len(info.shards)
    grants = [book.acquire(f"node-{i}") for i in range(LOOKAHEAD * count)]
    assert [g.epoch for g in grants] == [e for e in range(LOOKAHEAD) for _ in range(count)]
    assert book.acquire("node-late") is None  # the cap: a node that holds this much is broken
    book.release(grants[0].id, "node-0")
    again = book.acquire("node-late")  # the shard given back, in the oldest epoch
    assert (again.epoch, again.shard.id) == (0, grants[0].shard.id)


def test_one_shard_at_a_time_through_a_whole_epoch_then_the_next(setup, clock):
    """Lease, finish and apply one shard before the next lease: epoch 0 closes and epoch 1
    opens (a book must not re-create epoch 0 then)."""
    store, info = setup
    book = LeaseBook(store.db, info, ttl_s=TTL_S, lookahead=1, clock=clock)
    for number in range(len(info.shards)):
        grant = book.acquire("node-a")
        assert grant.epoch == 0
        complete(book, grant, "node-a", f"update-{number}", number + 1)
    assert book.coverage(0)["completed_at"] is not None
    assert book.acquire("node-a").epoch == 1


def test_a_resend_never_submits_leases_the_first_sending_did_not(book):
    mine, other = book.acquire("node-a"), book.acquire("node-a")
    assert book.hold([mine.id], "node-a", "update-1") == {mine.id: "submitted"}
    # the same update id again (a resend, or another node reusing a published id)
    answers = book.hold([mine.id, other.id], "node-a", "update-1", resend=True)
    assert answers == {mine.id: "submitted", other.id: "not_in_update"}
    assert book.applied(["update-1"], version=3) == 1
    assert book.renew(other.id, "node-a") > 0  # still active: it was never submitted
