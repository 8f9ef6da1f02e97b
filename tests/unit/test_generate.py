"""Unit tests for sampling with the KV cache."""

import pytest
import torch

from crowdtrain.model import GPT, GPTConfig, generate


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    # float64 so cached and uncached logits agree far below any argmax tie
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).double()


def greedy_by_full_forward(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_kv_cache_greedy_matches_full_recompute(model):
    prompt = [1, 5, 9, 2, 7]
    expected = greedy_by_full_forward(model, prompt, 20)
    assert list(generate(model, prompt, 20, temperature=0)) == expected


def test_top_k_one_is_greedy(model):
    prompt = [3, 1, 4, 1, 5]
    greedy = list(generate(model, prompt, 15, temperature=0))
    generator = torch.Generator().manual_seed(0)
    assert list(generate(model, prompt, 15, top_k=1, generator=generator)) == greedy


def test_tiny_top_p_is_greedy(model):
    prompt = [2, 7, 1, 8]
    greedy = list(generate(model, prompt, 15, temperature=0))
    assert list(generate(model, prompt, 15, top_p=1e-9)) == greedy


def test_sampling_is_reproducible_with_a_generator(model):
    def sample(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return list(generate(model, [1, 2, 3], 25, temperature=1.5, generator=generator))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert all(0 <= token < 64 for token in sample(3))


def test_stops_at_eot_without_yielding_it(model):
    prompt = [1, 5, 9]
    greedy = list(generate(model, prompt, 10, temperature=0))
    eot_id = greedy[3]
    stopped = list(generate(model, prompt, 10, temperature=0, eot_id=eot_id))
    assert stopped == greedy[: greedy.index(eot_id)]


def test_generates_past_block_size(model):
    # a prompt longer than the block is cropped; the cache is refilled as generation goes on
    prompt = list(range(64)) * 2
    tokens = list(generate(model, prompt, 100, temperature=0))
    assert len(tokens) == 100
    # until the first refill, the output matches full recompute on the cropped prompt
    assert tokens[:1] == greedy_by_full_forward(model, prompt[-32:], 1)


def test_restores_mode_and_leaves_grad_on_between_tokens(model):
    model.train()
    for _ in generate(model, [1, 2], 3, temperature=0):
        assert model.training
        assert torch.is_grad_enabled()
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt_ids": []}, "prompt_ids"),
        ({"prompt_ids": [64]}, "prompt_ids"),
    ],
)
def test_rejects_bad_arguments_at_call_time(model, kwargs, name):
    arguments = {"prompt_ids": [1, 2], "max_new_tokens": 5, **kwargs}
    # raised by the call itself, before any iteration
    with pytest.raises(ValueError, match=name):
        generate(model, **arguments)
