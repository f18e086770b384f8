"""Reading the user's data files: formats, row parsers with file and row numbers, column checks.

`check_data` is the driver-side entry point (files exist, formats known, columns present, before
anything starts); `parse_file` is what every reader (training data, prediction inputs, analysis)
uses, so a bad row is reported the same way everywhere. `split_file` and `count_span` let one
large file be read by many tasks (a span each) to the same rows and row numbers.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.ipc as paipc
import pyarrow.parquet as pq

from trainers.config import RunSpec
from trainers.errors import DataError
from trainers.storage import HUB_DATASET_PREFIX, absolute, is_hub_dataset, is_uri
from trainers.tasks import TASKS

_LOCAL = pafs.LocalFileSystem()
# A file larger than this is read by several tasks, one per range of about this many bytes (or
# Parquet row groups). 16 MiB of JSONL parses in about a second and grows to a few hundred MB as
# Python rows: far above a Ray task's start cost (milliseconds), small enough that a read task's
# memory stays bounded and that a 100 MB file already keeps several cores busy.
READ_RANGE_BYTES = 16 << 20
# One CSV record on one line: every field plain or fully quoted (Python's and pyarrow's default
# dialect). A line that does not match might open a quoted field that runs on to the next line,
# and a range starting there would read the inside of a quote as rows.
_CSV_ONE_LINE = re.compile(rb'(?:"(?:[^"]|"")*"|[^,"]*)(?:,(?:"(?:[^"]|"")*"|[^,"]*))*\r?')
# What `Dataset.save_to_disk` writes beside the Arrow data: never rows.
_SAVED_DATASET_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")


def check_data(spec: RunSpec) -> list[str]:
    """Driver-side checks before anything starts: files exist, formats known, columns present."""
    problems: list[str] = []
    needed = raw_columns(spec)
    for key in ("train_files", "validation_files"):
        try:
            paths = expand_files(getattr(spec.data, key), f"data.{key}")
        except DataError as e:
            problems.append(str(e))
            continue
        for path in paths:
            try:
                fmt = format_of(path, spec.data.format)
                cols = peek_columns(path, fmt)
            except DataError as e:
                problems.append(str(e))
                continue
            except Exception as e:  # unreadable header: reported with the file, not a traceback
                problems.append(
                    f"data.{key}={path}: cannot read ({e}). Check the file and data.format."
                )
                continue
            for col in needed.values():
                if cols is not None and col not in cols:
                    problems.append(
                        f"data.{key}={path}: column '{col}' not found (has: "
                        f"{', '.join(sorted(cols))}). "
                        f"Set the matching data.*_column or fix the file."
                    )
    return problems


def expand_files(patterns: list[str], key: str) -> list[str]:
    """The data files the entries of `key` name, in order.

    An entry is a local path or glob, a pyarrow URI, a folder (walked), a folder written by
    `datasets.Dataset.save_to_disk` (its Arrow data files, in the order its `state.json` lists
    them) or `hf-hub:NAME[:SPLIT]` (the Arrow cache files of `datasets.load_dataset`).

    Raises:
        DataError: naming the entry: nothing found, a `DatasetDict` folder, a Hub dataset that
            cannot be loaded here.
    """
    out: list[str] = []
    for pat in patterns:
        if is_hub_dataset(pat):
            out += _hub_files(pat, key)
            continue
        if is_uri(pat):
            fs, path = pafs.FileSystem.from_uri(pat)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"{key}={pat}: file not found. Check the URI and credentials.")
            scheme = pat.split("://")[0] + "://"
            if info.type == pafs.FileType.Directory:
                saved = _saved_dataset_files(fs, path, key, pat, pat)
                if saved is None:
                    sel = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                    saved = [i.path for i in sel if i.type == pafs.FileType.File]
                out += [scheme + p for p in saved]
            else:
                out.append(pat)
            continue
        local = os.path.expanduser(pat)
        if os.path.isdir(local):
            matches = _walk(local, key, pat)
        else:
            matches = []
            for m in sorted(glob.glob(local, recursive=True)):
                if os.path.isdir(m):  # plain folders matched by a glob are skipped, as ever
                    matches += _saved_dataset_files(_LOCAL, m, key, pat, m) or []
                elif os.path.isfile(m) and not _is_saved_dataset_metadata(m):
                    matches.append(m)
        if not matches:
            raise DataError(f"{key}={pat}: file not found. Fix the path or glob.")
        out += list(dict.fromkeys(os.path.abspath(m) for m in matches))
    return out


def _walk(folder: str, key: str, pat: str) -> list[str]:
    """Every file under `folder` (hidden and `_`-prefixed ones left out), sorted by path; a saved
    `datasets` folder inside contributes its data files, in its own order, at its place."""
    groups: list[tuple[str, list[str]]] = []
    for d, dirs, files in os.walk(folder):
        if "state.json" in files or "dataset_dict.json" in files:
            saved = _saved_dataset_files(_LOCAL, d, key, pat, d)
            if saved is not None:
                dirs[:] = []
                groups.append((os.path.join(d, ""), saved))
                continue
        groups += [
            (os.path.join(d, f), [os.path.join(d, f)])
            for f in files
            if not f.startswith((".", "_"))
        ]
    return [p for _, paths in sorted(groups) for p in paths]


def _saved_dataset_files(
    fs: pafs.FileSystem, folder: str, key: str, pat: str, shown: str
) -> list[str] | None:
    """The Arrow data files of a folder `Dataset.save_to_disk` wrote (listed in its `state.json`;
    any other `.arrow` there is a cache file of a later `.map`), or None for any other folder.

    Args:
        fs, folder: the folder on its filesystem.
        key, pat: the config key and its entry that led here, for messages.
        shown: the folder as the user writes it (a local path or a URI).

    Raises:
        DataError: the folder holds a `DatasetDict` (one subfolder per split): which split to
            train on is the user's choice, not ours.
    """
    folder, shown = folder.rstrip("/"), shown.rstrip("/")
    try:
        with fs.open_input_stream(f"{folder}/dataset_dict.json") as f:
            splits = [str(x) for x in json.loads(f.read())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        splits = None
    if splits is not None:
        where = pat if shown == os.path.expanduser(pat).rstrip("/") else f"{pat} ({shown})"
        raise DataError(
            f"{key}={where}: a DatasetDict folder with splits {', '.join(splits)}. "
            f"Point at one split's folder, e.g. {shown}/{splits[0] if splits else 'train'}."
        )
    try:
        with fs.open_input_stream(f"{folder}/state.json") as f:
            names = [entry["filename"] for entry in json.loads(f.read())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [f"{folder}/{name}" for name in names]


def _is_saved_dataset_metadata(path: str) -> bool:
    """`state.json` & co. beside the data of a saved `datasets` folder (a glob like `ds/*`)."""
    folder, name = os.path.split(path)
    return name in _SAVED_DATASET_METADATA and any(
        os.path.isfile(os.path.join(folder, m)) for m in ("state.json", "dataset_dict.json")
    )


def _hub_files(entry: str, key: str) -> list[str]:
    """`hf-hub:NAME[:SPLIT]` -> the Arrow files `datasets.load_dataset(NAME, split=SPLIT)` keeps
    in its cache (downloaded on first use, on the driver).

    Raises:
        DataError: one message, the fix included, when the dataset cannot be loaded here
            (offline, no network, unknown name or split).
    """
    name, _, split = entry.removeprefix(HUB_DATASET_PREFIX).partition(":")
    split = split or "train"
    save = (
        f"datasets.load_dataset('{name}', split='{split}').save_to_disk(DIR) where the network "
        f"allows and set {key} to DIR"
    )
    if not name:
        raise DataError(
            f"{key}={entry}: no dataset name. Write {HUB_DATASET_PREFIX}NAME or "
            f"{HUB_DATASET_PREFIX}NAME:SPLIT, e.g. {HUB_DATASET_PREFIX}tatsu-lab/alpaca:train."
        )
    if "[" in split:
        # A sliced split (train[:10%]) is an index over the cached files, which hold every row.
        raise DataError(
            f"{key}={entry}: split slices are not read. Name a whole split and cap rows with "
            f"data.max_rows, or save the slice with {save}."
        )
    try:
        return list(_load_hub_dataset(name, split))
    except Exception as e:  # every failure becomes one message, not a traceback
        text = str(e).strip()
        reason = type(e).__name__ + (f": {text.splitlines()[0][:300]}" if text else "")
        if _is_unreachable(e):
            raise DataError(
                f"{key}={entry}: cannot load the Hub dataset here: offline, no network or no such "
                f"dataset ({reason}). Check the name, or run {save}."
            ) from None
        raise DataError(
            f"{key}={entry}: datasets.load_dataset failed ({reason}). Fix the name or split, "
            f"or run {save}."
        ) from None


@functools.cache  # check_data and prepare_dataset both expand the same entry on the driver
def _load_hub_dataset(name: str, split: str) -> tuple[str, ...]:
    import datasets  # slow to import (seconds): only when an hf-hub entry is used

    ds = datasets.load_dataset(name, split=split)
    files = tuple(f["filename"] for f in ds.cache_files)
    if not files:
        raise ValueError("the dataset was loaded in memory and has no cache files")
    return files


def _is_unreachable(e: BaseException) -> bool:
    """The network or the dataset is not there: OSError covers ConnectionError, the Hub's
    OfflineModeIsEnabled and `datasets`' DatasetNotFoundError; httpx's errors are no OSError."""
    return isinstance(e, OSError) or any(
        c.__module__.split(".")[0].startswith("httpx") for c in type(e).__mro__
    )


def raw_columns(spec: RunSpec, optional: bool = False) -> dict[str, str]:
    """Canonical name -> the user's column name, for the columns the task reads (the task says
    which; the config says what they are called); with `optional`, also those a row may lack."""
    task = TASKS[spec.task.type]
    fields = dict(task.columns(spec.data))
    if optional and hasattr(task, "optional_columns"):
        fields.update(task.optional_columns(spec.data))
    return {canon: spec.data.column(field) for canon, field in fields.items()}


def format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz")
    for ext, f in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".parquet", "parquet"),
        (".arrow", "arrow"),
    ):
        if name.endswith(ext):
            return f
    raise DataError(
        f"data.format=auto: cannot tell the format of {path} from its extension. "
        "Set data.format to jsonl (JSON Lines or a JSON array), csv, parquet or arrow."
    )


def peek_columns(path: str, fmt: str) -> set[str] | None:
    fs, p = pafs.FileSystem.from_uri(absolute(path))
    if fmt == "parquet":
        with fs.open_input_file(p) as f:
            return set(pq.ParquetFile(f).schema_arrow.names)
    if fmt == "arrow":
        with _open(fs, p) as f:
            return set(_arrow_reader(path, f).schema.names)
    with fs.open_input_stream(p) as f:
        head = f.read(1 << 16)
    if fmt == "csv":
        first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace")
        return set(next(csv.reader([first])))
    if head.lstrip().startswith(b"["):  # a JSON array of row objects (e.g. Alpaca's .json)
        with fs.open_input_stream(p) as f:
            try:
                rows = json.loads(f.read())
            except ValueError:
                return None  # reported with the file by the reader
        first = next((r for r in rows if isinstance(r, dict)), None)
        return set(first) if first is not None else None
    line = head.split(b"\n", 1)[0].strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None  # reported with its row by the reader
    return set(obj) if isinstance(obj, dict) else None


def split_file(path: str, fmt: str, range_bytes: int = READ_RANGE_BYTES) -> list[tuple[int, int]]:
    """The spans one file is read in, each by its own task: byte ranges that start at a line
    start (JSON Lines, CSV) or row-group ranges (Parquet); one span, `(0, -1)` (the whole file),
    for a file of at most `range_bytes`, a compressed file, a JSON array or an Arrow file.

    A CSV split here may still have to be read whole: `count_span` says whether its lines are
    one record each."""
    fs, p = pafs.FileSystem.from_uri(absolute(path))
    size = fs.get_file_info(p).size or 0
    if size <= range_bytes or fmt not in ("jsonl", "csv", "parquet") or _compressed(path):
        return [(0, -1)]
    if fmt == "parquet":
        with fs.open_input_file(p) as f:
            meta = pq.ParquetFile(f).metadata
        spans, first, acc = [], 0, 0
        for i in range(meta.num_row_groups):
            acc += meta.row_group(i).total_byte_size
            if acc >= range_bytes:
                spans.append((first, i + 1))
                first, acc = i + 1, 0
        if first < meta.num_row_groups:
            spans.append((first, meta.num_row_groups))
        return spans
    with fs.open_input_file(p) as f:
        if fmt == "jsonl" and f.read_at(1 << 16, 0).lstrip().startswith(b"["):
            return [(0, -1)]  # a JSON array is one value: only a whole-file parse reads it
        starts = [0]
        for nominal in range(range_bytes, size, range_bytes):
            at = _next_line_start(f, nominal, size)
            if at > starts[-1] and at < size:  # a line longer than a range: no empty span
                starts.append(at)
    return list(zip(starts, starts[1:] + [size]))


def count_span(
    path: str, fmt: str, span: tuple[int, int], label_column: str | None = None
) -> tuple[int, bool, dict[str, int]]:
    """What the reader of a span needs to know about the spans before it: the span's row count
    (rows as `parse_file` numbers them), whether the span may be read apart from the rest of
    its file (CSV: no record spans lines) and, with `label_column`, how many of its labels are
    of each kind (`label_kind` of a file is decided over all its spans)."""
    fs, p = pafs.FileSystem.from_uri(absolute(path))
    if fmt == "parquet":
        with fs.open_input_file(p) as f:
            meta = pq.ParquetFile(f).metadata
        return sum(meta.row_group(i).num_rows for i in range(*span)), True, {}
    with fs.open_input_file(p) as f:
        raw = f.read_at(span[1] - span[0], span[0])
    lines = raw.split(b"\n")
    if fmt == "csv":
        # pyarrow also ends lines at a lone CR: then its rows are not the newline-counted ones.
        ok = raw.count(b"\r") == raw.count(b"\r\n") and all(
            _CSV_ONE_LINE.fullmatch(line) for line in lines if b'"' in line
        )
        rows = sum(1 for line in lines if line.rstrip(b"\r"))  # empty lines are no rows
        return rows - (span[0] == 0 and rows > 0), ok, {}  # the header is no row
    kinds: dict[str, int] = {}
    rows = 0
    for line in lines:
        if not line.strip():
            continue
        rows += 1
        if label_column is None:
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included: no label, as in `parse_file`
            continue
        if isinstance(obj, dict):
            for kind, n in label_kinds([obj.get(label_column)]).items():
                kinds[kind] = kinds.get(kind, 0) + n
    return rows, True, kinds


def _next_line_start(f: pa.NativeFile, at: int, size: int) -> int:
    """The first line start at or after byte `at` (`size` if none)."""
    pos = at - 1  # a newline just before `at` makes `at` itself a line start
    while pos < size:
        chunk = f.read_at(1 << 16, pos)
        nl = chunk.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(chunk)
    return size


def _compressed(path: str) -> bool:
    try:
        return pa.Codec.detect(path) is not None
    except (TypeError, ValueError):  # no compression extension
        return False


def parse_file(
    path: str, fmt: str, columns: list[str], span: tuple[int, int] = (0, -1)
) -> tuple[list[dict | None], list[str | None]]:
    """A file's records (None where a row cannot be read) and each row's problem (or None).

    Args:
        span: one of `split_file`'s spans; its rows are numbered from 1 again (the caller adds
            the rows of the spans before it). A CSV span after the first is read with the
            file's header line.
    """
    fs, p = pafs.FileSystem.from_uri(absolute(path))
    if fmt == "parquet":
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            t = (
                pf.read(columns=cols)
                if span[1] < 0
                else pf.read_row_groups(range(*span), columns=cols)
            )
        return t.to_pylist(), [None] * t.num_rows
    if fmt == "arrow":
        with _open(fs, p) as f:
            reader = _arrow_reader(path, f)
            t = reader.read_all().select([c for c in columns if c in reader.schema.names])
        return _decode_class_labels(t).to_pylist(), [None] * t.num_rows
    if span[1] >= 0:
        with fs.open_input_file(p) as f:
            raw = f.read_at(span[1] - span[0], span[0])
            if fmt == "csv" and span[0] > 0:
                raw = f.read_at(_next_line_start(f, 1, span[0]), 0) + raw
    else:
        with fs.open_input_stream(p, compression="detect") as f:
            raw = f.read()
    if fmt == "csv":
        return _parse_csv(path, raw)
    if raw.lstrip().startswith(b"["):
        return _parse_json_array(path, raw)
    records: list[dict | None] = []
    errors: list[str | None] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            records.append(obj)
            errors.append(None)
        except UnicodeDecodeError:
            records.append(None)
            errors.append("not valid UTF-8")
        except ValueError as e:
            records.append(None)
            errors.append(f"malformed JSON ({str(e)[:60]})")
    return records, errors


def text_error(value: Any, column: str) -> str | None:
    """Why a parsed value cannot be read as text, or None (a missing value is the caller's own
    rule). Text is a string, as every CSV cell is; a JSON number or boolean in a text column is
    a bad row, not text made of its digits, and a list or object is structure."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, (dict, list)):
        return (
            f"not text ('{column}' holds a JSON {type(value).__name__}; for chat data set "
            "task.type=chat, see data.conversation)"
        )
    return f"expected a string, got {type(value).__name__} ('{column}' holds {value!r})"


def label_kind(values: list[Any] | dict[str, int]) -> str | None:
    """The kind of most of one file's labels: "string", "number" or "boolean" (strings win a
    tie), or None when the file has none; `values` may also be `label_kinds` counts. Label ids
    (0, 1) and booleans are labels too; what `label_error` refuses is a value of another kind
    than the file's other labels."""
    counts = values if isinstance(values, dict) else label_kinds(values)
    return max(counts, key=lambda k: (counts[k], k == "string"), default=None)


def label_kinds(values: list[Any]) -> dict[str, int]:
    """How many labels are of each kind ("string", "number", "boolean"; nothing for missing
    labels and structure)."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None and not isinstance(v, (dict, list)):
            counts[_kind(v)] = counts.get(_kind(v), 0) + 1
    return counts


def label_error(value: Any, column: str, kind: str | None) -> str | None:
    """Why `value` cannot be a label in a file whose labels are of `kind` (`label_kind`), or
    None: its text would make a class of its own ("1" beside "pos" and "neg")."""
    if value is None or isinstance(value, (dict, list)):
        return text_error(value, column)
    if kind is None or _kind(value) == kind:
        return None
    return (
        f"expected a {kind}, got {type(value).__name__} ('{column}' holds {value!r}; the "
        f"file's other labels are {kind}s)"
    )


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _open(fs: pafs.FileSystem, p: str) -> pa.NativeFile:
    """A local file memory-mapped (only the columns read are ever paged in), else opened."""
    return pa.memory_map(p) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(p)


def _arrow_reader(
    path: str, f: pa.NativeFile
) -> paipc.RecordBatchStreamReader | paipc.RecordBatchFileReader:
    """`datasets` writes the Arrow IPC stream format; pyarrow and Feather v2 write the file
    format: try the stream, then the file."""
    try:
        return paipc.open_stream(f)
    except pa.ArrowInvalid:
        f.seek(0)
    try:
        return paipc.open_file(f)
    except pa.ArrowInvalid as e:
        raise DataError(
            f"{path}: not an Arrow IPC stream or file ({e}). Check the file and data.format."
        ) from None


def _decode_class_labels(t: pa.Table) -> pa.Table:
    """Columns `datasets` declares a `ClassLabel` hold class indices: give back the names (what a
    JSONL export of the same data holds, and what the trained model's labels should be called).
    -1 (`datasets`' "no label") becomes null, a row without a label."""
    meta = (t.schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        return t  # metadata from another writer: the values are what they are
    for name, feature in features.items() if isinstance(features, dict) else ():
        if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
            continue
        if name not in t.column_names or not pa.types.is_integer(t.schema.field(name).type):
            continue
        names = feature.get("names") or []
        values = [
            names[i] if i is not None and 0 <= i < len(names) else None
            for i in t.column(name).to_pylist()
        ]
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, type=pa.string()))
    return t


def _parse_json_array(path: str, raw: bytes) -> tuple[list[dict | None], list[str | None]]:
    """A JSON array of row objects (a `.json` file, e.g. Alpaca's): row N is element N."""
    try:
        rows = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}). Save the file as UTF-8.") from e
    except ValueError as e:
        raise DataError(
            f"{path}: not valid JSON ({e}). Fix the file, or write one JSON object per "
            "line (JSON Lines)."
        ) from e
    records: list[dict | None] = []
    errors: list[str | None] = []
    for row in rows:
        ok = isinstance(row, dict)
        records.append(row if ok else None)
        errors.append(None if ok else f"not a JSON object ({type(row).__name__})")
    return records, errors


def _parse_csv(path: str, raw: bytes) -> tuple[list[dict | None], list[str | None]]:
    """Every cell as text: a CSV has no types, and pyarrow's type inference would turn the
    text "007" into the number 7 (and a column of digits into numbers a text column refuses)."""
    try:
        header = next(csv.reader([raw.split(b"\n", 1)[0].decode("utf-8", errors="replace")]))
    except (csv.Error, StopIteration):
        header = []  # pyarrow fails on it too, and the record-by-record read says where
    try:
        t = pacsv.read_csv(
            io.BytesIO(raw),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                auto_dict_encode=False,
            ),
            read_options=pacsv.ReadOptions(use_threads=False),
        )
        return t.to_pylist(), [None] * t.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass  # pyarrow names neither the row nor the line: read again, record by record
    return _parse_csv_records(path, raw)


def _parse_csv_records(path: str, raw: bytes) -> tuple[list[dict | None], list[str | None]]:
    """The file through Python's csv module, each record with the lines it spans: a row with
    the wrong field count or bytes that are not UTF-8 is a bad row; broken quoting, after which
    no later row can be trusted, fails the file with the line where the broken record starts.

    Raises:
        DataError: broken quoting, naming the file, the line and the data row.
    """
    bad_utf8: set[int] = set()

    def lines():
        for n, line in enumerate(raw.split(b"\n"), start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                bad_utf8.add(n)
                text = line.decode("utf-8", errors="replace")
            # The newline is given back: a quoted field may span lines and keeps its newlines.
            yield text + "\n"

    reader = csv.reader(lines(), strict=True)
    header: list[str] | None = None
    records: list[dict | None] = []
    errors: list[str | None] = []
    done = 0  # the last line of the records read so far
    try:
        for fields in reader:
            first, done = done + 1, reader.line_num
            if not fields:
                continue  # a blank line, skipped like pyarrow does
            if header is None:
                header = fields
            elif bad_utf8.intersection(range(first, done + 1)):
                records.append(None)
                errors.append("not valid UTF-8")
            elif len(fields) != len(header):
                records.append(None)
                errors.append(f"expected {len(header)} fields, got {len(fields)}")
            else:
                records.append(dict(zip(header, fields)))
                errors.append(None)
    except csv.Error as e:
        row = len(records) + 1
        if "unexpected end of data" in str(e):
            raise DataError(
                f"{path} line {done + 1} (data row {row}): unterminated quote: a quoted field "
                "that opens in this row is never closed, so the rest of the file would read "
                "as one field. Close the quote; a quote inside a quoted field is written "
                'twice ("").'
            ) from None
        raise DataError(
            f"{path} line {reader.line_num} (data row {row}): CSV parse error ({e}). Quote the "
            'whole field and write each quote inside it twice ("").'
        ) from None
    return records, errors
