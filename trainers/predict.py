"""Batch prediction: a trained model over input files -> Parquet files of predictions, on Ray Data.

`predict_dataset` is the entry point (driver side). Stages:
  check inputs on the driver (checkpoint folder, input files and their columns, empty output folder)
  -> read: one Ray task per input file with the same parsers as training data, so a bad row is
     reported with its file and row number (data.on_bad_rows: error fails, skip leaves it out)
  -> predict: `map_batches` with a callable class on a fixed-size actor pool, so each actor loads
     the model once (`trainers.evaluate.load_for_eval`) and runs batched forward passes
  -> write Parquet to the output folder, in input order.

Every output row carries `file` and `row` (1-based line/row in that file), the input's `id` column
when it has one, the text (and label, if present) columns, and the predictions:
  sequence_classification: `prediction` (label name), `score` (its probability), `prob_<label>`;
  causal_lm: `generation` (greedy continuation of the prompt, prompt text excluded);
  chat: `prediction` (the assistant's reply to the conversation up to its last user turn, with
    the chat template and the `generation:` settings), beside the `messages` it answered;
  summarization: `prediction` (the generated summary, `generation:` settings);
  question_answering: `prediction` (the answer), and `answer_start` (its character offset in the
    context, -1 if none) for the extractive style.
Other input columns are not carried: join on `id` or (`file`, `row`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainers.config import RunSpec
from trainers.data.files import (
    expand_files,
    format_of,
    parse_file,
    peek_columns,
    raw_columns,
    text_error,
)
from trainers.data.prepare import PreparedData
from trainers.device import compute_device, on_device
from trainers.errors import ConfigError, DataError, unwrap_data_errors
from trainers.model import load_tokenizer
from trainers.preflight import prepare_data
from trainers.saved import is_checkpoint, load_saved
from trainers.storage import is_uri
from trainers.tasks import TASKS

log = logging.getLogger("ferry.predict")

ID_COLUMN = "id"


@dataclass
class PredictSummary:
    """What a prediction run wrote."""

    output_dir: str
    rows: int
    input_files: int
    output_files: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"predicted {self.rows} rows from {self.input_files} file(s) in {self.seconds:.1f}s "
            f"({self.rows_per_s:.1f} rows/s) -> {self.output_dir} ({self.output_files} Parquet "
            "file(s))"
        )


def predict_dataset(
    spec: RunSpec,
    checkpoint: str,
    input_files: list[str],
    output_dir: str,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    num_actors: int | None = None,
) -> PredictSummary:
    """Run `checkpoint` over `input_files` and write predictions as Parquet to `output_dir`.

    Needs a connected Ray (the CLI connects first).

    Args:
        spec: the run config the checkpoint was trained with (task, columns, max_seq_length).
        checkpoint: `<run>/final` (HF model, LoRA adapter, or a feature-extraction head with its
            frozen base) or a `checkpoint_step_*` folder.
        input_files: paths or globs of JSONL/CSV/Parquet files.
        output_dir: a new or empty local folder.
        batch_size: rows per forward pass.
        max_new_tokens: tokens generated per row: causal_lm (greedy; None = 32), summarization
            and generative QA (None = generation.max_new_tokens).
        num_actors: model replicas; default scaling.num_workers, each with scaling.cpus_per_worker
            CPUs and scaling.gpus_per_worker GPUs.

    Raises:
        ConfigError: bad flags (missing checkpoint, non-empty output folder).
        DataError: missing input files or columns, bad rows under data.on_bad_rows=error.
    """
    import ray.data

    files = check_predict_inputs(
        spec, checkpoint, input_files, output_dir, batch_size, max_new_tokens
    )
    t0 = time.perf_counter()
    data = _prepared_data_for(spec, checkpoint)
    labels = _label_names(spec, checkpoint, data)
    rows = _read_inputs(files, spec)
    actors = num_actors or spec.scaling.num_workers
    predictions = rows.map_batches(
        _Predictor,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={
            "spec_dict": spec.model_dump(),
            "checkpoint": os.path.abspath(checkpoint),
            "data_dict": data.to_dict() if data else None,
            "label_names": labels,
            "max_new_tokens": max_new_tokens,
        },
        num_cpus=spec.scaling.cpus_per_worker,
        num_gpus=spec.scaling.gpus_per_worker,
    )
    # Outputs keep the input's order (file by file, row by row); the dataset's own copy of the
    # context keeps the setting to this run.
    predictions.context.execution_options.preserve_order = True
    os.makedirs(output_dir, exist_ok=True)
    with unwrap_data_errors():
        n, written = _write_in_order(predictions, output_dir)
    return PredictSummary(output_dir, n, len(files), written, time.perf_counter() - t0)


def _write_in_order(predictions, output_dir: str) -> tuple[int, int]:
    """Stream the predictions to `part-NNNNN.parquet` files in input order; return (rows, files).

    Written here, batch by batch, rather than by Ray Data's write_parquet: that names its files
    by write task, and under load a later block's task can get the earlier name, so reading the
    folder back mixed the rows' order (seen with 9 rows in 3 batches). A new file starts when a
    batch's schema differs (e.g. integer ids in one input file, string ids in the next)."""
    rows, files, writer, schema = 0, 0, None, None
    try:
        for batch in predictions.iter_batches(batch_format="pyarrow", batch_size=None):
            if batch.num_rows == 0:
                continue
            if writer is None or not batch.schema.equals(schema):
                if writer is not None:
                    writer.close()
                schema = batch.schema
                writer = pq.ParquetWriter(
                    os.path.join(output_dir, f"part-{files:05d}.parquet"), schema
                )
                files += 1
            writer.write_table(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows, files


def check_predict_inputs(
    spec: RunSpec,
    checkpoint: str,
    input_files: list[str],
    output_dir: str,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Driver-side checks before Ray starts; returns the expanded input files.

    Raises:
        ConfigError: every flag problem at once.
        DataError: an input file or column is missing.
    """
    problems = []
    if not os.path.isdir(checkpoint):
        problems.append(
            f"--checkpoint={checkpoint}: folder not found. Pass <run>/final or a "
            "checkpoint_step_* folder of the run."
        )
    if is_uri(output_dir):
        problems.append(f"--output={output_dir}: must be a local folder. Write locally, then copy.")
    elif os.path.isdir(output_dir) and os.listdir(output_dir):
        problems.append(
            f"--output={output_dir}: folder is not empty (predictions would mix with its "
            "files). Choose a new folder or empty this one."
        )
    if batch_size < 1:
        problems.append(f"--batch-size={batch_size}: must be >= 1. Use e.g. 16.")
    if max_new_tokens is not None and max_new_tokens < 1:
        problems.append(f"--max-new-tokens={max_new_tokens}: must be >= 1. Use e.g. 32.")
    if spec.task.type == "masked_lm":
        problems.append(
            "task.type=masked_lm: a continued-pretraining model has nothing to predict "
            "per row. Predict with the model of the task stage that follows it."
        )
    if problems:
        raise ConfigError(problems)
    files = expand_files(input_files, "--input")
    for path in files:
        cols = peek_columns(path, format_of(path, spec.data.format))
        for column, key in input_columns(spec).values():
            if cols is not None and column not in cols:
                raise DataError(
                    f"--input={path}: column '{column}' not found (has: "
                    f"{', '.join(sorted(cols))}). "
                    f"Pass --set {key}=<column> or fix the file."
                )
    return files


def input_columns(spec: RunSpec) -> dict[str, tuple[str, str]]:
    """Canonical name -> (the input's column, its config key) for every column the model reads,
    in the task's order (the first is the text a generative model continues)."""
    task = TASKS[spec.task.type]
    fields = task.columns(spec.data)
    return {
        canon: (spec.data.column(fields[canon]), f"data.{fields[canon]}")
        for canon in task.predict_inputs(spec.data)
    }


def _prepared_data_for(spec: RunSpec, checkpoint: str) -> PreparedData | None:
    """A DeepSpeed checkpoint carries weights only: its tokenizer and labels come from the run's
    preprocessed data (a cache hit after training). An export carries its own."""
    return prepare_data(spec) if is_checkpoint(checkpoint) else None


def _label_names(spec: RunSpec, checkpoint: str, data: PreparedData | None) -> list[str] | None:
    if spec.task.type != "sequence_classification":
        return None
    if data is not None:
        return data.label_names
    path = os.path.join(checkpoint, "labels.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    # A LoRA adapter's config lacks id2label; its base (presets: final/base) has it.
    for cfg_dir in (checkpoint, os.path.join(checkpoint, "base")):
        cfg = os.path.join(cfg_dir, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                id2label = json.load(f).get("id2label")
            if id2label:
                return [id2label[str(i)] for i in range(len(id2label))]
    raise ConfigError(
        [
            f"--checkpoint={checkpoint}: no labels.json and no id2label in config.json. "
            "Pass a Ferry export (<run>/final) or a checkpoint_step_* folder."
        ]
    )


def _read_inputs(files: list[str], spec: RunSpec):
    import ray.data

    columns = [c for c, _ in input_columns(spec).values()]
    items = [{"path": p} for p in files]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_file_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "columns": columns,
            "label_column": spec.data.label_column,
            "fmt": spec.data.format,
            "on_bad_rows": spec.data.on_bad_rows,
            "spec_dict": spec.model_dump(),
        },
    )


def _read_file_batch(
    batch: pa.Table,
    columns: list[str],
    label_column: str,
    fmt: str,
    on_bad_rows: str,
    spec_dict: dict | None = None,
) -> pa.Table:
    """One input file -> file, row, [id], text columns[, label]; bad rows fail or are left out.
    A task that reads its rows itself (`read_row`: chat) gets its canonical columns instead of
    the text columns (chat: `messages`, the conversation up to its last user turn)."""
    spec = RunSpec.model_validate(spec_dict) if spec_dict else None
    read_row = getattr(TASKS[spec.task.type], "read_row", None) if spec else None
    path = batch.column("path")[0].as_py()
    wanted = [ID_COLUMN, *columns, label_column]
    if read_row is not None:
        wanted += list(raw_columns(spec, optional=True).values())
    records, errors = parse_file(path, format_of(path, fmt), wanted)
    keep: list[tuple[int, dict]] = []
    skipped = 0
    for i, (rec, err) in enumerate(zip(records, errors), start=1):
        if read_row is not None and err is None:
            values, err = read_row(rec, spec.data, need_reply=False)
            rec = {**rec, **(values or {})}
        for column in [] if read_row is not None else columns:
            v = rec.get(column) if rec else None
            if err is None and (v is None or (isinstance(v, str) and not v.strip())):
                err = f"missing or empty '{column}'"
            err = err or text_error(v, column)
        if err is None:
            keep.append((i, rec))
        elif on_bad_rows == "error":
            raise DataError(
                f"{path} row {i}: {err}. Fix the row or set data.on_bad_rows=skip "
                "(the row is then left out of the predictions)."
            )
        else:
            skipped += 1
    if skipped:
        log.warning("%s: left out %d bad rows (data.on_bad_rows=skip)", path, skipped)
    out = {
        "file": pa.array([path] * len(keep), type=pa.string()),
        "row": pa.array([i for i, _ in keep], type=pa.int64()),
    }
    present = set().union(*(r.keys() for _, r in keep)) if keep else set()
    if ID_COLUMN in present:
        out[ID_COLUMN] = _as_array([r.get(ID_COLUMN) for _, r in keep])
    read = TASKS[spec.task.type].ROW_COLUMNS if read_row is not None else columns
    for column in read:
        out[column] = pa.array([str(r[column]) for _, r in keep], type=pa.string())
    if label_column in present and label_column not in columns:
        out[label_column] = pa.array(
            [None if r.get(label_column) is None else str(r[label_column]) for _, r in keep],
            type=pa.string(),
        )
    return pa.table(out)


def _as_array(values: list) -> pa.Array:
    """Ids keep their type (int or string); a file mixing types gets strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


class _Predictor:
    """One model replica (a Ray Data actor): loads the checkpoint once, predicts batches."""

    def __init__(
        self,
        spec_dict: dict[str, Any],
        checkpoint: str,
        data_dict: dict | None,
        label_names: list[str] | None,
        max_new_tokens: int | None,
    ):
        self.spec = RunSpec.model_validate(spec_dict)
        data = PreparedData(**data_dict) if data_dict else None
        self.tokenizer = load_tokenizer(data.tokenizer_path if data else checkpoint)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # `data` is only read for DeepSpeed checkpoints (to rebuild the model); exports load
        # from their own folder. On the actor's GPU, in the run's precision, when it has one.
        self.device, dtype = compute_device(self.spec)
        self.model = load_saved(self.spec, self.tokenizer, data, checkpoint).to(self.device, dtype)
        self.column = next(iter(input_columns(self.spec).values()))[0]
        self.label_names = label_names
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        task = TASKS[self.spec.task.type]
        with torch.no_grad():
            if hasattr(task, "predict"):
                names = getattr(task, "ROW_COLUMNS", None)
                inputs = (
                    {c: batch.column(c).to_pylist() for c in names}
                    if names
                    else {
                        canon: batch.column(col).to_pylist()
                        for canon, (col, _) in input_columns(self.spec).items()
                    }
                )
                for name, values in task.predict(
                    self.model, self.tokenizer, inputs, self.spec, self.max_new_tokens
                ).items():
                    batch = batch.append_column(name, pa.array(values))
                return batch
            texts = batch.column(self.column).to_pylist()
            if self.spec.task.type == "sequence_classification":
                return self._classify(batch, texts)
            return self._generate(batch, texts)

    def _classify(self, batch: pa.Table, texts: list[str]) -> pa.Table:
        import torch

        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.spec.data.max_seq_length,
            padding=True,
            return_tensors="pt",
        )
        enc = on_device(dict(enc), self.device)
        logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        best = probs.argmax(-1)
        batch = batch.append_column(
            "prediction", pa.array([self.label_names[i] for i in best], type=pa.string())
        )
        batch = batch.append_column("score", pa.array(probs.max(-1), type=pa.float64()))
        for i, name in enumerate(self.label_names):
            batch = batch.append_column(f"prob_{name}", pa.array(probs[:, i], type=pa.float64()))
        return batch

    def _generate(self, batch: pa.Table, texts: list[str]) -> pa.Table:
        tok = self.tokenizer
        # Left padding and left truncation: every prompt ends where generation starts, and an
        # over-long prompt keeps its end. No special tokens, as in training (text + EOS).
        tok.padding_side, tok.truncation_side = "left", "left"
        enc = tok(
            texts,
            truncation=True,
            max_length=self.spec.data.max_seq_length,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        enc = on_device(dict(enc), self.device)
        # use_cache=True: presets train with the KV cache off (packing); generation wants it.
        out = self.model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            do_sample=False,
            max_new_tokens=self.max_new_tokens or 32,
            pad_token_id=tok.pad_token_id,
            use_cache=True,
        )
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        generations = tok.batch_decode(new, skip_special_tokens=True)
        return batch.append_column("generation", pa.array(generations, type=pa.string()))
