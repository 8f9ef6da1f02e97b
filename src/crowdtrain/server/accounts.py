"""Accounts: API tokens (admin, viewer), enrollment tokens, node identities, sequence numbers.

Secrets are random strings handed out once and stored only as their sha256 (they carry 256
bits of randomness, so a fast hash is enough). What every request checks (a token's role and
whether it was revoked, whether a node was banned) is cached in memory and changed only through
this class, so a revocation takes effect on the next request; a token created by another
process (`crowdtrain tokens create --data-dir`) is found in the database on first use.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from crowdtrain.db import Database
from crowdtrain.db.models import AccessToken, NodeAccount
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.audit import AuditLog
from crowdtrain.settings import NODE_NAME_MAX

log = logging.getLogger(__name__)

ROLES = ("admin", "node", "viewer")
TOKEN_PREFIX = {"admin": "ct_admin_", "viewer": "ct_view_", "node": "ct_enroll_"}
REFRESH_PREFIX = "ct_refresh_"
TOKEN_PATTERN = re.compile(r"^ct_[a-z]+_[A-Za-z0-9_-]{20,100}$")
SHOWN_CHARS = 14  # of a token, kept in clear to tell tokens apart in lists
USE_NOTED_EVERY_S = 60.0
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'7d' -> 604800.0; plain numbers are seconds. Units: s, m, h, d, w."""
    match = DURATION.match(text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a duration; write a positive number with an optional unit "
            "(s, m, h, d, w), for example 7d or 12h"
        )
    return float(match.group(1)) * UNIT_S[match.group(2)]


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass
class TokenInfo:
    id: int
    kind: str  # api | enroll
    role: str
    expires_at: float | None
    revoked: bool
    noted_at: float = 0.0  # when its last use was written to the database

    def problem(self, now: float) -> tuple[int, str, str] | None:
        """Why the token cannot be used now, as (status, code, message), or None."""
        if self.revoked:
            return 403, "token_revoked", "this token was revoked; ask the server's admin for one"
        if self.expires_at is not None and now >= self.expires_at:
            return 401, "token_expired", "this token has expired; ask the server's admin for one"
        return None


@dataclass
class NodeState:
    id: str
    name: str
    token_id: int | None
    revoked: bool
    last_seq: int
    last_update_id: str = ""
    saved_seq: int = 0  # what the database holds
    created_at: float = 0.0

    @property
    def registration(self) -> int:
        """What tells this registration from an earlier one under the same id (its time in
        ms): access tokens carry it."""
        return round(self.created_at * 1000)


def token_public(token: AccessToken, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    if token.revoked_at is not None:
        state = "revoked"
    elif token.expires_at is not None and now >= token.expires_at:
        state = "expired"
    elif token.max_uses is not None and token.uses >= token.max_uses:
        state = "used up"
    else:
        state = "active"
    return {
        "id": token.id,
        "prefix": token.prefix,
        "kind": token.kind,
        "role": token.role,
        "label": token.label,
        "uses": token.uses,
        "max_uses": token.max_uses,
        "created_at": token.created_at,
        "created_by": token.created_by,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
        "last_used_at": token.last_used_at,
        "state": state,
    }


def node_public(account: NodeAccount) -> dict[str, Any]:
    return {
        "node_id": account.id,
        "name": account.name,
        "token_id": account.token_id,
        "created_at": account.created_at,
        "last_seen_at": account.last_seen_at,
        "revoked_at": account.revoked_at,
        "revoked_reason": account.revoked_reason,
    }


class Accounts:
    def __init__(self, db: Database, audit: AuditLog):
        self.db = db
        self.audit = audit
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()
        self._tokens: dict[str, TokenInfo] = {}  # by hash: api tokens seen so far
        self._nodes: dict[str, NodeState] = {}
        self._listeners: list = []  # called with a node id when it is banned
        with db.session() as session:
            for account in session.scalars(select(NodeAccount)):
                self._nodes[account.id] = NodeState(
                    account.id,
                    account.name,
                    account.token_id,
                    account.revoked_at is not None,
                    account.last_seq,
                    saved_seq=account.last_seq,
                    created_at=account.created_at,
                )

    def on_ban(self, listener) -> None:
        self._listeners.append(listener)

    # ---- admin tokens at first start -------------------------------------------------

    def ensure_admin(self, given: str | None) -> str | None:
        """Make sure an admin can log in. With `given` (CROWDTRAIN_ADMIN_TOKEN) its hash is
        stored; otherwise, when no usable admin token exists, a new one is made and returned
        (the caller prints it once: only its hash is kept)."""
        now = time.time()
        with self.db.transaction() as session:
            if given is not None:
                if not TOKEN_PATTERN.match(given):
                    raise ValueError(
                        "CROWDTRAIN_ADMIN_TOKEN must look like ct_admin_ followed by at least 20 "
                        "letters, digits, '-' or '_'; `python -c \"import secrets; "
                        "print('ct_admin_' + secrets.token_urlsafe(32))\"` makes one"
                    )
                existing = session.scalar(
                    select(AccessToken).where(AccessToken.hash == digest(given))
                )
                if existing is None:
                    self._add_token(
                        session,
                        given,
                        "api",
                        "admin",
                        "from CROWDTRAIN_ADMIN_TOKEN",
                        None,
                        None,
                        "server",
                    )
                elif existing.role != "admin" or existing.revoked_at is not None:
                    raise ValueError(
                        "CROWDTRAIN_ADMIN_TOKEN names a token that is revoked or not an admin token"
                    )
                return None
            usable = session.scalar(
                select(AccessToken.id).where(
                    AccessToken.role == "admin",
                    AccessToken.revoked_at.is_(None),
                    (AccessToken.expires_at.is_(None)) | (AccessToken.expires_at > now),
                )
            )
            if usable is not None:
                return None
            secret = new_secret(TOKEN_PREFIX["admin"])
            self._add_token(
                session, secret, "api", "admin", "made at first start", None, None, "server"
            )
            return secret

    # ---- tokens ----------------------------------------------------------------------

    def create_token(
        self,
        role: str,
        actor: str,
        uses: int | None = None,
        expires_in_s: float | None = None,
        label: str = "",
        address: str = "",
    ) -> tuple[str, dict[str, Any]]:
        """A new token: for role `node` an enrollment token (good for `uses` registrations),
        else an API token. Returns the secret (shown once) and its public record."""
        if role not in ROLES:
            raise WireError(
                422, "bad_role", f"role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        kind = "enroll" if role == "node" else "api"
        if kind == "api" and uses is not None:
            raise WireError(422, "bad_uses", "uses counts registrations: only node tokens have it")
        expires_at = None if expires_in_s is None else time.time() + expires_in_s
        secret = new_secret(TOKEN_PREFIX[role])
        with self.db.transaction() as session:
            token = self._add_token(session, secret, kind, role, label, uses, expires_at, actor)
            session.flush()
            self.audit.add(
                session,
                actor,
                "token.create",
                f"token:{token.id}",
                {"role": role, "uses": uses, "expires_at": expires_at, "label": label},
                address,
            )
            public = token_public(token)
        return secret, public

    @staticmethod
    def _add_token(session, secret, kind, role, label, uses, expires_at, actor) -> AccessToken:
        token = AccessToken(
            hash=digest(secret),
            prefix=secret[:SHOWN_CHARS],
            kind=kind,
            role=role,
            label=label,
            uses=0,
            max_uses=uses,
            created_at=time.time(),
            created_by=actor,
            expires_at=expires_at,
        )
        session.add(token)
        return token

    def list_tokens(self) -> list[dict[str, Any]]:
        now = time.time()
        with self.db.session() as session:
            return [
                token_public(t, now)
                for t in session.scalars(select(AccessToken).order_by(AccessToken.id))
            ]

    def revoke_token(self, token_id: int, actor: str, address: str = "") -> dict[str, Any]:
        with self.db.transaction() as session:
            token = session.get(AccessToken, token_id)
            if token is None:
                raise WireError(
                    404, "no_such_token", f"there is no token {token_id}; see GET /api/v1/tokens"
                )
            if token.revoked_at is None:
                token.revoked_at = time.time()
                self.audit.add(
                    session,
                    actor,
                    "token.revoke",
                    f"token:{token_id}",
                    {"role": token.role},
                    address,
                )
            public = token_public(token)
            hash_ = token.hash
        with self._lock:  # replaced, not patched: a lookup racing this one cannot undo it
            self._tokens[hash_] = TokenInfo(
                public["id"], public["kind"], public["role"], public["expires_at"], True
            )
        return public

    def api_token(self, secret: str) -> TokenInfo | None:
        """The admin or viewer token with this secret, or None (unknown or an enrollment
        token)."""
        key = digest(secret)
        with self._lock:
            info = self._tokens.get(key)
        if info is None:
            with self.db.session() as session:
                token = session.scalar(select(AccessToken).where(AccessToken.hash == key))
                if token is None or token.kind != "api":
                    return None
                info = TokenInfo(
                    token.id, token.kind, token.role, token.expires_at, token.revoked_at is not None
                )
            with self._lock:
                info = self._tokens.setdefault(key, info)
        self._note_use(info)
        return info

    def _note_use(self, info: TokenInfo) -> None:
        """Keep `last_used_at` of an API token, written at most once a minute per token."""
        now = time.time()
        with self._lock:
            if now - info.noted_at < USE_NOTED_EVERY_S:
                return
            info.noted_at = now

        def write() -> None:  # off the request path: a busy database must not stall it
            try:
                with self.db.transaction() as session:
                    statement = update(AccessToken).where(AccessToken.id == info.id)
                    session.execute(statement.values(last_used_at=now))
            except SQLAlchemyError as error:
                log.warning("could not note the use of token %d: %s", info.id, error)

        threading.Thread(target=write, name="token-use", daemon=True).start()

    # ---- nodes -----------------------------------------------------------------------

    def register(self, secret: str, name: str, address: str = "") -> tuple[NodeState, str]:
        """Trade an enrollment token for a node identity; returns it and its refresh token."""
        now = time.time()
        # one registration at a time in this process (a name is checked, then taken), and the
        # use is counted by one conditional UPDATE, so parallel requests cannot overdraw it
        with self._register_lock, self.db.transaction() as session:
            token = session.scalar(select(AccessToken).where(AccessToken.hash == digest(secret)))
            if token is None or token.kind != "enroll":
                raise WireError(
                    401,
                    "bad_token",
                    "this is not an enrollment token of this server; ask its admin for one "
                    "(crowdtrain tokens create --role node)",
                )
            problem = TokenInfo(
                token.id, token.kind, token.role, token.expires_at, token.revoked_at is not None
            ).problem(now)
            if problem is not None:
                raise WireError(*problem)
            counted = session.execute(
                update(AccessToken)
                .where(
                    AccessToken.id == token.id,
                    AccessToken.revoked_at.is_(None),
                    AccessToken.max_uses.is_(None) | (AccessToken.uses < AccessToken.max_uses),
                )
                .values(uses=AccessToken.uses + 1, last_used_at=now)
            )
            if counted.rowcount != 1:
                raise WireError(
                    403,
                    "token_used_up",
                    f"this enrollment token was good for {token.max_uses} registrations and "
                    "all are used; ask the server's admin for a new one",
                )
            node_id = self._free_node_id(session, name)
            refresh = new_secret(REFRESH_PREFIX)
            session.add(
                NodeAccount(
                    id=node_id,
                    name=name,
                    token_id=token.id,
                    refresh_hash=digest(refresh),
                    created_at=now,
                    last_seen_at=now,
                    last_seq=0,
                )
            )
            self.audit.add(
                session,
                f"node:{node_id}",
                "node.register",
                f"node:{node_id}",
                {"token": token.id, "name": name},
                address,
            )
        state = NodeState(node_id, name, token.id, False, 0, created_at=now)
        with self._lock:
            self._nodes[node_id] = state
        return state, refresh

    def _free_node_id(self, session, name: str) -> str:
        if session.get(NodeAccount, name) is None:
            return name
        while True:
            candidate = f"{name[: NODE_NAME_MAX - 7]}-{secrets.token_hex(3)}"
            if session.get(NodeAccount, candidate) is None:
                return candidate

    def refresh(self, node_id: str, refresh_token: str, address: str = "") -> NodeState:
        """Check a node's refresh token (it buys a new access token); saves its sequence
        number so that the node can continue above it after a restart."""
        with self.db.transaction() as session:
            account = session.get(NodeAccount, node_id)
            if account is None or not secrets.compare_digest(
                account.refresh_hash, digest(refresh_token)
            ):
                raise WireError(
                    401,
                    "bad_token",
                    "unknown node or refresh token; register again with an enrollment token",
                )
            if account.revoked_at is not None:
                raise WireError(
                    403,
                    "node_revoked",
                    f"node {node_id} was banned "
                    f"({account.revoked_reason or 'no reason given'}); it cannot rejoin",
                )
            account.last_seen_at = time.time()
            state = self._nodes.get(node_id)
            if state is not None and state.last_seq > account.last_seq:
                account.last_seq = state.last_seq
            if state is not None:
                state.saved_seq = account.last_seq
        return self._nodes[node_id]

    def node(self, node_id: str) -> NodeState | None:
        return self._nodes.get(node_id)

    def list_nodes(self) -> list[dict[str, Any]]:
        with self.db.session() as session:
            return [
                node_public(a)
                for a in session.scalars(select(NodeAccount).order_by(NodeAccount.created_at))
            ]

    def ban(
        self,
        node_id: str,
        actor: str,
        reason: str = "",
        revoke_token: bool = True,
        address: str = "",
    ) -> dict[str, Any]:
        """Revoke a node's identity (and by default the enrollment token it registered with,
        so that it cannot come back as a new node)."""
        with self.db.transaction() as session:
            account = session.get(NodeAccount, node_id)
            if account is None:
                raise WireError(
                    404, "no_such_node", f"there is no node {node_id!r}; see GET /api/v1/nodes"
                )
            now = time.time()
            if account.revoked_at is None:
                account.revoked_at = now
                account.revoked_reason = reason[:200] or None
            token_id = account.token_id if revoke_token else None
            if token_id is not None:
                session.execute(
                    update(AccessToken)
                    .where(AccessToken.id == token_id, AccessToken.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
            self.audit.add(
                session,
                actor,
                "node.revoke",
                f"node:{node_id}",
                {"reason": reason, "token_revoked": token_id},
                address,
            )
            public = node_public(account)
        with self._lock:
            state = self._nodes.get(node_id)
            if state is not None:
                state.revoked = True
        for listener in self._listeners:
            listener(node_id)
        return public

    def check_seq(self, node_id: str, seq: int | None, update_id: str) -> None:
        """Refuse a submission whose sequence number is not above the node's last one (the
        same number again is allowed only for a resend of the same update)."""
        if seq is None:
            raise WireError(
                422,
                "bad_metadata",
                "an update must carry seq, the node's submission counter "
                "(upgrade crowdtrain on the node)",
            )
        with self._lock:
            state = self._nodes[node_id]
            if seq > state.last_seq:
                state.last_seq, state.last_update_id = seq, update_id
                return
            if seq == state.last_seq and update_id and update_id == state.last_update_id:
                return
            last = state.last_seq
        raise WireError(
            409,
            "replayed",
            f"sequence number {seq} is not above {last}, the last one this node used: "
            "a replayed or reordered submission",
            last_seq=last,
        )

    def save_sequences(self) -> None:
        """Write every node's sequence number that moved (at shutdown)."""
        with self._lock:
            moved = {s.id: s.last_seq for s in self._nodes.values() if s.last_seq != s.saved_seq}
        if not moved:
            return
        with self.db.transaction() as session:
            for node_id, seq in moved.items():
                session.execute(
                    update(NodeAccount).where(NodeAccount.id == node_id).values(last_seq=seq)
                )
        with self._lock:
            for node_id, seq in moved.items():
                self._nodes[node_id].saved_seq = seq
