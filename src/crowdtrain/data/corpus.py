"""Text corpora: the default one shipped inside Python itself, and a node's own files."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from crowdtrain.data.importers import DataImportError, ImportOptions, find_sources, read_documents

# documents are built from whole paragraphs until they reach this size, so most are 2-4 KB
DOCUMENT_MIN_CHARS = 2000


@dataclass
class Corpus:
    name: str  # short label that goes into run metadata
    train: list[str]  # training documents
    valid: list[str]  # held-out documents for validation loss


def default_corpus(valid_fraction: float = 0.1) -> Corpus:
    """Python's own help topics (pydoc_data, ~460 KB of English and code); nothing is downloaded.

    Each document goes to `valid` by a hash of its text, so the split is the same in every run
    and process, and identical documents never land on both sides.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be strictly between 0 and 1, got {valid_fraction}")
    # imported here: it is a large module that only this function needs
    from pydoc_data.topics import topics

    train: list[str] = []
    valid: list[str] = []
    for topic in sorted(topics):
        for document in _split_into_documents(topics[topic]):
            (valid if _hash_fraction(document) < valid_fraction else train).append(document)
    return Corpus(name="pydoc-topics", train=train, valid=valid)


def _split_into_documents(text: str) -> list[str]:
    """Group blank-line-separated paragraphs into documents of at least DOCUMENT_MIN_CHARS."""
    documents: list[str] = []
    paragraphs: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
        if size >= DOCUMENT_MIN_CHARS:
            documents.append("\n\n".join(paragraphs))
            paragraphs, size = [], 0
    if paragraphs:
        documents.append("\n\n".join(paragraphs))
    return documents


def _hash_fraction(text: str) -> float:
    """A number in [0, 1) fixed by the text; Python's hash() is salted per process, so no."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def load_text_files(path: str | os.PathLike[str]) -> list[str]:
    """Every text document in a file or directory, read by the store's importers (any format
    `crowdtrain data import` takes): a node's own data for `crowdtrain node --data`."""
    options = ImportOptions()
    documents = [
        document
        for source in find_sources(path, options)
        for document in read_documents(source, options)
    ]
    if not documents:
        raise DataImportError(f"no text found in {path}: every file in it is empty")
    return documents
