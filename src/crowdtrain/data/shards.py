"""Token shards: a split's documents as fixed-size arrays of token ids, the format nodes
download and read.

A shard is a raw little-endian uint16 (vocabularies up to 65,535) or uint32 array, read as a
numpy memmap; documents are separated by the end-of-text token. An annotated (SFT) shard has a
uint8 loss mask of the same length beside it (`.mask`): 1 where the token is a response target.
A tokenization's `index.json` lists its shards with their token counts and sha256 (of the token
bytes, then the mask bytes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crowdtrain.data.batches import token_dtype
from crowdtrain.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, render_many
from crowdtrain.files import write_atomic

ENCODE_BATCH = 256  # documents per tokenizer call

Document = str | list[dict[str, str]]  # text, or a conversation (annotated)


@dataclass(frozen=True)
class ShardInfo:
    id: int
    index: int
    tokens: int
    sha256: str
    path: Path
    mask_path: Path | None


@dataclass(frozen=True)
class TokenizationInfo:
    id: int
    dataset: str
    split: str
    tokenizer_version: str
    shard_tokens: int
    revision: int
    tokens: int
    documents: int
    dtype: str
    masked: bool
    shards: tuple[ShardInfo, ...]


def load_shard(shard: ShardInfo, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The shard's token ids (and loss mask) as read-only memmaps."""
    tokens = np.memmap(shard.path, dtype=np.dtype(dtype), mode="r")
    mask = None if shard.mask_path is None else np.memmap(shard.mask_path, np.uint8, mode="r")
    return tokens, mask


def shard_digest(tokens: bytes, mask: bytes | None) -> str:
    digest = hashlib.sha256(tokens)
    if mask is not None:
        digest.update(mask)
    return digest.hexdigest()


def build_shards(
    documents: Iterable[Document],
    directory: Path,
    tokenizer,
    shard_tokens: int,
    masked: bool = False,
    template: ChatTemplate | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Tokenize `documents` into shards of `shard_tokens` tokens (the last one shorter) in
    `directory`, write its index.json, and return the index. Text documents end with the
    end-of-text token; with `masked`, documents are conversations rendered by `template`."""
    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[dict] = []
    pending_ids: list[np.ndarray] = []
    pending_mask: list[np.ndarray] = []
    pending = 0
    count = 0

    def cut(final: bool) -> None:
        nonlocal pending
        if pending == 0:
            return
        ids = np.concatenate(pending_ids)
        mask = np.concatenate(pending_mask) if masked else None
        start = 0
        while len(ids) - start >= shard_tokens or (final and start < len(ids)):
            end = min(start + shard_tokens, len(ids))
            piece = None if mask is None else mask[start:end]
            shards.append(_write_shard(directory, len(shards), ids[start:end], piece))
            start = end
        pending_ids[:] = [ids[start:]]
        pending_mask[:] = [mask[start:]] if masked else []
        pending = len(ids) - start

    for batch in batched(documents, ENCODE_BATCH):
        if masked:
            ids, mask = render_many(batch, tokenizer, template or DEFAULT_CHAT_TEMPLATE)
            pending_ids.append(ids.astype(dtype, copy=False))
            pending_mask.append(mask)
            pending += len(ids)
        else:
            for ids in tokenizer.encode_batch(batch):
                pending_ids.append(np.array([*ids, tokenizer.eot_id], dtype=dtype))
                pending += len(ids) + 1
        count += len(batch)
        if progress is not None:
            progress(sum(document_bytes(d) for d in batch))
        if pending >= shard_tokens:
            cut(final=False)
    cut(final=True)
    index = {
        "tokenizer_version": tokenizer.version,
        "dtype": np.dtype(dtype).name,
        "masked": masked,
        "shard_tokens": shard_tokens,
        "documents": count,
        "shards": shards,
    }
    write_atomic(directory / "index.json", json.dumps(index, indent=1))
    return index


def _write_shard(directory: Path, number: int, ids: np.ndarray, mask: np.ndarray | None) -> dict:
    file = f"shard-{number:05d}.bin"
    token_bytes = np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("<")).tobytes()
    write_atomic(directory / file, token_bytes)
    mask_bytes = None
    if mask is not None:
        mask_bytes = np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
        write_atomic((directory / file).with_suffix(".mask"), mask_bytes)
    return {"file": file, "tokens": len(ids), "sha256": shard_digest(token_bytes, mask_bytes)}


def document_bytes(document: Document) -> int:
    if isinstance(document, str):
        return len(document.encode("utf-8"))
    return sum(len(m["content"].encode("utf-8")) for m in document)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
