"""schemathesis against a real server process's OpenAPI schema, with valid credentials: no
answer is a 5xx, and every answer is one the schema documents (status, content type, body).

Each operation gets a few derandomized examples of valid and of invalid input, sent as the role
that may use it: routes only nodes may call get a registered node's access token, every other
route the admin's token (the roles are read from the application's routes, as in
tests/api/test_authorization.py). Two things are held back: a long poll waits at most
MAX_WAIT_S, and the fuzzer never revokes the credentials it runs with.

The operations are driven with schemathesis's Python API (`as_strategy`) rather than its
pytest integration, whose fixture-loaded schemas (`schemathesis.pytest.from_fixture`) break on
pytest 9 (they set `request.node._nodeid`).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crowdtrain.server.app import API_PREFIX, create_app
from crowdtrain.server.auth import api_routes, route_access
from crowdtrain.settings import ServerSettings

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_WAIT_S = 0.2  # long polls (`wait`) are cut to this: nothing publishes versions here
NODE_NAME = "fuzz-node-q7x"
# a few examples per operation and kind of data, the same on every run
EXAMPLES = settings(
    max_examples=6,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)


def node_only_operations(tmp_path) -> set[str]:
    """Labels ("POST /api/v1/updates") of the operations whose routes only nodes may call."""
    # the routes are all the schema needs: no runtime is built (nothing is served)
    app = create_app(ServerSettings(data_dir=tmp_path), runtime=object())  # type: ignore[arg-type]
    return {
        f"{method} {API_PREFIX}{route.path_format}"
        for route in api_routes(app.routes)
        if (access := route_access(route)) is not None and access.roles == ("node",)
        for method in getattr(route, "methods", None) or ()  # none: a WebSocket
    }


class Fuzzing:
    """The running server and the credentials the fuzzer sends."""

    def __init__(self, e2e, node_only: set[str]):
        self.url = e2e.url
        self.admin = e2e.admin
        enrollment = e2e.swarm.enrollment_token(e2e.url)
        response = httpx.post(
            f"{e2e.url}{API_PREFIX}/nodes/register",
            json={"enrollment_token": enrollment, "name": NODE_NAME},
            timeout=30,
        )
        response.raise_for_status()
        self.node = {"Authorization": f"Bearer {response.json()['access_token']}"}
        self.node_only = node_only
        tokens = httpx.get(f"{e2e.url}{API_PREFIX}/tokens", headers=self.admin, timeout=30)
        self.token_ids = {token["id"] for token in tokens.json()}  # the fuzzer must not revoke

    def headers(self, case) -> dict[str, str]:
        return self.node if case.operation.label in self.node_only else self.admin


@pytest.fixture
def fuzzing(e2e, tmp_path) -> Fuzzing:
    e2e.start_server(
        evaluate="false",
        max_auth_failures_per_min=1_000_000,  # random enrollment tokens must not lock us out
        max_registrations_per_min=1_000_000,
    )
    return Fuzzing(e2e, node_only_operations(tmp_path))


def spares_our_credentials(case, fuzzing: Fuzzing) -> bool:
    """False for a case that would revoke a token or ban the node this test runs with."""
    target = (case.path_parameters or {}).get
    if case.operation.label == f"DELETE {API_PREFIX}/tokens/{{token_id}}":
        return target("token_id") not in fuzzing.token_ids
    if case.operation.label == f"DELETE {API_PREFIX}/nodes/{{node_id}}":
        return target("node_id") != NODE_NAME
    return True


def cut_long_polls(case) -> None:
    query: dict[str, Any] = case.query or {}
    wait = query.get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > MAX_WAIT_S:
        query["wait"] = MAX_WAIT_S


def fuzz(operation, mode: GenerationMode, fuzzing: Fuzzing) -> str | None:
    """Run one operation's examples; what failed (the check, the case, the answer), or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @EXAMPLES
    def run(case) -> None:
        if not spares_our_credentials(case, fuzzing):
            return
        cut_long_polls(case)
        case.call_and_validate(headers=fuzzing.headers(case), checks=CHECKS, timeout=30)

    try:
        run()
    except Unsatisfiable:  # negative data for an operation with no input that can be wrong
        return None
    except (Exception, schemathesis.errors.FailureGroup) as error:
        return describe(error)
    return None


def describe(error: BaseException) -> str:
    """An error with hypothesis's notes (the example) and, for a group that does not list
    them itself (hypothesis's FlakyFailure), what it groups."""
    lines = [f"{type(error).__name__}: {error}", *getattr(error, "__notes__", [])]
    if not isinstance(error, schemathesis.errors.FailureGroup):
        lines += [describe(inner) for inner in getattr(error, "exceptions", ())]
    return "\n".join(lines)


def test_api_conforms_to_its_schema(fuzzing):
    schema = schemathesis.openapi.from_url(f"{fuzzing.url}/openapi.json", timeout=30)
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failure = fuzz(operation, mode, fuzzing)
            if failure is not None:
                failures.append(f"==== {operation.label} ({mode.value} data)\n{failure}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)
