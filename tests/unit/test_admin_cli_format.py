"""The admin commands' pure parts: durations, times, table cells, the one-line refusals."""

from __future__ import annotations

import time

import pytest

from crowdtrain.admin_cli import (
    detail_text,
    moment,
    refusal_message,
    span,
    tokens_table,
    uses_text,
)
from crowdtrain.server.accounts import parse_duration
from crowdtrain.terminal import table_text

URL = "http://127.0.0.1:8000/api/v1/tokens"


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("7d", 604800),
        ("12h", 43200),
        ("30m", 1800),
        ("3600", 3600),
        ("2w", 1209600),
        ("1.5h", 5400),
    ],
)
def test_durations_take_a_unit_or_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-1d", "0", "7 days", ""])
def test_a_bad_duration_names_the_format(text):
    with pytest.raises(ValueError, match="for example 7d or 12h"):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds, text",
    [(5, "5s"), (125, "2m"), (3600, "1h"), (3 * 3600 + 20 * 60, "3h 20m"), (7 * 86400, "7d")],
)
def test_spans_are_rough_and_short(seconds, text):
    assert span(seconds) == text
    assert span(-seconds) == text


def test_moments_say_how_far_from_now():
    now = time.time()
    assert moment(None) == "-"
    assert moment(None, now, never="never") == "never"
    assert moment(now + 7 * 86400 + 30, now).endswith("(in 7d)")
    assert moment(now - 90, now).endswith("(1m ago)")


def test_uses_count_registrations_of_enrollment_tokens_only():
    assert uses_text({"kind": "enroll", "uses": 2, "max_uses": 5}) == "2/5"
    assert uses_text({"kind": "enroll", "uses": 2, "max_uses": None}) == "2"
    assert uses_text({"kind": "api", "uses": 0, "max_uses": None}) == "-"


def test_audit_detail_leaves_out_empty_values():
    text = detail_text({"role": "node", "uses": None, "label": "", "reason": "spam"})
    assert text == "role=node reason=spam"
    assert detail_text({"expires_at": 0.0}).startswith("expires_at=19")


def test_a_refusal_is_the_servers_own_message_on_one_line():
    body = {"error": "bad_uses", "detail": "uses counts registrations: only node tokens have it"}
    message = refusal_message(422, body, URL)
    assert message == f"{body['detail']} (HTTP 422 bad_uses)"


def test_a_refused_token_says_how_to_get_an_admin_token():
    body = {"error": "bad_token", "detail": "unknown token"}
    message = refusal_message(401, body, URL)
    assert message.startswith("the server refused the admin token: unknown token")
    assert "CROWDTRAIN_ADMIN_TOKEN" in message and "--data-dir" in message


def test_a_validation_error_names_the_field():
    body = {"detail": [{"loc": ["body", "role"], "msg": "Input should be 'node'"}]}
    assert "role: Input should be 'node'" in refusal_message(422, body, URL)


def test_an_answer_that_is_not_crowdtrains_names_the_url():
    assert refusal_message(404, {"detail": "Not Found"}, URL) == f"HTTP 404 from {URL}: Not Found"
    message = refusal_message(502, "<html>\n<b>Bad gateway</b>\n</html>", URL)
    assert message == f"HTTP 502 from {URL}: <html> <b>Bad gateway</b> </html>"
    assert "\n" not in message


def test_the_token_table_never_shows_more_than_the_prefix():
    token = {
        "id": 3,
        "prefix": "ct_enroll_abcd",
        "kind": "enroll",
        "role": "node",
        "label": "lab [machines]",  # brackets are text, not rich markup
        "uses": 1,
        "max_uses": 5,
        "created_at": time.time(),
        "created_by": "admin:1",
        "expires_at": None,
        "state": "active",
    }
    text = table_text(tokens_table([token]))
    assert "ct_enroll_abcd…" in text and "lab [machines]" in text and "1/5" in text
