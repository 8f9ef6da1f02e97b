"""Token arrays from documents, and (input, target) windows cut from them at random or in order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # only for annotations: crowdtrain.model imports this module
    from crowdtrain.model.tokenizer import Tokenizer


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds every token id: uint16 up to 65535 ids."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one flat token array, with eot_id between consecutive documents."""
    dtype = token_dtype(tokenizer.vocab_size)
    separator = np.array([tokenizer.eot_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(tokenizer.encode_batch(docs)):
        if i > 0:
            pieces.append(separator)
        pieces.append(np.array(ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


class BatchSampler:
    """Batches of windows at random positions; the same seed gives the same sequence."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"batch_size and block_size must be >= 1, got {batch_size} and {block_size}"
            )
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"need at least block_size + 1 = {block_size + 1} tokens to cut one window, "
                f"got {len(tokens)}; use more text or a smaller block_size"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size, block_size); y is x shifted left by one."""
        # the last valid start leaves room for the one extra target token
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class SequentialBatches:
    """Reads one token array front to back, so every token but the first is a target exactly once.

    Windows of block_size + 1 tokens step by block_size, batch_size windows per batch; the
    last batch may have fewer rows, and its last row is padded (inputs 0, targets -1). Targets
    whose `mask` is 0 become -1, which the loss ignores; a batch with no target left is skipped.
    Works on np.memmap arrays: each batch reads only its own slice.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        mask: np.ndarray | None = None,
        start: int = 0,
    ):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"tokens must be a 1-D integer array, got shape {tokens.shape} {tokens.dtype}"
            )
        for name, size in (("batch_size", batch_size), ("block_size", block_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {size!r}")
        if mask is not None and (mask.shape != tokens.shape or mask.dtype.kind not in "biu"):
            raise ValueError(
                f"mask must be a 1-D integer array as long as tokens ({len(tokens)}), "
                f"got shape {mask.shape} {mask.dtype}"
            )
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(tokens):
            raise ValueError(f"start must be between 0 and {len(tokens)} tokens, got {start!r}")
        self.tokens = tokens
        self.mask = mask
        self.batch_size = batch_size
        self.block_size = block_size
        self._position = start
        # the batches still ahead that have a target; one pass over the mask, never the tokens
        self._batch_starts = [
            batch_start
            for batch_start in range(start, len(tokens) - 1, self._targets_per_batch)
            if mask is None or mask[batch_start + 1 : self._target_end(batch_start)].any()
        ]
        self._next_batch = 0

    @property
    def _targets_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def _target_end(self, batch_start: int) -> int:
        """One past the last target position of the batch whose first window starts here."""
        return min(batch_start + self._targets_per_batch, len(self.tokens) - 1) + 1

    @property
    def position(self) -> int:
        """Tokens consumed: every token up to this one has been a target; resume with start=it."""
        return self._position

    @property
    def remaining_batches(self) -> int:
        """Batches that next() will still return (all-masked ones are not counted)."""
        return len(self._batch_starts) - self._next_batch

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, y), both int64 of shape (rows, block_size), rows <= batch_size; None at the end."""
        if self._next_batch == len(self._batch_starts):
            self._position = max(self._position, len(self.tokens) - 1)
            return None
        batch_start = self._batch_starts[self._next_batch]
        self._next_batch += 1
        target_end = self._target_end(batch_start)
        # consecutive windows overlap by one token, so a batch is one contiguous slice
        window = self.tokens[batch_start:target_end].astype(np.int64)
        num_targets = len(window) - 1
        rows = -(-num_targets // self.block_size)
        x = np.zeros(rows * self.block_size, dtype=np.int64)
        y = np.full(rows * self.block_size, -1, dtype=np.int64)
        x[:num_targets] = window[:-1]
        y[:num_targets] = window[1:]
        if self.mask is not None:
            y[:num_targets][self.mask[batch_start + 1 : target_end] == 0] = -1
        self._position = target_end - 1
        shape = (rows, self.block_size)
        return torch.from_numpy(x.reshape(shape)), torch.from_numpy(y.reshape(shape))
