"""Named model sizes, from a ~1M-parameter smoke test to GPT-2 medium."""

from __future__ import annotations

from crowdtrain.model.gpt import GPTConfig

# vocab_size doubles as the default size to train the tokenizer to; the gpt2 sizes use 50304
# (50257 rounded up to a multiple of 64) because it makes the embedding matmuls faster on GPUs
PRESETS: dict[str, dict] = {
    # ~0.87M parameters: runs anywhere, for tests and first tries
    "tiny": dict(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # ~12M parameters: learns something in minutes on a laptop
    "small": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),
    # ~124M parameters: GPT-2 small
    "gpt2-124m": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # ~354M parameters: GPT-2 medium
    "gpt2-350m": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
}


def preset_config(
    name: str, vocab_size: int | None = None, block_size: int | None = None
) -> GPTConfig:
    """The GPTConfig of a preset; vocab_size and block_size override the preset's when given."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    if block_size is not None:
        fields["block_size"] = block_size
    return GPTConfig(**fields)
