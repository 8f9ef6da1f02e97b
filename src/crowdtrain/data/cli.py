"""`crowdtrain data`: import, list, show and remove datasets in a server's data directory."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table

from crowdtrain.progress import human_bytes
from crowdtrain.settings import ServerSettings, SettingsError, load_settings
from crowdtrain.terminal import CONFIG_HELP, console, fail, table_text

data_app = typer.Typer(
    help="Manage the training data a server hands out: datasets with train, valid and "
    "annotated splits.\n\nImport files with `crowdtrain data import PATH --dataset NAME`, then "
    "start the server with `crowdtrain server --dataset NAME`. Run these commands against the "
    "server's --data-dir (also while it runs).",
    no_args_is_help=True,
)

DATA_DIR_HELP = "The server's data directory (default: ./crowdtrain-data, or CROWDTRAIN_DATA_DIR)."


def _store(data_dir: Path | None, config: Path | None):
    from crowdtrain.data.store import DataStore
    from crowdtrain.db import Database, DatabaseError

    try:
        settings = load_settings(ServerSettings, config, data_dir=data_dir)
        database = (
            Database(settings.database_url)
            if settings.database_url
            else Database.in_directory(settings.data_dir)
        )
        return DataStore(settings.data_dir, database)
    except (SettingsError, DatabaseError) as error:
        fail(str(error))
    except OSError as error:  # a data directory that cannot be created or written
        fail(f"cannot use the data directory: {error}")


@data_app.command("import")
def import_(
    path: Path = typer.Argument(
        ...,
        help="A file (.txt, .md, .jsonl, .json, .csv, .parquet), a folder of them (searched "
        "recursively), or a Hugging Face dataset folder saved with save_to_disk.",
    ),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset to add to (created if new)."),
    split: str = typer.Option(
        "train",
        "--split",
        help="train (what nodes lease), valid (the server's own held-out data) or annotated "
        "(prompt/response or chat records for --objective sft).",
    ),
    field: str = typer.Option(
        "text",
        "--field",
        help="The JSON key or column that holds the text (.jsonl .json .csv "
        ".parquet, saved datasets).",
    ),
    paragraphs: bool = typer.Option(
        False,
        "--paragraphs",
        help=".txt/.md: one document per blank-line-separated paragraph instead of per file.",
    ),
    include: list[str] = typer.Option(
        [],
        "--include",
        help="Folders: import only files matching this glob, for example '*.md' or "
        "'docs/**/*.txt' (repeatable).",
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Import files into a dataset split: all of them or, on any error, nothing.

    Text is checked to be UTF-8 (the error names the file and line), exact duplicates are
    dropped, and importing the same file again changes nothing. The server tokenizes new
    documents into shards at its next start.
    """
    from crowdtrain.data.importers import DataImportError, ImportOptions, find_sources
    from crowdtrain.data.store import StoreError, check_dataset_name, check_split
    from crowdtrain.progress import byte_progress

    store = _store(data_dir, config)
    try:
        check_dataset_name(dataset)
        check_split(split)
        options = ImportOptions(
            field=field,
            paragraphs=paragraphs,
            include=tuple(include),
            annotated=split == "annotated",
        )
        total = sum(source.size for source in find_sources(path, options))
        with byte_progress(f"importing {path.name}", total, console) as advance:
            report = store.import_path(path, dataset, split, options, progress=advance)
    except (DataImportError, StoreError) as error:
        fail(str(error), code=1)
    console.print(report.summary(), highlight=False)


@data_app.command("list")
def list_(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every dataset with its splits: documents, size, tokens and shards."""
    datasets = _store(data_dir, config).list()
    if as_json:
        print(json.dumps(datasets, indent=2))
        return
    if not datasets:
        console.print(
            "no datasets yet: import one with `crowdtrain data import PATH --dataset NAME` "
            "(the server imports its built-in corpus as 'pydoc-topics' on first start)"
        )
        return
    table = Table("dataset", "split", "documents", "size", "tokens", "shards", "sources")
    for dataset in datasets:
        for split in dataset["splits"]:
            table.add_row(
                dataset["name"],
                split["name"],
                f"{split['documents']:,}",
                human_bytes(split["bytes"]),
                "-" if split["tokens"] is None else f"{split['tokens']:,}",
                "-" if split["shards"] is None else str(split["shards"]),
                str(split["sources"]),
            )
    typer.echo(table_text(table))


@data_app.command("show")
def show(
    name: str = typer.Argument(..., help="The dataset's name."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """A dataset's splits, the files they came from (with sha256) and their tokenizations."""
    from crowdtrain.data.store import StoreError
    from crowdtrain.model.tokenizer import Tokenizer

    store = _store(data_dir, config)
    tokenizer_file = store.data_dir / "tokenizer.json"
    try:
        current = Tokenizer.load(tokenizer_file).version if tokenizer_file.exists() else None
    except ValueError:  # unreadable: show the tokenizations without judging them stale
        current = None
    try:
        dataset = store.show(name, current)
    except StoreError as error:
        fail(str(error), code=1)
    if as_json:
        print(json.dumps(dataset, indent=2))
        return
    for split in dataset["splits"]:
        console.print(
            f"[bold]{dataset['name']}/{split['name']}[/]: {split['documents']:,} documents, "
            f"{human_bytes(split['bytes'])}, {split['duplicates']:,} duplicates dropped",
            highlight=False,
        )
        sources = Table("source", "format", "sha256", "documents", "duplicates", "imported")
        for source in split["sources"]:
            sources.add_row(
                source["path"],
                source["format"],
                source["sha256"][:16],
                f"{source['documents']:,}",
                f"{source['duplicates']:,}",
                datetime.fromtimestamp(source["imported_at"]).strftime("%Y-%m-%d %H:%M"),
            )
        typer.echo(table_text(sources))
        if split["tokenizations"]:
            shards = Table("tokenizer", "shard tokens", "tokens", "shards", "state")
            for t in split["tokenizations"]:
                state = "stale (re-tokenized at the next server start)" if t["stale"] else "current"
                shards.add_row(
                    t["tokenizer_version"],
                    f"{t['shard_tokens']:,}",
                    f"{t['tokens']:,}",
                    str(t["shards"]),
                    state,
                )
            typer.echo(table_text(shards))


@data_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="The dataset's name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Remove it even though an epoch is under way (stop the server training on it first).",
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    config: Path | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Delete a dataset: its documents, shards and epoch ledger. Refused while nodes hold
    leases on it."""
    from crowdtrain.data.store import StoreError

    store = _store(data_dir, config)
    if not yes and not typer.confirm(f"remove dataset {name!r} and all its files?"):
        raise typer.Exit(1)
    try:
        store.remove(name, force=force)
    except StoreError as error:
        fail(str(error), code=1)
    console.print(f"removed dataset {name!r}", highlight=False)
