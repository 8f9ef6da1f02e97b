"""The dataset store: named datasets with train / valid / annotated splits, imported
atomically, deduplicated, and tokenized into fixed-size shards.

On disk, under `DATA_DIR/datasets/NAME/SPLIT/`:
- `parts/ID.jsonl.zst`: the documents one import added (JSON lines, zstd), shared by the
  sources of that import;
- `tokens/TOKENIZER-SHARDSIZE-rREVISION-ID/`: the split as token shards (format: data/shards.py).
The database holds what exists: a file the database does not name is debris of an interrupted
import or tokenization and is removed when the store opens. So an import is atomic: its part
file is written (temp, fsync, rename) before the one transaction that records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from crowdtrain.data.importers import (
    DataImportError,
    ImportOptions,
    SourceFile,
    find_sources,
    read_documents,
)
from crowdtrain.data.shards import (
    Document,
    ShardInfo,
    TokenizationInfo,
    build_shards,
    document_bytes,
    load_shard,
)
from crowdtrain.data.shards import (
    batched as _batched,
)
from crowdtrain.db import Database, Dataset, Lease, Shard, Source, Split, Tokenization
from crowdtrain.db.models import DocumentHash, Epoch
from crowdtrain.files import fsync_directory
from crowdtrain.progress import human_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "annotated")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HASH_BATCH = 500  # document hashes looked up per query
HASH_INSERT_BATCH = 10_000  # document hashes inserted per statement
# Files no database row names are removed when a store opens, once they are this old: younger
# ones may belong to an import another process is finishing right now.
SWEEP_AGE_S = 600.0

Progress = Callable[[int], None]  # called with the number of source bytes just read


class StoreError(ValueError):
    """A request the store refuses, worded for the user; nothing was changed."""


def check_dataset_name(name: str) -> str:
    if not isinstance(name, str) or not DATASET_NAME.match(name) or name in (".", ".."):
        raise StoreError(
            f"dataset name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', spaces or other path characters)"
        )
    return name


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def document_hash(document: Document) -> bytes:
    """16 bytes of sha256 over the document's canonical form: equal hashes, equal documents."""
    if isinstance(document, str):
        canonical = "text:" + document
    else:
        canonical = "chat:" + json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()[:16]


@dataclass
class ImportReport:
    dataset: str
    split: str
    imported: list[str] = field(default_factory=list)  # sources read
    skipped: list[str] = field(default_factory=list)  # sources imported before: not read again
    documents: int = 0  # documents added
    duplicates: int = 0  # documents dropped as exact duplicates
    bytes: int = 0  # UTF-8 bytes of the documents added

    @property
    def changed(self) -> bool:
        return bool(self.imported)

    def summary(self) -> str:
        where = f"{self.dataset}/{self.split}"
        if not self.changed:
            return (
                f"nothing changed: {len(self.skipped)} source(s) were already imported into "
                f"{where} (same sha256)"
            )
        text = (
            f"imported {self.documents:,} document(s) ({human_bytes(self.bytes)}) from "
            f"{len(self.imported)} source(s) into {where}"
        )
        if self.duplicates:
            text += f"; dropped {self.duplicates:,} exact duplicate(s)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} source(s) already imported"
        return text


class DataStore:
    """Datasets in one data directory. Safe to use from several threads and processes: every
    change is one database transaction, made after the files it names are on disk."""

    def __init__(
        self, data_dir: Path, database: Database | None = None, sweep_age_s: float = SWEEP_AGE_S
    ):
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "datasets"
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = database or Database.in_directory(self.data_dir)
        self._sweep(sweep_age_s)

    # ---- import -------------------------------------------------------------------------

    def import_path(
        self,
        path: str | os.PathLike[str],
        dataset: str,
        split: str,
        options: ImportOptions | None = None,
        progress: Progress | None = None,
        label: str | None = None,
    ) -> ImportReport:
        """Import a file or a directory. All of it, or (on any error) nothing. `label` names a
        single-file source in the store instead of its path (an upload's temp file)."""
        check_dataset_name(dataset)
        check_split(split)
        options = options or ImportOptions()
        if (split == "annotated") != options.annotated:
            options = ImportOptions(**{**asdict(options), "annotated": split == "annotated"})
        sources = find_sources(path, options)
        hashed = [(source, source_sha256(source)) for source in sources]
        known = self._imported_hashes(dataset, split)
        fresh = [(s, h) for s, h in hashed if h not in known]
        if label is not None and len(hashed) != 1:
            label = None  # a label names a single-file source only
        report = ImportReport(
            dataset, split, skipped=[label or str(s.path) for s, h in hashed if h in known]
        )
        # the same content twice in one import (copies in two folders) counts once
        unique: dict[str, SourceFile] = {}
        for source, sha in fresh:
            unique.setdefault(sha, source)
        if not unique:
            return report

        def documents() -> Iterator[tuple[int, Document]]:
            for position, source in enumerate(unique.values()):
                shown = 0  # of the file's bytes; its text can be more (escapes) or less (markup)
                for document in read_documents(source, options):
                    yield position, document
                    if progress is not None:
                        step = min(document_bytes(document), source.size - shown)
                        shown += step
                        progress(step)
                if progress is not None and source.size > shown:
                    progress(source.size - shown)

        return self._import(dataset, split, list(unique.items()), documents(), report, label)

    def import_documents(
        self, dataset: str, split: str, documents: Iterable[Document], label: str
    ) -> ImportReport:
        """Import documents held in memory (the embedded corpus) as one source named `label`."""
        check_dataset_name(dataset)
        check_split(split)
        documents = list(documents)
        digest = hashlib.sha256()
        for document in documents:
            digest.update(document_hash(document))
        sha = digest.hexdigest()
        report = ImportReport(dataset, split)
        if sha in self._imported_hashes(dataset, split):
            report.skipped.append(label)
            return report
        size = sum(document_bytes(d) for d in documents)
        source = SourceFile(Path(label), "memory", size)
        return self._import(
            dataset, split, [(sha, source)], ((0, d) for d in documents), report, label=label
        )

    def _import(
        self,
        dataset: str,
        split: str,
        sources: list[tuple[str, SourceFile]],
        documents: Iterator[tuple[int, Document]],
        report: ImportReport,
        label: str | None = None,
    ) -> ImportReport:
        dataset_id = self._dataset_id(dataset)
        parts_dir = self.root / dataset / split / "parts"
        created = [
            d for d in (parts_dir, parts_dir.parent, parts_dir.parent.parent) if not d.exists()
        ]
        parts_dir.mkdir(parents=True, exist_ok=True)
        per_source = [{"documents": 0, "duplicates": 0, "part": ""} for _ in sources]
        seen: dict[bytes, None] = {}  # insertion-ordered: the hashes this import adds
        # one part file for the whole import: memory and open files stay flat however many
        # source files it reads
        writer: _PartWriter | None = None
        chars = 0
        try:
            pending: list[tuple[int, Document, bytes]] = []

            def flush() -> None:
                nonlocal chars, writer
                existing = self._existing_hashes(dataset_id, [h for _, _, h in pending])
                for position, document, digest in pending:
                    if digest in existing or digest in seen:
                        per_source[position]["duplicates"] += 1
                        report.duplicates += 1
                        continue
                    seen[digest] = None
                    if writer is None:
                        writer = _PartWriter(parts_dir)
                    writer.write(document)
                    per_source[position]["documents"] += 1
                    report.documents += 1
                    size = document_bytes(document)
                    report.bytes += size
                    chars += _document_chars(document)
                pending.clear()

            for position, document in documents:
                pending.append((position, document, document_hash(document)))
                if len(pending) >= HASH_BATCH:
                    flush()
            flush()
            if report.documents == 0 and report.duplicates == 0:
                names = ", ".join(str(s.path) for _, s in sources)
                raise StoreError(f"no documents found in {names}; nothing was imported")
            if writer is not None:
                part = writer.finish()
                for counts in per_source:
                    counts["part"] = part if counts["documents"] else ""
            self._record(dataset, split, sources, per_source, seen, chars, report, label)
        except BaseException:
            if writer is not None and not self._part_recorded(dataset, split, writer.name):
                writer.discard()  # (a Ctrl-C just after the commit keeps the recorded file)
            for directory in created:  # innermost first; only the ones this import made
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        report.imported = [label or str(s.path) for _, s in sources]
        return report

    def _record(self, dataset, split, sources, per_source, hashes, chars, report, label) -> None:
        """The one transaction that makes an import visible."""
        try:
            with self.db.transaction() as session:
                dataset_row = session.scalar(select(Dataset).where(Dataset.name == dataset))
                if dataset_row is None:
                    dataset_row = Dataset(name=dataset)
                    session.add(dataset_row)
                    session.flush()
                split_row = session.scalar(
                    select(Split).where(Split.dataset_id == dataset_row.id, Split.name == split)
                )
                if split_row is None:
                    split_row = Split(
                        dataset_id=dataset_row.id,
                        name=split,
                        documents=0,
                        chars=0,
                        bytes=0,
                        duplicates=0,
                        revision=0,
                    )
                    session.add(split_row)
                    session.flush()
                for (sha, source), counts in zip(sources, per_source, strict=True):
                    session.add(
                        Source(
                            split_id=split_row.id,
                            path=label or str(source.path),
                            format=source.format,
                            sha256=sha,
                            size=source.size,
                            **counts,
                        )
                    )
                table = DocumentHash.__table__
                for chunk in _batched(hashes, HASH_INSERT_BATCH):  # bounded memory per insert
                    session.execute(
                        insert(table),
                        [
                            {"dataset_id": dataset_row.id, "hash": h, "split_id": split_row.id}
                            for h in chunk
                        ],
                    )
                split_row.documents += report.documents
                split_row.bytes += report.bytes
                split_row.chars += chars
                split_row.duplicates += report.duplicates
                if report.documents:
                    split_row.revision += 1
        except IntegrityError:
            raise StoreError(
                f"another import into dataset {dataset!r} finished while this one ran, with "
                "some of the same sources or documents; run this import again"
            ) from None

    def _part_recorded(self, dataset: str, split: str, part: str) -> bool:
        with self.db.session() as session:
            query = (
                select(Source.id)
                .join(Split)
                .join(Dataset)
                .where(Dataset.name == dataset, Split.name == split, Source.part == part)
            )
            return session.scalar(query.limit(1)) is not None

    def _dataset_id(self, dataset: str) -> int | None:
        with self.db.session() as session:
            return session.scalar(select(Dataset.id).where(Dataset.name == dataset))

    def _imported_hashes(self, dataset: str, split: str) -> set[str]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Source.sha256)
                .join(Split)
                .join(Dataset)
                .where(Dataset.name == dataset, Split.name == split)
            )
            return set(rows)

    def _existing_hashes(self, dataset_id: int | None, hashes: list[bytes]) -> set[bytes]:
        if dataset_id is None or not hashes:
            return set()
        with self.db.session() as session:
            return set(
                session.scalars(
                    select(DocumentHash.hash).where(
                        DocumentHash.dataset_id == dataset_id, DocumentHash.hash.in_(hashes)
                    )
                )
            )

    # ---- reading ------------------------------------------------------------------------

    def exists(self, dataset: str, split: str | None = None) -> bool:
        with self.db.session() as session:
            query = select(Split.id).join(Dataset).where(Dataset.name == dataset)
            if split is not None:
                query = query.where(Split.name == split, Split.documents > 0)
            return session.scalar(query.limit(1)) is not None

    def documents(self, dataset: str, split: str) -> Iterator[Document]:
        """Every document of a split, in import order."""
        with self.db.session() as session:
            # the sources of one import share its part file: read each file once, in order
            parts = dict.fromkeys(
                session.scalars(
                    select(Source.part)
                    .join(Split)
                    .join(Dataset)
                    .where(Dataset.name == dataset, Split.name == split, Source.part != "")
                    .order_by(Source.id)
                )
            )
        for part in parts:
            yield from _read_part(self.root / dataset / split / "parts" / part)

    def list(self) -> list[dict]:
        """Every dataset with its splits' sizes."""
        with self.db.session() as session:
            return [
                _dataset_summary(d) for d in session.scalars(select(Dataset).order_by(Dataset.name))
            ]

    def show(self, dataset: str, tokenizer_version: str | None = None) -> dict:
        """A dataset's splits, sources and tokenizations (`stale` against `tokenizer_version`)."""
        with self.db.session() as session:
            row = session.scalar(select(Dataset).where(Dataset.name == dataset))
            if row is None:
                raise StoreError(self.unknown_message(dataset))
            summary = _dataset_summary(row)
            for split, split_row in zip(summary["splits"], row.splits, strict=True):
                split["sources"] = [
                    {
                        "path": s.path,
                        "format": s.format,
                        "sha256": s.sha256,
                        "size": s.size,
                        "documents": s.documents,
                        "duplicates": s.duplicates,
                        "imported_at": s.imported_at,
                    }
                    for s in split_row.sources
                ]
                split["tokenizations"] = [
                    {
                        "tokenizer_version": t.tokenizer_version,
                        "shard_tokens": t.shard_tokens,
                        "tokens": t.tokens,
                        "shards": len(t.shards),
                        "stale": t.revision != split_row.revision
                        or (
                            tokenizer_version is not None
                            and t.tokenizer_version != tokenizer_version
                        ),
                    }
                    for t in split_row.tokenizations
                ]
            return summary

    def unknown_message(self, dataset: str) -> str:
        names = [d["name"] for d in self.list()]
        known = ", ".join(names) if names else "none yet: import one with `crowdtrain data import`"
        return f"no dataset named {dataset!r}; datasets: {known}"

    def remove(self, dataset: str, force: bool = False) -> None:
        """Delete a dataset, its files and its ledger. Refused while a node holds a lease on
        it, and (unless `force`) while one of its epochs is under way: a server may be
        training on it."""
        check_dataset_name(dataset)
        with self.db.transaction() as session:
            row = session.scalar(select(Dataset).where(Dataset.name == dataset))
            if row is None:
                raise StoreError(self.unknown_message(dataset))
            held = session.scalar(
                select(Lease.id)
                .join(Shard, Lease.shard_id == Shard.id)
                .join(Tokenization)
                .join(Split)
                .where(
                    Split.dataset_id == row.id,
                    (Lease.state == "submitted")
                    | ((Lease.state == "active") & (Lease.expires_at > time.time())),
                )
                .limit(1)
            )
            if held is not None:
                raise StoreError(
                    f"dataset {dataset!r} is being trained on (lease {held} is held); stop the "
                    "server or wait for the leases to end, then remove it"
                )
            open_epoch = session.scalar(
                select(Epoch.number)
                .join(Tokenization)
                .join(Split)
                .where(Split.dataset_id == row.id, Epoch.completed_at.is_(None))
                .limit(1)
            )
            if open_epoch is not None and not force:
                raise StoreError(
                    f"dataset {dataset!r} has epoch {open_epoch} under way: a server may be "
                    "training on it. Stop that server first, then remove it with --force"
                )
            session.delete(row)
        self._remove_tree(self.root / dataset)

    def _remove_tree(self, path: Path) -> None:
        if path.exists():  # renamed first, so a crash never leaves half a dataset by its name
            trash = path.with_name(f".trash-{uuid.uuid4().hex}")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    # ---- tokenization -------------------------------------------------------------------

    def tokenized(
        self,
        dataset: str,
        split: str,
        tokenizer,
        shard_tokens: int,
        template=None,
        progress: Progress | None = None,
    ) -> TokenizationInfo:
        """The split's shards for this tokenizer and shard size, built when missing or stale
        (the tokenizer changed, or documents were imported since)."""
        if shard_tokens < 2:
            raise StoreError(f"shard_tokens must be at least 2, got {shard_tokens}")
        with self.db.session() as session:
            split_row = session.scalar(
                select(Split).join(Dataset).where(Dataset.name == dataset, Split.name == split)
            )
            if split_row is None or split_row.documents == 0:
                raise StoreError(
                    f"dataset {dataset!r} has no {split} documents; import some with "
                    f"`crowdtrain data import PATH --dataset {dataset} --split {split}`"
                )
            revision = split_row.revision
            existing = _find_tokenization(session, split_row.id, tokenizer, shard_tokens, revision)
            if existing is not None:
                return self._info(existing, dataset, split)
            split_id = split_row.id
        built = self._build_shards(dataset, split, tokenizer, shard_tokens, template, progress)
        return self._record_tokenization(split_id, dataset, split, revision, tokenizer, built)

    def _build_shards(self, dataset, split, tokenizer, shard_tokens, template, progress):
        building = self.root / dataset / split / "tokens" / f".building-{uuid.uuid4().hex}"
        building.mkdir(parents=True)
        try:
            index = build_shards(
                self.documents(dataset, split),
                building,
                tokenizer,
                shard_tokens,
                masked=split == "annotated",
                template=template,
                progress=progress,
            )
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return building, {"dataset": dataset, "split": split, **index}

    def _record_tokenization(self, split_id, dataset, split, revision, tokenizer, built):
        building, index = built
        # a name of its own: two processes building the same tokenization never share a folder
        name = f"{tokenizer.version}-{index['shard_tokens']}-r{revision}-{uuid.uuid4().hex[:8]}"
        final = building.with_name(name)
        os.replace(building, final)
        fsync_directory(final.parent)
        try:
            with self.db.transaction() as session:
                row = Tokenization(
                    split_id=split_id,
                    tokenizer_version=tokenizer.version,
                    shard_tokens=index["shard_tokens"],
                    revision=revision,
                    tokens=sum(s["tokens"] for s in index["shards"]),
                    documents=index["documents"],
                    dtype=index["dtype"],
                    masked=index["masked"],
                    directory=str(final.relative_to(self.data_dir)),
                    shards=[
                        Shard(index=i, tokens=s["tokens"], sha256=s["sha256"], file=s["file"])
                        for i, s in enumerate(index["shards"])
                    ],
                )
                session.add(row)
                session.flush()
                info = self._info(row, dataset, split)
        except IntegrityError:  # another process built the same one first: use theirs
            shutil.rmtree(final, ignore_errors=True)
            with self.db.session() as session:
                row = _find_tokenization(
                    session, split_id, tokenizer, index["shard_tokens"], revision
                )
                return self._info(row, dataset, split)
        log.info(
            "tokenized %s/%s: %d tokens in %d shards", dataset, split, info.tokens, len(info.shards)
        )
        return info

    def _info(self, row: Tokenization, dataset: str, split: str) -> TokenizationInfo:
        directory = self.data_dir / row.directory
        return TokenizationInfo(
            id=row.id,
            dataset=dataset,
            split=split,
            tokenizer_version=row.tokenizer_version,
            shard_tokens=row.shard_tokens,
            revision=row.revision,
            tokens=row.tokens,
            documents=row.documents,
            dtype=row.dtype,
            masked=row.masked,
            shards=tuple(
                ShardInfo(
                    id=s.id,
                    index=s.index,
                    tokens=s.tokens,
                    sha256=s.sha256,
                    path=directory / s.file,
                    mask_path=(directory / s.file).with_suffix(".mask") if row.masked else None,
                )
                for s in row.shards
            ),
        )

    def tokens(self, info: TokenizationInfo, limit: int | None = None) -> np.ndarray:
        """A tokenization's ids as one array (the first `limit` tokens)."""
        pieces, total = [], 0
        for shard in info.shards:
            ids, _ = load_shard(shard, info.dtype)
            take = ids if limit is None else ids[: max(0, limit - total)]
            pieces.append(np.asarray(take))
            total += len(take)
            if limit is not None and total >= limit:
                break
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=info.dtype)

    # ---- housekeeping -------------------------------------------------------------------

    def _sweep(self, age_s: float) -> None:
        """Remove files no database row names (debris of interrupted imports and builds) once
        they are `age_s` old."""
        now = time.time()

        def debris(path: Path) -> bool:
            """Nothing in it changed for `age_s`: a live import keeps writing its temp file."""
            try:
                files = [path, *path.rglob("*")] if path.is_dir() else [path]
                return all(now - f.stat().st_mtime >= age_s for f in files)
            except FileNotFoundError:  # changing right now
                return False

        with self.db.session() as session:
            parts = {
                (d, sp, part)
                for d, sp, part in session.execute(
                    select(Dataset.name, Split.name, Source.part)
                    .join(Split, Split.dataset_id == Dataset.id)
                    .join(Source, Source.split_id == Split.id)
                )
            }
            directories = set(session.scalars(select(Tokenization.directory)))
            datasets = set(session.scalars(select(Dataset.name)))
        for entry in self.root.iterdir():
            if entry.name not in datasets:
                if not debris(entry):
                    continue
                log.warning("removing %s: no dataset of that name in the database", entry)
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                continue
            for split_dir in (d for d in entry.iterdir() if d.is_dir()):
                for part in (split_dir / "parts").glob("*"):
                    if (entry.name, split_dir.name, part.name) not in parts and debris(part):
                        part.unlink(missing_ok=True)
                tokens_dir = split_dir / "tokens"
                for built in tokens_dir.glob("*") if tokens_dir.is_dir() else ():
                    named = str(built.relative_to(self.data_dir)) in directories
                    if not named and debris(built):
                        shutil.rmtree(built, ignore_errors=True)

    def delete_stale_tokenizations(self, keep: TokenizationInfo) -> None:
        """Drop the split's other tokenizations that no open epoch still uses."""
        with self.db.transaction() as session:
            split_id = session.scalar(
                select(Tokenization.split_id).where(Tokenization.id == keep.id)
            )
            stale = session.scalars(
                select(Tokenization).where(
                    Tokenization.split_id == split_id, Tokenization.id != keep.id
                )
            ).all()
            for row in stale:
                open_epoch = session.scalar(
                    select(Epoch.id)
                    .where(Epoch.tokenization_id == row.id, Epoch.completed_at.is_(None))
                    .limit(1)
                )
                if open_epoch is None:
                    directory = self.data_dir / row.directory
                    session.execute(delete(Tokenization).where(Tokenization.id == row.id))
                    shutil.rmtree(directory, ignore_errors=True)


def _find_tokenization(session, split_id: int, tokenizer, shard_tokens: int, revision: int):
    return session.scalar(
        select(Tokenization).where(
            Tokenization.split_id == split_id,
            Tokenization.tokenizer_version == tokenizer.version,
            Tokenization.shard_tokens == shard_tokens,
            Tokenization.revision == revision,
        )
    )


class _PartWriter:
    """Documents as zstd-compressed JSON lines in a temp file; `finish` makes it durable under
    its final name and returns that name."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.name = f"{uuid.uuid4().hex}.jsonl.zst"
        self.tmp = directory / f".{self.name}.tmp"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/discard
        self._stream = zstandard.ZstdCompressor(level=1).stream_writer(self._file, closefd=False)
        self.final: Path | None = None

    def write(self, document: Document) -> None:
        line = json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._stream.write(line.encode("utf-8"))

    def finish(self) -> str:
        self._stream.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.final = self.directory / self.name
        os.replace(self.tmp, self.final)
        fsync_directory(self.directory)
        return self.name

    def discard(self) -> None:
        if not self._file.closed:
            self._stream.close()
            self._file.close()
        self.tmp.unlink(missing_ok=True)
        if self.final is not None:
            self.final.unlink(missing_ok=True)


def _read_part(path: Path) -> Iterator[Document]:
    with open(path, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            yield json.loads(line)


def source_sha256(source: SourceFile) -> str:
    """sha256 of a file's bytes; for a directory source, of its files' names and bytes."""
    digest = hashlib.sha256()
    files = (
        [source.path]
        if source.path.is_file()
        else sorted(p for p in source.path.rglob("*") if p.is_file())
    )
    for file in files:
        if file != source.path:
            digest.update(str(file.relative_to(source.path)).encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _document_chars(document: Document) -> int:
    if isinstance(document, str):
        return len(document)
    return sum(len(m["content"]) for m in document)


def _dataset_summary(row: Dataset) -> dict:
    return {
        "name": row.name,
        "created_at": row.created_at,
        "splits": [
            {
                "name": s.name,
                "documents": s.documents,
                "chars": s.chars,
                "bytes": s.bytes,
                "duplicates": s.duplicates,
                "sources": len(s.sources),
                "revision": s.revision,
                "tokens": max(
                    (t.tokens for t in s.tokenizations if t.revision == s.revision), default=None
                ),
                "shards": max(
                    (len(t.shards) for t in s.tokenizations if t.revision == s.revision),
                    default=None,
                ),
            }
            for s in row.splits
        ],
    }


__all__ = [
    "DataImportError",
    "DataStore",
    "ImportOptions",
    "ImportReport",
    "SPLITS",
    "StoreError",
    "check_dataset_name",
    "check_split",
]
