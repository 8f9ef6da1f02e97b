"""The TensorBoard sink: scalars of each round and validation losses reach the writer off the
round path and are flushed at stop; a missing tensorboard package is a clear start error."""

from __future__ import annotations

import sys
import time

import pytest

from crowdtrain.server.coordinator import RoundResult
from crowdtrain.server.tensorboard import INSTALL_HINT, TensorBoardSink, summary_writer_class
from crowdtrain.settings import SettingsError


class FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.flushed = self.closed = False

    def add_scalar(self, tag, value, global_step, walltime):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


class FakeEvaluations:
    def __init__(self):
        self.records: list[dict] = []

    def since(self, version: int, limit: int = 10_000) -> list[dict]:
        return [r for r in self.records if r["version"] > version][:limit]


def round_result(version: int, at: float) -> RoundResult:
    record = {
        "version": version,
        "time": at,
        "train_loss": 5.0 - version / 10,
        "lr": 1e-3,
        "updates": 2,
        "nodes": 2,
        "samples": 16,
        "tokens": 2048,
        "wire_bytes": 5000,
        "round_s": 0.5,
    }
    return RoundResult(version, record)


def test_rounds_and_evaluations_are_written_and_flushed_at_stop():
    writer, evals = FakeWriter(), FakeEvaluations()
    sink = TensorBoardSink(writer, evals)
    sink.start()
    now = time.time()
    for version in (1, 2, 3):
        sink.on_round(round_result(version, now + version))
    evals.records.append({"version": 3, "time": now, "valid_loss": 4.25})
    sink.stop()
    assert writer.flushed and writer.closed
    written = {(tag, step): value for tag, value, step in writer.scalars}
    assert written["train/loss", 1] == 4.9
    assert written["round/update_wire_bytes", 3] == 5000
    assert written["train/tokens_per_s", 2] == pytest.approx(2048)  # a round a second
    assert ("train/tokens_per_s", 1) not in written  # no previous round to count from
    assert written["valid/loss", 3] == 4.25
    assert sink.evaluated == 3


def test_evaluations_already_written_are_not_written_again():
    writer, evals = FakeWriter(), FakeEvaluations()
    evals.records = [{"version": v, "time": 0.0, "valid_loss": 1.0} for v in (10, 20)]
    sink = TensorBoardSink(writer, evals, evaluated=10)
    sink.start()
    sink.stop()
    assert [step for tag, _, step in writer.scalars if tag == "valid/loss"] == [20]


def test_a_failing_writer_does_not_stop_the_sink():
    class FullDisk(FakeWriter):
        def add_scalar(self, tag, value, global_step, walltime):
            raise OSError("no space left on device")

    writer = FullDisk()
    sink = TensorBoardSink(writer, FakeEvaluations())
    sink.start()
    sink.on_round(round_result(1, time.time()))
    sink.stop()  # returns: the error was logged, the thread went on to the end
    assert writer.closed


def test_a_missing_tensorboard_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SettingsError) as error:
        summary_writer_class(tmp_path / "tb")
    assert INSTALL_HINT in str(error.value) and "tensorboard_dir" in str(error.value)


def test_the_real_writer_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = summary_writer_class(tmp_path)(log_dir=str(tmp_path))
    sink = TensorBoardSink(writer, FakeEvaluations())
    sink.start()
    sink.on_round(round_result(1, time.time()))
    sink.stop()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert events.Scalars("train/loss")[0].value == pytest.approx(4.9)


def test_a_server_with_tensorboard_dir_but_no_package_fails_before_its_set_up(
    monkeypatch, tmp_path
):
    from crowdtrain.server.runtime import ServerRuntime
    from crowdtrain.settings import ServerSettings

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    settings = ServerSettings(data_dir=tmp_path / "data", tensorboard_dir=tmp_path / "tb")
    with pytest.raises(SettingsError, match="crowdtrain\\[tensorboard\\]"):
        ServerRuntime(settings)
    assert not (tmp_path / "data").exists()  # nothing was built first
