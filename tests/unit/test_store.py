"""The dataset store: atomic deduplicating imports, tokenized shards, removal and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from crowdtrain.cli import app
from crowdtrain.data.importers import DataImportError
from crowdtrain.data.leases import LeaseBook
from crowdtrain.data.shards import load_shard
from crowdtrain.data.store import DataStore, StoreError, check_dataset_name
from crowdtrain.db import Lease, Shard, Source, Split, Tokenization
from crowdtrain.db.models import DocumentHash
from crowdtrain.model.tokenizer import EOT_TOKEN, Tokenizer

TRAINING_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A shard is a fixed number of tokens cut from the documents of a split.",
    "Every document ends with the end-of-text token before the next one starts.",
    "Assistant answers are the only tokens the loss is computed on.",
] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TRAINING_TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def other_tokenizer(tokenizer) -> Tokenizer:
    other = Tokenizer.train(TRAINING_TEXTS, vocab_size=280)
    assert other.version != tokenizer.version
    return other


@pytest.fixture
def store(tmp_path) -> DataStore:
    store = DataStore(tmp_path / "data")
    yield store
    store.db.close()


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def texts(prefix: str, count: int) -> list[str]:
    return [f"{prefix} document {i}: the fox jumps over {i * i} lazy dogs." for i in range(count)]


def files(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def file_size(path: Path) -> int:
    """0 for a file that is gone (renamed by the process that writes it)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def snapshot(store: DataStore) -> dict:
    """What a user can see of the store: list(), show() of every dataset, the files, the
    document hashes."""
    listed = store.list()
    with store.db.session() as session:
        hashes = session.scalar(select(func.count()).select_from(DocumentHash))
    return {
        "list": listed,
        "show": {d["name"]: store.show(d["name"]) for d in listed},
        "files": files(store.root),
        "hashes": hashes,
    }


def split_summary(store: DataStore, dataset: str, split: str) -> dict:
    [dataset_row] = [d for d in store.list() if d["name"] == dataset]
    [split_row] = [s for s in dataset_row["splits"] if s["name"] == split]
    return split_row


def tokenizations(store: DataStore, dataset: str, split: str, version: str | None = None):
    [split_row] = [s for s in store.show(dataset, version)["splits"] if s["name"] == split]
    return split_row["tokenizations"]


# ------------------------------------------------------------------------------------ import


def test_directory_import_counts_orders_and_drops_duplicates(store, tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_text("First text document.\n", encoding="utf-8")
    write_jsonl(
        source / "b.jsonl",
        [{"text": "one"}, {"text": "two"}, {"text": "one"}, {"text": "First text document.\n"}],
    )

    report = store.import_path(source, "docs", "train")

    assert report.imported == [
        str((source / "a.txt").resolve()),
        str((source / "b.jsonl").resolve()),
    ]
    assert (report.documents, report.duplicates, report.skipped) == (3, 2, [])
    assert report.bytes == len("First text document.\n") + len("one") + len("two")
    assert report.changed
    assert "imported 3 document(s)" in report.summary()
    assert "dropped 2 exact duplicate(s)" in report.summary()
    assert list(store.documents("docs", "train")) == ["First text document.\n", "one", "two"]
    summary = split_summary(store, "docs", "train")
    assert {k: summary[k] for k in ("documents", "duplicates", "sources", "revision")} == {
        "documents": 3,
        "duplicates": 2,
        "sources": 2,
        "revision": 1,
    }
    assert (summary["tokens"], summary["shards"]) == (None, None)

    # across imports into the same split
    more = store.import_path(
        write_jsonl(tmp_path / "more.jsonl", [{"text": "two"}, {"text": "three"}]), "docs", "train"
    )
    assert (more.documents, more.duplicates) == (1, 1)
    assert list(store.documents("docs", "train")) == [
        "First text document.\n",
        "one",
        "two",
        "three",
    ]

    # across splits of the same dataset: a valid document equal to a train one is dropped
    valid = store.import_path(
        write_jsonl(tmp_path / "valid.jsonl", [{"text": "three"}, {"text": "held out"}]),
        "docs",
        "valid",
    )
    assert (valid.documents, valid.duplicates) == (1, 1)
    assert list(store.documents("docs", "valid")) == ["held out"]
    assert split_summary(store, "docs", "valid")["duplicates"] == 1
    assert split_summary(store, "docs", "train")["documents"] == 4


def test_reimporting_the_same_sources_changes_nothing(store, tmp_path):
    source = tmp_path / "corpus"
    write_jsonl(source / "a.jsonl", [{"text": t} for t in texts("a", 5)])
    write_jsonl(source / "b.jsonl", [{"text": t} for t in texts("b", 5)])
    store.import_path(source, "docs", "train")
    before = snapshot(store)

    again = store.import_path(source, "docs", "train")

    assert not again.changed
    assert (again.documents, again.duplicates, again.imported) == (0, 0, [])
    assert sorted(again.skipped) == sorted(str(p.resolve()) for p in source.iterdir())
    assert again.summary().startswith("nothing changed: 2 source(s) were already imported")
    assert snapshot(store) == before
    # a single file of the directory, imported on its own, is also already known
    assert not store.import_path(source / "a.jsonl", "docs", "train").changed
    assert snapshot(store) == before


def test_import_documents_from_memory_dedups_and_is_idempotent(store):
    report = store.import_documents("mem", "train", ["x", "y", "x"], label="builtin")
    assert (report.documents, report.duplicates, report.imported) == (2, 1, ["builtin"])
    assert list(store.documents("mem", "train")) == ["x", "y"]
    again = store.import_documents("mem", "train", ["x", "y", "x"], label="builtin")
    assert not again.changed and again.skipped == ["builtin"]
    assert store.show("mem")["splits"][0]["sources"][0]["path"] == "builtin"


# -------------------------------------------------------------------------------- atomicity


def test_failed_import_leaves_store_exactly_as_before(store, tmp_path):
    store.import_path(write_jsonl(tmp_path / "first.jsonl", [{"text": "kept"}]), "docs", "train")
    before = snapshot(store)
    source = tmp_path / "mixed"
    # more documents than one hash batch, so the part file really is written before the error
    write_jsonl(source / "a_good.jsonl", [{"text": t} for t in texts("good", 1200)])
    (source / "b_bad.txt").write_bytes(b"a fine first line\nthen \xff\xfe broken\n")

    for dataset in ("docs", "fresh"):
        with pytest.raises(DataImportError, match=r"b_bad\.txt: not valid UTF-8 at line 2"):
            store.import_path(source, dataset, "train")
        assert snapshot(store) == before
        assert not list(store.root.rglob("*.tmp"))
    with pytest.raises(StoreError, match="no dataset named 'fresh'"):
        store.show("fresh")
    assert list(store.documents("docs", "train")) == ["kept"]
    # nothing of the failed import counts as imported: without the bad file it goes through
    (source / "b_bad.txt").unlink()
    assert store.import_path(source, "docs", "train").documents == 1200


def test_sweep_removes_debris_only_once_it_is_old(tmp_path):
    data_dir = tmp_path / "data"
    store = DataStore(data_dir)
    store.import_path(write_jsonl(tmp_path / "a.jsonl", [{"text": "kept"}]), "docs", "train")
    store.db.close()
    before = files(data_dir / "datasets")
    debris = [
        data_dir / "datasets/docs/train/parts/.0123.jsonl.zst.tmp",
        data_dir / "datasets/docs/train/parts/orphan.jsonl.zst",
        data_dir / "datasets/docs/train/tokens/.building-abc/shard-00000.bin",
        data_dir / "datasets/ghost/train/parts/x.jsonl.zst",
    ]
    for path in debris:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"debris")

    DataStore(data_dir).db.close()  # young files may belong to an import still running
    assert all(path.exists() for path in debris)

    store = DataStore(data_dir, sweep_age_s=0)
    assert files(data_dir / "datasets") == before
    assert not (data_dir / "datasets/ghost").exists()
    assert list(store.documents("docs", "train")) == ["kept"]
    store.db.close()


def test_sweep_spares_an_old_folder_with_a_live_import_in_it(tmp_path):
    """A new dataset's folder is created once; an import of it that runs past the sweep age
    keeps writing its temp file, and that is what counts."""
    data_dir = tmp_path / "data"
    DataStore(data_dir).db.close()
    live = data_dir / "datasets/fresh/train/parts/.abc.jsonl.zst.tmp"
    live.parent.mkdir(parents=True)
    live.write_bytes(b"being written")
    old = time.time() - 3600
    for folder in (live.parent, live.parent.parent, live.parent.parent.parent):
        os.utime(folder, (old, old))
    DataStore(data_dir, sweep_age_s=600).db.close()
    assert live.exists()
    os.utime(live, (old, old))  # the import died an hour ago
    DataStore(data_dir, sweep_age_s=600).db.close()
    assert not (data_dir / "datasets/fresh").exists()


def test_import_killed_midway_leaves_nothing_behind(tmp_path):
    data_dir = tmp_path / "data"
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "already here"}])
    store = DataStore(data_dir)
    store.import_path(small, "big", "train")
    store.db.close()
    big = tmp_path / "big.jsonl"
    count = 60_000  # ~18 MB: a few seconds of import on 2 cores
    filler = "alpha beta gamma %d delta " * 10
    big.write_text(
        "".join(
            f'{{"text": "doc {i} {filler % ((i * 7919 % 100003,) * 10)}"}}\n' for i in range(count)
        ),
        encoding="utf-8",
    )
    before = files(data_dir / "datasets")
    parts = data_dir / "datasets/big/train/parts"

    process = subprocess.Popen(
        [sys.executable, "-m", "crowdtrain", "data", "import", str(big), "--dataset", "big"]
        + ["--data-dir", str(data_dir)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sizes: set[int] = set()
        deadline = time.monotonic() + 60
        while len(sizes) < 2 and process.poll() is None and time.monotonic() < deadline:
            sizes |= {size for p in parts.glob(".*.tmp") if (size := file_size(p))}
            time.sleep(0.01)
        assert process.poll() is None, "the import finished before it could be killed"
        assert len(sizes) >= 2, "the import never started writing its part file"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(parts.glob(".*.tmp")), "the killed import left no part file: nothing was tested"

    store = DataStore(data_dir, sweep_age_s=0)
    assert [(s["name"], s["documents"]) for s in store.list()[0]["splits"]] == [("train", 1)]
    assert files(data_dir / "datasets") == before
    assert list(store.documents("big", "train")) == ["already here"]

    report = store.import_path(big, "big", "train")
    assert (report.documents, report.duplicates) == (count, 0)
    assert split_summary(store, "big", "train")["documents"] == count + 1
    store.db.close()


# ------------------------------------------------------------------------------ bad requests


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a" * 65, "..", "with space"])
def test_bad_dataset_names_are_refused_and_change_nothing(store, tmp_path, name):
    store.import_path(write_jsonl(tmp_path / "a.jsonl", [{"text": "kept"}]), "docs", "train")
    other = write_jsonl(tmp_path / "b.jsonl", [{"text": "new"}])
    before = snapshot(store)
    outside = sorted(p for p in store.data_dir.parent.rglob("*") if p.is_dir())

    message = f"dataset name {name!r} is not allowed: use 1-64 letters"
    with pytest.raises(StoreError, match="^" + re.escape(message)):
        store.import_path(other, name, "train")
    with pytest.raises(StoreError, match="is not allowed"):
        store.import_documents(name, "train", ["new"], label="memory")
    with pytest.raises(StoreError, match="is not allowed"):
        store.remove(name)

    assert snapshot(store) == before
    assert sorted(p for p in store.data_dir.parent.rglob("*") if p.is_dir()) == outside


def test_longest_allowed_name_is_64_characters(store, tmp_path):
    name = "a" * 64
    assert check_dataset_name(name) == name
    store.import_path(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]), name, "train")
    assert [d["name"] for d in store.list()] == [name]


def test_unknown_split_is_refused_and_changes_nothing(store, tmp_path):
    file = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    before = snapshot(store)
    message = r"unknown split 'test'; choose one of: train, valid, annotated"
    with pytest.raises(StoreError, match=message):
        store.import_path(file, "docs", "test")
    with pytest.raises(StoreError, match=message):
        store.import_documents("docs", "test", ["x"], label="memory")
    assert snapshot(store) == before
    assert not (store.root / "docs").exists()


# ----------------------------------------------------------------------------- tokenization


def expected_tokens(tokenizer: Tokenizer, documents: list[str]) -> list[int]:
    return [t for doc in documents for t in [*tokenizer.encode(doc), tokenizer.eot_id]]


def test_shards_hold_every_document_then_eot_in_order(store, tmp_path, tokenizer):
    documents = texts("shard", 40)
    store.import_path(
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in documents]), "docs", "train"
    )

    info = store.tokenized("docs", "train", tokenizer, shard_tokens=64)

    expected = expected_tokens(tokenizer, documents)
    assert (info.dtype, info.masked, info.tokens, info.documents) == (
        "uint16",
        False,
        len(expected),
        40,
    )
    assert len(info.shards) == -(-len(expected) // 64) > 2
    pieces = []
    for position, shard in enumerate(info.shards):
        ids, mask = load_shard(shard, info.dtype)
        assert mask is None and shard.mask_path is None
        assert ids.dtype == np.uint16 and len(ids) == shard.tokens
        assert shard.index == position
        assert hashlib.sha256(shard.path.read_bytes()).hexdigest() == shard.sha256
        if position < len(info.shards) - 1:
            assert shard.tokens == 64
        pieces.append(np.asarray(ids))
    assert 0 < info.shards[-1].tokens <= 64
    assert np.concatenate(pieces).tolist() == expected
    assert store.tokens(info).tolist() == expected
    assert store.tokens(info, limit=70).tolist() == expected[:70]
    summary = split_summary(store, "docs", "train")
    assert (summary["tokens"], summary["shards"]) == (len(expected), len(info.shards))


def test_tokenized_is_reused_until_documents_or_tokenizer_change(
    store, tmp_path, tokenizer, other_tokenizer
):
    store.import_path(
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts("a", 20)]), "docs", "train"
    )
    first = store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    stamps = [(s.path.stat().st_ino, s.path.stat().st_mtime_ns) for s in first.shards]

    assert store.tokenized("docs", "train", tokenizer, shard_tokens=64) == first
    assert [(s.path.stat().st_ino, s.path.stat().st_mtime_ns) for s in first.shards] == stamps
    assert [t["stale"] for t in tokenizations(store, "docs", "train", tokenizer.version)] == [False]

    # an import of nothing but duplicates adds no documents: the shards stay current
    store.import_path(
        write_jsonl(tmp_path / "dup.jsonl", [{"text": texts("a", 1)[0]}]), "docs", "train"
    )
    assert store.tokenized("docs", "train", tokenizer, shard_tokens=64) == first

    store.import_path(
        write_jsonl(tmp_path / "b.jsonl", [{"text": "one more document"}]), "docs", "train"
    )
    assert [t["stale"] for t in tokenizations(store, "docs", "train")] == [True]
    second = store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    assert second.id != first.id and second.revision == first.revision + 1
    assert second.documents == 21
    assert store.tokens(second).tolist() == expected_tokens(
        tokenizer, [*texts("a", 20), "one more document"]
    )
    assert [t["stale"] for t in tokenizations(store, "docs", "train")] == [True, False]

    third = store.tokenized("docs", "train", other_tokenizer, shard_tokens=64)
    assert third.id not in (first.id, second.id)
    assert third.tokenizer_version == other_tokenizer.version
    assert [t["stale"] for t in tokenizations(store, "docs", "train", other_tokenizer.version)] == [
        True,
        True,
        False,
    ]
    assert [t["stale"] for t in tokenizations(store, "docs", "train", tokenizer.version)] == [
        True,
        False,
        True,
    ]

    old_directories = {first.shards[0].path.parent, second.shards[0].path.parent}
    store.delete_stale_tokenizations(third)
    assert not any(directory.exists() for directory in old_directories)
    assert third.shards[0].path.exists()
    assert [t["tokenizer_version"] for t in tokenizations(store, "docs", "train")] == [
        other_tokenizer.version
    ]
    with store.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Shard)) == len(third.shards)


def test_stale_tokenization_in_an_open_epoch_is_kept(store, tmp_path, tokenizer, other_tokenizer):
    store.import_path(
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts("a", 20)]), "docs", "train"
    )
    in_use = store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    LeaseBook(store.db, in_use, ttl_s=60).acquire("node-a")  # opens epoch 0
    current = store.tokenized("docs", "train", other_tokenizer, shard_tokens=64)

    store.delete_stale_tokenizations(current)

    assert all(shard.path.exists() for shard in in_use.shards)
    assert len(tokenizations(store, "docs", "train")) == 2


def test_tokenized_refuses_empty_splits_and_tiny_shards(store, tokenizer):
    with pytest.raises(StoreError, match="has no train documents; import some with `crowdtrain"):
        store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    with pytest.raises(StoreError, match="shard_tokens must be at least 2, got 1"):
        store.tokenized("docs", "train", tokenizer, shard_tokens=1)


def test_annotated_split_gives_masked_shards_of_the_responses(store, tmp_path, tokenizer):
    records = [
        {"prompt": "What does a shard hold?", "response": "A fixed number of tokens."},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there!"},
            ]
        },
        {"prompt": "And the mask?", "response": "It marks the answer tokens."},
    ]
    store.import_path(write_jsonl(tmp_path / "sft.jsonl", records), "docs", "annotated")
    assert len(list(store.documents("docs", "annotated"))) == 3

    info = store.tokenized("docs", "annotated", tokenizer, shard_tokens=16)

    assert info.masked and info.documents == 3 and len(info.shards) > 1
    all_ids, all_masks = [], []
    for shard in info.shards:
        ids, mask = load_shard(shard, info.dtype)
        assert shard.mask_path is not None and shard.mask_path.exists()
        assert len(mask) == len(ids) == shard.tokens
        digest = hashlib.sha256(shard.path.read_bytes() + shard.mask_path.read_bytes())
        assert digest.hexdigest() == shard.sha256
        all_ids.append(np.asarray(ids))
        all_masks.append(np.asarray(mask))
    ids, mask = np.concatenate(all_ids), np.concatenate(all_masks)
    assert 0 < mask.sum() < len(mask)
    answers = ["A fixed number of tokens.", "Hello there!", "It marks the answer tokens."]
    # each answer, its end of turn and the eot that ends the conversation are targets
    assert tokenizer.decode(ids[mask == 1].tolist()) == "".join(
        f"{a}\n{EOT_TOKEN}" for a in answers
    )
    assert "Be brief." in tokenizer.decode(ids[mask == 0].tolist())


# ---------------------------------------------------------------------------------- remove


def row_counts(store: DataStore) -> dict[str, int]:
    with store.db.session() as session:
        return {
            model.__name__: session.scalar(select(func.count()).select_from(model))
            for model in (Split, Source, DocumentHash, Tokenization, Shard, Lease)
        }


def test_remove_deletes_rows_and_files(store, tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts("a", 10)])
    store.import_path(file, "docs", "train")
    store.import_path(write_jsonl(tmp_path / "keep.jsonl", [{"text": "other"}]), "other", "train")
    store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    kept = files(store.root / "other")

    store.remove("docs")

    assert [d["name"] for d in store.list()] == ["other"]
    assert not (store.root / "docs").exists()
    assert [p.name for p in store.root.iterdir()] == ["other"]
    assert files(store.root / "other") == kept
    assert row_counts(store) == {
        "Split": 1,
        "Source": 1,
        "DocumentHash": 1,
        "Tokenization": 0,
        "Shard": 0,
        "Lease": 0,
    }
    with pytest.raises(StoreError, match="no dataset named 'docs'; datasets: other"):
        store.remove("docs")
    # its document hashes went with it: the same documents import again as new
    assert store.import_path(file, "docs", "train").documents == 10


def test_remove_is_refused_while_a_lease_is_held(store, tmp_path, tokenizer):
    store.import_path(
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts("a", 10)]), "docs", "train"
    )
    info = store.tokenized("docs", "train", tokenizer, shard_tokens=64)
    book = LeaseBook(store.db, info, ttl_s=60)
    grant = book.acquire("node-a")
    before = snapshot(store)

    with pytest.raises(StoreError, match=f"dataset 'docs' is being trained on \\(lease {grant.id}"):
        store.remove("docs")
    assert snapshot(store) == before

    book.hold([grant.id], "node-a", "update-1")  # submitted still counts as held
    with pytest.raises(StoreError, match="is being trained on"):
        store.remove("docs")

    book.unhold("update-1")
    # a lease left active by a server that stopped no longer counts once it has expired
    stale = LeaseBook(store.db, info, ttl_s=60, clock=lambda: time.time() - 3600)
    assert stale.renew(grant.id, "node-a") < time.time()
    with pytest.raises(StoreError, match="has epoch 0 under way"):
        store.remove("docs")  # past the lease check, stopped by the open epoch
    with pytest.raises(StoreError, match="has epoch 0 under way.*--force"):
        store.remove("docs")  # no lease held, but a server may still be training on it
    assert snapshot(store) == before
    store.remove("docs", force=True)
    assert store.list() == []
    assert row_counts(store)["Lease"] == 0


# ------------------------------------------------------------------------------------- CLI


def cli(*args: str):
    return CliRunner().invoke(app, ["data", *args])


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_cli_import_list_show_remove(tmp_path):
    data_dir = str(tmp_path / "data")
    file = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "one"}])

    empty = cli("list", "--data-dir", data_dir)
    assert empty.exit_code == 0
    assert "no datasets yet: import one with `crowdtrain data import PATH --dataset NAME`" in flat(
        empty.output
    )

    imported = cli("import", str(file), "--dataset", "docs", "--data-dir", data_dir)
    assert imported.exit_code == 0, imported.output
    assert "imported 2 document(s)" in flat(imported.output)
    assert "dropped 1 exact duplicate(s)" in flat(imported.output)

    again = cli("import", str(file), "--dataset", "docs", "--data-dir", data_dir)
    assert again.exit_code == 0
    assert "nothing changed: 1 source(s) were already imported into docs/train" in flat(
        again.output
    )

    listed = cli("list", "--data-dir", data_dir)
    assert listed.exit_code == 0
    [row] = [
        line.replace("│", " ").split() for line in listed.stdout.splitlines() if "docs" in line
    ]
    assert row[:3] == ["docs", "train", "2"]
    as_json = json.loads(cli("list", "--json", "--data-dir", data_dir).stdout)
    assert [(d["name"], d["splits"][0]["documents"]) for d in as_json] == [("docs", 2)]

    shown = cli("show", "docs", "--data-dir", data_dir)
    assert shown.exit_code == 0
    assert "docs/train: 2 documents" in flat(shown.output)
    assert "1 duplicates dropped" in flat(shown.output)
    detail = json.loads(cli("show", "docs", "--json", "--data-dir", data_dir).stdout)
    [source] = detail["splits"][0]["sources"]
    assert source["path"] == str(file.resolve())
    assert source["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()

    unknown = cli("show", "nope", "--data-dir", data_dir)
    assert unknown.exit_code == 1
    assert "no dataset named 'nope'; datasets: docs" in flat(unknown.output)

    declined = CliRunner().invoke(
        app, ["data", "remove", "docs", "--data-dir", data_dir], input="n\n"
    )
    assert declined.exit_code == 1
    assert "docs" in cli("list", "--data-dir", data_dir).stdout

    removed = cli("remove", "docs", "--yes", "--data-dir", data_dir)
    assert removed.exit_code == 0
    assert "removed dataset 'docs'" in flat(removed.output)
    assert "no datasets yet" in cli("list", "--data-dir", data_dir).output


def test_cli_import_of_a_bad_file_names_file_and_line(tmp_path):
    data_dir = tmp_path / "data"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")

    result = cli("import", str(bad), "--dataset", "docs", "--data-dir", str(data_dir))

    assert result.exit_code == 1
    assert f"error: {bad.resolve()} line 2: invalid JSON at column 10" in flat(result.output)
    assert "Traceback" not in result.output
    assert "no datasets yet" in cli("list", "--data-dir", str(data_dir)).output

    bad_name = cli("import", str(bad), "--dataset", "../x", "--data-dir", str(data_dir))
    assert bad_name.exit_code == 1
    assert "dataset name '../x' is not allowed" in flat(bad_name.output)
