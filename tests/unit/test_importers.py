"""Unit tests for the dataset importers: every format, on good files and on bad ones."""

import json
import sys
from pathlib import Path

import pytest

from crowdtrain.data.importers import (
    DataImportError,
    ImportOptions,
    SourceFile,
    find_sources,
    messages_from_record,
    read_documents,
)

TEXT = ImportOptions()
ANNOTATED = ImportOptions(annotated=True)


def documents(path: Path, options: ImportOptions = TEXT) -> list:
    """Everything an import of `path` yields, over all its sources."""
    return [
        doc for source in find_sources(path, options) for doc in read_documents(source, options)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.table(columns), path, row_group_size=2)
    return path


# ------------------------------------------------------------------------------------ text


def test_text_file_is_one_document_without_bom(tmp_path):
    file = tmp_path / "notes.md"
    file.write_bytes("\ufeff# Title\n\nBody line.\n".encode())
    [source] = find_sources(file, TEXT)
    assert source == SourceFile(path=file.resolve(), format="text", size=file.stat().st_size)
    assert list(read_documents(source, TEXT)) == ["# Title\n\nBody line.\n"]


def test_paragraphs_split_on_whitespace_only_lines(tmp_path):
    file = tmp_path / "book.txt"
    file.write_text("\n\nFirst para\nstill first.\n \t\nSecond.\r\n\n\n\nThird.", encoding="utf-8")
    options = ImportOptions(paragraphs=True)
    assert documents(file, options) == ["First para\nstill first.", "Second.", "Third."]


def test_text_file_over_max_document_bytes_is_refused_unless_split(tmp_path):
    file = tmp_path / "big.txt"
    file.write_text(("word " * 100 + "\n\n") * 30, encoding="utf-8")
    with pytest.raises(DataImportError, match="more than max_document_bytes"):
        documents(file, ImportOptions(max_document_bytes=1000))
    options = ImportOptions(max_document_bytes=1000, paragraphs=True)
    assert len(documents(file, options)) == 30
    file.write_text("word " * 300, encoding="utf-8")
    with pytest.raises(DataImportError, match="line 1 is longer than max_document_bytes"):
        documents(file, options)


def test_paragraph_over_max_document_bytes_names_its_first_line(tmp_path):
    file = tmp_path / "long.txt"
    file.write_text("short\n\n" + "a line of forty characters, more or less\n" * 40)
    with pytest.raises(DataImportError, match="paragraph at line 3") as error:
        documents(file, ImportOptions(paragraphs=True, max_document_bytes=1000))
    assert "long.txt" in str(error.value)


def test_latin1_file_error_names_line_and_byte(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_bytes(b"first line\nsecond\nthe caf\xe9 is open\n")
    with pytest.raises(DataImportError) as error:
        documents(file)
    message = str(error.value)
    assert "notes.txt: not valid UTF-8 at line 3, byte 8 of the line" in message
    assert "(byte offset 25 in the file)" in message
    assert "convert the file to UTF-8" in message


def test_binary_file_is_refused(tmp_path):
    file = tmp_path / "image.txt"
    file.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataImportError, match="image.txt looks like a binary file"):
        documents(file)


@pytest.mark.parametrize("content", [b"", b" \n\t\n", b"\xef\xbb\xbf\n"])
def test_empty_file_given_directly_is_an_error(tmp_path, content):
    file = tmp_path / "empty.jsonl"
    file.write_bytes(content)
    with pytest.raises(DataImportError, match="empty.jsonl (is empty|holds only whitespace)"):
        find_sources(file, TEXT)


def test_empty_files_in_a_directory_are_listed_but_give_no_documents(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("  \n\n")
    (tmp_path / "c.parquet").write_bytes(b"")
    sources = find_sources(tmp_path, TEXT)
    assert [source.path.name for source in sources] == ["a.txt", "b.txt", "c.parquet"]
    assert [len(list(read_documents(source, TEXT))) for source in sources] == [1, 0, 0]
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DataImportError, match="all 2 matching files .* are empty"):
        find_sources(tmp_path, TEXT)


def test_text_files_cannot_be_annotated(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    with pytest.raises(DataImportError, match="plain text, not instruction or chat records"):
        find_sources(file, ANNOTATED)
    source = SourceFile(path=file, format="text", size=5)
    with pytest.raises(DataImportError, match="plain text"):
        read_documents(source, ANNOTATED)


# -------------------------------------------------------------------------------- finding


def test_directory_walk_is_sorted_recursive_and_skips_hidden_and_unsupported(tmp_path):
    for relative in ["b.txt", "a/z.md", "a/y.jsonl", ".hidden.txt", ".git/c.txt", "d/e.pdf"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text('{"text": "x"}')
    sources = find_sources(tmp_path, TEXT)
    assert [source.path.relative_to(tmp_path).as_posix() for source in sources] == [
        "a/y.jsonl",
        "a/z.md",
        "b.txt",
    ]
    assert [source.format for source in sources] == ["jsonl", "text", "text"]
    annotated = find_sources(tmp_path, ANNOTATED)
    assert [source.path.name for source in annotated] == ["y.jsonl"]


def test_include_globs(tmp_path):
    for relative in ["top.md", "top.txt", "docs/a.txt", "docs/deep/b.txt", "docs/deep/c.md"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(relative)

    def included(*patterns):
        options = ImportOptions(include=patterns)
        return [
            source.path.relative_to(tmp_path).as_posix()
            for source in find_sources(tmp_path, options)
        ]

    assert included("*.md") == ["docs/deep/c.md", "top.md"]
    assert included("docs/**/*.txt") == ["docs/a.txt", "docs/deep/b.txt"]
    assert included("top.*", "docs/deep/*") == [
        "docs/deep/b.txt",
        "docs/deep/c.md",
        "top.md",
        "top.txt",
    ]


def test_directory_with_no_matching_files(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataImportError) as error:
        find_sources(tmp_path, ImportOptions(include=("*.md",)))
    message = str(error.value)
    assert f"no files to import under {tmp_path}" in message
    assert ".txt, .md, .jsonl" in message and "'*.md'" in message and ".pdf" in message


def test_missing_path_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataImportError, match="does not exist"):
        find_sources(tmp_path / "nope.txt", TEXT)
    file = tmp_path / "paper.docx"
    file.write_text("x")
    with pytest.raises(DataImportError, match=r"unsupported file type '\.docx'.*\.parquet"):
        find_sources(file, TEXT)


# -------------------------------------------------------------------------------- JSON lines


def test_jsonl_field_blank_lines_and_empty_documents(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"body": "one", "id": 1}\n\n   \n{"body": "  "}\n"two"\n{"body": "three"}')
    assert documents(file, ImportOptions(field="body")) == ["one", "two", "three"]


def test_jsonl_missing_field_names_line_and_keys(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"content": "b", "id": 2}])
    with pytest.raises(DataImportError) as error:
        documents(file)
    message = str(error.value)
    assert "data.jsonl line 2: no 'text' field" in message
    assert "'content', 'id'" in message


def test_jsonl_non_string_field(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"text": ["a list"]}])
    with pytest.raises(
        DataImportError, match="data.jsonl line 1: 'text' must be a string, got a list"
    ):
        documents(file)


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(DataImportError) as error:
        documents(file)
    message = str(error.value)
    assert "data.jsonl line 2: invalid JSON at column" in message
    assert "Unterminated string" in message


def test_jsonl_huge_line_is_refused_without_reading_it_whole(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text('{"text": "fine"}\n' + json.dumps({"text": "x" * 5000}) + "\n")
    options = ImportOptions(max_document_bytes=1000)
    reader = read_documents(find_sources(file, options)[0], options)
    assert next(reader) == "fine"
    with pytest.raises(DataImportError, match="line 2 is longer than max_document_bytes"):
        next(reader)


def test_jsonl_latin1_error_has_file_offset(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    with pytest.raises(DataImportError, match=r"line 2, byte 13 of the line \(byte offset 27"):
        documents(file)


# ----------------------------------------------------------------------------------- JSON


def test_json_list_of_records_strings_and_data_object(tmp_path):
    file = tmp_path / "data.json"
    file.write_text(json.dumps([{"text": "a"}, "b", {"text": ""}]))
    assert documents(file) == ["a", "b"]
    file.write_text(json.dumps({"data": [{"text": "c"}]}))
    assert documents(file) == ["c"]


def test_json_wrong_shape_and_malformed(tmp_path):
    file = tmp_path / "data.json"
    file.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataImportError, match=r"expected a list of records.*keys 'rows'"):
        documents(file)
    file.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(
        DataImportError, match="data.json: invalid JSON at line 3, column 12: Expecting value"
    ):
        documents(file)
    file.write_text(json.dumps([{"text": "a"}, 7]))
    with pytest.raises(DataImportError, match=r"data.json element \[1\]: expected an object"):
        documents(file)


# ------------------------------------------------------------------------------------ CSV


def test_csv_column_quoted_newlines_and_bom(tmp_path):
    file = tmp_path / "data.csv"
    file.write_bytes('\ufeffid,text\n1,hello\n2,"multi\nline, quoted"\n3,\n\n4,bye\n'.encode())
    assert documents(file) == ["hello", "multi\nline, quoted", "bye"]


def test_csv_missing_column_lists_columns(tmp_path):
    file = tmp_path / "data.csv"
    file.write_text("id,body\n1,hello\n")
    with pytest.raises(DataImportError) as error:
        documents(file)
    assert "data.csv: the header row has no 'text' column" in str(error.value)
    assert "'id', 'body'" in str(error.value)
    assert documents(file, ImportOptions(field="body")) == ["hello"]


def test_csv_ragged_row_names_line(tmp_path):
    file = tmp_path / "data.csv"
    file.write_text("id,text\n1,ok\n2,a,b\n")
    with pytest.raises(DataImportError, match="data.csv line 3: 3 fields, but the header has 2"):
        documents(file)


def test_csv_field_over_max_document_bytes(tmp_path):
    file = tmp_path / "data.csv"
    file.write_text('text\n"' + "word\n" * 300 + '"\n')
    with pytest.raises(DataImportError, match="data.csv line 2: the document is 1500 bytes"):
        documents(file, ImportOptions(max_document_bytes=1000))


def test_csv_annotated(tmp_path):
    file = tmp_path / "chat.csv"
    file.write_text("prompt,response,system\nHi?,Hello!,\nSum 2+2,4,Be terse.\n")
    assert documents(file, ANNOTATED) == [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Sum 2+2"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    file.write_text("question,answer\nHi?,Hello!\n")
    with pytest.raises(DataImportError, match="no 'prompt' column; need 'prompt' and 'response'"):
        documents(file, ANNOTATED)


# -------------------------------------------------------------------------------- Parquet


def test_parquet_column_in_batches_skips_nulls_and_empty(tmp_path):
    file = write_parquet(
        tmp_path / "data.parquet", {"id": [1, 2, 3, 4, 5], "text": ["a", None, "", "d", "e"]}
    )
    [source] = find_sources(file, TEXT)
    assert source.format == "parquet"
    assert list(read_documents(source, TEXT)) == ["a", "d", "e"]


def test_parquet_without_the_column(tmp_path):
    file = write_parquet(tmp_path / "data.parquet", {"id": [1], "body": ["a"]})
    with pytest.raises(DataImportError) as error:
        documents(file)
    assert "data.parquet: no column 'text'; it has 'id', 'body'" in str(error.value)
    with pytest.raises(DataImportError, match="column 'id' holds int64, not text"):
        documents(file, ImportOptions(field="id"))


def test_parquet_document_too_big_names_row(tmp_path):
    file = write_parquet(tmp_path / "data.parquet", {"text": ["a", "b", "c" * 2000]})
    with pytest.raises(DataImportError, match="data.parquet row 3: the document is 2000 bytes"):
        documents(file, ImportOptions(max_document_bytes=1000))


def test_parquet_annotated_prompt_response_and_messages(tmp_path):
    file = write_parquet(tmp_path / "pr.parquet", {"prompt": ["Q"], "response": ["A"], "n": [1]})
    assert documents(file, ANNOTATED) == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    file = write_parquet(tmp_path / "chat.parquet", {"messages": [chat]})
    assert documents(file, ANNOTATED) == [chat]
    file = write_parquet(tmp_path / "bad.parquet", {"text": ["x"]})
    with pytest.raises(DataImportError, match="needs a 'messages' column .* it has 'text'"):
        documents(file, ANNOTATED)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    file = tmp_path / "data.parquet"
    file.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataImportError, match=r"reading .parquet needs pyarrow: pip install"):
        documents(file)


def test_corrupt_parquet(tmp_path):
    file = tmp_path / "data.parquet"
    file.write_bytes(b"not parquet at all")
    with pytest.raises(DataImportError, match="data.parquet: cannot read it as Parquet"):
        documents(file)


# ---------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf_datasets():
    return pytest.importorskip("datasets")


def test_hf_save_to_disk_directory(tmp_path, hf_datasets):
    dataset = hf_datasets.Dataset.from_dict({"text": ["one", "", None, "four"], "n": [1, 2, 3, 4]})
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    [source] = find_sources(tmp_path / "saved", TEXT)
    assert source.format == "hf" and source.path == (tmp_path / "saved").resolve()
    assert source.size > 0
    assert list(read_documents(source, TEXT)) == ["one", "four"]
    with pytest.raises(DataImportError, match="no column 'body'; it has 'text', 'n'"):
        documents(tmp_path / "saved", ImportOptions(field="body"))
    # found inside a directory import too, as one source
    (tmp_path / "readme.md").write_text("read me")
    assert [source.format for source in find_sources(tmp_path, TEXT)] == ["text", "hf"]


def test_hf_annotated_messages(tmp_path, hf_datasets):
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    hf_datasets.Dataset.from_dict({"messages": [chat]}).save_to_disk(str(tmp_path))
    assert documents(tmp_path, ANNOTATED) == [chat]


def test_hf_dataset_dict_asks_for_one_split(tmp_path, hf_datasets):
    split = hf_datasets.Dataset.from_dict({"text": ["a"]})
    hf_datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataImportError) as error:
        find_sources(tmp_path / "dd", TEXT)
    message = str(error.value)
    assert "is a Hugging Face DatasetDict with splits train, test" in message
    assert str(tmp_path / "dd" / "train") in message
    assert documents(tmp_path / "dd" / "train") == ["a"]
    with pytest.raises(DataImportError, match="DatasetDict"):
        find_sources(tmp_path, TEXT)


def test_hf_state_pointing_outside_the_directory_is_refused(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.arrow"}]}))
    with pytest.raises(DataImportError, match="bad '_data_files' entry"):
        find_sources(tmp_path, TEXT)


# ---------------------------------------------------------------------------- annotated records


def test_jsonl_annotated_formats(tmp_path):
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    records = [
        {"prompt": "U", "response": "A", "system": "S", "id": 3},
        {"messages": [dict(message, weight=1) for message in chat]},
    ]
    file = write_jsonl(tmp_path / "data.jsonl", records)
    assert documents(file, ANNOTATED) == [chat, chat]


@pytest.mark.parametrize(
    ("record", "complaint"),
    [
        ({"text": "plain"}, r"not an annotated record \(keys 'text'\)"),
        ("a string", r"not an annotated record \(a string\)"),
        ({"prompt": "Q", "response": 4}, "'response' must be a string, got a number"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"messages\[0\] is a string, not an object"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\] has role 'tool'"),
        ({"messages": [{"role": "user", "content": None}]}, "content must be a string, got null"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant message"),
    ],
)
def test_bad_annotated_records(record, complaint):
    with pytest.raises(DataImportError, match=complaint) as error:
        messages_from_record(record, "data.jsonl line 7")
    assert str(error.value).startswith("data.jsonl line 7: ")


def test_bad_annotated_record_in_a_file_names_the_line(tmp_path):
    file = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Q", "response": "A"}, {"q": 1}])
    with pytest.raises(DataImportError, match=r"data.jsonl line 2: .*expected \{\"prompt\""):
        documents(file, ANNOTATED)


def test_options_are_checked():
    with pytest.raises(DataImportError, match="max_document_bytes must be positive"):
        ImportOptions(max_document_bytes=0)
    with pytest.raises(DataImportError, match="include must be a tuple"):
        ImportOptions(include="*.md")  # type: ignore[arg-type]
