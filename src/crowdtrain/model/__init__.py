"""The GPT model, its presets, tokenizer, sampling and evaluation."""

from crowdtrain.model.evaluate import validation_loss
from crowdtrain.model.generate import generate
from crowdtrain.model.gpt import GPT, GPTConfig, KVCache
from crowdtrain.model.presets import PRESETS, preset_config
from crowdtrain.model.tokenizer import Tokenizer

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "KVCache",
    "Tokenizer",
    "generate",
    "preset_config",
    "validation_loss",
]
