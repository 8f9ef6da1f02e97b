"""The authorization matrix, generated from the app's OpenAPI schema: every operation x {no
token, malformed, expired, wrong role, revoked, valid} answers as the access level its route
declares (server/auth.py) says it must. A route that declares no access level fails here."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from fastapi import APIRouter, FastAPI

from crowdtrain.server.app import API_PREFIX, create_app
from crowdtrain.server.auth import (
    ALGORITHM,
    AUDIENCE,
    ISSUER,
    LEEWAY_S,
    Access,
    api_routes,
    route_access,
)

from .conftest import ADMIN, API, Server

# a server of its own: no public dashboard, and room for the many failed logins sent here
SERVER_SETTINGS = {
    "public_dashboard": False,
    "max_auth_failures_per_min": 1_000_000,
    "max_submissions_per_min": 1_000_000,
}
ROLES = ("admin", "viewer", "node")
REFUSED = (401, 403)
# path parameters by name: plausible values that reach the handler (which may answer 404);
# ids that exist nowhere, so that a valid DELETE never revokes what the matrix relies on
PATH_VALUES: dict[str, Any] = {
    "lease_id": "0" * 32,
    "shard_id": 1,
    "number": 0,
    "name": "matrix",
    "split": "train",
    "filename": "matrix.txt",
    "node_id": "no-such-node",
    "token_id": 1 << 40,
    "model_id": "imported:matrix-none",
}
BINARY_BODY = b"the authorization matrix uploads this line\n"
_names = itertools.count()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- operations: the OpenAPI schema, each operation with its route's access level ----------


@dataclass(frozen=True)
class Operation:
    method: str  # lower case, as in the schema
    path: str  # with {parameters}, as in the schema
    spec: dict[str, Any]  # the OpenAPI operation object
    access: Access | None  # None: its route declares none

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.path}"

    @property
    def roles(self) -> tuple[str, ...]:
        assert self.access is not None, f"{self.label} declares no access level"
        return self.access.roles


def declared_access(app: FastAPI) -> dict[tuple[str, str], Access | None]:
    """(method, path) -> the Access its route declares. An included router's routes carry
    their router-local path (FastAPI 0.165), so each is also known under API_PREFIX."""
    found = {}
    for route in api_routes(app.routes):
        for method in getattr(route, "methods", None) or ():
            for path in (route.path_format, API_PREFIX + route.path_format):
                found[method.lower(), path] = route_access(route)
    return found


def operations(app: FastAPI) -> list[Operation]:
    access = declared_access(app)
    schema = app.openapi()
    return [
        Operation(method, path, spec, access.get((method, path)))
        for path, item in schema["paths"].items()
        for method, spec in item.items()
    ]


def undeclared_routes(app: FastAPI) -> list[str]:
    """Every route (in the schema or not, HTTP or WebSocket) that declares no access level."""
    return sorted(
        f"{','.join(sorted(getattr(route, 'methods', None) or ['WEBSOCKET']))} {route.path}"
        for route in api_routes(app.routes)
        if route_access(route) is None
    )


# ---- requests: minimal and valid-shaped, from the schema ---------------------------------


def resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def example(schema: dict[str, Any], components: dict[str, Any]) -> Any:
    """A small value that `schema` accepts: required properties only, first enum value."""
    schema = resolve(schema, components)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if resolve(s, components).get("type") != "null"]
            return example(options[0], components)
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {k: example(properties[k], components) for k in schema.get("required", [])}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if kind == "string":
        for candidate in ("x", *map(str, PATH_VALUES.values())):
            if re.search(schema.get("pattern", ""), candidate):
                return candidate
        raise AssertionError(f"no example string matches {schema.get('pattern')!r}")
    raise AssertionError(f"cannot make an example of {schema}")


def public_body(server: Server, path: str, node: dict[str, str]) -> dict[str, Any] | None:
    """The bodies of public routes carry real secrets (an invalid one is refused with 401)."""
    if path == f"{API}/nodes/register":
        return {"enrollment_token": node["enrollment"], "name": f"matrix-{next(_names)}"}
    if path == f"{API}/nodes/refresh":
        return {"node_id": node["node_id"], "refresh_token": node["refresh_token"]}
    return None


@dataclass
class Credentials:
    """Authorization headers of each kind, made once per module on the matrix's server."""

    valid: dict[str, dict[str, str]]  # by role
    expired: dict[str, dict[str, str]]
    revoked: dict[str, dict[str, str]]
    malformed: list[dict[str, str]]
    node: dict[str, str]  # a registered node's secrets, for the public routes' bodies


def api_token(server: Server, role: str, expires: str | None = None) -> dict[str, Any]:
    body = {"role": role, "expires": expires, "label": "authorization matrix"}
    response = server.client.post(f"{API}/tokens", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return response.json()


def node_jwt(server: Server, node_id: str, expires_at: float, secret: bytes | None = None) -> str:
    state = server.runtime.security.accounts.node(node_id)
    registration = state.registration if state is not None else 0
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": node_id, "role": "node", "reg": registration}
    claims.update(iat=int(expires_at) - 60, exp=int(expires_at))
    return jwt.encode(claims, secret or server.runtime.security.keys.secret, algorithm=ALGORITHM)


@pytest.fixture(scope="module")
def credentials(server: Server) -> Credentials:
    enrollment = server.enrollment_token()
    node = server.register("matrix-node", enrollment)
    # the banned node registers with a token of its own: a ban revokes that token too
    banned = server.register("matrix-banned", server.enrollment_token())
    response = server.client.delete(f"{API}/nodes/matrix-banned", headers=ADMIN)
    assert response.status_code == 200, response.text
    revoked = {}
    for role in ("admin", "viewer"):
        token = api_token(server, role)
        response = server.client.delete(f"{API}/tokens/{token['id']}", headers=ADMIN)
        assert response.status_code == 200, response.text
        revoked[role] = bearer(token["token"])
    expired = {role: bearer(api_token(server, role, "0.001s")["token"]) for role in revoked}
    past = time.time() - LEEWAY_S - 60
    return Credentials(
        valid={
            "admin": ADMIN,
            "viewer": bearer(api_token(server, "viewer")["token"]),
            "node": bearer(node["access_token"]),
        },
        expired={**expired, "node": bearer(node_jwt(server, "matrix-node", past))},
        revoked={**revoked, "node": bearer(banned["access_token"])},
        malformed=[
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer not-a-token"},
            {"Authorization": "Basic YWRtaW46YWRtaW4="},
            bearer("ct_admin_" + "unknown" * 5),  # well-formed, but no such token
            bearer(enrollment),  # an enrollment token is no API token
            bearer(node_jwt(server, "matrix-node", time.time() + 600, b"x" * 32)),  # forged
            bearer(node_jwt(server, "no-such-node", time.time() + 600)),  # of no node
        ],
        node={**node, "enrollment": enrollment},
    )


def call(server: Server, operation: Operation, headers: dict[str, str], node: dict[str, str]):
    """One valid-shaped request for `operation`: its path parameters, required query
    parameters and body filled in (the handler may still answer 404, 409, 410 or 422)."""
    components = server.client.app.openapi().get("components", {}).get("schemas", {})
    path, params = operation.path, {}
    for parameter in operation.spec.get("parameters", []):
        name = parameter["name"]
        if parameter["in"] == "path":
            path = path.replace(f"{{{name}}}", str(PATH_VALUES[name]))
        elif parameter["in"] == "query" and parameter.get("required"):
            params[name] = example(parameter["schema"], components)
    kwargs: dict[str, Any] = {"params": params, "headers": headers}
    content = operation.spec.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = public_body(server, operation.path, node)
        kwargs["json"] = (
            body if body is not None else example(content["application/json"]["schema"], components)
        )
    elif "application/octet-stream" in content:
        kwargs["content"] = BINARY_BODY
        kwargs["headers"] = {**headers, "Content-Type": "application/octet-stream"}
    elif content:
        raise AssertionError(f"{operation.label}: no request body of {list(content)} is known")
    return server.client.request(operation.method.upper(), path, **kwargs)


# ---- the matrix ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request of the matrix and what it must get: a status and error code, or (None) any
    answer but 401 and 403."""

    what: str
    headers: dict[str, str]
    status: int | None = None
    codes: tuple[str, ...] = ()


def probes(case: str, operation: Operation, creds: Credentials) -> Iterator[Probe]:
    public = not operation.roles
    allowed = ROLES if public else operation.roles

    def refused(status: int, *codes: str) -> dict[str, Any]:
        return {} if public else {"status": status, "codes": codes}

    if case == "no token":
        yield Probe("no Authorization header", {}, **refused(401, "not_authenticated"))
    elif case == "malformed":
        for headers in creds.malformed:
            yield Probe(
                f"Authorization {headers['Authorization'][:30]}",
                headers,
                **refused(401, "bad_token"),
            )
    elif case == "expired":
        for role in allowed:
            yield Probe(
                f"an expired {role} token", creds.expired[role], **refused(401, "token_expired")
            )
    elif case == "wrong role":
        for role in (r for r in ROLES if r not in allowed):
            yield Probe(f"a {role} token", creds.valid[role], 403, ("forbidden",))
    elif case == "revoked":
        for role in allowed:
            code = "node_revoked" if role == "node" else "token_revoked"  # a banned node
            yield Probe(f"a revoked {role} token", creds.revoked[role], **refused(403, code))
    elif case == "valid":
        yield from (Probe(f"a {role} token", creds.valid[role]) for role in allowed)
        if public:
            yield Probe("no Authorization header", {})
    else:
        raise AssertionError(case)


def mismatch(operation: Operation, probe: Probe, response) -> str | None:
    """Why `response` is not what `probe` expects, or None."""
    said = f"{operation.label} with {probe.what}: {response.status_code} {response.text[:200]}"
    if probe.status is None:
        return said if response.status_code in REFUSED else None
    if response.status_code != probe.status:
        return f"{said} (expected {probe.status})"
    code = response.json().get("error")
    if code not in probe.codes:
        return f"{said} (expected error {' or '.join(probe.codes)})"
    if probe.status == 401 and response.headers.get("www-authenticate") != "Bearer":
        return f"{said} (a 401 without WWW-Authenticate: Bearer)"
    return None


CASES = ("no token", "malformed", "expired", "wrong role", "revoked", "valid")


@pytest.mark.parametrize("case", CASES)
def test_authorization_matrix(server: Server, credentials: Credentials, case: str):
    problems, sent = [], 0
    for operation in operations(server.client.app):
        for probe in probes(case, operation, credentials):
            response = call(server, operation, probe.headers, credentials.node)
            sent += 1
            problems.append(mismatch(operation, probe, response))
    assert sent > 0
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_every_operation_maps_to_a_route_that_declares_access(server: Server):
    ops = operations(server.client.app)
    assert len(ops) >= 20  # the schema really was read
    assert [op.label for op in ops if op.access is None] == []
    assert undeclared_routes(server.client.app) == []


def test_a_route_without_an_access_level_fails_the_check(server: Server):
    """What the two tests above do with a new route that forgot `Depends(ACCESS)`."""
    app = create_app(server.runtime.settings, server.runtime)  # no lifespan: routes only
    router = APIRouter()

    @router.get("/forgotten")
    def forgotten() -> dict:
        return {}

    app.include_router(router, prefix=API_PREFIX)

    @app.post(f"{API_PREFIX}/direct")
    def direct() -> dict:
        return {}

    assert undeclared_routes(app) == ["GET /forgotten", f"POST {API_PREFIX}/direct"]
    unmapped = [op.label for op in operations(app) if op.access is None]
    assert unmapped == [f"GET {API_PREFIX}/forgotten", f"POST {API_PREFIX}/direct"]


def test_every_protected_operation_documents_401_and_403(server: Server):
    missing = [
        f"{op.label}: {sorted(op.spec['responses'])}"
        for op in operations(server.client.app)
        if op.roles and not {"401", "403"} <= set(op.spec["responses"])
    ]
    assert missing == []


def test_path_values_reach_the_handlers(server: Server):
    """The matrix's path parameters pass their schema, so a valid request is not stopped by a
    422 of its path (which would say nothing about the handler's authorization)."""
    for operation in operations(server.client.app):
        for parameter in operation.spec.get("parameters", []):
            if parameter["in"] != "path":
                continue
            name, schema = parameter["name"], parameter["schema"]
            assert name in PATH_VALUES, f"{operation.label}: add a value for {name} to PATH_VALUES"
            value = PATH_VALUES[name]
            assert re.search(schema.get("pattern", ""), str(value)), (operation.label, name)
            assert schema.get("minimum", value) <= value <= schema.get("maximum", value)


def test_the_auth_check_comes_before_body_validation(server: Server):
    """A body that breaks the schema gets 401 without a token, not 422: nothing about the
    route's input is answered to a caller who may not use it."""
    response = server.client.post(f"{API}/tokens", json={"role": "emperor", "uses": -1})
    assert response.status_code == 401, response.text


@pytest.mark.parametrize("body", [b"{not json", b"\x80{}"], ids=["malformed", "not-utf8"])
def test_an_unreadable_json_body_without_a_token_is_401(server: Server, body: bytes):
    """POST /tokens reads its body after the access check, so even a body FastAPI could not
    parse is answered 401 to a caller without a token; with the admin's token it is 422."""
    headers = {"Content-Type": "application/json"}
    response = server.client.post(f"{API}/tokens", content=body, headers=headers)
    assert response.status_code == 401, response.text
    response = server.client.post(f"{API}/tokens", content=body, headers={**headers, **ADMIN})
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"


def test_a_public_dashboard_opens_viewer_routes_only(server: Server, credentials, monkeypatch):
    monkeypatch.setattr(server.runtime.settings, "public_dashboard", True)
    problems = []
    for operation in operations(server.client.app):
        if not operation.roles:
            continue
        if operation.access.public_setting == "public_dashboard":
            anonymous = Probe("no token, public dashboard", {})
        else:
            anonymous = Probe("no token", {}, 401, ("not_authenticated",))
        # a token that is sent is checked even on a public route: a bad one is still refused
        bad = Probe(
            "a malformed token, public dashboard", credentials.malformed[1], 401, ("bad_token",)
        )
        for probe in (anonymous, bad):
            response = call(server, operation, probe.headers, credentials.node)
            problems.append(mismatch(operation, probe, response))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
    assert any(op.access.public_setting for op in operations(server.client.app) if op.access)
