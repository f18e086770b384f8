"""Masked LM: continued pretraining of an encoder on domain text (BERT-style masking).

Masking is static: each row's masked positions are drawn once, at tokenization, from a generator
seeded by the row's file and number (BERT's original recipe). Training sees the same masks every
epoch, which costs a little sample diversity, and buys a deterministic evaluation: perplexity
before and after domain adaptation is measured on exactly the same masked tokens.
Of the chosen positions 80 % become the mask token, 10 % a random token, 10 % stay unchanged;
the loss is taken on the chosen positions only.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.errors import DataError

# same loss/perplexity metrics
from trainers.tasks.causal_lm import IGNORE, METRICS, metrics  # noqa: F401
from trainers.tasks.common import overlong_policy, pad, pad_inputs


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column."""
    return {"text": "text_column"}


def predict_inputs(data_cfg) -> list[str]:
    return []  # nothing to predict per row (refused by ferry predict)


def tokenize(table: pa.Table, tokenizer, spec, label_index=None) -> tuple[pa.Table, int]:
    """Token ids with static masks; over-long rows are cut, dropped or rejected per
    data.overlong."""
    if tokenizer.mask_token_id is None:
        raise DataError(
            "task.type=masked_lm: the tokenizer of model "
            f"{spec.model.name_or_path or spec.model.preset} "
            "has no mask token. Use an encoder (BERT-style) model or task.type=causal_lm."
        )
    max_len = spec.data.max_seq_length
    enc = tokenizer(table.column("text").to_pylist(), truncation=False, add_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    candidates = np.array([i for i in range(len(tokenizer)) if i not in special])
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    out_ids, out_labels, overlong = [], [], 0
    for i, ids in enumerate(enc["input_ids"]):
        policy = overlong_policy(len(ids), spec, files[i], rows[i])
        if policy:
            overlong += 1
            if policy == "drop":
                continue
            ids = ids[: max_len - 1] + ids[-1:]  # keep the closing [SEP]
        seed = zlib.crc32(f"{spec.run.seed}:{files[i]}:{rows[i]}".encode())
        masked, labels = _mask(
            ids,
            special,
            tokenizer.mask_token_id,
            candidates,
            spec.task.mlm_probability,
            np.random.default_rng(seed),
        )
        out_ids.append(masked)
        out_labels.append(labels)
    lst = pa.list_(pa.int32())
    return pa.table(
        {"input_ids": pa.array(out_ids, type=lst), "labels": pa.array(out_labels, type=lst)}
    ), overlong


def _mask(
    ids: list[int], special: set[int], mask_id: int, candidates: np.ndarray, p: float, rng
) -> tuple[list[int], list[int]]:
    positions = [j for j, t in enumerate(ids) if t not in special]
    chosen = [j for j in positions if rng.random() < p]
    if not chosen and positions:
        chosen = [positions[int(rng.integers(len(positions)))]]  # every row teaches something
    masked, labels = list(ids), [IGNORE] * len(ids)
    for j in chosen:
        labels[j] = ids[j]
        roll = rng.random()
        if roll < 0.8:
            masked[j] = mask_id
        elif roll < 0.9:
            masked[j] = int(candidates[rng.integers(len(candidates))])
    return masked, labels


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    return {
        **pad_inputs(rows["input_ids"], pad_id),
        "labels": pad(rows["labels"], IGNORE),
    }


def model_class(transformers, spec=None, config=None):
    return transformers.AutoModelForMaskedLM


def loss_and_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Summed cross-entropy over the masked positions, and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch["labels"].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, (batch["labels"] != IGNORE).sum().float(), None
