"""Causal LM: continued pretraining on plain text, or prompt/response with loss on the response
only.

Packing (`data.pack`): documents (each ending in EOS) fill rows of exactly data.max_seq_length
tokens (`trainers.tasks.packing`). With data.packing=best_fit (default) a document that fits in a
row is never split: best-fit decreasing over the tokenization batch's documents, a longer one cut
into full rows plus a remainder packed like any other document; data.packing=concat joins the
documents and cuts the stream every max_seq_length tokens (documents split across rows).
`position_ids` restart at 0 at every document start; transformers (masking_utils
`find_packed_sequence_indices`) turns restarting position ids into a block-diagonal causal mask
when no attention_mask is passed, so a token never attends across a document boundary (checked
in tests for sdpa and eager Llama). The first token of each document (and of each piece of a
split one) gets no loss: its only context would be another document. A row's tail is filled
with EOS tokens forming their own masked "document" with no loss, so every packed row has full
length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.tasks.common import IGNORE, overlong_policy, pad, pad_inputs, table_of
from trainers.tasks.packing import pack_documents

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
        return pack_documents(docs, max_len, eos, spec.data.packing), 0
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
