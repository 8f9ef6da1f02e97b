"""Unit tests for the byte-level BPE tokenizer."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain.model import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 20,
    "Zoë's café serves crème brûlée; 東京 and 北京 are cities. 🎉🚀" * 10,
    "lists, tuples and range objects are the basic sequence types\n" * 20,
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=400)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "  two leading spaces,\ttabs\nand\r\nnewlines  ",
        "naïve façade, Straße, Ελληνικά, русский, 日本語, العربية",
        "emoji 🎉👩‍👩‍👧🏳️‍🌈 and a lone \u0301 combining mark",
        "text with <|endoftext|> inside",
        "\x00 control \x7f bytes",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_learns_merges(tokenizer):
    text = "The quick brown fox"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8"))
    # training stops early when the texts run out of pairs to merge
    assert 300 < tokenizer.vocab_size <= 400


def test_eot_token(tokenizer):
    assert tokenizer.encode("<|endoftext|>") == [tokenizer.eot_id]
    assert tokenizer.decode([tokenizer.eot_id]) == "<|endoftext|>"


def test_encode_batch_matches_encode(tokenizer):
    texts = ["one", "two words", "", "émoji 🎉"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_training_is_deterministic():
    first = Tokenizer.train(TEXTS, vocab_size=400)
    second = Tokenizer.train(iter(TEXTS), vocab_size=400)
    assert first.to_json() == second.to_json()
    assert first.version == second.version
    assert len(first.version) == 16
    int(first.version, 16)


def test_version_changes_with_vocab_size(tokenizer):
    assert Tokenizer.train(TEXTS, vocab_size=350).version != tokenizer.version


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(TEXTS, vocab_size=256)


def test_json_and_file_round_trip(tokenizer, tmp_path):
    assert Tokenizer.from_json(tokenizer.to_json()).version == tokenizer.version
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    tokenizer.save(path)  # overwriting goes through the same atomic replace
    loaded = Tokenizer.load(path)
    assert loaded.version == tokenizer.version
    assert loaded.eot_id == tokenizer.eot_id
    assert loaded.encode("café 🎉") == tokenizer.encode("café 🎉")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_bad_json_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a valid tokenizer JSON"):
        Tokenizer.from_json("{not json")
    path = tmp_path / "broken.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="broken.json"):
        Tokenizer.load(path)
