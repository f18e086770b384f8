"""A look inside the preprocessed cache: counts, and rows decoded with the loss-bearing tokens
marked, so a wrong mask (loss on the prompt, none on the response) shows before training.

`sample_rows` is the entry point: the first rows of the cache's train split, read with pyarrow
(no Ray) and decoded with the cache's own tokenizer. `summarize` gives the counts,
`format_summary` and `print_samples` turn both into what `ferry preprocess` prints.

What bears loss, by the shape of a cached row (see each task's `tokenize`):
  `labels` a token list aligned with `input_ids` (causal LM, masked LM, decoder-only
      summarization): token i bears loss when labels[i] != -100; a loss span is decoded from
      the labels, which for masked LM are the original tokens under the masks;
  `labels` a token list with `reference_bytes` and no `prompt_length` (encoder-decoder
      summarization, generative QA): the labels are the decoder's own sequence, the target;
  `start_positions`/`end_positions` (extractive QA): the tokens the span head points at;
  `labels` a scalar (classification): no token bears loss; the label name is shown.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainers.data.prepare import PreparedData
from trainers.model import load_tokenizer
from trainers.storage import filesystem
from trainers.tasks.common import IGNORE

# Stats shown as percentages (fractions in [0, 1]); any other stat is shown as a number.
_PERCENT_STATS = (
    "data/packing_efficiency",
    "data/whole_document_share",
    "data/trained_token_share",
)
_COLUMNS = ("input_ids", "labels", "start_positions", "end_positions")


def sample_rows(data: PreparedData, n: int) -> list[dict[str, Any]]:
    """The first `n` rows of the train split, decoded (special tokens kept, so a chat template's
    tokens show) with what bears loss picked out.

    Args:
        data: a prepared cache (`trainers.data.prepare.prepare_dataset`).
        n: how many rows; 0 gives none.

    Returns:
        One dict per row: `row` (index in the split, file-name order), `text` (the decoded
        input), `segments` ([text, bears_loss] pieces that concatenate to `text` for
        tokenizers whose decoding of a prefix is a prefix of the whole), `loss_spans` (each
        contiguous loss-bearing span decoded on its own), `loss_text` (the spans joined with no
        separator), `tokens`, `loss_tokens`; plus `label` (the label name) for classification
        and `target` (the decoded decoder labels) for encoder-decoder rows.
    """
    if n <= 0:
        return []
    rows, columns = _first_rows(data.train_path, n)
    # Encoder-decoder rows (trainers.tasks.summarization.tokenize_pairs) keep the reference text
    # and no prompt length; their labels are the decoder's sequence, not aligned with the input.
    decoder_target = "reference_bytes" in columns and "prompt_length" not in columns
    tokenizer = load_tokenizer(data.tokenizer_path)
    return [
        _sample(i, row, tokenizer, data.label_names, decoder_target) for i, row in enumerate(rows)
    ]


def summarize(data: PreparedData) -> dict[str, Any]:
    """The counts of a prepared cache, JSON-ready; `stats` holds `PreparedData.stats` when the
    cache has them."""
    return {
        "cache_path": data.cache_path,
        "cache_hit": data.cache_hit,
        "train_rows": data.train_rows,
        "validation_rows": data.validation_rows,
        "train_tokens": data.train_tokens,
        "bad_rows": dict(data.bad_rows),
        "stats": dict(getattr(data, "stats", None) or {}),
    }


def format_summary(summary: dict[str, Any]) -> list[str]:
    """`summarize`'s counts as lines of text."""
    bad = summary["bad_rows"]
    hit = "hit: reused" if summary["cache_hit"] else "written"
    lines = [
        f"cache: {summary['cache_path']} ({hit})",
        f"train: {summary['train_rows']:,} rows, {summary['train_tokens']:,} tokens",
        f"validation: {summary['validation_rows']:,} rows",
        "bad rows skipped: "
        + (
            f"{sum(bad.values()):,} ("
            + ", ".join(f"{count:,} {reason}" for reason, count in sorted(bad.items()))
            + ")"
            if bad
            else "none"
        ),
    ]
    for key, value in sorted(summary["stats"].items()):
        shown = f"{value:.1%}" if key in _PERCENT_STATS else f"{value:.4g}"
        lines.append(f"{key}: {shown}")
    return lines


def print_samples(samples: list[dict[str, Any]], color: bool, file=None) -> None:
    """Print samples: loss-bearing text in colour (rich) when `color`, else inside `[[`...`]]`.

    Args:
        samples: `sample_rows`' dicts.
        color: for a terminal (`sys.stdout.isatty()`); plain text for files and pipes.
        file: where to print (default stdout).
    """
    if not color:
        for s in samples:
            print(_heading(s), format_sample(s), sep="\n", file=file)
        return
    from rich.console import Console

    console = Console(file=file, force_terminal=True, highlight=False, soft_wrap=True)
    for s in samples:
        console.print(_heading(s), style="bold", markup=False)
        console.print(_styled(s))


def format_sample(sample: dict[str, Any]) -> str:
    """A sample's text with `[[`...`]]` around each loss-bearing span (the target of an
    encoder-decoder row on its own line)."""
    text = "".join(f"[[{piece}]]" if loss else piece for piece, loss in sample["segments"])
    if "target" in sample:
        text += f"\ntarget: [[{sample['target']}]]"
    return text


def _heading(sample: dict[str, Any]) -> str:
    head = f"train row {sample['row']}: {sample['tokens']} tokens"
    if "label" in sample:
        return f"{head}, label {sample['label']}"
    return f"{head}, {sample['loss_tokens']} with loss"


def _styled(sample: dict[str, Any]):
    from rich.text import Text

    text = Text()
    for piece, loss in sample["segments"]:
        text.append(piece, style="bold green" if loss else "dim")
    if "target" in sample:
        text.append("\ntarget: ")
        text.append(sample["target"], style="bold green")
    return text


def _first_rows(path: str, n: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The first `n` rows of a Parquet folder (the columns `_sample` reads), its files in name
    order (Ray Data names them by write task, so this is the order the split was written in),
    and the folder's column names."""
    fs, root = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for name in files:
        with fs.open_input_file(name) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            columns = [c for c in _COLUMNS if c in names]
            for batch in pf.iter_batches(batch_size=n, columns=columns):
                rows += batch.to_pylist()[: n - len(rows)]
                if len(rows) == n:
                    return rows, names
    return rows, names


def _sample(
    index: int, row: dict[str, Any], tokenizer, label_names, decoder_target: bool
) -> dict[str, Any]:
    ids = row["input_ids"]
    labels = row.get("labels")
    sample: dict[str, Any] = {
        "row": index,
        "text": tokenizer.decode(ids, skip_special_tokens=False),
    }
    target = None
    if isinstance(labels, list) and decoder_target:
        mask, source = [False] * len(ids), ids
        target = [t for t in labels if t != IGNORE]
    elif isinstance(labels, list):
        mask, source = [t != IGNORE for t in labels], labels
    elif row.get("start_positions") is not None:
        first, last = row["start_positions"], row["end_positions"]
        mask, source = [first <= i <= last for i in range(len(ids))], ids
    else:
        mask, source = [False] * len(ids), ids
    runs = _runs(mask)
    sample["segments"] = _segments(tokenizer, ids, runs)
    if target is not None:
        spans = [tokenizer.decode(target, skip_special_tokens=False)] if target else []
        sample["target"] = "".join(spans)
    else:
        spans = [
            tokenizer.decode(source[a:b], skip_special_tokens=False) for a, b, loss in runs if loss
        ]
    sample.update(
        loss_spans=spans,
        loss_text="".join(spans),
        tokens=len(ids),
        loss_tokens=len(target) if target is not None else sum(mask),
    )
    if labels is not None and not isinstance(labels, list):
        sample["label"] = label_names[labels] if label_names else labels
    return sample


def _runs(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values: (start, end, value)."""
    runs: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, mask[start]))
            start = i
    return runs


def _segments(tokenizer, ids: list[int], runs) -> list[list]:
    """[text, bears_loss] per run. Each piece is the difference of two decoded prefixes, so the
    space a word-piece or byte-level decoder puts between tokens is kept; a run is decoded on its
    own where the prefix's text changes with what follows (a character split across byte-level
    tokens)."""
    out, head = [], ""
    for start, end, loss in runs:
        upto = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if upto.startswith(head):
            piece = upto[len(head) :]
        else:
            piece = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        out.append([piece, loss])
        head = upto
    return out
