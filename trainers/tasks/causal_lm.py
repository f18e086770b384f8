"""Causal LM: continued pretraining on plain text, or prompt/response with loss on the response
only.

Packing: documents (each ending in EOS) are concatenated and cut into rows of exactly
data.max_seq_length tokens. `position_ids` restart at 0 at every document start; transformers
(masking_utils `find_packed_sequence_indices`) turns restarting position ids into a block-diagonal
causal mask when no attention_mask is passed, so a token never attends across a document boundary
(checked in tests for sdpa and eager Llama). The first token of each document gets no loss: its
only context would be another document. The tail of the last row in a batch is filled with EOS
tokens forming their own masked "document" with no loss, so every packed row has full length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.tasks.common import overlong_policy, pad, pad_inputs

IGNORE = -100
# Metric keys every evaluation reports.
METRICS = ("eval/loss", "eval/perplexity", "eval/tokens")


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column: instruction pairs when a
    prompt column is set, else plain text."""
    if data_cfg.prompt_column:
        return {"prompt": "prompt_column", "response": "response_column"}
    return {"text": "text_column"}


def predict_inputs(data_cfg) -> list[str]:
    """What the model reads at prediction time: the prompt (or the text to continue)."""
    return ["prompt"] if data_cfg.prompt_column else ["text"]


def tokenize(table: pa.Table, tokenizer, spec, label_index=None) -> tuple[pa.Table, int]:
    eos = tokenizer.eos_token_id
    docs = _documents(table, tokenizer, eos)
    max_len = spec.data.max_seq_length
    if spec.data.pack:
        return _pack(docs, max_len, eos), 0
    out_ids, out_labels, overlong = [], [], 0
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    for i, (ids, labels) in enumerate(docs):
        policy = overlong_policy(len(ids), spec, files[i], rows[i], fix=", set data.pack=true")
        if policy:
            overlong += 1
            if policy == "drop":
                continue
            ids, labels = ids[:max_len], labels[:max_len]
        out_ids.append(ids)
        out_labels.append(labels)
    positions = [list(range(len(x))) for x in out_ids]
    return table_of(out_ids, out_labels, positions), overlong


def _documents(table: pa.Table, tokenizer, eos: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: text + EOS, or prompt (no loss) + response + EOS."""
    if "prompt" in table.column_names:
        prompts = tokenizer(table.column("prompt").to_pylist(), add_special_tokens=False)[
            "input_ids"
        ]
        answers = tokenizer(table.column("response").to_pylist(), add_special_tokens=False)[
            "input_ids"
        ]
        return [(p + a + [eos], [IGNORE] * len(p) + a + [eos]) for p, a in zip(prompts, answers)]
    texts = tokenizer(table.column("text").to_pylist(), add_special_tokens=False)["input_ids"]
    return [(t + [eos], t + [eos]) for t in texts]


def _pack(docs, max_len: int, eos: int) -> pa.Table:
    ids, labels, pos = [], [], []
    for d_ids, d_labels in docs:
        d_labels = [IGNORE] + d_labels[1:]
        ids += d_ids
        labels += d_labels
        pos += list(range(len(d_ids)))
    rows = []
    for start in range(0, len(ids), max_len):
        r_ids, r_lab, r_pos = (
            ids[start : start + max_len],
            labels[start : start + max_len],
            pos[start : start + max_len],
        )
        if r_pos and r_pos[0] != 0:
            # A document split across rows: its continuation starts a new block; no loss on the
            # first token since its context is in the previous row.
            r_pos = list(range(len(r_pos)))
            r_lab = [IGNORE] + r_lab[1:]
        pad = max_len - len(r_ids)
        rows.append((r_ids + [eos] * pad, r_lab + [IGNORE] * pad, r_pos + list(range(pad))))
    table = table_of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    # Real tokens per row (the rest is filler): data/packing_efficiency.
    real = [min(max_len, len(ids) - start) for start in range(0, len(ids), max_len)]
    return table.append_column("_real", pa.array(real, type=pa.int64()))


def table_of(ids, labels, positions) -> pa.Table:
    """Token rows as the cache stores them (int32 lists)."""
    lst = pa.list_(pa.int32())
    return pa.table(
        {
            "input_ids": pa.array(ids, type=lst),
            "labels": pa.array(labels, type=lst),
            "position_ids": pa.array(positions, type=lst),
        }
    )


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [np.asarray(x) for x in rows["input_ids"]]
    width = max(len(x) for x in ids)
    if all(len(x) == width for x in ids):
        # Full-length (packed) rows: no attention_mask, so restarting position_ids give a
        # block-diagonal mask (see module docstring).
        return {
            "input_ids": torch.as_tensor(np.stack(ids), dtype=torch.long),
            "labels": torch.as_tensor(np.stack(rows["labels"]), dtype=torch.long),
            "position_ids": torch.as_tensor(np.stack(rows["position_ids"]), dtype=torch.long),
        }
    return {**pad_inputs(ids, pad_id), "labels": pad(rows["labels"], IGNORE)}


def model_class(transformers, spec=None, config=None):
    return transformers.AutoModelForCausalLM


def loss_and_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Summed next-token cross-entropy over label tokens, and the number of label tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False: with a KV cache transformers skips packed-sequence detection and lets
    # packed documents attend to each other.
    logits = model(**inputs, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, (targets != IGNORE).sum().float(), None


def metrics(loss_sum: float, weight: float, preds, labels, label_names) -> dict[str, float]:
    loss = loss_sum / max(weight, 1.0)
    return {
        "eval/loss": loss,
        "eval/perplexity": float(np.exp(min(loss, 50.0))),
        "eval/tokens": weight,
    }
