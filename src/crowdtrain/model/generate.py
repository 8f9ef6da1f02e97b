"""Token-by-token sampling from a GPT with a KV cache: greedy, temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.nn import functional as F

from crowdtrain.model.gpt import GPT, KVCache


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time.

    temperature 0 is greedy decoding (top_k and top_p are then irrelevant). Generation stops
    early after sampling eot_id, which is not yielded. `generator` (on the model's device)
    makes sampling reproducible.

    The prompt is prefilled once, then each step feeds one token through the KV cache. A prompt
    longer than block_size is cropped to its last block_size tokens. When the cache fills up,
    it is re-prefilled with the last block_size // 2 tokens, so the model always sees between
    half a block and a full block of context, at an amortized cost of O(block_size) per token.

    Arguments are checked when generate is called, not when iteration starts. The model is in
    eval mode and grad is off only while a step runs, never while the caller holds a token, so
    the caller may train between tokens.
    """
    block_size = model.config.block_size
    vocab_size = model.config.vocab_size
    _check_arguments(prompt_ids, vocab_size, max_new_tokens, temperature, top_k, top_p)
    context = [int(token) for token in prompt_ids[-block_size:]]
    return _generate(model, context, max_new_tokens, temperature, top_k, top_p, eot_id, generator)


def _check_arguments(
    prompt_ids: list[int],
    vocab_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if len(prompt_ids) == 0:
        raise ValueError(
            "prompt_ids must not be empty; to sample from scratch pass [tokenizer.eot_id]"
        )
    bad = [token for token in prompt_ids if not 0 <= int(token) < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids contains ids outside [0, {vocab_size}): {bad[:5]}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _generate(
    model: GPT,
    context: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eot_id: int | None,
    generator: torch.Generator | None,
) -> Iterator[int]:
    block_size = model.config.block_size
    device = next(model.parameters()).device
    cache = KVCache(model.config)
    logits = _step(model, context, cache, device)
    for _ in range(max_new_tokens):
        token = _sample(logits, temperature, top_k, top_p, generator)
        if token == eot_id:
            return
        yield token
        context.append(token)
        if cache.length == block_size:
            # full: keep the most recent half block so the next refill is block_size // 2 away
            context = context[-max(1, block_size // 2) :]
            cache.reset()
            logits = _step(model, context, cache, device)
        else:
            logits = _step(model, [token], cache, device)


def _step(model: GPT, new_ids: list[int], cache: KVCache, device: torch.device) -> torch.Tensor:
    """Feed new_ids through the cache and return the last position's logits, shape (vocab,)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            idx = torch.tensor([new_ids], dtype=torch.long, device=device)
            logits, _ = model(idx, kv_cache=cache)
    finally:
        model.train(was_training)
    return logits[0, -1].float()


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token if the tokens ranked above it already reach top_p; the first always stays
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_by_id = torch.zeros_like(drop).scatter(0, sorted_ids, drop)
        logits = logits.masked_fill(drop_by_id, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
