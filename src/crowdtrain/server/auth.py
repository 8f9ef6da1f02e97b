"""Who is asking, and may they: bearer tokens, roles, and the access every route declares.

- Admins and viewers send an API token (`ct_admin_...`, `ct_view_...`) as `Authorization:
  Bearer`. It is looked up by its sha256.
- Nodes send a short-lived access JWT (HS256, PyJWT) that names the node; they get it at
  registration and renew it with their refresh token. The node identity of every request comes
  from this token, never from what the node writes in a payload.

Every route declares one access level with `Depends(ACCESS)`; tests/api/test_authorization.py
fails for a route that declares none.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import jwt
from fastapi import Depends
from starlette.requests import HTTPConnection  # a Request or a WebSocket (node sessions)

from crowdtrain.files import write_atomic
from crowdtrain.protocol.errors import WireError

log = logging.getLogger(__name__)

ISSUER = "crowdtrain"
AUDIENCE = "crowdtrain-node"
ALGORITHM = "HS256"
LEEWAY_S = 10
VERIFIED_CACHE = 10_000  # node access tokens remembered as checked (about 1 per node)


@dataclass(frozen=True)
class Principal:
    role: str  # admin, viewer, node, or "public" (no credentials, on a public route)
    subject: str  # the node id, or admin:ID / viewer:ID for API tokens
    token_id: int | None = None

    @property
    def node_id(self) -> str:
        return self.subject


class JwtKeys:
    """Issues and checks node access tokens with one secret (from the setting, or a file of
    the data directory made at first start, readable by its owner only)."""

    def __init__(self, secret: bytes, ttl_s: float):
        self.secret = secret
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        # token -> (node id, registration, expiry)
        self._verified: dict[str, tuple[str, int, float]] = {}

    @classmethod
    def load(cls, data_dir: Path, given: str | None, ttl_s: float) -> JwtKeys:
        if given:
            if len(given) < 32:
                raise ValueError("jwt_secret must be at least 32 characters")
            return cls(given.encode("utf-8"), ttl_s)
        path = Path(data_dir) / "secrets" / "jwt.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            write_atomic(path, secrets.token_hex(32), mode=0o600)
        return cls(path.read_text().strip().encode("ascii"), ttl_s)

    def issue(self, node_id: str, registration: int) -> tuple[str, float]:
        """A token for `node_id`; `registration` tells apart two registrations under one id
        (a data directory made anew): a token of the other is refused."""
        now = time.time()
        expires = now + self.ttl_s
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": node_id,
            "role": "node",
            "iat": int(now),
            "exp": int(expires),
            "jti": uuid.uuid4().hex,
            "reg": registration,
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM), expires

    def verify(self, token: str) -> tuple[str, int]:
        """(node id, registration) the token names; WireError 401 when it is not valid now. A
        token checked before is found in a small cache until it expires (a signature check
        costs ~0.1 ms of Python per request; whether the node was banned is checked by the
        caller each time)."""
        with self._lock:
            cached = self._verified.get(token)
        if cached is not None and time.time() < cached[2] + LEEWAY_S:
            return cached[0], cached[1]
        node_id, registration, expires = self.decode(token)
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.clear()
            self._verified[token] = (node_id, registration, expires)
        return node_id, registration

    def decode(self, token: str) -> tuple[str, int, float]:
        """(node id, registration, expiry) of a token, checked in full (no cache)."""
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                leeway=LEEWAY_S,
                options={"require": ["exp", "sub", "aud", "iss", "reg"]},
            )
        except jwt.ExpiredSignatureError:
            raise WireError(
                401,
                "token_expired",
                "the access token has expired; renew it with POST /api/v1/nodes/refresh",
            ) from None
        except jwt.InvalidTokenError as error:
            raise WireError(401, "bad_token", f"the access token is not valid: {error}") from None
        node_id, registration = claims.get("sub"), claims.get("reg")
        if claims.get("role") != "node" or not isinstance(node_id, str):
            raise WireError(401, "bad_token", "the access token does not name a node")
        if not isinstance(registration, int):
            raise WireError(401, "bad_token", "the access token names no registration")
        return node_id, registration, float(claims["exp"])


class SlidingWindow:
    """At most `limit` events per `window_s` per key (client address, node id)."""

    def __init__(self, limit: int, window_s: float = 60.0, max_keys: int = 100_000):
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._events: OrderedDict[str, deque[float]] = OrderedDict()  # least recent first

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            while len(self._events) >= self.max_keys:  # forget the longest quiet
                self._events.popitem(last=False)
            events = self._events[key] = deque()
        else:
            self._events.move_to_end(key)
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may act again, or None when it may now."""
        now = time.monotonic()
        with self._lock:
            events = self._recent(key, now)
            if len(events) < self.limit:
                return None
            return max(0.1, events[0] + self.window_s - now)

    def hit(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(key, now).append(now)

    def take(self, key: str, what: str) -> None:
        """Count one event, or refuse it with 429 when `key` is over the limit."""
        now = time.monotonic()
        with self._lock:
            events = self._recent(key, now)
            if len(events) >= self.limit:
                wait = max(0.1, events[0] + self.window_s - now)
                raise WireError(
                    429,
                    "rate_limited",
                    f"too many {what}: at most {self.limit} per {self.window_s:.0f} s; "
                    f"try again in {wait:.0f} s",
                    retry_after_s=round(wait, 1),
                )
            events.append(now)


def client_address(request: HTTPConnection) -> str:
    """The client's address (uvicorn takes it from X-Forwarded-For behind a trusted proxy)."""
    return request.client.host if request.client else ""


def bearer(request: HTTPConnection) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise WireError(401, "bad_token", "the Authorization header must be 'Bearer TOKEN'")
    return value.strip()


def authenticate(request: HTTPConnection, token: str) -> Principal:
    """The principal a bearer token stands for; WireError 401/403 when it stands for none."""
    security = request.app.state.runtime.security
    if token.count(".") == 2:  # a JWT: a node
        node_id, registration = security.keys.verify(token)
        state = security.accounts.node(node_id)
        if state is None or state.registration != registration:
            raise WireError(
                401,
                "bad_token",
                "the access token names a node this server does not know (or an earlier "
                "registration of its id); register again with an enrollment token",
            )
        if state.revoked:
            raise WireError(403, "node_revoked", f"node {node_id} was banned by the admin")
        return Principal("node", node_id)
    info = security.accounts.api_token(token)
    if info is None:
        raise WireError(401, "bad_token", "unknown token; ask the server's admin for one")
    problem = info.problem(time.time())
    if problem is not None:
        raise WireError(*problem)
    return Principal(info.role, f"{info.role}:{info.id}", info.id)


class Access:
    """A route's access level: which roles may call it. `public_setting` names a server setting
    that, when on, opens the route to anyone (the dashboard's `public_dashboard`)."""

    def __init__(self, name: str, roles: tuple[str, ...], public_setting: str | None = None):
        self.name = name
        self.roles = roles
        self.public_setting = public_setting

    def __repr__(self) -> str:
        return f"Access({self.name})"

    def __call__(self, request: HTTPConnection) -> Principal:
        if not self.roles:
            return Principal("public", "anonymous")
        security = request.app.state.runtime.security
        address = client_address(request)
        public = self.public_setting and getattr(
            request.app.state.runtime.settings, self.public_setting
        )
        token = None
        try:
            token = bearer(request)
            if token is None:
                if public:
                    return Principal("public", "anonymous")
                raise WireError(
                    401,
                    "not_authenticated",
                    "this route needs a token: send 'Authorization: Bearer TOKEN' "
                    f"({' or '.join(self.roles)})",
                )
            principal = authenticate(request, token)
        except WireError as error:
            if token is not None and error.status in (401, 403):
                failed_login(security, "auth.refused", request.url.path, address, error)
            raise
        if principal.role not in self.roles:
            error = WireError(
                403,
                "forbidden",
                f"this route is for {' or '.join(self.roles)}; your token is a "
                f"{principal.role} token",
            )
            failed_login(
                security, "auth.forbidden", request.url.path, address, error, principal.subject
            )
            raise error
        return principal


def failed_login(
    security,
    action: str,
    target: str,
    address: str,
    error: WireError,
    actor: str = "anonymous",
) -> None:
    """Count and record a refused token. Past `max_auth_failures_per_min` from one address the
    answer becomes 429: valid tokens from that address still pass (a stranger behind the same
    NAT cannot lock the others out), while guessing slows down."""
    if error.code == "token_expired":  # nodes renew expired tokens routinely
        return
    wait = security.failures.retry_after(address)
    if wait is not None:  # not recorded one by one: a flood must not grow the audit log
        raise WireError(
            429,
            "rate_limited",
            f"too many failed logins from {address}; try again in {wait:.0f} s",
            retry_after_s=round(wait, 1),
        ) from None
    security.failures.hit(address)
    security.audit.record(actor, action, target, {"reason": error.code}, address)


PUBLIC = Access("public", ())
VIEWER = Access("viewer", ("viewer", "node", "admin"), public_setting="public_dashboard")
DOWNLOAD = Access("download", ("node", "admin"))
NODE = Access("node", ("node",))
ADMIN = Access("admin", ("admin",))
LEVELS = (PUBLIC, VIEWER, DOWNLOAD, NODE, ADMIN)

CurrentNode = Annotated[Principal, Depends(NODE)]
Admin = Annotated[Principal, Depends(ADMIN)]
Downloader = Annotated[Principal, Depends(DOWNLOAD)]
Viewer = Annotated[Principal, Depends(VIEWER)]
Anyone = Annotated[Principal, Depends(PUBLIC)]


def route_access(route) -> Access | None:
    """The access level a route declares (None: it declares none, which is a bug)."""
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, Access):
            return dependant.call
        stack.extend(dependant.dependencies)
    return None


def api_routes(routes) -> list:
    """Every APIRoute under `routes` (app.routes), also inside included routers (which newer
    FastAPI keeps as one entry per router)."""
    found, stack = [], list(routes)
    while stack:
        route = stack.pop(0)
        inner = getattr(route, "original_router", None)
        if inner is not None:
            stack.extend(inner.routes)
        elif hasattr(route, "dependant"):
            found.append(route)
    return found
