"""Unit tests for the default corpus, text file loading and token batches."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from crowdtrain.data.batches import BatchSampler, encode_documents
from crowdtrain.data.corpus import default_corpus, load_text_files
from crowdtrain.model import Tokenizer


def test_default_corpus_split():
    corpus = default_corpus()
    assert corpus.name == "pydoc-topics"
    assert corpus.valid and corpus.train
    assert not set(corpus.train) & set(corpus.valid)
    train_chars = sum(map(len, corpus.train))
    valid_chars = sum(map(len, corpus.valid))
    assert train_chars > 4 * valid_chars
    assert train_chars + valid_chars > 300_000
    assert all(document.strip() for document in corpus.train + corpus.valid)
    sizes = sorted(map(len, corpus.train))
    assert sizes[len(sizes) // 2] < 5000  # documents are chunks, not whole topics


def test_default_corpus_is_deterministic_across_processes():
    corpus = default_corpus()
    # a different hash seed in a new process must not change the split
    script = "from crowdtrain.data.corpus import default_corpus; print(default_corpus().valid[0])"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONIOENCODING": "utf-8"},
    )
    assert result.stdout == corpus.valid[0] + "\n"
    assert default_corpus() == corpus


def test_default_corpus_valid_fraction():
    small = default_corpus(valid_fraction=0.05)
    large = default_corpus(valid_fraction=0.3)
    assert set(small.valid) < set(large.valid)
    with pytest.raises(ValueError, match="valid_fraction"):
        default_corpus(valid_fraction=1.0)


def test_load_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub" / "b.md").write_text("\ufeffsecond é", encoding="utf-8")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "skip.rst").write_text("not loaded")
    (tmp_path / ".hidden" / "c.txt").write_text("not loaded")
    assert load_text_files(tmp_path) == ["first", "second é"]
    assert load_text_files(str(tmp_path / "a.txt")) == ["first"]


def test_load_text_files_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_files(tmp_path / "missing")
    with pytest.raises(ValueError, match="no files to import"):
        load_text_files(tmp_path)
    (tmp_path / "notes.rst").write_text("x")
    with pytest.raises(ValueError, match=r"notes.rst: unsupported file type '\.rst'"):
        load_text_files(tmp_path / "notes.rst")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text_files(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok, then \xff")
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8 at line 1.*byte offset 15"):
        load_text_files(tmp_path)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["some text to learn a few merges from. " * 50], vocab_size=300)


def test_encode_documents(tokenizer):
    docs = ["first doc", "second", "third one"]
    tokens = encode_documents(tokenizer, docs)
    assert tokens.dtype == np.uint16
    expected = []
    for i, doc in enumerate(docs):
        expected += ([tokenizer.eot_id] if i else []) + tokenizer.encode(doc)
    assert tokens.tolist() == expected
    assert encode_documents(tokenizer, []).size == 0


def test_encode_documents_uses_uint32_for_large_vocabularies():
    class LargeVocab:
        vocab_size = 70_000
        eot_id = 69_999

        def encode_batch(self, texts):
            return [[66_000, 1] for _ in texts]

    tokens = encode_documents(LargeVocab(), ["a", "b"])
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [66_000, 1, 69_999, 66_000, 1]


def test_batch_sampler_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=4, block_size=32, seed=0)
    x, y = sampler.next()
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    # consecutive tokens are consecutive integers here, so y is exactly x + 1
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 999


def test_batch_sampler_is_seeded():
    tokens = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    first = BatchSampler(tokens, 2, 8, seed=5)
    second = BatchSampler(tokens, 2, 8, seed=5)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first.next(), second.next(), strict=True))


def test_batch_sampler_rejects_short_tokens():
    BatchSampler(np.zeros(9, dtype=np.uint16), 1, 8, seed=0)  # exactly one window fits
    with pytest.raises(ValueError, match="at least block_size \\+ 1 = 9 tokens"):
        BatchSampler(np.zeros(8, dtype=np.uint16), 1, 8, seed=0)
