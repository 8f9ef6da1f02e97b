"""Unit tests for checkpoints: exact round trip with optimizer state, pruning, corruption."""

import logging

import pytest
import torch

from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.files import write_atomic
from crowdtrain.server.checkpoints import Checkpoint, CheckpointStore, CorruptCheckpoint

INFO = {"model_config": {"n_layer": 2}, "settings": {"model": "tiny"}, "totals": {"updates": 3}}


def trained(seed: int = 0, steps: int = 3):
    """A small model and its AdamW optimizer after a few steps (so every state entry is set)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 2))
    optimizer = build_optimizer(model.parameters(), OptimizerConfig("adamw", lr=0.01))
    for _ in range(steps):
        take_step(model, optimizer, seed)
    return model, optimizer


def take_step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    loss = model(torch.randn(8, 6, generator=g)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def checkpoint_of(model, optimizer, version: int) -> Checkpoint:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return Checkpoint(version, params, optimizer.state_dict(), INFO)


def assert_optimizer_states_equal(a: dict, b: dict) -> None:
    assert set(a["state"]) == set(b["state"])
    for index, entry in a["state"].items():
        other = b["state"][index]
        assert set(entry) == set(other)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert other[key].dtype == value.dtype and torch.equal(other[key], value), key
            else:
                assert other[key] == value, key
    assert len(a["param_groups"]) == len(b["param_groups"])
    for group, other in zip(a["param_groups"], b["param_groups"], strict=True):
        assert set(group) == set(other)
        for key, value in group.items():
            expected = list(value) if isinstance(value, tuple) else value
            got = list(other[key]) if isinstance(other[key], tuple) else other[key]
            assert got == expected, key


def test_round_trip_restores_params_and_optimizer_exactly(tmp_path):
    model, optimizer = trained()
    store = CheckpointStore(tmp_path)
    path = store.save(checkpoint_of(model, optimizer, version=7))
    assert path == store.path_for(7) and path.exists()

    loaded = store.load(path)
    assert loaded.version == 7 and loaded.info == INFO
    for name, p in model.named_parameters():
        assert torch.equal(loaded.params[name], p.detach())
    assert_optimizer_states_equal(optimizer.state_dict(), loaded.optimizer_state)

    # A fresh model and optimizer resumed from the file take the very same next step.
    resumed, resumed_optimizer = trained(seed=1, steps=0)
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.copy_(loaded.params[name])
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    take_step(model, optimizer, seed=5)
    take_step(resumed, resumed_optimizer, seed=5)
    for (name, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert_optimizer_states_equal(optimizer.state_dict(), resumed_optimizer.state_dict())


def test_checkpoint_without_optimizer_state(tmp_path):
    model, optimizer = trained(steps=0)
    store = CheckpointStore(tmp_path)
    loaded = store.load(store.save(checkpoint_of(model, optimizer, version=0)))
    assert loaded.optimizer_state["state"] == {}
    assert len(loaded.optimizer_state["param_groups"]) == 1


def test_keeps_only_the_last_k(tmp_path):
    model, optimizer = trained()
    store = CheckpointStore(tmp_path, keep=2)
    for version in (1, 2, 3, 10, 4):
        store.save(checkpoint_of(model, optimizer, version))
    assert [v for v, _ in store.list()] == [10, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000000004.safetensors",
        "checkpoint-000000010.safetensors",
    ]
    assert store.load_latest().version == 10


def test_list_ignores_other_files(tmp_path):
    store = CheckpointStore(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "checkpoint-1.safetensors").write_text("x")
    (tmp_path / ".checkpoint-000000001.safetensors.abc.tmp").write_text("x")
    assert store.list() == []
    assert store.load_latest() is None


def two_checkpoints(tmp_path):
    model, optimizer = trained()
    store = CheckpointStore(tmp_path)
    store.save(checkpoint_of(model, optimizer, version=1))
    take_step(model, optimizer, seed=9)
    newest = store.save(checkpoint_of(model, optimizer, version=2))
    return store, newest


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -1])
def test_truncated_newest_is_skipped(tmp_path, caplog, keep_bytes):
    store, newest = two_checkpoints(tmp_path)
    data = newest.read_bytes()
    newest.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint):
        store.load(newest)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.server.checkpoints"):
        loaded = store.load_latest()
    assert loaded.version == 1
    assert any(
        r.levelno == logging.WARNING and newest.name in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("from_end", [1, 4, 33])
def test_bit_flip_in_tensor_data_is_skipped(tmp_path, caplog, from_end):
    store, newest = two_checkpoints(tmp_path)
    data = bytearray(newest.read_bytes())
    data[-from_end] ^= 0x10  # inside the tensor bytes, which follow the header
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        store.load(newest)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.server.checkpoints"):
        loaded = store.load_latest()
    assert loaded.version == 1
    assert any("checksum" in r.getMessage() for r in caplog.records)


def _flip_metadata_byte(path, marker: bytes, offset: int, mask: int) -> None:
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    position = data.index(marker, 8, 8 + header_len) + offset
    data[position] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "marker, offset, mask",
    [
        # '{' -> '[' (one bit) at the start of the info JSON: the header stays valid JSON
        (b'"info":"{', 8, 0x20),
        # '2' -> '3' (one bit) in the version: the file would claim to be version 3
        (b'"version":"2"', 11, 0x01),
    ],
    ids=["info-json", "version"],
)
def test_bit_flip_in_metadata_is_skipped(tmp_path, caplog, marker, offset, mask):
    store, newest = two_checkpoints(tmp_path)
    _flip_metadata_byte(newest, marker, offset, mask)
    with caplog.at_level(logging.WARNING, logger="crowdtrain.server.checkpoints"):
        loaded = store.load_latest()
    assert loaded.version == 1
    assert any(newest.name in r.getMessage() for r in caplog.records)


def test_all_corrupt_gives_none(tmp_path, caplog):
    store, newest = two_checkpoints(tmp_path)
    for _, path in store.list():
        path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="crowdtrain.server.checkpoints"):
        assert store.load_latest() is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    write_atomic(target, b"first")
    write_atomic(target, "second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temp_files(tmp_path):
    target = tmp_path / "file.bin"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # not bytes: fails while writing the temp file
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_checkpoint_save_leaves_no_temp_files(tmp_path):
    store, _ = two_checkpoints(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-000000001.safetensors", "checkpoint-000000002.safetensors"]


def test_downlink_residuals_survive_a_restart(tmp_path):
    # what the server's downlink held back is still owed to the nodes after a restart
    model, optimizer = trained()
    checkpoint = checkpoint_of(model, optimizer, version=7)
    checkpoint.downlink_residuals = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    store = CheckpointStore(tmp_path)
    store.save(checkpoint)
    loaded = store.load_latest()
    assert set(loaded.downlink_residuals) == set(checkpoint.downlink_residuals)
    for name, residual in checkpoint.downlink_residuals.items():
        assert torch.equal(loaded.downlink_residuals[name], residual)
    assert set(loaded.params) == {n for n, _ in model.named_parameters()}
