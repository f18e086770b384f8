"""Sequence classification: text -> one of N labels (string labels mapped to indices)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.tasks.common import overlong_policy, pad_inputs

# Metric keys every evaluation reports (plus eval/f1_<label> per class).
METRICS = ("eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1")


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column."""
    return {"text": "text_column", "label": "label_column"}


def predict_inputs(data_cfg) -> list[str]:
    return ["text"]


def tokenize(table: pa.Table, tokenizer, spec, label_index: dict[str, int]) -> tuple[pa.Table, int]:
    """Tokenize rows; over-long rows are cut, dropped or rejected per data.overlong."""
    max_len = spec.data.max_seq_length
    enc = tokenizer(table.column("text").to_pylist(), truncation=False, add_special_tokens=True)
    keep_ids, keep_rows, overlong = [], [], 0
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    for i, ids in enumerate(enc["input_ids"]):
        policy = overlong_policy(len(ids), spec, files[i], rows[i])
        if policy:
            overlong += 1
            if policy == "drop":
                continue
            # Keep the closing special token (e.g. [SEP]) that encoders expect at the end.
            ids = ids[: max_len - 1] + ids[-1:]
        keep_ids.append(ids)
        keep_rows.append(i)
    labels = [label_index[str(table.column("label")[i].as_py())] for i in keep_rows]
    out = pa.table(
        {
            "input_ids": pa.array(keep_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(labels, type=pa.int32()),
        }
    )
    return out, overlong


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    return {
        **pad_inputs(rows["input_ids"], pad_id),
        # A copy: Arrow-backed arrays are read-only, and viewing them warns once per process.
        "labels": torch.tensor(np.asarray(rows["labels"]), dtype=torch.long),
    }


def model_class(transformers, spec=None, config=None):
    return transformers.AutoModelForSequenceClassification


def loss_and_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch, the example count, and the predicted classes."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    # The count on the logits' device: evaluation stacks it with the loss (no CPU/GPU mix).
    n = torch.tensor(float(len(batch["labels"])), device=logits.device)
    return loss, n, logits.argmax(-1)


def metrics(loss_sum: float, weight: float, preds, labels, label_names) -> dict[str, float]:
    """Loss, accuracy, macro precision/recall/F1 and per-class F1 (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    idx = list(range(len(label_names)))
    p, r, f, _ = precision_recall_fscore_support(
        labels, preds, labels=idx, average="macro", zero_division=0
    )
    per_class = f1_score(labels, preds, labels=idx, average=None, zero_division=0)
    out = {
        "eval/loss": loss_sum / max(weight, 1.0),
        "eval/accuracy": float(accuracy_score(labels, preds)),
        "eval/precision": float(p),
        "eval/recall": float(r),
        "eval/f1": float(f),
    }
    out.update({f"eval/f1_{name}": float(v) for name, v in zip(label_names, per_class)})
    return out
