"""Question answering on SQuAD-format rows (question, context, answers), two styles (task.qa_style):

extractive: the model (an encoder with a span head, AutoModelForQuestionAnswering) scores every
    context token as answer start and end. Input is `[CLS] question [SEP] context [SEP]`, the
    context cut to data.max_seq_length (no sliding windows). A row whose context was cut is
    over-long: data.overlong=truncate keeps it, and if its answer was cut away it is trained to
    point at position 0 ([CLS], "no answer in view") as Hugging Face's run_qa.py does; drop
    skips it; error fails. The prediction is the best-scoring span with start <= end, both in
    the context and at most MAX_ANSWER_TOKENS long, mapped back to context characters through
    the tokenizer's offsets (a fast tokenizer is needed).
generative: "question: ... context: ..." -> answer text, with summarization's machinery
    (encoder-decoder or decoder-only; decoded with the `generation:` settings).

The first gold answer is trained on; exact match and F1 take the best over all gold answers
(SQuAD v1.1: every row has at least one answer). Evaluation needs the context text, offsets and
gold answers beside the tensors, so they travel in the batch as UTF-8 bytes.
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.errors import DataError
from trainers.tasks import summarization as seq
from trainers.tasks.common import overlong_policy, pad, pad_inputs

MAX_ANSWER_TOKENS = 30  # longest predicted span (run_qa.py's max_answer_length default)
PROMPT_SUFFIX = "\nanswer: "  # generative, decoder-only models: between the prompt and the answer
# Metric keys every evaluation reports.
METRICS = ("eval/loss", "eval/exact_match", "eval/f1")


# Columns holding structure rather than text: SQuAD's answers object travels as JSON text.
NESTED = ("answers",)


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column."""
    return {"question": "question_column", "context": "context_column", "answers": "answers_column"}


def predict_inputs(data_cfg) -> list[str]:
    return ["question", "context"]


def parse_answers(value: str, extractive: bool) -> tuple[list[str], list[int] | None]:
    """An answers cell -> (texts, character starts). Accepts SQuAD's {"text": [...],
    "answer_start": [...]}, a list of {"text", "answer_start"} objects, or (generative only) a
    plain answer string.

    Raises:
        ValueError: a message for the bad-row report.
    """
    try:
        obj = json.loads(value)
    except ValueError:
        obj = value
    if isinstance(obj, list) and all(isinstance(a, dict) for a in obj):
        obj = {
            "text": [a.get("text") for a in obj],
            "answer_start": [a.get("answer_start") for a in obj],
        }
    if isinstance(obj, str) and not extractive:
        obj = {"text": [obj]}
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), list):
        raise ValueError("answers not in SQuAD format ({text: [...], answer_start: [...]})")
    texts = obj["text"]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("answers has no answer text")
    if not extractive:
        return texts, None
    starts = obj.get("answer_start")
    if (
        not isinstance(starts, list)
        or len(starts) != len(texts)
        or not all(isinstance(s, int) and s >= 0 for s in starts)
    ):
        raise ValueError("answers needs one integer answer_start per answer text")
    return texts, starts


def check_row(row: dict[str, str | None], spec) -> str | None:
    """A bad-row reason, or None: answers must parse, and (extractive) each answer text must sit
    at its answer_start in the context."""
    extractive = spec.task.qa_style == "extractive"
    try:
        texts, starts = parse_answers(row["answers"] or "", extractive)
    except ValueError as e:
        return str(e)
    context = row["context"] or ""
    for text, start in zip(texts, starts or []):
        if context[start : start + len(text)] != text:
            return f"answer not found in context ('{text[:40]}' at answer_start={start})"
    return None


def tokenize(table: pa.Table, tokenizer, spec, label_index=None) -> tuple[pa.Table, int]:
    questions = table.column("question").to_pylist()
    contexts = table.column("context").to_pylist()
    extractive = spec.task.qa_style == "extractive"
    answers = [parse_answers(a, extractive) for a in table.column("answers").to_pylist()]
    if not extractive:
        sources = [prompt(q, c) for q, c in zip(questions, contexts)]
        refs = [json.dumps(texts) for texts, _ in answers]
        return seq.tokenize_pairs(
            sources, [texts[0] for texts, _ in answers], refs, table, tokenizer, spec, PROMPT_SUFFIX
        )
    return _tokenize_extractive(questions, contexts, answers, table, tokenizer, spec)


def prompt(question: str, context: str) -> str:
    """Generative QA: the source text (the answer follows it)."""
    return f"question: {question} context: {context}"


def _encode(tokenizer, questions, contexts, max_len):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "task.qa_style=extractive: needs a fast tokenizer (character offsets). "
            "Use a model whose tokenizer has a tokenizer.json, or qa_style=generative."
        )
    return tokenizer(
        questions,
        contexts,
        truncation="only_second",
        max_length=max_len,
        return_offsets_mapping=True,
    )


def _context_offsets(enc, i) -> list[tuple[int, int]]:
    """Character span of every token in row i; (-1, -1) outside the context."""
    return [
        tuple(o) if sid == 1 else (-1, -1)
        for o, sid in zip(enc["offset_mapping"][i], enc.sequence_ids(i))
    ]


def _tokenize_extractive(questions, contexts, answers, table, tokenizer, spec):
    max_len = spec.data.max_seq_length
    enc = _encode(tokenizer, questions, contexts, max_len)
    full_lengths = [len(x) for x in tokenizer(questions, contexts)["input_ids"]]
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    out: dict[str, list] = collections.defaultdict(list)
    overlong = 0
    for i, ((texts, starts), context) in enumerate(zip(answers, contexts)):
        # Truncation already happened in _encode (the context is cut, never the question).
        policy = overlong_policy(full_lengths[i], spec, files[i], rows[i])
        if policy:
            overlong += 1
            if policy == "drop":
                continue
        offsets = _context_offsets(enc, i)
        start, end = _answer_tokens(offsets, starts[0], starts[0] + len(texts[0]))
        seen = max(e for _, e in offsets)
        out["input_ids"].append(enc["input_ids"][i])
        out["token_type_ids"].append(
            enc["token_type_ids"][i] if "token_type_ids" in enc else [0] * len(enc["input_ids"][i])
        )
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["offsets"].append([x for pair in offsets for x in pair])
        out["context_bytes"].append(list(context[: max(seen, 0)].encode("utf-8")))
        out["reference_bytes"].append(list(json.dumps(texts).encode("utf-8")))
    lst = pa.list_(pa.int32())
    cols = {k: pa.array(out[k], type=lst) for k in ("input_ids", "token_type_ids", "offsets")}
    cols.update(
        start_positions=pa.array(out["start_positions"], type=pa.int32()),
        end_positions=pa.array(out["end_positions"], type=pa.int32()),
    )
    for k in ("context_bytes", "reference_bytes"):
        cols[k] = pa.array(out[k], type=pa.list_(pa.uint8()))
    return pa.table(cols), overlong


def _answer_tokens(offsets, char_start: int, char_end: int) -> tuple[int, int]:
    """First and last context token of the answer's characters; (0, 0) when the answer is not
    entirely inside the context that survived truncation."""
    inside = [j for j, (s, e) in enumerate(offsets) if s >= 0 and e > char_start and s < char_end]
    last_seen = max(e for _, e in offsets)
    if not inside or last_seen < char_end:
        return 0, 0
    return inside[0], inside[-1]


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    if "start_positions" not in rows:
        return seq.collate(rows, pad_id)
    return {
        **pad_inputs(rows["input_ids"], pad_id),
        "token_type_ids": pad(rows["token_type_ids"], 0),
        "start_positions": torch.as_tensor(np.asarray(rows["start_positions"]), dtype=torch.long),
        "end_positions": torch.as_tensor(np.asarray(rows["end_positions"]), dtype=torch.long),
        "offsets": pad(rows["offsets"], -1),
        "context_bytes": pad(rows["context_bytes"], 0, torch.uint8),
        "reference_bytes": pad(rows["reference_bytes"], 0, torch.uint8),
    }


def model_class(transformers, spec, config=None):
    if spec.task.qa_style == "extractive":
        return transformers.AutoModelForQuestionAnswering
    return seq.model_class(transformers, spec, config)


def loss_and_outputs(model, batch):
    """Extractive: summed (start CE + end CE) / 2 per row, the row count, and (in evaluation)
    the predicted answer texts. Generative: summarization's token loss."""
    if "start_positions" not in batch:
        return seq.loss_and_outputs(model, batch)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    ce = torch.nn.functional.cross_entropy
    loss = (
        ce(out.start_logits.float(), batch["start_positions"], reduction="sum")
        + ce(out.end_logits.float(), batch["end_positions"], reduction="sum")
    ) / 2
    n = torch.tensor(float(len(batch["input_ids"])), device=loss.device)
    # A DeepSpeed engine's eval() sets only its wrapped module's flag, not its own.
    if getattr(model, "module", model).training:
        return loss, n, None
    offsets = batch["offsets"].view(len(batch["input_ids"]), -1, 2)
    spans = best_spans(out.start_logits, out.end_logits, offsets[..., 0] >= 0)
    texts = [t for t, _ in span_texts(spans, offsets, seq.texts_of(batch["context_bytes"]))]
    return loss, n, texts


def best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    in_context: torch.Tensor,
    max_tokens: int = MAX_ANSWER_TOKENS,
) -> list[tuple[int, int]]:
    """Per row, the (start, end) token pair maximizing start + end logit with start <= end <
    start + max_tokens, both context tokens."""
    n, width = start_logits.shape
    idx = torch.arange(width, device=start_logits.device)
    in_context = in_context.to(start_logits.device)
    ok = (idx[None, :] >= idx[:, None]) & (idx[None, :] < idx[:, None] + max_tokens)
    ok = ok[None] & in_context[:, :, None] & in_context[:, None, :]
    scores = (start_logits.float()[:, :, None] + end_logits.float()[:, None, :]).masked_fill(
        ~ok, -torch.inf
    )
    flat = scores.view(n, -1).argmax(-1)
    return [(int(f) // width, int(f) % width) for f in flat]


def span_texts(spans, offsets: torch.Tensor, contexts: list[str]) -> list[tuple[str, int]]:
    """(answer text, character start) per row; ("", -1) when no context token was in view."""
    out = []
    for (s, e), offs, context in zip(spans, offsets.tolist(), contexts):
        cs, ce = offs[s][0], offs[e][1]
        out.append(("", -1) if cs < 0 or ce < 0 else (context[cs:ce], cs))
    return out


def references(batch) -> list[list[str]]:
    """Every gold answer text of each row (what EM/F1 compare with)."""
    return [json.loads(t) for t in seq.texts_of(batch["reference_bytes"])]


def generate(model, batch, tokenizer, gen_cfg, synced: bool) -> list[str] | None:
    """Generative style: the generated answer per row; None for extractive batches."""
    if "start_positions" in batch:
        return None
    return seq.generate(model, batch, tokenizer, gen_cfg, synced)


def predict(model, tokenizer, inputs: dict[str, list[str]], spec, max_new_tokens: int | None):
    """Batch prediction (trainers.predict): `prediction` (answer text) per row, and for the
    extractive style `answer_start` (its character offset in the context, -1 if none)."""
    questions, contexts = inputs["question"], inputs["context"]
    if spec.task.qa_style == "generative":
        m = getattr(model, "module", model)
        enc_dec = bool(getattr(m.config, "is_encoder_decoder", False))
        sources = seq.encode_sources(
            tokenizer,
            [prompt(q, c) for q, c in zip(questions, contexts)],
            enc_dec,
            PROMPT_SUFFIX,
            spec.data.max_seq_length,
        )
        return {
            "prediction": seq.generate_texts(
                model, tokenizer, sources, spec.generation, max_new_tokens=max_new_tokens
            )
        }
    enc = _encode(tokenizer, questions, contexts, spec.data.max_seq_length)
    offsets = pad(
        [[x for p in _context_offsets(enc, i) for x in p] for i in range(len(questions))], -1
    ).view(len(questions), -1, 2)
    kwargs = {"token_type_ids": pad(enc["token_type_ids"], 0)} if "token_type_ids" in enc else {}
    inputs = {**pad_inputs(enc["input_ids"], tokenizer.pad_token_id or 0), **kwargs}
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    spans = best_spans(out.start_logits, out.end_logits, offsets[..., 0] >= 0)
    found = span_texts(spans, offsets, contexts)
    return {"prediction": [t for t, _ in found], "answer_start": [s for _, s in found]}


def metrics(loss_sum: float, weight: float, preds, labels, label_names) -> dict[str, float]:
    """Loss, and SQuAD exact match and F1 (fractions in [0, 1], best over each row's answers)."""
    em = [max(exact_match(p, g) for g in golds) for p, golds in zip(preds, labels)]
    f1 = [max(f1_score(p, g) for g in golds) for p, golds in zip(preds, labels)]
    return {
        "eval/loss": loss_sum / max(weight, 1.0),
        "eval/exact_match": float(np.mean(em)) if em else 0.0,
        "eval/f1": float(np.mean(f1)) if f1 else 0.0,
    }


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalization, as in the official evaluation script (evaluate-v1.1.py,
    rajpurkar.github.io/SQuAD-explorer): lowercase, drop punctuation, drop the articles
    a/an/the, collapse whitespace. No maintained package ships it offline: Hugging Face
    `evaluate.load("squad")` fetches its script from the Hub."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCTUATION = set(string.punctuation)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalized strings (official v1.1 script: no empty-answer case)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)
