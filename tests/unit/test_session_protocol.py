"""The session message schemas: every message round-trips; bad or oversized ones are refused."""

from __future__ import annotations

import json

import pytest

from crowdtrain.node.session import session_url
from crowdtrain.node.waiting import backoff_s
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.session import (
    MAX_MESSAGE_BYTES,
    DensityBudget,
    Heartbeat,
    Hello,
    LeaseOffer,
    RoundDeadline,
    SessionError,
    Shutdown,
    VersionPublished,
    Welcome,
    parse_node_message,
    parse_server_message,
)

HELLO = Hello(
    software_version="0.1.0",
    torch_version="2.13.0",
    device="cuda:0",
    device_name="NVIDIA H200",
    memory_bytes=141 << 30,
    cpu_count=16,
    upload_bytes_per_s=1.5e6,
    rtt_s=0.03,
    location="Lyon",
)
NODE_MESSAGES = [
    HELLO,
    Hello(software_version="0.1.0", device="cpu"),
    Heartbeat(status="training", version=12, tokens_per_s=830.5, rss_bytes=1 << 30),
    Heartbeat(status="waiting_for_shard", gpu_memory_bytes=0),
]
SERVER_MESSAGES = [
    Welcome(
        node_id="n1", heartbeat_s=2.0, session_timeout_s=6.0, version=3, lineage="ab12cd34ef56ab78"
    ),
    VersionPublished(version=4, lineage="ab12cd34ef56ab78"),
    RoundDeadline(version=5, closes_in_s=7.5),
    DensityBudget(max_density=0.05),
    LeaseOffer(free=2),
    Shutdown(reason="the server is stopping", retry_after_s=5.0),
    SessionError(code="node_revoked", detail="node n1 was banned"),
]


@pytest.mark.parametrize("message", NODE_MESSAGES, ids=lambda m: m.type)
def test_node_messages_round_trip(message):
    assert parse_node_message(message.to_json()) == message


@pytest.mark.parametrize("message", SERVER_MESSAGES, ids=lambda m: m.type)
def test_server_messages_round_trip(message):
    assert parse_server_message(message.to_json()) == message


def test_whole_numbers_are_taken_for_floats():
    beat = parse_node_message('{"type": "heartbeat", "status": "training", "tokens_per_s": 5}')
    assert beat.tokens_per_s == 5.0


def _hello(**changes) -> str:
    return json.dumps({**HELLO.model_dump(), **changes})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '"hello"',
        '{"software_version": "0.1.0", "device": "cpu"}',  # no type
        '{"type": "welcome", "node_id": "n1"}',  # a server message
        '{"type": "nonsense"}',
        _hello(extra=1),
        _hello(location="x" * 65),
        _hello(location="bell\x07"),
        _hello(device="CPU; DROP TABLE"),
        _hello(device_name="n" * 129),
        _hello(memory_bytes=-1),
        _hello(cpu_count=0),
        _hello(rtt_s=1e9),
        _hello(protocol="1"),  # strict: no strings for numbers
        '{"type": "heartbeat", "status": "sleeping"}',
        '{"type": "heartbeat", "status": "training", "version": "7"}',
        '{"type": "heartbeat", "status": "training", "tokens_per_s": NaN}',
        '{"type": "heartbeat", "status": "training", "tokens_per_s": Infinity}',
        '{"type": "heartbeat", "status": "training", "rss_bytes": 1.5}',
    ],
)
def test_bad_node_messages_are_refused(text):
    with pytest.raises(WireError) as refused:
        parse_node_message(text)
    assert refused.value.code == "bad_message"
    assert len(refused.value.message) <= 400


def test_oversized_messages_are_refused_before_parsing():
    text = _hello(device_name="x" * 100).ljust(MAX_MESSAGE_BYTES + 1)
    with pytest.raises(WireError) as refused:
        parse_node_message(text)
    assert refused.value.code == "message_too_big"
    # the cap counts bytes, not characters
    with pytest.raises(WireError):
        parse_node_message("é" * (MAX_MESSAGE_BYTES // 2 + 1))


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "density", "max_density": 0}',
        '{"type": "density", "max_density": 1.5}',
        '{"type": "lease_offer", "free": 0}',
        '{"type": "error", "code": "Bad Code", "detail": ""}',
        '{"type": "shutdown", "reason": "x", "retry_after_s": -1}',
        '{"type": "round", "version": 0, "closes_in_s": 1}',
        '{"type": "heartbeat", "status": "training"}',  # a node message
    ],
)
def test_bad_server_messages_are_refused(text):
    with pytest.raises(WireError):
        parse_server_message(text)


@pytest.mark.parametrize(
    "base, url",
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/api/v1/nodes/session"),
        ("https://train.example.org/ct/", "wss://train.example.org/ct/api/v1/nodes/session"),
    ],
)
def test_session_url(base, url):
    assert session_url(base) == url


def test_backoff_grows_jittered_to_its_cap():
    waits = [backoff_s(failures, cap=30.0) for failures in range(12)]
    assert 0.25 <= waits[0] <= 0.5
    assert all(0 < w <= 30.0 for w in waits)
    assert waits[-1] >= 15.0  # capped, then jittered down by at most half
