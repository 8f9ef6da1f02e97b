"""Which data a server trains on: the --dataset setting, the resumed run's dataset, and a
dataset without a valid split (fine without the Evaluator, a clear error with it)."""

from __future__ import annotations

import pytest

from crowdtrain.data.store import DataStore
from crowdtrain.server.runtime import DEFAULT_DATASET, ServerRuntime
from crowdtrain.settings import ServerSettings, SettingsError

TEXTS = [f"Document {i} of a small dataset: tokens, shards and leases. " * 8 for i in range(40)]


def small_dataset(data_dir, valid: bool) -> None:
    store = DataStore(data_dir)
    store.import_documents("small", "train", TEXTS[:36], label="test")
    if valid:
        store.import_documents("small", "valid", TEXTS[36:], label="test")
    store.db.close()


def runtime(data_dir, **settings) -> ServerRuntime:
    return ServerRuntime(
        ServerSettings(data_dir=data_dir, vocab_size=300, shard_tokens=512, **settings)
    )


def test_a_resumed_run_keeps_its_dataset_unless_told_otherwise(tmp_path):
    small_dataset(tmp_path, valid=True)
    first = runtime(tmp_path, dataset="small")
    assert first.dataset == "small" and first.train_data.dataset == "small"
    first.save_checkpoint()
    first.db.close()

    resumed = runtime(tmp_path)  # no --dataset: the checkpoint's, not the embedded corpus
    assert resumed.resumed_from == 0
    assert resumed.dataset == "small" and resumed.info()["data"]["dataset"] == "small"
    assert not resumed.store.exists(DEFAULT_DATASET)
    resumed.db.close()


def test_without_a_valid_split_the_evaluator_must_be_off(tmp_path):
    small_dataset(tmp_path, valid=False)
    with pytest.raises(SettingsError, match=r"no valid documents.*evaluate = false"):
        runtime(tmp_path, dataset="small")
    server = runtime(tmp_path, dataset="small", evaluate=False)
    assert server.train_data.split == "train" and server.evaluator.tokens.size == 0
    server.db.close()


def test_an_unknown_dataset_names_the_known_ones(tmp_path):
    small_dataset(tmp_path, valid=True)
    with pytest.raises(SettingsError, match=r"no dataset named 'other'; datasets: small"):
        runtime(tmp_path, dataset="other")


def test_the_first_admin_token_is_shown_even_when_the_first_start_fails(tmp_path):
    """It is made (and its hash stored) before the rest of the set-up: a start that fails
    later must still have shown it, since the next start makes none."""
    shown: list[str] = []
    settings = ServerSettings(data_dir=tmp_path, dataset="no-such-dataset")
    with pytest.raises(SettingsError, match="no-such-dataset"):
        ServerRuntime(settings, on_admin_token=shown.append)
    assert len(shown) == 1 and shown[0].startswith("ct_admin_")
    # the next start finds it (by its hash) and makes no other
    again: list[str] = []
    with pytest.raises(SettingsError):
        ServerRuntime(settings, on_admin_token=again.append)
    assert again == []
