"""Validation loss over a fixed sample of windows, comparable from one call to the next."""

from __future__ import annotations

import numpy as np
import torch

from crowdtrain.data.batches import BatchSampler
from crowdtrain.model.gpt import GPT


def validation_loss(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    num_batches: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> float:
    """Mean loss over num_batches batches of windows whose positions depend only on seed.

    A fresh sampler per call makes every call score the same windows, so changes in the number
    reflect the model, not the sample. Runs in eval mode without grad; the mode is restored.
    """
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"validation set has {len(tokens)} tokens, fewer than block_size + 1 = "
            f"{block_size + 1}; use more validation text or a smaller block_size"
        )
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    sampler = BatchSampler(tokens, batch_size, block_size, seed)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        with torch.no_grad():
            for _ in range(num_batches):
                x, y = sampler.next()
                _, loss = model(x.to(device), y.to(device))
                assert loss is not None  # forward always returns a loss when given targets
                total += loss.item()
    finally:
        model.train(was_training)
    return total / num_batches
