"""Packing documents into full rows (trainers.tasks.packing): best-fit keeps documents whole,
concat cuts the stream; both keep the per-document masking. Pure functions, plus one prepare
run per strategy for the cache key and the reported figures."""

import random

import pyarrow.parquet as pq
from conftest import write_jsonl

from trainers.data.prepare import _cache_key, prepare_dataset
from trainers.model import load_tokenizer_for
from trainers.tasks.packing import pack_documents

IGNORE, EOS, MAX = -100, 7, 32


def _docs(lengths):
    """Document i's token k is i * 1000 + k + 10 (never EOS), so every token names its place."""
    docs = []
    for i, n in enumerate(lengths):
        ids = [i * 1000 + k + 10 for k in range(n)]
        docs.append((ids, list(ids)))
    return docs


def _pieces(table):
    """Per row, the real pieces as (document, first token index, tokens), split where position
    ids restart, after checking each piece's positions, labels and the row's filler."""
    out = []
    for ids, labels, pos, real in zip(
        *(table.column(c).to_pylist() for c in ("input_ids", "labels", "position_ids", "_real"))
    ):
        assert len(ids) == len(labels) == len(pos) == MAX
        fill = MAX - real
        assert ids[real:] == [EOS] * fill and labels[real:] == [IGNORE] * fill
        assert pos[real:] == list(range(fill))  # the filler is a block of its own
        starts = [i for i in range(real) if pos[i] == 0] + [real]
        assert starts[0] == 0
        row = []
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))
            # No loss on a piece's first token.
            assert labels[a] == IGNORE and labels[a + 1 : b] == ids[a + 1 : b]
            doc, first = divmod(ids[a] - 10, 1000)
            assert ids[a:b] == [doc * 1000 + first + k + 10 for k in range(b - a)]
            row.append((doc, first, b - a))
        out.append(row)
    return out


def _every_token_once(rows, lengths):
    seen = sorted((d, f + k) for row in rows for d, f, n in row for k in range(n))
    assert seen == [(d, k) for d, n in enumerate(lengths) for k in range(n)]


def test_best_fit_keeps_every_fitting_document_whole():
    lengths = [random.Random(s).randint(1, MAX) for s in range(200)]
    table = pack_documents(_docs(lengths), MAX, EOS, "best_fit")
    rows = _pieces(table)
    _every_token_once(rows, lengths)
    assert all(f == 0 and n == lengths[d] for row in rows for d, f, n in row)  # never split
    assert table.column("_real").to_pylist() == [sum(n for _, _, n in row) for row in rows]
    assert (
        sum(table.column("_docs").to_pylist()) == 200 and sum(table.column("_cut").to_pylist()) == 0
    )
    # Best fit decreasing: no two rows could have been merged, and it needs fewer rows than
    # filling rows in input order with whole documents.
    real = sorted(table.column("_real").to_pylist())
    assert real[0] + real[1] > MAX
    next_fit, free = 0, 0
    for n in lengths:
        if n > free:
            next_fit, free = next_fit + 1, MAX
        free -= n
    assert table.num_rows < next_fit
    assert sum(real) / (MAX * table.num_rows) > 0.97
    # Rows in the order of their first document, whatever the lengths: same input, same rows.
    firsts = [row[0][0] for row in rows]
    assert firsts == sorted(firsts)
    assert pack_documents(_docs(lengths), MAX, EOS, "best_fit").equals(table)


def test_best_fit_cuts_an_overlong_document_into_full_rows_and_a_packed_remainder():
    lengths = [5, 2 * MAX + 9, 20, 3 * MAX, 3]
    table = pack_documents(_docs(lengths), MAX, EOS, "best_fit")
    rows = _pieces(table)
    _every_token_once(rows, lengths)
    assert [[(1, 0, MAX)], [(1, MAX, MAX)]] == [r for r in rows if r[0][0] == 1 and r[0][2] == MAX]
    assert [[(3, 0, MAX)], [(3, MAX, MAX)], [(3, 2 * MAX, MAX)]] == [
        r for r in rows if r[0][0] == 3
    ]
    # The 9-token remainder shares a row with whole documents (best fit: with the 20 and the 3).
    assert sorted([(1, 2 * MAX, 9), (2, 0, 20), (4, 0, 3)]) in rows
    assert [(0, 0, 5)] in rows  # left alone: that row is full
    assert sum(table.column("_cut").to_pylist()) == 2  # documents 1 and 3
    assert sum(table.column("_docs").to_pylist()) == 5
    assert table.num_rows == 2 + 3 + 1 + 1


def test_concat_cuts_the_stream_into_full_rows():
    lengths = [random.Random(s).randint(1, 2 * MAX) for s in range(60)]
    table = pack_documents(_docs(lengths), MAX, EOS, "concat")
    rows = _pieces(table)
    _every_token_once(rows, lengths)
    real = table.column("_real").to_pylist()
    assert real[:-1] == [MAX] * (len(real) - 1) and real[-1] == sum(lengths) - MAX * (len(real) - 1)
    # The stream in document order; a document crossing a row boundary goes on in the next row.
    assert [(d, f) for row in rows for d, f, _ in row] == sorted(
        (d, f) for row in rows for d, f, _ in row
    )
    split = {d for row in rows for d, f, n in row if f > 0 or n < lengths[d]}
    assert sum(table.column("_cut").to_pylist()) == len(split) > 0


def test_packing_strategy_is_part_of_the_cache_key(spec_factory):
    keys = {
        strategy: _cache_key(spec_factory("lm", data={"packing": strategy}), [["a", 1, 2]], "t")
        for strategy in ("best_fit", "concat")
    }
    assert keys["best_fit"] != keys["concat"]
    assert keys["best_fit"] == _cache_key(spec_factory("lm"), [["a", 1, 2]], "t")  # the default


def test_concat_reports_the_documents_it_splits(ray_session, spec_factory, tmp_path):
    """The figures prepare reports for a packed split (best_fit's, whole documents only, are
    checked on the chat examples and in test_data's packing test)."""
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    rng = random.Random(0)
    rows = [
        {"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 24)))} for _ in range(100)
    ]
    f = write_jsonl(tmp_path / "docs.jsonl", rows)
    spec = spec_factory("lm", data={"train_files": [f], "max_seq_length": 32, "packing": "concat"})
    data = prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))
    table = pq.read_table(data.train_path)
    assert set(table.column_names) == {"input_ids", "labels", "position_ids"}
    assert 0.3 < data.stats["data/whole_document_share"] < 0.9
    # Only the last row has filler, less than a row of it.
    assert 1 - 1 / data.train_rows < data.stats["data/packing_efficiency"] <= 1


def test_packing_is_ignored_with_a_warning_where_nothing_packs(spec_factory, caplog):
    with caplog.at_level("WARNING", logger="ferry.config"):
        spec_factory("lm", data={"packing": "concat", "pack": False})
    assert "data.packing=concat is ignored: only causal_lm and chat training rows" in caplog.text
