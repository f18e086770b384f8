"""Packing tokenized documents into full rows of data.max_seq_length (causal LM and chat
training rows, `data.pack`).

`pack_documents` is the entry point; `data.packing` picks how rows are filled:
  best_fit: best-fit decreasing over the documents of one tokenization batch. Each document goes
     whole into the fullest row it still fits in. A document longer than max_seq_length is cut
     into full rows of max_seq_length and its remainder is packed like any other document.
  concat: documents are joined into one stream cut every max_seq_length tokens: every slot is
     used except the batch's last row, and a document crossing a row boundary is split.

Either way, `position_ids` restart at 0 where each document (or piece of one) starts, which
transformers turns into a block-diagonal causal mask (see trainers.tasks.causal_lm), and the
first token of each piece bears no loss: its context is another document, or a piece of its own
document in another row. A row's tail that no document fills is EOS filler forming its own block
with no loss, so every row has full length.

Rows come out in the order of the first document they hold (the batch's document order), not
by length, so the order is a function of the batch alone.
"""

from __future__ import annotations

import bisect

import pyarrow as pa

from trainers.tasks.common import IGNORE, table_of

# A piece of a document in a row: (document index, first token, end token).
Piece = tuple[int, int, int]


def pack_documents(docs, max_len: int, eos: int, strategy: str = "best_fit") -> pa.Table:
    """(input ids, labels) per document -> packed rows of exactly `max_len` tokens.

    Args:
        docs: (ids, labels) per document, in a stable order (the batch's row order).
        max_len: tokens per row (data.max_seq_length).
        eos: the filler token.
        strategy: "best_fit" or "concat" (data.packing).

    Returns:
        `input_ids`, `labels`, `position_ids` (int32 lists, see `table_of`) and three
        bookkeeping columns per row: `_real` (tokens that are not filler), `_docs` (documents
        starting in the row) and `_cut` (of those, documents that continue in another row).
    """
    rows = _best_fit(docs, max_len) if strategy == "best_fit" else _concat(docs, max_len)
    out_ids, out_labels, out_pos, real, starts, cut = [], [], [], [], [], []
    for pieces in rows:
        ids, labels, pos = [], [], []
        for i, s, e in pieces:
            d_ids, d_labels = docs[i]
            ids += d_ids[s:e]
            labels += [IGNORE] + list(d_labels[s + 1 : e])
            pos += range(e - s)
        fill = max_len - len(ids)
        out_ids.append(ids + [eos] * fill)
        out_labels.append(labels + [IGNORE] * fill)
        out_pos.append(pos + list(range(fill)))
        real.append(len(ids))
        starts.append(sum(s == 0 for _, s, _ in pieces))
        cut.append(sum(s == 0 and e < len(docs[i][0]) for i, s, e in pieces))
    table = table_of(out_ids, out_labels, out_pos)
    for name, values in (("_real", real), ("_docs", starts), ("_cut", cut)):
        table = table.append_column(name, pa.array(values, type=pa.int64()))
    return table


def _best_fit(docs, max_len: int) -> list[list[Piece]]:
    rows: list[list[Piece]] = []
    pieces: list[Piece] = []
    for i, (ids, _) in enumerate(docs):
        n = len(ids)
        whole_rows = n // max_len if n > max_len else 0
        rows += [[(i, s, s + max_len)] for s in range(0, whole_rows * max_len, max_len)]
        if n > whole_rows * max_len:
            pieces.append((i, whole_rows * max_len, n))
    bins: list[list[Piece]] = []
    # (free slots, bin index) of rows with room left, sorted: the first entry with enough room
    # is the fullest row the piece fits in (ties: the oldest row).
    room: list[tuple[int, int]] = []
    for piece in sorted(pieces, key=lambda p: (p[1] - p[2], p[0])):
        n = piece[2] - piece[1]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = max_len, len(bins)
            bins.append([])
        bins[b].append(piece)
        if free > n:
            bisect.insort(room, (free - n, b))
    rows += [sorted(members) for members in bins]
    return sorted(rows)


def _concat(docs, max_len: int) -> list[list[Piece]]:
    rows: list[list[Piece]] = [[]]
    used = 0
    for i, (ids, _) in enumerate(docs):
        s = 0
        while s < len(ids):
            if used == max_len:
                rows.append([])
                used = 0
            e = min(len(ids), s + max_len - used)
            rows[-1].append((i, s, e))
            used += e - s
            s = e
    return [r for r in rows if r]
