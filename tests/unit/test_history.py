"""The JSONL history survives a crash that tore its last line."""

from __future__ import annotations

from crowdtrain.server.metrics import HistoryLog


def test_torn_last_line_is_dropped_and_later_appends_stay_readable(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"version": 1, "loss": 5.0}\n{"version": 2, "lo')
    log = HistoryLog(path)
    assert [r["version"] for r in log.records] == [1]
    log.append({"version": 2, "loss": 4.0})
    assert [r["version"] for r in HistoryLog(path).records] == [1, 2]


def test_truncate_after_forgets_versions_past_a_checkpoint(tmp_path):
    log = HistoryLog(tmp_path / "evals.jsonl")
    for version in range(1, 6):
        log.append({"version": version})
    log.truncate_after(3)
    assert [r["version"] for r in log.since(-1)] == [1, 2, 3]
    assert [r["version"] for r in HistoryLog(tmp_path / "evals.jsonl").records] == [1, 2, 3]


def test_a_bad_line_in_the_middle_loses_only_itself(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"version": 1}\nnot json\n[1, 2]\n{"version": 3}\n')
    assert [r["version"] for r in HistoryLog(path).records] == [1, 3]
    assert [r["version"] for r in HistoryLog(path).records] == [1, 3]  # rewritten clean
