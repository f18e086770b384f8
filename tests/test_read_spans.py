"""A large file read in spans by many tasks reads to the very rows of the file read whole: the
same rows, row numbers, validation split and bad rows (file and 1-based row). A tiny range size
makes small files split into many spans."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import classification_rows

from trainers.data.files import count_span, split_file
from trainers.data.prepare import _check_rows, _read_file_batch, _read_rows
from trainers.errors import DataError


def _rows(spec, path, range_bytes):
    """The file's rows read on Ray in spans of `range_bytes`, in row order, and the dataset."""
    ds = _read_rows({"train": [path]}, spec, range_bytes).materialize()
    return sorted(ds.take_all(), key=lambda r: r["_row"]), ds


def _whole(spec, path):
    """The file's rows as one read task reads them (in this process)."""
    t = _read_file_batch(
        pa.table({"path": [path], "split": ["train"]}),
        {"text": "text", "label": "label"},
        "auto",
        fraction=spec.data.validation_fraction,
        seed=spec.data.split_seed,
        max_rows=spec.data.max_rows,
        spec_dict=spec.model_dump(),
    )
    return t.to_pylist()


def _jsonl_lines(n=200):
    """Rows with a malformed line at row 150 and numeric labels at rows 101-140 (a span of
    their own is mostly numbers, the file mostly text: the file's kind decides), blank lines."""
    lines = [json.dumps(r) for r in classification_rows(n, seed=5)]
    lines[149] = '{"text": "broken'
    for i in range(100, 140):
        lines[i] = json.dumps({"text": f"row {i + 1}", "label": i % 2})
    return lines[:40] + ["", "      "] * 800 + lines[40:]  # blank lines: spans of no rows


@pytest.mark.parametrize("newline,trailing", [("\n", True), ("\r\n", False)])
def test_split_jsonl_reads_like_the_whole_file(
    ray_session, spec_factory, tmp_path, newline, trailing
):
    path = tmp_path / "big.jsonl"
    path.write_bytes((newline.join(_jsonl_lines()) + (newline if trailing else "")).encode())
    spec = spec_factory("cls", data={"train_files": [str(path)]})
    split, ds = _rows(spec, str(path), 2500)
    spans = split_file(str(path), "jsonl", 2500)
    assert len(spans) > 4 and split == _whole(spec, str(path))
    assert [count_span(str(path), "jsonl", s)[0] for s in spans].count(0) >= 1
    assert [r["_row"] for r in split] == list(range(1, 201))
    assert 5 <= sum(r["_split"] == "validation" for r in split) <= 40
    bad = {r["_row"]: r["_error"] for r in split if r["_error"]}
    assert sorted(bad) == list(range(101, 141)) + [150]
    assert bad[150].startswith("malformed JSON")
    assert (
        bad[101]
        == "expected a string, got int ('label' holds 0; the file's other labels are strings)"
    )
    # The malformed row sits past the 3rd span's start and keeps its row number.
    assert path.read_bytes().index(b'{"text": "broken') > spans[2][0]
    with pytest.raises(
        DataError, match=r"41 bad rows .*first at .*big\.jsonl row 101: expected a string"
    ):
        _check_rows(ds, spec)


def test_split_csv_reads_with_its_header_and_quoted_newlines_read_whole(
    ray_session, spec_factory, tmp_path
):
    rows = classification_rows(200, seed=2)
    lines = ["text,label"] + [f'"{r["text"]}, yes",{r["label"]}' for r in rows]
    lines[150] = "an extra,field,here"
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    spec = spec_factory("cls", data={"train_files": [str(path)]})
    split, _ = _rows(spec, str(path), 2000)
    assert len(split_file(str(path), "csv", 2000)) > 3 and split == _whole(spec, str(path))
    assert split[0]["text"] == rows[0]["text"] + ", yes"  # the header names every span's columns
    assert [r["_row"] for r in split if r["_error"]] == [150]
    # A newline inside quotes: a span might start inside the quote, so the file is read whole.
    lines[60] = '"first line\nsecond line",pos'
    path.write_text("\n".join(lines) + "\n")
    assert not all(count_span(str(path), "csv", s)[1] for s in split_file(str(path), "csv", 2000))
    split, _ = _rows(spec, str(path), 2000)
    assert split == _whole(spec, str(path)) and len(split) == 200
    assert split[59]["text"] == "first line\nsecond line"


def test_parquet_is_read_by_row_groups(ray_session, spec_factory, tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(classification_rows(300)), path, row_group_size=40)
    spec = spec_factory("cls", data={"train_files": [str(path)], "max_rows": 250})
    split, _ = _rows(spec, str(path), 500)
    assert len(split_file(str(path), "parquet", 500)) > 3 and split == _whole(spec, str(path))
    assert [r["_row"] for r in split] == list(range(1, 251))
