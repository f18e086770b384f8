"""What several tasks share: the label that bears no loss, token rows as the cache stores them,
the over-long row rule and padding a batch of id lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from trainers.errors import DataError

# The label of a token that bears no loss (torch cross-entropy's ignore_index).
IGNORE = -100


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


def overlong_policy(n_tokens: int, spec, file: str, row: int, fix: str = "") -> str | None:
    """What to do with a row of `n_tokens` tokens under data.overlong.

    Returns:
        None when the row fits data.max_seq_length; else "truncate" or "drop".

    Raises:
        DataError: data.overlong=error, naming the row; `fix` is an extra remedy (", set
            data.pack=true") offered before the usual ones.
    """
    max_len = spec.data.max_seq_length
    if n_tokens <= max_len:
        return None
    if spec.data.overlong == "error":
        raise DataError(
            f"{file} row {row}: {n_tokens} tokens > data.max_seq_length={max_len}. "
            f"Raise data.max_seq_length{fix} or set data.overlong=truncate|drop."
        )
    return spec.data.overlong


def pad_inputs(seqs, pad_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` right-padded with `pad_id`, and the `attention_mask` that marks real tokens."""
    ids = pad(seqs, pad_id)
    lengths = torch.tensor([len(x) for x in seqs])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def pad(seqs, value, dtype=torch.long) -> torch.Tensor:
    """Right-pad variable-length rows into one (rows, longest) tensor."""
    width = max(1, max(len(x) for x in seqs))
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, x in enumerate(seqs):
        # A copy: Arrow-backed arrays are read-only, and viewing them warns once per process.
        out[i, : len(x)] = torch.tensor(np.asarray(x))
    return out
