"""The Evaluator's history in the database, and the one-time takeover of a legacy evals.jsonl."""

from __future__ import annotations

import json

import pytest

from crowdtrain.db import Database
from crowdtrain.server.metrics import EvaluationLog


def evaluation(version: int, **extra) -> dict:
    return {
        "version": version,
        "time": 1_000.0 + version,
        "valid_loss": 5.0 - version / 10,
        "valid_perplexity": 150.0 - version,
        "eval_s": 0.5,
        "dataset": "docs",
        "sample_tokens": 4096,
        **extra,
    }


@pytest.fixture
def database(tmp_path):
    database = Database.in_directory(tmp_path / "data")
    yield database
    database.close()


def test_append_since_last_truncate_round_trip(database, tmp_path):
    log = EvaluationLog(database)
    assert log.last() is None and log.since(-1) == []
    records = [evaluation(v) for v in (1, 2, 3)]
    for record in records:
        log.append(record)

    assert log.since(0) == records
    assert log.since(1) == records[1:]
    assert log.since(0, limit=2) == records[:2]
    assert log.since(3) == []
    assert log.last() == records[-1]

    log.truncate_after(1)
    assert log.since(0) == records[:1]
    assert log.last() == records[0]
    log.append(evaluation(2, valid_loss=1.0))
    assert [r["valid_loss"] for r in log.since(0)] == [records[0]["valid_loss"], 1.0]

    reopened = Database.in_directory(tmp_path / "data")  # the records are in the database
    assert EvaluationLog(reopened).since(0) == log.since(0)
    reopened.close()


def test_optional_fields_default(database):
    log = EvaluationLog(database)
    log.append({"version": 1, "time": 1.0, "valid_loss": 2.0, "valid_perplexity": 7.4})
    assert log.last() == {
        "version": 1,
        "time": 1.0,
        "valid_loss": 2.0,
        "valid_perplexity": 7.4,
        "eval_s": 0.0,
        "dataset": "",
        "sample_tokens": 0,
    }


def test_legacy_jsonl_is_taken_over_once(database, tmp_path):
    legacy = tmp_path / "evals.jsonl"
    old = [
        {"version": 1, "time": 10.0, "valid_loss": 4.0, "valid_perplexity": 54.6, "eval_s": 1.5},
        {"version": 2, "time": 20.0, "valid_loss": 3.5, "valid_perplexity": 33.1, "eval_s": 1.4},
    ]
    legacy.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"version": 3, "ti')

    log = EvaluationLog(database, legacy)

    expected = [{**r, "dataset": "", "sample_tokens": 0} for r in old]  # the torn line is dropped
    assert log.since(0) == expected
    assert not legacy.exists()
    imported = tmp_path / "evals.jsonl.imported"
    assert [json.loads(line)["version"] for line in imported.read_text().splitlines()] == [1, 2]

    # opened again (the file is gone) or with the file back: nothing is imported twice
    assert EvaluationLog(database, legacy).since(0) == expected
    legacy.write_text(json.dumps(old[0]) + "\n")
    assert EvaluationLog(database, legacy).since(0) == expected
