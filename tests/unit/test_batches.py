"""Unit tests for SequentialBatches, which reads a token shard front to back."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from crowdtrain.data.batches import SequentialBatches
from crowdtrain.model import GPT, GPTConfig


def shard(length: int, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=length).astype(dtype)


def read_all(reader: SequentialBatches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    while (batch := reader.next()) is not None:
        batches.append(batch)
    return batches


def flat_targets(batches) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of all batches, rows in order, flattened."""
    x = torch.cat([x for x, _ in batches]).flatten().numpy()
    y = torch.cat([y for _, y in batches]).flatten().numpy()
    return x, y


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("length", [2, 9, 17, 24, 25, 103, 97])
def test_every_token_but_the_first_is_a_target_once(length, dtype):
    tokens = shard(length, dtype=dtype)
    batch_size, block_size = 3, 8
    reader = SequentialBatches(tokens, batch_size, block_size)
    num_windows = -(-(length - 1) // block_size)
    assert reader.remaining_batches == -(-num_windows // batch_size)

    batches = read_all(reader)
    assert len(batches) == -(-num_windows // batch_size)
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape and x.shape[1] == block_size and 1 <= x.shape[0] <= batch_size
        # within a row the target is the next input (where that input is not padding)
        valid = y[:, 1:] != -1
        assert torch.equal(y[:, :-1][valid], x[:, 1:][valid])
    x, y = flat_targets(batches)
    num_targets = length - 1
    np.testing.assert_array_equal(y[:num_targets], tokens[1:])
    np.testing.assert_array_equal(x[:num_targets], tokens[:-1])
    # only the last row is padded: inputs 0, targets ignored
    assert (y[num_targets:] == -1).all() and (x[num_targets:] == 0).all()
    assert len(y) - num_targets < block_size
    assert reader.remaining_batches == 0 and reader.position == length - 1
    assert reader.next() is None


def test_last_batch_has_fewer_rows():
    tokens = shard(8 * 7 + 4)  # 59 targets: 7 full windows and one of 3 targets
    reader = SequentialBatches(tokens, batch_size=3, block_size=8)
    shapes = [tuple(x.shape) for x, _ in read_all(reader)]
    assert shapes == [(3, 8), (3, 8), (2, 8)]


@pytest.mark.parametrize("length", [0, 1])
def test_a_shard_without_a_target_has_no_batches(length):
    reader = SequentialBatches(shard(length), batch_size=2, block_size=4)
    assert reader.remaining_batches == 0
    assert reader.next() is None


def test_a_one_token_tail_is_dropped():
    tokens = shard(17)  # windows [0, 8] and [8, 16]; token 16 is the last target
    batches = read_all(SequentialBatches(tokens, batch_size=1, block_size=8))
    assert len(batches) == 2
    assert batches[-1][1][0, -1] == int(tokens[16])


def test_resume_from_position_continues_the_pass():
    tokens = shard(200)
    reader = SequentialBatches(tokens, batch_size=2, block_size=8)
    assert reader.position == 0
    read_all_at_once = read_all(SequentialBatches(tokens, batch_size=2, block_size=8))
    reader.next()
    reader.next()
    assert reader.position == 2 * 2 * 8
    resumed = SequentialBatches(tokens, batch_size=2, block_size=8, start=reader.position)
    assert resumed.remaining_batches == reader.remaining_batches
    rest = read_all(resumed)
    assert len(rest) == len(read_all_at_once) - 2
    for (x, y), (x_expected, y_expected) in zip(rest, read_all_at_once[2:], strict=True):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_start_anywhere_covers_the_rest():
    tokens = shard(100)
    start = 37
    x, y = flat_targets(
        read_all(SequentialBatches(tokens, batch_size=2, block_size=8, start=start))
    )
    np.testing.assert_array_equal(y[: 100 - 1 - start], tokens[start + 1 :])
    np.testing.assert_array_equal(x[: 100 - 1 - start], tokens[start:-1])
    assert SequentialBatches(tokens, batch_size=2, block_size=8, start=99).next() is None
    assert SequentialBatches(tokens, batch_size=2, block_size=8, start=100).next() is None


def test_masked_targets_become_minus_one():
    tokens = shard(150)
    mask = np.random.default_rng(1).integers(0, 2, size=150).astype(np.uint8)
    _, y = flat_targets(read_all(SequentialBatches(tokens, 3, 8, mask=mask)))
    expected = np.where(mask[1:] == 1, tokens[1:].astype(np.int64), -1)
    np.testing.assert_array_equal(y[:149], expected)


def test_batches_without_a_target_are_skipped():
    tokens = shard(4 * 16 + 1)  # four batches of 2 windows of 8 tokens
    mask = np.ones(len(tokens), dtype=np.uint8)
    mask[17:33] = 0  # every target of the second batch
    mask[49:] = 0  # and of the fourth
    unmasked = read_all(SequentialBatches(tokens, 2, 8))
    reader = SequentialBatches(tokens, 2, 8, mask=mask)
    assert reader.remaining_batches == 2
    first = reader.next()
    assert first is not None and torch.equal(first[1], unmasked[0][1])
    third = reader.next()
    assert third is not None and torch.equal(third[0], unmasked[2][0])
    assert reader.position == 48
    assert reader.next() is None
    assert reader.position == len(tokens) - 1

    nothing = SequentialBatches(tokens, 2, 8, mask=np.zeros(len(tokens), dtype=np.uint8))
    assert nothing.remaining_batches == 0 and nothing.next() is None


def test_reads_a_memmap(tmp_path):
    tokens = shard(300, dtype=np.uint32)
    mask = np.random.default_rng(2).integers(0, 2, size=300).astype(np.uint8)
    tokens.tofile(tmp_path / "tokens.bin")
    mask.tofile(tmp_path / "mask.bin")
    mapped_tokens = np.memmap(tmp_path / "tokens.bin", dtype=np.uint32, mode="r")
    mapped_mask = np.memmap(tmp_path / "mask.bin", dtype=np.uint8, mode="r")
    reader = SequentialBatches(mapped_tokens, 4, 16, mask=mapped_mask, start=5)
    assert reader.tokens is mapped_tokens  # kept mapped, not copied
    expected = read_all(SequentialBatches(tokens, 4, 16, mask=mask, start=5))
    got = read_all(reader)
    assert len(got) == len(expected)
    for (x, y), (x_expected, y_expected) in zip(got, expected, strict=True):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": np.zeros((2, 5), dtype=np.uint16)}, "tokens must be a 1-D integer"),
        ({"tokens": np.zeros(10, dtype=np.float32)}, "tokens must be a 1-D integer"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"block_size": 2.0}, "block_size must be an integer >= 1"),
        ({"mask": np.ones(9, dtype=np.uint8)}, "mask must be .* as long as tokens"),
        ({"mask": np.ones(10, dtype=np.float32)}, "mask must be .* as long as tokens"),
        ({"start": -1}, "start must be between 0 and 10"),
        ({"start": 11}, "start must be between 0 and 10"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    arguments = {"tokens": shard(10), "batch_size": 2, "block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        SequentialBatches(**arguments)


def test_gpt_loss_on_a_masked_batch_counts_only_unmasked_targets():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).eval()
    tokens = np.random.default_rng(3).integers(0, 64, size=3 * 16 + 1).astype(np.uint16)
    mask = np.random.default_rng(4).integers(0, 2, size=len(tokens)).astype(np.uint8)
    batch = SequentialBatches(tokens, batch_size=4, block_size=16, mask=mask).next()
    assert batch is not None
    x, y = batch
    assert (y == -1).any() and (y != -1).any()
    with torch.no_grad():
        logits, loss = model(x, y)
    keep = y != -1
    expected = F.cross_entropy(logits[keep], y[keep])
    assert loss is not None
    torch.testing.assert_close(loss, expected)
