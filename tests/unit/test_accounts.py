"""Accounts and the audit log against a real SQLite database: secrets stored only as hashes,
enrollment tokens that count, expire and are revoked, bans, sequence numbers, the first admin
token, and audit events written with the change or through the queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from crowdtrain.db import Database
from crowdtrain.db.models import AccessToken
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.accounts import SHOWN_CHARS, Accounts, digest, parse_duration
from crowdtrain.server.audit import AuditLog

ADMIN = "admin:1"  # the actor of the admin actions below
GIVEN_ADMIN = "ct_admin_" + "given" * 8


class Store:
    """One database in tmp_path with its audit log; `accounts()` is a server (re)starting."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.db = Database.in_directory(folder)
        self.audit = AuditLog(self.db)

    def accounts(self) -> Accounts:
        return Accounts(self.db, self.audit)

    def close(self) -> None:
        self.audit.close()
        self.db.close()


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    opened = Store(tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def accounts(store) -> Accounts:
    return store.accounts()


def refused(call, status: int, code: str) -> WireError:
    with pytest.raises(WireError) as caught:
        call()
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return caught.value


def new_token(accounts: Accounts, role: str, **options) -> tuple[str, int]:
    """A new token's secret and id."""
    secret, public = accounts.create_token(role, ADMIN, **options)
    return secret, public["id"]


def enrollment(accounts: Accounts, **options) -> tuple[str, int]:
    return new_token(accounts, "node", **options)


# ---- secrets ---------------------------------------------------------------------------


def test_secrets_are_stored_only_as_their_hashes(store, accounts):
    made_at_start = accounts.ensure_admin(None)
    viewer, _ = accounts.create_token("viewer", ADMIN)
    admin, _ = accounts.create_token("admin", ADMIN)
    node_token, _ = enrollment(accounts)
    _, refresh = accounts.register(node_token, "hashed-node")
    store.audit.flush()
    secrets = [made_at_start, viewer, admin, node_token, refresh]

    files = b"".join(p.read_bytes() for p in store.folder.rglob("*") if p.is_file())
    assert files, "the database files were not found"
    for secret in secrets:
        # a few leading characters are kept in clear to tell tokens apart; never the rest
        assert secret[SHOWN_CHARS:].encode() not in files, secret[:SHOWN_CHARS]
    with store.db.session() as session:
        hashes = set(session.scalars(select(AccessToken.hash)))
    assert {digest(s) for s in (made_at_start, viewer, admin, node_token)} <= hashes


def test_an_api_token_is_known_by_its_secret_only(accounts):
    viewer, public = accounts.create_token("viewer", ADMIN, label="dashboard")
    info = accounts.api_token(viewer)
    assert (info.id, info.role, info.problem(time.time())) == (public["id"], "viewer", None)
    assert accounts.api_token(viewer + "x") is None
    node_token, _ = enrollment(accounts)
    assert accounts.api_token(node_token) is None  # an enrollment token is no API token


def test_a_token_made_by_another_process_is_found_on_first_use(store, accounts):
    other = store.accounts()  # e.g. `crowdtrain tokens create --data-dir` while serving
    secret, _ = other.create_token("admin", ADMIN)
    assert accounts.api_token(secret).role == "admin"


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604800), ("12h", 43200), ("3600", 3600), ("0.5s", 0.5)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1s", "7y", "d", "1e3"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="for example 7d or 12h"):
        parse_duration(text)


def test_create_token_refuses_what_makes_no_sense(accounts):
    refused(lambda: accounts.create_token("root", ADMIN), 422, "bad_role")
    refused(lambda: accounts.create_token("viewer", ADMIN, uses=3), 422, "bad_uses")


# ---- enrollment tokens -----------------------------------------------------------------


def test_enrollment_uses_are_counted_and_run_out(accounts):
    token, token_id = enrollment(accounts, uses=2)
    first, _ = accounts.register(token, "counted-a")
    second, _ = accounts.register(token, "counted-b")
    assert (first.id, second.id, first.token_id) == ("counted-a", "counted-b", token_id)
    error = refused(lambda: accounts.register(token, "counted-c"), 403, "token_used_up")
    assert "2 registrations" in error.message
    listed = {t["id"]: t for t in accounts.list_tokens()}[token_id]
    assert (listed["uses"], listed["max_uses"], listed["state"]) == (2, 2, "used up")
    assert accounts.node("counted-c") is None


def test_an_expired_token_is_refused_with_401(accounts):
    token, _ = enrollment(accounts, expires_in_s=0.01)
    viewer, _ = accounts.create_token("viewer", ADMIN, expires_in_s=0.01)
    time.sleep(0.05)
    refused(lambda: accounts.register(token, "too-late"), 401, "token_expired")
    status, code, _ = accounts.api_token(viewer).problem(time.time())
    assert (status, code) == (401, "token_expired")
    assert {t["state"] for t in accounts.list_tokens()} == {"expired"}


def test_a_revoked_token_is_refused_now_and_after_a_restart(store, accounts):
    viewer, viewer_id = new_token(accounts, "viewer")
    assert accounts.api_token(viewer).problem(time.time()) is None  # now cached
    node_token, node_token_id = enrollment(accounts)
    for token_id in (viewer_id, node_token_id):
        assert accounts.revoke_token(token_id, ADMIN)["state"] == "revoked"
    assert accounts.api_token(viewer).problem(time.time())[:2] == (403, "token_revoked")
    refused(lambda: accounts.register(node_token, "after-revoke"), 403, "token_revoked")
    restarted = store.accounts()
    assert restarted.api_token(viewer).problem(time.time())[:2] == (403, "token_revoked")
    refused(lambda: accounts.revoke_token(10_000, ADMIN), 404, "no_such_token")


def test_an_unknown_secret_cannot_register(accounts):
    viewer, _ = accounts.create_token("viewer", ADMIN)
    for secret in ("ct_enroll_" + "x" * 40, viewer):
        refused(lambda secret=secret: accounts.register(secret, "stranger"), 401, "bad_token")


def test_a_taken_name_gets_a_suffix(accounts):
    token, _ = enrollment(accounts)
    first, _ = accounts.register(token, "twin")
    second, _ = accounts.register(token, "twin")
    assert first.id == "twin" and second.id.startswith("twin-") and second.name == "twin"


def test_refresh_needs_the_nodes_own_refresh_token(accounts):
    token, _ = enrollment(accounts)
    state, refresh = accounts.register(token, "refresher")
    assert accounts.refresh("refresher", refresh).id == state.id
    refused(lambda: accounts.refresh("refresher", refresh + "x"), 401, "bad_token")
    refused(lambda: accounts.refresh("nobody", refresh), 401, "bad_token")


# ---- bans ------------------------------------------------------------------------------


def test_a_ban_revokes_the_node_and_by_default_its_enrollment_token(accounts):
    banned_ids = []
    accounts.on_ban(banned_ids.append)
    token, token_id = enrollment(accounts)
    _, refresh = accounts.register(token, "to-ban")
    public = accounts.ban("to-ban", ADMIN, reason="sent garbage")
    assert public["revoked_reason"] == "sent garbage" and public["revoked_at"] is not None
    assert accounts.node("to-ban").revoked and banned_ids == ["to-ban"]
    refused(lambda: accounts.refresh("to-ban", refresh), 403, "node_revoked")
    refused(lambda: accounts.register(token, "to-ban-again"), 403, "token_revoked")
    assert {t["id"]: t for t in accounts.list_tokens()}[token_id]["state"] == "revoked"
    refused(lambda: accounts.ban("nobody", ADMIN), 404, "no_such_node")


def test_a_ban_can_leave_the_enrollment_token_working(accounts):
    token, _ = enrollment(accounts)
    accounts.register(token, "banned-alone")
    accounts.ban("banned-alone", ADMIN, revoke_token=False)
    assert accounts.register(token, "still-welcome")[0].id == "still-welcome"


def test_a_ban_survives_a_restart(store, accounts):
    token, _ = enrollment(accounts)
    accounts.register(token, "stays-banned")
    accounts.ban("stays-banned", ADMIN)
    assert store.accounts().node("stays-banned").revoked


# ---- sequence numbers ------------------------------------------------------------------


def test_check_seq_accepts_increasing_numbers_and_resends_only(accounts):
    token, _ = enrollment(accounts)
    accounts.register(token, "counter")
    refused(lambda: accounts.check_seq("counter", None, "u0"), 422, "bad_metadata")
    accounts.check_seq("counter", 1, "u1")
    accounts.check_seq("counter", 5, "u5")  # gaps are fine: a node may drop updates
    accounts.check_seq("counter", 5, "u5")  # the same update again: a resend
    error = refused(lambda: accounts.check_seq("counter", 5, "other"), 409, "replayed")
    assert error.extra == {"last_seq": 5}
    refused(lambda: accounts.check_seq("counter", 5, ""), 409, "replayed")  # no id: no resend
    refused(lambda: accounts.check_seq("counter", 4, "u4"), 409, "replayed")
    accounts.check_seq("counter", 6, "u6")
    assert accounts.node("counter").last_seq == 6


def test_sequences_are_saved_for_the_next_start(store, accounts):
    token, _ = enrollment(accounts)
    accounts.register(token, "saved-a")
    accounts.register(token, "saved-b")
    accounts.check_seq("saved-a", 7, "u7")
    assert store.accounts().node("saved-a").last_seq == 0  # kept in memory until saved
    accounts.save_sequences()
    restarted = store.accounts()
    assert (restarted.node("saved-a").last_seq, restarted.node("saved-b").last_seq) == (7, 0)
    refused(lambda: restarted.check_seq("saved-a", 7, "replayed"), 409, "replayed")


def test_a_refresh_saves_the_nodes_sequence_number(store, accounts):
    token, _ = enrollment(accounts)
    _, refresh = accounts.register(token, "refreshed")
    accounts.check_seq("refreshed", 3, "u3")
    assert accounts.refresh("refreshed", refresh).last_seq == 3
    assert store.accounts().node("refreshed").last_seq == 3


# ---- the admin token at first start ------------------------------------------------------


def admin_tokens(store: Store) -> list[AccessToken]:
    with store.db.session() as session:
        return list(session.scalars(select(AccessToken).where(AccessToken.role == "admin")))


def test_a_given_admin_token_is_stored_as_its_hash(store, accounts):
    assert accounts.ensure_admin(GIVEN_ADMIN) is None
    assert store.accounts().ensure_admin(GIVEN_ADMIN) is None  # the second start adds nothing
    (stored,) = admin_tokens(store)
    assert stored.hash == digest(GIVEN_ADMIN) and GIVEN_ADMIN[SHOWN_CHARS:] not in stored.prefix
    assert accounts.api_token(GIVEN_ADMIN).role == "admin"


def test_without_a_given_token_one_is_made_at_the_first_start_only(store, accounts):
    made = accounts.ensure_admin(None)
    assert made.startswith("ct_admin_") and accounts.api_token(made).role == "admin"
    assert store.accounts().ensure_admin(None) is None
    assert len(admin_tokens(store)) == 1
    accounts.revoke_token(admin_tokens(store)[0].id, ADMIN)
    again = store.accounts().ensure_admin(None)  # no usable admin token is left: a new one
    assert again is not None and again != made


@pytest.mark.parametrize("given", ["secret", "ct_admin_short", "ct_admin_" + "é" * 30])
def test_a_malformed_given_admin_token_is_a_clear_error(accounts, given):
    with pytest.raises(ValueError, match="CROWDTRAIN_ADMIN_TOKEN must look like ct_admin_"):
        accounts.ensure_admin(given)


def test_a_given_token_that_is_revoked_or_no_admin_token_is_refused(accounts):
    viewer, _ = accounts.create_token("viewer", ADMIN)
    admin, admin_id = new_token(accounts, "admin")
    accounts.revoke_token(admin_id, ADMIN)
    for given in (viewer, admin):
        with pytest.raises(ValueError, match="revoked or not an admin token"):
            accounts.ensure_admin(given)


# ---- the audit log ---------------------------------------------------------------------


def test_admin_actions_are_audited_in_their_own_transaction(store, accounts):
    _, public = accounts.create_token("viewer", ADMIN, label="ops", address="10.0.0.1")
    token, _ = enrollment(accounts)
    accounts.register(token, "audited", address="10.0.0.2")
    accounts.ban("audited", ADMIN, reason="test")
    accounts.revoke_token(public["id"], ADMIN)
    # written with the change: in the database before any flush of the queue
    events = store.audit.query()
    assert [e["action"] for e in events] == [
        "token.revoke",
        "node.revoke",
        "node.register",
        "token.create",
        "token.create",
    ]
    created = events[-1]
    assert (created["actor"], created["target"], created["address"]) == (
        ADMIN,
        f"token:{public['id']}",
        "10.0.0.1",
    )
    assert created["detail"]["label"] == "ops" and created["detail"]["role"] == "viewer"
    assert events[2]["actor"] == "node:audited" and events[2]["address"] == "10.0.0.2"


def test_a_token_never_exists_without_its_audit_event(store, accounts, monkeypatch):
    def failing_add(*args, **kwargs):
        raise RuntimeError("the audit event cannot be written")

    monkeypatch.setattr(store.audit, "add", failing_add)
    with pytest.raises(RuntimeError):
        accounts.create_token("admin", ADMIN)
    assert accounts.list_tokens() == []  # the transaction was rolled back


def test_recorded_events_are_written_by_the_queue(store):
    for n in range(5):
        store.audit.record("anonymous", "auth.refused", f"/path/{n}", {"reason": "bad_token"})
    store.audit.record("node:x", "update.refused", "node:x", {"reason": "replayed"}, "10.0.0.3")
    store.audit.flush()
    events = store.audit.query()
    assert len(events) == 6 and events[0]["action"] == "update.refused"
    assert events[0]["detail"] == {"reason": "replayed"} and events[0]["address"] == "10.0.0.3"
    assert [e["target"] for e in events[1:]] == [f"/path/{n}" for n in reversed(range(5))]


def test_query_pages_back_and_filters(store):
    for n in range(7):
        store.audit.record("admin:1" if n % 2 else "anonymous", f"action.{n % 3}", str(n))
    store.audit.flush()
    newest = store.audit.query(limit=3)
    older = store.audit.query(limit=3, before=newest[-1]["id"])
    oldest = store.audit.query(limit=3, before=older[-1]["id"])
    pages = [e["target"] for e in newest + older + oldest]
    assert pages == [str(n) for n in reversed(range(7))]
    assert [e["target"] for e in store.audit.query(action="action.0")] == ["6", "3", "0"]
    assert [e["target"] for e in store.audit.query(actor="admin:1")] == ["5", "3", "1"]
    assert store.audit.query(before=1) == []
