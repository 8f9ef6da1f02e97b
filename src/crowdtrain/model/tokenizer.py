"""Byte-level BPE tokenizer (HF tokenizers) that round-trips any text and has a content version."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from crowdtrain.files import write_atomic

EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOT_TOKEN]
# every byte is a base token, so no text is ever unknown
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """Byte-level BPE with one special token, `<|endoftext|>`, that separates documents.

    Build one with `Tokenizer.train`, `Tokenizer.from_json` or `Tokenizer.load`.
    """

    def __init__(self, hf_tokenizer: HFTokenizer):
        eot_id = hf_tokenizer.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {EOT_TOKEN} token; train it with Tokenizer.train")
        self._tokenizer = hf_tokenizer
        self._eot_id = eot_id
        self._json = hf_tokenizer.to_str()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn merges from texts until vocab_size tokens (fewer if the texts run out of pairs)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                f"{len(SPECIAL_TOKENS)} special token), got {vocab_size}"
            )
        hf_tokenizer = HFTokenizer(models.BPE())
        # no prefix space: it would add a space to the text and break decode(encode(s)) == s
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(hf_tokenizer)

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        try:
            hf_tokenizer = HFTokenizer.from_str(s)
        except Exception as error:  # tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"not a valid tokenizer JSON: {error}") from error
        return cls(hf_tokenizer)

    def to_json(self) -> str:
        return self._json

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON atomically, so a crash never leaves a half-written tokenizer."""
        write_atomic(Path(path), self._json)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        text = Path(path).read_text(encoding="utf-8")
        try:
            return cls.from_json(text)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        # keep <|endoftext|> in the text; dropping it would make decode(encode(s)) lossy
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def version(self) -> str:
        """Content hash: two tokenizers with the same version encode identically."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]
