"""Unit tests for the GPT model, its config, presets, KV cache and validation loss."""

import math

import numpy as np
import pytest
import torch

from crowdtrain.model import GPT, PRESETS, GPTConfig, KVCache, preset_config, validation_loss


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    fields.update(overrides)
    return GPT(GPTConfig(**fields))


def test_config_dict_round_trip():
    config = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=True)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert GPTConfig.from_dict({}) == GPTConfig()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown GPTConfig key.*n_layers"):
        GPTConfig.from_dict({"n_layers": 4})


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"n_embd": 130, "n_head": 4}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": "512"}, "vocab_size"),
        ({"block_size": True}, "block_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"bias": "no"}, "bias"),
    ],
)
def test_config_rejects_bad_values(fields, name):
    with pytest.raises(ValueError, match=name):
        GPTConfig.from_dict(fields)


def test_output_shapes():
    model = tiny_model()
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 64)
    assert loss is not None and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 64)
    assert loss is None


def test_untrained_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    idx = torch.randint(0, 512, (4, 64))
    _, loss = model(idx, torch.randint(0, 512, (4, 64)))
    assert abs(loss.item() - math.log(512)) < 0.15


def test_ignore_index():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, partial = model(idx, targets)
    logits, _ = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64), idx[:, :4].ravel())
    torch.testing.assert_close(partial, expected)


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_model()
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, first = model(x, y)
    for _ in range(30):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.6 * first.item()


def test_weight_tying_shares_storage():
    model = tiny_model()
    state = model.state_dict()
    assert "transformer.wte.weight" in state and "lm_head.weight" in state
    assert state["transformer.wte.weight"].data_ptr() == state["lm_head.weight"].data_ptr()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.trainable_named_parameters()]
    assert names == [name for name, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    # a gradient step through either name moves the one shared tensor
    _, loss = model(torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 4)))
    loss.backward()
    assert model.lm_head.weight.grad is model.transformer.wte.weight.grad


def test_init_is_deterministic_and_gpt2_scaled():
    first, second = tiny_model(seed=3), tiny_model(seed=3)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    big = GPT(GPTConfig(n_layer=8, n_embd=256))
    proj_std = big.transformer.h[0].attn.c_proj.weight.std().item()
    fc_std = big.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_num_params_leaves_out_position_embeddings():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 0.7e6, 1.3e6),
        ("small", 8e6, 15e6),
        ("gpt2-124m", 120e6, 130e6),
        ("gpt2-350m", 340e6, 370e6),
    ],
)
def test_preset_param_counts(name, low, high):
    # the meta device builds the modules without allocating their weights
    with torch.device("meta"):
        model = GPT(preset_config(name))
    assert low <= model.num_params(non_embedding=False) <= high
    assert model.config.vocab_size == PRESETS[name]["vocab_size"]


def test_preset_config_overrides_and_unknown_name():
    config = preset_config("small", vocab_size=1000, block_size=64)
    assert (config.vocab_size, config.block_size, config.n_layer) == (1000, 64, 6)
    message = "unknown model preset 'huge'; choose one of: tiny, small, gpt2-124m, gpt2-350m"
    with pytest.raises(ValueError) as error:
        preset_config("huge")
    assert str(error.value) == message


def test_kv_cache_matches_full_forward():
    model = tiny_model().double().eval()
    idx = torch.randint(0, 64, (2, 12))
    cache = KVCache(model.config)
    # chunks of several tokens after a non-empty past exercise the offset causal mask
    with torch.no_grad():
        for start, end in [(0, 5), (5, 8), (8, 9), (9, 12)]:
            cached, _ = model(idx[:, start:end], kv_cache=cache)
            full, _ = model(idx[:, :end])
            torch.testing.assert_close(cached, full)
    assert cache.length == 12


def test_kv_cache_reset_and_batch_checks():
    model = tiny_model().double().eval()
    idx = torch.randint(0, 64, (1, 6))
    cache = KVCache(model.config)
    with torch.no_grad():
        first, _ = model(idx, kv_cache=cache)
        with pytest.raises(ValueError, match="batch of 1"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
        cache.reset()
        again, _ = model(idx, kv_cache=cache)
    torch.testing.assert_close(first, again)
    assert cache.length == 6


def test_forward_rejects_too_long_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config)
    model(torch.zeros(1, 10, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="10 cached"):
        model(torch.zeros(1, 7, dtype=torch.long), kv_cache=cache)


def test_validation_loss_is_repeatable_and_restores_mode():
    model = tiny_model()
    model.train()
    tokens = np.random.default_rng(0).integers(0, 64, size=500).astype(np.uint16)
    first = validation_loss(model, tokens, batch_size=4, block_size=16, num_batches=3, seed=7)
    second = validation_loss(model, tokens, batch_size=4, block_size=16, num_batches=3, seed=7)
    assert first == second
    assert model.training
    other = validation_loss(model, tokens, batch_size=4, block_size=16, num_batches=3, seed=8)
    assert other != first


def test_validation_loss_rejects_short_tokens():
    model = tiny_model()
    with pytest.raises(ValueError, match="validation set has 16 tokens"):
        validation_loss(model, np.zeros(16, dtype=np.uint16), 2, 16, 1)
