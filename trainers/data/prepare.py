"""Raw files -> validated rows -> tokens -> a Parquet cache that training workers stream from.

`prepare_dataset` is the entry point (driver side). Stages, all on Ray Data:
  read (one task per file, or per ~16 MiB span of a larger one, each span numbering its rows on
     from the spans before it, so every bad row is reported with its file and row number)
  -> check rows (missing/empty text, unknown label, bad encoding) under data.on_bad_rows
  -> split train/validation (a stable hash of file name + row, so the split never depends on
     block order or worker count)
  -> tokenize / pack in `map_batches`
  -> write Parquet to `<cache_dir>/<key>/`, key = hash(input files' identity, tokenizer,
     preprocessing settings). The cache is written to a temporary folder and published by rename
     with a completion marker written last, so a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from trainers.config import RunSpec
from trainers.data.files import (
    READ_RANGE_BYTES,
    count_span,
    expand_files,
    format_of,
    label_error,
    label_kind,
    parse_file,
    raw_columns,
    split_file,
    text_error,
)
from trainers.errors import DataError, on_full_disk, unwrap_data_errors
from trainers.model import load_tokenizer, load_tokenizer_for
from trainers.storage import filesystem, publish, read_marker, with_scheme
from trainers.tasks import TASKS
from trainers.tasks.common import IGNORE

log = logging.getLogger("ferry.data")

# Bump when the preprocessed format changes, or what a file reads to (5: CSV cells are text,
# numbers in text columns are bad rows; 6: best-fit packing keeps documents whole).
_CACHE_VERSION = 6
# Rows per tokenization batch; packing fills rows within one batch, so its last rows are part
# filler: a larger window for packed LM tasks (see BENCHMARKS.md, "Packing").
_BATCH_ROWS = 512
_PACKED_BATCH_ROWS = 4096


@dataclass
class PreparedData:
    """Where the preprocessed data lives and what it holds (travels to workers as a dict)."""

    cache_path: str
    tokenizer_path: str
    label_names: list[str] | None
    train_rows: int
    validation_rows: int
    train_tokens: int
    bad_rows: dict[str, int] = field(default_factory=dict)
    # Training split, token-level LM tasks: data/packing_efficiency (real tokens / token slots
    # of packed rows), data/whole_document_share (documents packed without a split) and
    # data/trained_token_share (loss-bearing / real tokens).
    stats: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False

    @property
    def train_path(self) -> str:
        return self.cache_path + "/train"

    @property
    def validation_path(self) -> str:
        return self.cache_path + "/validation"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_dataset(spec: RunSpec, tokenizer_source=None) -> PreparedData:
    """Read, check, tokenize and cache the run's data; reuse the cache when nothing changed.

    Args:
        spec: the validated run config.
        tokenizer_source: callable(text_iterator_factory) -> tokenizer; default the run's own
            (`trainers.model.load_tokenizer_for`: presets train theirs on the training text).

    Raises:
        DataError: bad rows under on_bad_rows=error, an empty split, unreadable files.
        DiskFullError: the cache's disk filled up (the cache is published only when complete).
    """
    # Every file written here goes under the cache folder (Ray Data's write tasks included).
    with on_full_disk("data.cache_dir", spec.cache_dir, spec.cache_dir):
        return _prepare_dataset(spec, tokenizer_source)


def _prepare_dataset(spec: RunSpec, tokenizer_source) -> PreparedData:
    if tokenizer_source is None:

        def tokenizer_source(texts):
            return load_tokenizer_for(spec, texts)

    files = {"train": expand_files(spec.data.train_files, "data.train_files")}
    if spec.data.validation_files:
        files["validation"] = expand_files(spec.data.validation_files, "data.validation_files")
    fs, cache_root = filesystem(spec.cache_dir)
    files_id = [_file_identity(p) for split in files.values() for p in split]

    # Presets derive their tokenizer from the data, so the data and settings identify it; a
    # pretrained tokenizer is identified by its own content.
    tokenizer = None if spec.model.preset else tokenizer_source(None)
    tok_id = (
        spec.model.preset + str(spec.model.preset_vocab_size)
        if spec.model.preset
        else _tokenizer_identity(tokenizer)
    )
    key = _cache_key(spec, files_id, tok_id)
    final = f"{cache_root}/{key}"
    meta = read_marker(fs, final)
    if meta is not None:
        log.info("preprocessing cache hit: %s", final)
        return PreparedData(
            **{**meta, "cache_path": with_scheme(spec.cache_dir, final), "cache_hit": True}
        )

    rows = _read_rows(files, spec)
    rows, bad = _check_rows(rows, spec)
    train_rows = rows.filter(lambda r: r["_split"] == "train")
    val_rows = rows.filter(lambda r: r["_split"] == "validation")
    n_train, n_val = train_rows.count(), val_rows.count()
    if n_train == 0:
        raise DataError(
            f"data.train_files={spec.data.train_files}: no usable training rows "
            f"(bad rows skipped: {sum(bad.values())}). Point data.train_files at non-empty data."
        )
    if n_val == 0:
        raise DataError(
            "data.validation_files: the validation split is empty. Add data.validation_files or "
            "raise data.validation_fraction."
        )
    label_names = _label_names(train_rows, spec)
    if label_names is not None:
        val_rows, unknown = _drop_unknown_labels(val_rows, label_names, spec)
        if unknown:
            bad["label not in the training label set"] = unknown

    partial = f"{cache_root}/{key}.partial-{uuid.uuid4().hex[:8]}"
    fs.create_dir(partial)
    if tokenizer is None:
        tokenizer = tokenizer_source(lambda: _iter_text(train_rows))
    tok_dir = f"{partial}/tokenizer"
    _save_tokenizer(tokenizer, fs, tok_dir)
    label_index = {name: i for i, name in enumerate(label_names or [])}
    tok_uri = with_scheme(spec.cache_dir, tok_dir)
    counts = {}
    packed = spec.task.type in ("causal_lm", "chat") and spec.data.pack
    for split, ds in (("train", train_rows), ("validation", val_rows)):
        # Which rows share a batch decides how they pack: batches follow the files' order, not
        # the order Ray's tasks finish in.
        ds.context.execution_options.preserve_order = True
        with unwrap_data_errors():
            out = ds.map_batches(
                _tokenize_batch,
                batch_format="pyarrow",
                batch_size=_PACKED_BATCH_ROWS if packed else _BATCH_ROWS,
                fn_kwargs={
                    "tok_uri": tok_uri,
                    "spec_dict": spec.model_dump(),
                    "label_index": label_index,
                },
            ).materialize()
        n, overlong, tokens, real, loss, docs, cut = _split_stats(out)
        if n == 0:
            raise DataError(
                f"data.max_seq_length={spec.data.max_seq_length}: every {split} row was dropped as "
                "over-long. Raise data.max_seq_length or set data.overlong=truncate."
            )
        if overlong:
            log.warning(
                "%s: %d rows longer than data.max_seq_length (%s)",
                split,
                overlong,
                spec.data.overlong,
            )
        out = out.drop_columns(list(_BOOKKEEPING))
        counts[split] = (n, tokens)
        if split == "train":
            stats = _token_stats(spec, tokens, real, loss, docs, cut)
        out.write_parquet(with_scheme(spec.cache_dir, f"{partial}/{split}"))
    meta = {
        "tokenizer_path": with_scheme(spec.cache_dir, f"{final}/tokenizer"),
        "label_names": label_names,
        "train_rows": counts["train"][0],
        "validation_rows": counts["validation"][0],
        "train_tokens": counts["train"][1],
        "bad_rows": bad,
        "stats": stats,
    }
    publish(fs, partial, final, meta)
    return PreparedData(**meta, cache_path=with_scheme(spec.cache_dir, final))


def _read_rows(files: dict[str, list[str]], spec: RunSpec, range_bytes: int = READ_RANGE_BYTES):
    import ray.data

    cols = raw_columns(spec, optional=True)
    items = _plan_reads(files, spec, cols, range_bytes)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_file_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "columns": cols,
            "fmt": spec.data.format,
            # With explicit validation files nothing is split off the training data.
            "fraction": 0.0 if "validation" in files else spec.data.validation_fraction,
            "seed": spec.data.split_seed,
            "max_rows": spec.data.max_rows,
            "spec_dict": spec.model_dump(),
        },
    )


def _plan_reads(
    files: dict[str, list[str]], spec: RunSpec, columns: dict[str, str], range_bytes: int
) -> list[dict]:
    """One read per file, or one per span of a file above `range_bytes` (`split_file`). A span's
    rows are numbered on from the rows of the spans before it, and its labels are judged by the
    kind of its whole file's labels, so a split file reads to the very rows, row numbers,
    validation split and bad rows of the whole file read at once: both are counted first, by
    one task per span (`count_span`). A CSV whose records span lines is read whole."""
    import ray.data

    groups = []
    for split, paths in files.items():
        for path in paths:
            spans = split_file(path, format_of(path, spec.data.format), range_bytes)
            groups.append(
                [
                    {"path": path, "split": split, "start": a, "end": b, "row0": 0, "kind": None}
                    for a, b in spans
                ]
            )
    counted = [
        dict(item, i=i) for group in groups if len(group) > 1 for i, item in enumerate(group)
    ]
    if not counted:
        return [item for group in groups for item in group]
    # The file's label kind only matters where `_read_file_batch` would judge labels by it.
    task = TASKS[spec.task.type]
    by_kind = "label" in columns and not spec.task.labels and not hasattr(task, "read_row")
    with unwrap_data_errors():
        counts = (
            ray.data.from_items(counted, override_num_blocks=len(counted))
            .map_batches(
                _count_span_batch,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={
                    "fmt": spec.data.format,
                    "label_column": columns["label"] if by_kind else None,
                },
            )
            .take_all()
        )
    found = {(c["path"], c["split"], c["i"]): c for c in counts}
    items = []
    for group in groups:
        if len(group) == 1:
            items += group
            continue
        spans = [found[(it["path"], it["split"], i)] for i, it in enumerate(group)]
        if not all(c["ok"] for c in spans):
            items.append(dict(group[0], start=0, end=-1))
            continue
        kinds: dict[str, int] = {}
        for c in spans:
            for k, n in json.loads(c["kinds"]).items():
                kinds[k] = kinds.get(k, 0) + n
        row0 = 0
        for item, c in zip(group, spans):
            if not spec.data.max_rows or row0 < spec.data.max_rows:
                items.append(dict(item, row0=row0, kind=label_kind(kinds)))
            row0 += c["rows"]
    return items


def _count_span_batch(batch: pa.Table, fmt: str, label_column: str | None) -> pa.Table:
    """One span -> its rows, whether it reads apart from its file, its label kinds."""
    item = batch.to_pylist()[0]
    path = item["path"]
    rows, ok, kinds = count_span(
        path, format_of(path, fmt), (item["start"], item["end"]), label_column
    )
    return pa.table(
        {
            "path": [path],
            "split": [item["split"]],
            "i": [item["i"]],
            "rows": [rows],
            "ok": [ok],
            "kinds": [json.dumps(kinds)],
        }
    )


def _read_file_batch(
    batch: pa.Table, columns, fmt, fraction, seed, max_rows, spec_dict: dict | None = None
) -> pa.Table:
    """One file, or one span of it (`_plan_reads`) -> rows with canonical columns plus _file,
    _row (1-based, in the file), _split, _error.

    A task's optional `read_row(record, data_cfg)` turns a record into its canonical columns
    (chat: any conversation format -> `messages`); otherwise each column is text. Nested values
    are kept as JSON text only where the task reads structure (`NESTED`: SQuAD `answers`);
    elsewhere a list or object is a bad row, never training text, and so is a number or boolean
    in a text column (`text_error`) or a label of another kind than the file's other labels
    (`label_error`). A task's optional
    `check_row(row, spec)` adds its own rule (e.g. the answer must sit in the context)."""
    spec = RunSpec.model_validate(spec_dict) if spec_dict else None
    task = TASKS[spec.task.type] if spec else None
    check_row = getattr(task, "check_row", None)
    read_row = getattr(task, "read_row", None)
    nested = getattr(task, "NESTED", ())
    item = batch.to_pylist()[0]
    path, split = item["path"], item["split"]
    span, row0 = (item.get("start", 0), item.get("end", -1)), item.get("row0", 0)
    records, errors = parse_file(path, format_of(path, fmt), list(columns.values()), span)
    if max_rows:
        records, errors = records[: max_rows - row0], errors[: max_rows - row0]
    out: dict[str, list] = {k: [] for k in (task.ROW_COLUMNS if read_row else columns)}
    rows, splits = [], []
    name = os.path.basename(path)
    # Declared task.labels decide which labels are known (checked once every file is read);
    # without them, a label of another kind than the file's others is a bad row.
    labels_are = item.get("kind")
    if "label" in columns and not (spec and spec.task.labels) and labels_are is None:
        labels_are = label_kind([rec.get(columns["label"]) for rec in records if rec])
    for i, (rec, err) in enumerate(zip(records, errors), start=row0 + 1):
        if read_row is not None:
            values, reason = read_row(rec, spec.data) if rec is not None else ({}, None)
            err = err or reason
            for canon in out:
                out[canon].append((values or {}).get(canon))
        else:
            for canon, col in columns.items():
                v = rec.get(col) if rec else None
                if canon in nested:
                    problem = None
                elif canon == "label":
                    problem = label_error(v, col, labels_are)
                else:
                    problem = text_error(v, col)
                if problem:
                    err = err or problem
                    v = None
                out[canon].append(
                    None if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                )
            if err is None:
                for col in columns.values():
                    v = rec.get(col)
                    if v is None or (isinstance(v, str) and not v.strip()):
                        err = f"missing or empty '{col}'"
                        break
        if err is None and check_row is not None:
            err = check_row({canon: out[canon][-1] for canon in out}, spec)
        errors[i - row0 - 1] = err
        rows.append(i)
        if split == "train" and fraction and _in_validation(name, i, seed, fraction):
            splits.append("validation")
        else:
            splits.append(split)
    table = {k: pa.array(v, type=pa.string()) for k, v in out.items()}
    table.update(
        _file=pa.array([path] * len(rows), type=pa.string()),
        _row=pa.array(rows, type=pa.int64()),
        _split=pa.array(splits, type=pa.string()),
        _error=pa.array(errors[: len(rows)], type=pa.string()),
    )
    return pa.table(table)


def _in_validation(name: str, row: int, seed: int, fraction: float) -> bool:
    return zlib.crc32(f"{seed}:{name}:{row}".encode()) / 2**32 < fraction


def _check_rows(rows, spec: RunSpec):
    """Apply data.on_bad_rows; return good rows and bad-row counts by reason."""
    with unwrap_data_errors():
        rows = rows.materialize()
    bad_ds = rows.filter(lambda r: r["_error"] is not None)
    n_bad = bad_ds.count()
    bad: dict[str, int] = {}
    if n_bad:
        first = bad_ds.sort(["_file", "_row"]).take(1)[0]
        for r in bad_ds.select_columns(["_error"]).iter_rows():
            reason = r["_error"].split(" (")[0]
            bad[reason] = bad.get(reason, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(bad.items()))
        where = f"{first['_file']} row {first['_row']}: {first['_error']}"
        if spec.data.on_bad_rows == "error":
            raise DataError(
                f"data.on_bad_rows=error: {n_bad} bad rows ({summary}); first at {where}. "
                "Fix the data or set data.on_bad_rows=skip."
            )
        log.warning("skipped %d bad rows (%s); first at %s", n_bad, summary, where)
    return rows.filter(lambda r: r["_error"] is None), bad


def _label_names(train_rows, spec: RunSpec) -> list[str] | None:
    if spec.task.type != "sequence_classification":
        return None
    seen = sorted(_distinct(train_rows, "label"))
    if spec.task.labels is None:
        if len(seen) < 2:
            raise DataError(
                f"data.label_column={spec.data.label_column}: training data has {len(seen)} "
                "distinct "
                "label(s). Classification needs at least 2; check the column."
            )
        return seen
    unknown = sorted(set(seen) - set(spec.task.labels))
    if unknown:
        first = (
            train_rows.filter(lambda r: r["label"] in unknown).sort(["_file", "_row"]).take(1)[0]
        )
        raise DataError(
            f"task.labels={spec.task.labels}: label '{unknown[0]}' in {first['_file']} row "
            f"{first['_row']} is not in the label set ({len(unknown)} unknown: {unknown[:5]}). "
            "Add it to task.labels or fix the data."
        )
    return list(spec.task.labels)


def _drop_unknown_labels(val_rows, label_names, spec: RunSpec):
    allowed = set(label_names)
    unknown = val_rows.filter(lambda r: r["label"] not in allowed)
    n = unknown.count()
    if n and spec.data.on_bad_rows == "error":
        first = unknown.sort(["_file", "_row"]).take(1)[0]
        raise DataError(
            f"data.on_bad_rows=error: {n} validation rows have a label not in the training label "
            "set "
            f"{label_names}; first at {first['_file']} row {first['_row']} ('{first['label']}'). "
            "Fix the data, list the labels in task.labels, or set data.on_bad_rows=skip."
        )
    return val_rows.filter(lambda r: r["label"] in allowed), n


def _iter_text(ds):
    cols = [
        c
        for c in ("text", "prompt", "response", "summary", "question", "context", "messages")
        if c in ds.columns()
    ]
    for batch in ds.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=1024):
        for c in cols:
            values = [x for x in batch.column(c).to_pylist() if x]
            if c == "messages":  # chat rows: the turns' text
                values = [m["content"] for x in values for m in json.loads(x)]
            yield from values


# Per-row bookkeeping columns of a tokenized split, summed by `_split_stats`, never cached.
_BOOKKEEPING = ("_overlong", "_tokens", "_real", "_loss", "_docs", "_cut")


def _tokenize_batch(table: pa.Table, tok_uri: str, spec_dict: dict, label_index: dict) -> pa.Table:
    """The task's tokenization, plus the bookkeeping columns `_split_stats` sums: the batch's
    over-long row count (on its first row), each row's token count, real (non-filler) tokens,
    loss-bearing tokens, documents starting in it and, of those, documents split across rows."""
    spec = RunSpec.model_validate(spec_dict)
    tokenizer = _load_tokenizer_cached(tok_uri)
    if "_file" in table.column_names and "_row" in table.column_names:
        # Packing depends on the order of the batch's rows: make it the files' order.
        table = table.sort_by([("_file", "ascending"), ("_row", "ascending")])
    out, overlong = TASKS[spec.task.type].tokenize(table, tokenizer, spec, label_index)
    flags = [overlong] + [0] * (out.num_rows - 1) if out.num_rows else []
    out = out.append_column("_overlong", pa.array(flags, type=pa.int64()))
    slots = pa.compute.cast(pa.compute.list_value_length(out.column("input_ids")), pa.int64())
    out = out.append_column("_tokens", slots)
    if "_real" not in out.column_names:  # only packers add filler tokens
        out = out.append_column("_real", slots)
    loss = [0] * out.num_rows
    if "labels" in out.column_names and pa.types.is_list(out.schema.field("labels").type):
        loss = [sum(x != IGNORE for x in row) for row in out.column("labels").to_pylist()]
    out = out.append_column("_loss", pa.array(loss, type=pa.int64()))
    if "_docs" not in out.column_names:  # unpacked: one document per row, none split
        out = out.append_column("_docs", pa.array([1] * out.num_rows, type=pa.int64()))
        out = out.append_column("_cut", pa.array([0] * out.num_rows, type=pa.int64()))
    return out


def _split_stats(ds) -> tuple[int, ...]:
    """Rows, over-long rows, token slots, real tokens, loss-bearing tokens, documents and split
    documents of a tokenized split, from its small bookkeeping columns in one pass. Ray Data's
    own aggregations (count + sum) would each start a job, and a sum starts a shuffle: seconds
    each on a fresh Ray."""
    sums = dict.fromkeys(_BOOKKEEPING, 0)
    rows = 0
    for batch in ds.select_columns(list(sums)).iter_batches(
        batch_format="pyarrow", batch_size=None
    ):
        rows += batch.num_rows
        for k in sums:
            sums[k] += int(pa.compute.sum(batch.column(k)).as_py() or 0)
    return (rows, *sums.values())


def _token_stats(
    spec: RunSpec, slots: int, real: int, loss: int, docs: int, cut: int
) -> dict[str, float]:
    """What the training split's tokens are worth: how full packed rows are, how many
    documents they keep whole and how many tokens teach the model (LM-style tasks, whose labels
    are per token)."""
    out: dict[str, float] = {}
    if spec.task.type in ("causal_lm", "chat") and spec.data.pack:
        out["data/packing_efficiency"] = real / max(slots, 1)
        out["data/whole_document_share"] = 1 - cut / max(docs, 1)
    if loss:
        out["data/trained_token_share"] = loss / max(real, 1)
    return out


def _distinct(ds, column: str) -> set:
    """The distinct values of one column, gathered on the driver: a label column is small, and
    Ray Data's unique() is a shuffle (seconds on a freshly started Ray)."""
    seen: set = set()
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=None):
        seen.update(batch.column(column).to_pylist())
    return seen


_TOKENIZERS: dict[str, Any] = {}


def _load_tokenizer_cached(uri: str):
    """One tokenizer per process: Ray Data reuses worker processes across batches."""
    if uri not in _TOKENIZERS:
        _TOKENIZERS[uri] = load_tokenizer(uri)
    return _TOKENIZERS[uri]


def _save_tokenizer(tokenizer, fs, path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


def _cache_key(spec: RunSpec, files_id: list, tok_id: str) -> str:
    """The cache folder's name: the format version, the input files' identity, the tokenizer's
    and every preprocessing setting (data.packing included)."""
    settings = _preprocess_settings(spec)
    return hashlib.sha256(
        json.dumps([_CACHE_VERSION, files_id, tok_id, settings]).encode()
    ).hexdigest()[:20]


def _preprocess_settings(spec: RunSpec) -> dict[str, Any]:
    d = spec.data.model_dump(exclude={"cache_dir", "train_files", "validation_files"})
    return {"task": spec.task.model_dump(), "data": d}


def _file_identity(path: str) -> list:
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    return [path, info.size, info.mtime_ns]


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    extra = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()
