"""Top-k sparsification with error feedback: nothing the optimizer asked for is dropped."""

from __future__ import annotations

import math

import torch

from crowdtrain.compression.codecs import ValueCodec
from crowdtrain.compression.sparse import SparseDelta

# Below this size an exact torch.topk is cheap; above it a sampled threshold is ~9x faster on
# CPU (measured for 1% of 124M entries: 9.0 s exact vs 1.0 s sampled) and k is approximate.
EXACT_TOPK_MAX_NUMEL = 1 << 21
THRESHOLD_SAMPLE_SIZE = 1 << 18


def select_topk(magnitudes: torch.Tensor, k: int, generator: torch.Generator | None = None):
    """Sorted int64 indices of (about) the k largest entries of a 1-D tensor of magnitudes.

    Exact for tensors up to EXACT_TOPK_MAX_NUMEL entries; above that the threshold is estimated
    from a random sample, so the count is at most k and k minus sampling noise.
    """
    numel = magnitudes.numel()
    if k <= 0 or numel == 0:
        return torch.empty(0, dtype=torch.int64, device=magnitudes.device)
    if k >= numel:
        return torch.arange(numel, device=magnitudes.device)
    if numel > EXACT_TOPK_MAX_NUMEL:
        sample_at = torch.randint(
            numel, (THRESHOLD_SAMPLE_SIZE,), generator=generator, device="cpu"
        ).to(magnitudes.device)
        sample = magnitudes[sample_at]
        rank = max(1, THRESHOLD_SAMPLE_SIZE - math.ceil(THRESHOLD_SAMPLE_SIZE * k / numel))
        threshold = sample.kthvalue(rank).values
        indices = torch.nonzero(magnitudes > threshold).flatten()
        # Ties (for example a tensor of mostly zeros) can make the mask far too wide.
        if 0 < indices.numel() <= 2 * k:
            if indices.numel() > k:  # never more than k: a server caps the entries it takes
                keep = torch.topk(magnitudes[indices], k, sorted=False).indices
                indices = indices[keep.sort().values]
            return indices
    indices = torch.topk(magnitudes, k, sorted=False).indices
    return indices.sort().values


class TopKCompressor:
    """Keeps one residual per parameter; `compress` sends the top-k of (input + residual).

    Invariant (tested): sent + new residual == input + old residual, entry by entry.
    """

    def __init__(self, density: float, codec: ValueCodec, seed: int = 0):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.codec = codec
        self.residuals: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def compress(self, tensors: dict[str, torch.Tensor]) -> dict[str, SparseDelta]:
        """Sparsify and quantize each tensor; keep what was not sent as the next residual."""
        out: dict[str, SparseDelta] = {}
        for name, tensor in tensors.items():
            residual = self.residuals.get(name)
            accumulated = tensor.detach().float() + (residual if residual is not None else 0.0)
            accumulated = accumulated.contiguous()  # a transposed input keeps its strides
            flat = accumulated.view(-1)
            if self.density >= 1.0:
                sent = SparseDelta.encode(accumulated, self.codec)
                sent.add_to(accumulated, alpha=-1.0)
                self.residuals[name] = accumulated
                out[name] = sent
                continue
            k = max(1, math.ceil(self.density * flat.numel()))
            indices = select_topk(flat.abs(), k, self._generator).to(torch.int32)
            sent = SparseDelta.encode(flat[indices], self.codec, indices)
            sent.add_to(accumulated, alpha=-1.0)
            self.residuals[name] = accumulated
            out[name] = sent
        return out

    def restore(self, sent: dict[str, SparseDelta]) -> None:
        """Put an update the server refused back into the residuals, so it is sent later."""
        for name, delta in sent.items():
            delta.add_to(self.residuals[name])
