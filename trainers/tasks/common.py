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
    ids, mask = pad_flat(*_flat(seqs), pad_id)
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
    }


def pad(seqs, value, dtype=torch.long) -> torch.Tensor:
    """Right-pad variable-length rows into one (rows, longest) tensor."""
    out, _ = pad_flat(*_flat(seqs), value)
    return torch.from_numpy(out).to(dtype)


def pad_flat(values: np.ndarray, lengths: np.ndarray, value) -> tuple[np.ndarray, np.ndarray]:
    """Rows given as their values end to end and their lengths, right-padded with `value` into
    one (rows, longest) int64 array (at least one column), and the mask of real entries."""
    width = max(1, int(lengths.max(initial=0)))
    mask = np.arange(width)[None, :] < lengths[:, None]
    out = np.full((len(lengths), width), value, dtype=np.int64)
    out[mask] = values  # a boolean mask fills row by row: the values' own order
    return out, mask


def _flat(seqs) -> tuple[np.ndarray, np.ndarray]:
    """A batch's rows (Arrow-backed, read-only arrays) as one new array and their lengths."""
    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    parts = [np.asarray(x, dtype=np.int64) for x in seqs]
    return (np.concatenate(parts) if parts else np.empty(0, np.int64)), lengths
