"""Importers: turn user files (text, JSONL, JSON, CSV, Parquet, saved datasets) into documents.

Every error a user's file can cause is a DataImportError that names the file, the line or row
where it applies (both count from 1), and how to fix it. Files are streamed: only a single
.txt/.md document (size checked first) and a .json file (under JSON_MAX_BYTES) are read whole.

Empty files: a file given directly that is empty or only whitespace is an error. In a directory
import they are listed by find_sources (size 0 for empty ones) and read_documents yields nothing
for them, so a caller counts them as the sources that gave no document.
"""

from __future__ import annotations

import csv
import fnmatch
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

TEXT_SPLITS = ("train", "valid")  # a document is a str
ANNOTATED = "annotated"  # a document is a list of messages [{"role": ..., "content": ...}]

SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
RECORD_FORMATS = ("jsonl", "json", "csv", "parquet", "hf")  # the formats that can hold annotated
ROLES = ("system", "user", "assistant")
# a .json file is parsed whole, and its Python objects take several times the file's size
JSON_MAX_BYTES = 256 << 20
BINARY_SNIFF_BYTES = 8192  # a NUL byte this close to the start means the file is not text
ARROW_BATCH_ROWS = 256  # rows per Parquet batch: bounded memory even with large documents
EXPECTED_RECORDS = (
    'expected {"prompt": str, "response": str} (optionally "system": str) or '
    '{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]} '
    "with at least one assistant message"
)

Document = str | list[dict[str, str]]
# how values read back to a user who wrote them in JSON, CSV or a table
JSON_TYPE_NAMES = {
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    type(None): "null",
}


class DataImportError(ValueError):
    """Bad input, worded for the user: names the file (and line / row where it applies) and how to
    fix it."""


@dataclass(frozen=True)
class ImportOptions:
    field: str = "text"  # jsonl/json/csv/parquet/HF datasets: the column holding the text
    paragraphs: bool = False  # .txt/.md: one document per blank-line-separated block, not per file
    include: tuple[str, ...] = ()  # directory imports: fnmatch globs on the relative path; () = all
    annotated: bool = False  # read instruction/chat records instead of text
    max_document_bytes: int = 64 << 20  # a bigger single document or line is refused

    def __post_init__(self) -> None:
        if not self.field:
            raise DataImportError("field must name the column that holds the text, got ''")
        if isinstance(self.include, str):
            raise DataImportError(f"include must be a tuple of patterns, got {self.include!r}")
        if self.max_document_bytes < 1:
            raise DataImportError(
                f"max_document_bytes must be positive, got {self.max_document_bytes}"
            )


@dataclass
class SourceFile:
    path: Path  # resolved file path (the directory itself for format "hf")
    format: str  # "text", "jsonl", "json", "csv", "parquet", "hf"
    size: int  # bytes on disk (of all its data files for "hf")


# ---------------------------------------------------------------------------------- finding files


def find_sources(path: str | os.PathLike[str], options: ImportOptions) -> list[SourceFile]:
    """The files an import of `path` reads, in sorted order.

    `path` is a file, a directory (searched recursively, skipping hidden files and folders,
    unsupported suffixes and files that no `include` glob matches), or a Hugging Face `datasets`
    directory saved with save_to_disk, which is one SourceFile of format "hf". With
    `options.annotated`, .txt/.md files are not looked for, as they hold no records.
    """
    given = Path(path)
    if given.is_dir():
        kind = _hf_kind(given)
        if kind == "dataset":
            return [_hf_source(given)]
        if kind == "dataset_dict":
            raise _dataset_dict_error(given)
        return _sources_under(given, options)
    if not given.exists():
        raise DataImportError(f"{given} does not exist; check the path")
    return [_single_source(given, options)]


def _single_source(file: Path, options: ImportOptions) -> SourceFile:
    format = SUFFIX_FORMATS.get(file.suffix.lower())
    if format is None:
        hint = "; point at the datasets directory that holds it" if file.suffix == ".arrow" else ""
        raise DataImportError(
            f"{file}: unsupported file type {file.suffix or '(no suffix)'!r}; supported are "
            f"{_supported()}{hint}"
        )
    if options.annotated and format not in RECORD_FORMATS:
        raise _text_not_annotated(file)
    try:
        size = file.stat().st_size
        blank = size == 0 or (format != "parquet" and _only_whitespace(file))
    except OSError as error:
        raise DataImportError(f"{file}: cannot read it: {error.strerror}") from None
    if size == 0:
        raise DataImportError(f"{file} is empty; there is nothing to import")
    if blank:
        raise DataImportError(f"{file} holds only whitespace; there is nothing to import")
    return SourceFile(path=file.resolve(), format=format, size=size)


def _sources_under(root: Path, options: ImportOptions) -> list[SourceFile]:
    found: list[tuple[tuple[str, ...], SourceFile]] = []
    skipped_suffixes: set[str] = set()
    for directory, subdirectories, filenames in os.walk(root):
        here = Path(directory)
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        relative = here.relative_to(root)
        kind = _hf_kind(here) if here != root else None
        if kind == "dataset_dict":
            raise _dataset_dict_error(here)
        if kind == "dataset":
            subdirectories[:] = []
            if _included(relative, options.include):
                found.append((relative.parts, _hf_source(here)))
            continue
        for filename in filenames:
            file = here / filename
            format = SUFFIX_FORMATS.get(file.suffix.lower())
            if filename.startswith(".") or not file.is_file():
                continue
            if format is None or (options.annotated and format not in RECORD_FORMATS):
                skipped_suffixes.add(file.suffix.lower() or "(no suffix)")
            elif _included(relative / filename, options.include):
                source = SourceFile(path=file.resolve(), format=format, size=file.stat().st_size)
                found.append(((relative / filename).parts, source))
    if not found:
        raise _nothing_found(root, options, skipped_suffixes)
    if all(source.size == 0 for _, source in found):
        raise DataImportError(f"all {len(found)} matching files under {root} are empty")
    return [source for _, source in sorted(found, key=lambda pair: pair[0])]


def _included(relative: Path, include: tuple[str, ...]) -> bool:
    if not include:
        return True
    name = relative.as_posix()
    for pattern in include:
        # fnmatch's "*" already crosses "/", so "a/**/b" only misses zero folders in between
        if fnmatch.fnmatchcase(name, pattern) or (
            "**/" in pattern and fnmatch.fnmatchcase(name, pattern.replace("**/", ""))
        ):
            return True
    return False


def _nothing_found(root: Path, options: ImportOptions, skipped: set[str]) -> DataImportError:
    suffixes = [s for s, f in SUFFIX_FORMATS.items() if not options.annotated or f != "text"]
    wanted = f"files ending in {', '.join(suffixes)}"
    if options.include:
        wanted += f" that match {', '.join(map(repr, options.include))}"
    seen = f"; it has other files ending in {', '.join(sorted(skipped))}" if skipped else ""
    return DataImportError(
        f"no files to import under {root}: looked for {wanted} (hidden ones skipped){seen}"
    )


def _supported() -> str:
    return f"{', '.join(SUFFIX_FORMATS)}, or a Hugging Face datasets directory from save_to_disk"


def _text_not_annotated(file: Path) -> DataImportError:
    return DataImportError(
        f"{file}: .txt/.md files hold plain text, not instruction or chat records; for annotated "
        "data use .jsonl, .json, .csv, .parquet or a datasets directory"
    )


def _only_whitespace(file: Path) -> bool:
    with file.open("rb") as handle:
        first = True
        while chunk := handle.read(1 << 20):
            if first:
                chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
            if chunk.strip():
                return False
    return True


# ------------------------------------------------------------------------- reading documents


def read_documents(source: SourceFile, options: ImportOptions) -> Iterator[Document]:
    """Yield documents from one source, streaming.

    Text documents are str; with options.annotated, lists of messages. Documents that are empty
    or only whitespace are skipped, as are null values in Parquet and datasets columns.
    """
    if options.annotated and source.format not in RECORD_FORMATS:
        raise _text_not_annotated(source.path)
    reader = _READERS.get(source.format)
    if reader is None:
        raise DataImportError(
            f"{source.path}: unknown format {source.format!r}; expected one of {sorted(_READERS)}"
        )
    if source.format != "hf" and source.path.stat().st_size == 0:
        return iter(())  # an empty file in a directory import; find_sources refuses one given alone
    return reader(source.path, options)


def messages_from_record(record: object, where: str) -> list[dict[str, str]]:
    """Normalise one annotated record into a list of {"role", "content"} messages.

    {"prompt", "response"} (optional "system") becomes [system?, user, assistant]; a
    {"messages": [...]} list is validated and copied (only "role" and "content" are kept).
    Other keys in the record are ignored.
    """
    if isinstance(record, dict) and "messages" in record:
        return _validated_messages(record["messages"], where)
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        messages = []
        for key, role in (("system", "system"), ("prompt", "user"), ("response", "assistant")):
            content = record.get(key)
            if key == "system" and (content is None or content == ""):
                continue
            if not isinstance(content, str):
                raise DataImportError(
                    f"{where}: {key!r} must be a string, got {_describe(content)}; "
                    f"{EXPECTED_RECORDS}"
                )
            messages.append({"role": role, "content": content})
        return messages
    raise DataImportError(
        f"{where}: not an annotated record ({_describe(record)}); {EXPECTED_RECORDS}"
    )


def _validated_messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataImportError(
            f"{where}: 'messages' must be a non-empty list, got {_describe(messages)}; "
            f"{EXPECTED_RECORDS}"
        )
    result = []
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, dict):
            raise DataImportError(
                f"{at} is {_describe(message)}, not an object; {EXPECTED_RECORDS}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataImportError(
                f"{at} has role {role!r}; roles must be one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataImportError(
                f"{at} content must be a string, got {_describe(content)}; {EXPECTED_RECORDS}"
            )
        result.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in result):
        raise DataImportError(
            f"{where}: no assistant message, so there is no answer to learn; {EXPECTED_RECORDS}"
        )
    return result


def _document_from_record(record: object, where: str, options: ImportOptions) -> Document | None:
    """The document in one parsed record, or None when its text is empty."""
    if options.annotated:
        messages = messages_from_record(record, where)
        size = sum(len(message["content"].encode("utf-8")) for message in messages)
        _check_size(size, where, options.max_document_bytes)
        return messages
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        raise DataImportError(
            f"{where}: expected an object with a {options.field!r} string (or a string), got "
            f"{_describe(record)}"
        )
    elif options.field not in record:
        raise DataImportError(
            f"{where}: no {options.field!r} field; the record has {_describe(record)}; set field "
            "to the one that holds the text"
        )
    elif not isinstance(record[options.field], str):
        raise DataImportError(
            f"{where}: {options.field!r} must be a string, got {_describe(record[options.field])}"
        )
    else:
        text = record[options.field]
    if not text.strip():
        return None
    _check_size(len(text.encode("utf-8")), where, options.max_document_bytes)
    return text


def _check_size(size: int, where: str, limit: int) -> None:
    if size > limit:
        raise DataImportError(
            f"{where}: the document is {size} bytes, more than max_document_bytes ({limit}); "
            "split it into smaller documents"
        )


def _describe(value: object) -> str:
    if isinstance(value, dict):
        keys = [repr(key) for key in itertools.islice(value, 20)]
        more = f" and {len(value) - 20} more" if len(value) > 20 else ""
        return f"keys {', '.join(keys)}{more}" if keys else "no keys"
    return JSON_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


# ------------------------------------------------------------------------------- text formats


def _read_text(path: Path, options: ImportOptions) -> Iterator[Document]:
    name, limit = str(path), options.max_document_bytes
    if not options.paragraphs:
        size = path.stat().st_size
        if size > limit:
            raise DataImportError(
                f"{name} is {size} bytes, more than max_document_bytes ({limit}); split it into "
                "smaller files or import it one paragraph per document"
            )
    with _open_text(path) as file:
        lines = _lines(file, name, limit)
        if not options.paragraphs:
            text = "".join(line for _, line in lines)
            if text.strip():
                yield text
            return
        yield from _paragraphs(lines, name, limit)


def _paragraphs(lines: Iterable[tuple[int, str]], name: str, limit: int) -> Iterator[str]:
    """Blocks of lines separated by lines that are empty or only whitespace."""
    block: list[str] = []
    size = first_line = 0
    for number, line in lines:
        if not line.strip():
            if block:
                yield "".join(block).rstrip("\r\n")
            block, size = [], 0
            continue
        if not block:
            first_line = number
        block.append(line)
        size += len(line.encode("utf-8"))
        _check_size(size, f"{name}: paragraph at line {first_line}", limit)
    if block:
        yield "".join(block).rstrip("\r\n")


def _read_jsonl(path: Path, options: ImportOptions) -> Iterator[Document]:
    name = str(path)
    with _open_text(path) as file:
        for number, line in _lines(file, name, options.max_document_bytes):
            if not line.strip():
                continue
            where = f"{name} line {number}"
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataImportError(
                    f"{where}: invalid JSON at column {error.colno}: {error.msg}; each line must "
                    "hold one complete JSON value (for one JSON document, use a .json file)"
                ) from None
            except (ValueError, RecursionError) as error:
                raise DataImportError(f"{where}: invalid JSON: {error}") from None
            document = _document_from_record(record, where, options)
            if document is not None:
                yield document


def _read_json(path: Path, options: ImportOptions) -> Iterator[Document]:
    name, size = str(path), path.stat().st_size
    if size > JSON_MAX_BYTES:
        raise DataImportError(
            f"{name} is {size} bytes; a .json file is read whole, so it must be under "
            f"{JSON_MAX_BYTES} bytes; convert it to JSON Lines (.jsonl, one record per line)"
        )
    with _open_text(path) as file:
        text = _decode(file.read(), name).removeprefix("\ufeff")
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataImportError(
            f"{name}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except (ValueError, RecursionError) as error:
        raise DataImportError(f"{name}: invalid JSON: {error}") from None
    del text
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        items, prefix = value["data"], "data"
    elif isinstance(value, list):
        items, prefix = value, ""
    else:
        raise DataImportError(
            f"{name}: expected a list of records (or of strings) or an object with a list under "
            f'"data", got {_describe(value)}'
        )
    for index, item in enumerate(items):
        document = _document_from_record(item, f"{name} element {prefix}[{index}]", options)
        if document is not None:
            yield document


def _read_csv(path: Path, options: ImportOptions) -> Iterator[Document]:
    name = str(path)
    # the limit is process-wide: raise it, never lower it under another reader
    csv.field_size_limit(max(csv.field_size_limit(), options.max_document_bytes))
    with _open_text(path) as file:
        reader = csv.reader(line for _, line in _lines(file, name, options.max_document_bytes))
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = _csv_columns(header, name, options)
            while True:
                first_line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not row:
                    continue
                where = f"{name} line {first_line}"
                if len(row) != len(header):
                    raise DataImportError(
                        f"{where}: {len(row)} fields, but the header has {len(header)}; check "
                        "the quoting of that row"
                    )
                record = {column: row[index] for column, index in columns.items()}
                document = _document_from_record(record, where, options)
                if document is not None:
                    yield document
        except csv.Error as error:
            raise DataImportError(
                f"{name} line {reader.line_num}: malformed CSV: {error}"
            ) from None


def _csv_columns(header: list[str], name: str, options: ImportOptions) -> dict[str, int]:
    """The columns a record needs, by their index in the header."""
    wanted = ["prompt", "response", "system"] if options.annotated else [options.field]
    columns = {column: header.index(column) for column in wanted if column in header}
    missing = [column for column in wanted[:2] if column not in columns]
    if missing:
        need = (
            "'prompt' and 'response' columns"
            if options.annotated
            else f"a {options.field!r} column"
        )
        fix = "" if options.annotated else "; set field to the column that holds the text"
        raise DataImportError(
            f"{name}: the header row has no {missing[0]!r} column; need {need}; it has "
            f"{', '.join(map(repr, header))}{fix}"
        )
    return columns


@contextmanager
def _open_text(path: Path) -> Iterator[BinaryIO]:
    """The file opened for binary reads, after refusing one that is not text."""
    try:
        file = path.open("rb")
    except OSError as error:
        raise DataImportError(f"{path}: cannot open it: {error.strerror}") from None
    with file:
        if b"\0" in file.read(BINARY_SNIFF_BYTES):
            raise DataImportError(
                f"{path} looks like a binary file (NUL bytes in its first "
                f"{BINARY_SNIFF_BYTES // 1024} KiB), not UTF-8 text; if it is UTF-16 text, "
                "convert it to UTF-8"
            )
        file.seek(0)
        yield file


def _lines(file: BinaryIO, name: str, limit: int) -> Iterator[tuple[int, str]]:
    """(number, decoded line with its newline); a line over `limit` bytes is never read whole."""
    offset = 0
    for number in itertools.count(1):
        raw = file.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise DataImportError(
                f"{name}: line {number} is longer than max_document_bytes ({limit} bytes); "
                "split it, or raise the limit if the document is meant to be this big"
            )
        line = _decode(raw, name, number, offset)
        yield number, line.removeprefix("\ufeff") if number == 1 else line
        offset += len(raw)


def _decode(data: bytes, name: str, first_line: int = 1, offset: int = 0) -> str:
    """UTF-8 text of `data`, which starts at `first_line` and byte `offset` of the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = first_line + data.count(b"\n", 0, error.start)
        raise DataImportError(
            f"{name}: not valid UTF-8 at line {line}, byte {error.start - line_start + 1} of the "
            f"line (byte offset {offset + error.start} in the file): {error.reason}; convert the "
            "file to UTF-8 (for example: iconv -f latin1 -t utf-8)"
        ) from None


# ------------------------------------------------------------------------------ Arrow formats


def _read_parquet(path: Path, options: ImportOptions) -> Iterator[Document]:
    pyarrow = _pyarrow("reading .parquet")
    import pyarrow.parquet as parquet  # type: ignore[import-untyped]

    name = str(path)
    try:
        file = parquet.ParquetFile(str(path))
        columns = _arrow_columns(file.schema_arrow, name, options)
        batches = file.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=columns)
        yield from _documents_from_batches(batches, columns, name, options, itertools.count(1))
    except pyarrow.ArrowException as error:
        raise DataImportError(f"{name}: cannot read it as Parquet: {error}") from None


def _read_hf(path: Path, options: ImportOptions) -> Iterator[Document]:
    pyarrow = _pyarrow("reading a Hugging Face datasets directory")
    name, rows = str(path), itertools.count(1)
    for data_file in _hf_data_files(path):
        try:
            with pyarrow.memory_map(str(data_file)) as stream:
                batches = pyarrow.ipc.open_stream(stream)
                columns = _arrow_columns(batches.schema, name, options)
                selected = (batch.select(columns) for batch in batches)
                yield from _documents_from_batches(selected, columns, name, options, rows)
        except pyarrow.ArrowException as error:
            raise DataImportError(
                f"{data_file}: cannot read it as an Arrow stream ({error}); save the dataset "
                "again with save_to_disk"
            ) from None


def _documents_from_batches(
    batches: Iterable[Any],
    columns: list[str],
    name: str,
    options: ImportOptions,
    rows: Iterator[int],
) -> Iterator[Document]:
    """Documents from Arrow record batches; `rows` counts rows across all the source's files."""
    for batch in batches:
        values = [batch.column(column).to_pylist() for column in columns]
        for row in zip(*values, strict=True):
            where = f"{name} row {next(rows)}"
            record = dict(zip(columns, row, strict=True))
            if options.annotated:
                record = {key: value for key, value in record.items() if value is not None}
            elif record[options.field] is None:
                continue
            document = _document_from_record(record, where, options)
            if document is not None:
                yield document


def _arrow_columns(schema: Any, name: str, options: ImportOptions) -> list[str]:
    """The columns a record needs, after checking that `schema` has them."""
    names = list(schema.names)
    found = ", ".join(map(repr, names))
    if options.annotated:
        if "messages" in names:
            return ["messages"]
        if "prompt" in names and "response" in names:
            return ["prompt", "response"] + (["system"] if "system" in names else [])
        raise DataImportError(
            f"{name}: annotated data needs a 'messages' column or 'prompt' and 'response' "
            f"columns; it has {found}"
        )
    if options.field not in names:
        raise DataImportError(
            f"{name}: no column {options.field!r}; it has {found}; set field to the column that "
            "holds the text"
        )
    column_type = schema.field(options.field).type
    if not _is_arrow_text(column_type):
        raise DataImportError(
            f"{name}: column {options.field!r} holds {column_type}, not text; set field to a "
            "string column"
        )
    return [options.field]


def _is_arrow_text(column_type: Any) -> bool:
    import pyarrow  # type: ignore[import-untyped]

    if pyarrow.types.is_dictionary(column_type):
        column_type = column_type.value_type
    is_string_view = getattr(pyarrow.types, "is_string_view", lambda _: False)
    return bool(
        pyarrow.types.is_string(column_type)
        or pyarrow.types.is_large_string(column_type)
        or is_string_view(column_type)
    )


def _pyarrow(needed_for: str) -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.ipc  # type: ignore[import-untyped]
    except ImportError:
        raise DataImportError(
            f"{needed_for} needs pyarrow: pip install 'crowdtrain[data]'"
        ) from None
    return pyarrow


# ------------------------------------------------------------- Hugging Face save_to_disk layout


def _hf_kind(directory: Path) -> str | None:
    """ "dataset" or "dataset_dict" for a save_to_disk directory, None for any other."""
    if (directory / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (directory / "state.json").is_file() and (directory / "dataset_info.json").is_file():
        return "dataset"
    return None


def _hf_source(directory: Path) -> SourceFile:
    size = sum(file.stat().st_size for file in _hf_data_files(directory))
    return SourceFile(path=directory.resolve(), format="hf", size=size)


def _hf_data_files(directory: Path) -> list[Path]:
    """The Arrow stream files that state.json lists, each checked to exist inside `directory`."""
    broken = f"{directory / 'state.json'}: "
    fix = "; save the dataset again with save_to_disk"
    try:
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataImportError(f"{broken}cannot read it ({error}){fix}") from None
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataImportError(f"{broken}no '_data_files' list{fix}")
    root = directory.resolve()
    files = []
    for entry in entries:
        filename = entry.get("filename") if isinstance(entry, dict) else None
        file = (root / filename).resolve() if isinstance(filename, str) else None
        if file is None or file.parent != root:
            raise DataImportError(f"{broken}bad '_data_files' entry {entry!r}{fix}")
        if not file.is_file():
            raise DataImportError(f"{broken}lists {filename}, which is missing{fix}")
        files.append(file)
    return files


def _dataset_dict_error(directory: Path) -> DataImportError:
    try:
        splits = json.loads((directory / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        names = [str(split) for split in splits]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(child.name for child in directory.iterdir() if _hf_kind(child) == "dataset")
    example = f", e.g. {directory / names[0]}" if names else ""
    return DataImportError(
        f"{directory} is a Hugging Face DatasetDict with splits {', '.join(names) or '(none)'}; "
        f"import one split at a time by pointing at its subdirectory{example}"
    )


_READERS: dict[str, Callable[[Path, ImportOptions], Iterator[Document]]] = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf": _read_hf,
}
