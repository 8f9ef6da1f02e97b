"""Token arrays from documents, and random (input, target) windows cut from them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # only for annotations: crowdtrain.model imports this module
    from crowdtrain.model.tokenizer import Tokenizer


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one flat token array, with eot_id between consecutive documents."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
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
