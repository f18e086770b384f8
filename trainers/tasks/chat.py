"""Chat and instruction fine-tuning (task.type=chat): conversations through the model's chat
template, loss on the assistant turns.

Rows: every format (`data.conversation.format`: messages, sharegpt, alpaca, prompt_completion)
is read into one canonical column `messages`, a JSON list of {role, content} (`read_row`); a
malformed conversation is a bad row with its file and row.

Tokens: each conversation is rendered once by the tokenizer's `apply_chat_template` and that text
is tokenized without added special tokens, which is what `apply_chat_template(tokenize=True)`
does: the ids equal the template's token for token. Each message's text is then found in the
rendered string in order, and a token bears loss when it overlaps a trained assistant message
(`data.train_on`), together with the whitespace and the special token that close the turn (its
end-of-turn token: the model learns to stop). Finding the text instead of diffing renders of
growing prefixes works with templates that add a default system prompt or rewrite earlier turns.

Packing (`data.pack`, training split): conversations fill rows of data.max_seq_length
(`trainers.tasks.packing`); with data.packing=best_fit (default) each goes whole into a row by
best-fit decreasing (an over-long one was already cut by data.overlong), with data.packing=concat
they are joined and cut at row boundaries. Position ids restart per conversation (the
block-diagonal mask of causal_lm's packing: no attention across conversations). Validation rows
hold one conversation each, with the token offset of its last assistant reply (`prompt_length`)
and that reply as text (`reference_bytes`), so evaluation can generate the reply and score it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa
import torch

from trainers.chat_templates import end_of_turn_ids
from trainers.errors import DataError
from trainers.tasks import causal_lm
from trainers.tasks.common import overlong_policy, pad, pad_inputs, table_of
from trainers.tasks.packing import pack_documents
from trainers.tasks.summarization import generate_texts, rouge, texts_of

IGNORE = causal_lm.IGNORE
# The canonical columns `read_row` produces, whatever the format.
ROW_COLUMNS = ("messages",)
# Metric keys every evaluation reports (the reply scores with generation.score_replies, the
# default).
METRICS = ("eval/loss", "eval/perplexity", "eval/tokens", "eval/rougeL", "eval/exact_match")


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column (required columns)."""
    fmt = data_cfg.conversation.format
    if fmt in ("messages", "sharegpt"):
        return {"messages": "conversation.messages_column"}
    if fmt == "alpaca":
        return {
            "instruction": "conversation.instruction_column",
            "output": "conversation.output_column",
        }
    return {"prompt": "conversation.prompt_column", "completion": "conversation.completion_column"}


def optional_columns(data_cfg) -> dict[str, str]:
    """Columns read when a row has them."""
    c = data_cfg.conversation
    out = {"input": "conversation.input_column"} if c.format == "alpaca" else {}
    if c.system_column and c.format in ("alpaca", "prompt_completion"):
        out["system"] = "conversation.system_column"
    return out


def predict_inputs(data_cfg) -> list[str]:
    """What `ferry predict` needs per row: the conversation, or the instruction / prompt."""
    fmt = data_cfg.conversation.format
    return {"alpaca": ["instruction"], "prompt_completion": ["prompt"]}.get(fmt, ["messages"])


def read_row(rec: dict, data_cfg, need_reply: bool = True) -> tuple[dict | None, str | None]:
    """A raw record -> ({"messages": JSON list of {role, content}}, None) or (None, reason).

    Args:
        need_reply: training rows must hold an assistant turn; prediction inputs (False) keep
            the conversation up to its last user turn (a trailing reply is the reference, not
            input).
    """
    c = data_cfg.conversation
    if c.format in ("messages", "sharegpt"):
        msgs, err = _turns(rec.get(c.messages_column), c.messages_column, c)
    else:
        msgs, err = _pair(rec, c, need_reply)
    if err:
        return None, err
    if need_reply:
        if not any(m["role"] == "assistant" for m in msgs):
            return None, (
                "no assistant turn (nothing to learn; the conversation needs a reply, or use "
                "task.type=causal_lm for plain text)"
            )
    else:
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not any(m["role"] == "user" for m in msgs):
            return None, "no user turn (nothing to reply to)"
    return {"messages": json.dumps(msgs, ensure_ascii=False)}, None


def _turns(turns: Any, column: str, c) -> tuple[list[dict], str | None]:
    if isinstance(turns, str):  # CSV cells and some exports hold the list as JSON text
        try:
            turns = json.loads(turns)
        except ValueError:
            return [], f"'{column}' is text, not a list of turns (expected a JSON list)"
    if not isinstance(turns, list):
        return [], f"'{column}' is not a list of turns (got {type(turns).__name__})"
    if not turns:
        return [], f"empty conversation ('{column}' has no turns)"
    msgs = []
    for j, t in enumerate(turns, start=1):
        if not isinstance(t, dict):
            return [], f"turn is not an object (turn {j}: {type(t).__name__})"
        name = t.get(c.role_key)
        role = c.roles.get(name) if isinstance(name, str) else None
        if role is None:
            return [], (
                f"unknown role (turn {j}: {c.role_key}={name!r}; known: "
                f"{', '.join(c.roles)}; map it in data.conversation.roles)"
            )
        content = t.get(c.content_key)
        err = _text_error(content, f"turn {j} '{c.content_key}'")
        if err:
            return [], err
        msgs.append({"role": role, "content": content})
    return msgs, None


def _pair(rec: dict, c, need_reply: bool) -> tuple[list[dict], str | None]:
    """Alpaca (instruction [+ input] -> output) or prompt -> completion as a conversation."""
    if c.format == "alpaca":
        user_col, reply_col = c.instruction_column, c.output_column
    else:
        user_col, reply_col = c.prompt_column, c.completion_column
    msgs: list[dict] = []
    system = rec.get(c.system_column) if c.system_column else None
    if system is not None and _text_error(system, c.system_column) is None:
        msgs.append({"role": "system", "content": system})
    user = rec.get(user_col)
    if isinstance(user, list) and c.format == "prompt_completion":  # conversational prompt
        turns, err = _turns(user, user_col, c)
        if err:
            return [], err
        msgs += turns
    else:
        err = _text_error(user, f"'{user_col}'")
        if err:
            return [], err
        extra = rec.get(c.input_column) if c.format == "alpaca" else None
        if extra is not None and not isinstance(extra, str):
            return [], f"non-string content ('{c.input_column}' is {type(extra).__name__})"
        msgs.append({"role": "user", "content": user + ("\n" + extra if extra else "")})
    reply = rec.get(reply_col)
    if reply is None and not need_reply:
        return msgs, None
    if reply is None:
        what = "an Alpaca row needs" if c.format == "alpaca" else "a row needs"
        return [], f"missing '{reply_col}' ({what} the reply to learn)"
    if isinstance(reply, list) and c.format == "prompt_completion":
        turns, err = _turns(reply, reply_col, c)
        return ([], err) if err else (msgs + turns, None)
    err = _text_error(reply, f"'{reply_col}'")
    return ([], err) if err else (msgs + [{"role": "assistant", "content": reply}], None)


def _text_error(value: Any, what: str) -> str | None:
    if value is None:
        return f"missing content ({what})"
    if not isinstance(value, str):
        return f"non-string content ({what} is {type(value).__name__}; expected text)"
    if not value.strip():
        return f"empty content ({what})"
    return None


def tokenize(table: pa.Table, tokenizer, spec, label_index=None) -> tuple[pa.Table, int]:
    """Rendered, tokenized and masked conversations; packed for training when data.pack."""
    convs = [json.loads(x) for x in table.column("messages").to_pylist()]
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    validation = table.num_rows > 0 and table.column("_split")[0].as_py() == "validation"
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in convs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    stops = end_of_turn_ids(tokenizer)
    max_len = spec.data.max_seq_length
    docs, overlong = [], 0
    for i, msgs in enumerate(convs):
        ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
        spans = _message_spans(texts[i], msgs)
        if spans is None:
            raise DataError(
                f"{files[i]} row {rows[i]}: the chat template does not render the messages' "
                "text verbatim, so the assistant tokens cannot be found. Set data.chat_template "
                "to a template that writes each message's content as given (e.g. chatml)."
            )
        labels, turns = _mask(ids, offsets, texts[i], spans, spec.data.train_on, stops)
        policy = overlong_policy(len(ids), spec, files[i], rows[i])
        if policy:
            overlong += 1
            if policy == "drop":
                continue
            cut = max((end for _, end, _ in turns if end <= max_len), default=max_len)
            ids, labels = ids[:cut], labels[:cut]
            turns = [t for t in turns if t[0] < cut]
            if not turns or all(x == IGNORE for x in labels):
                continue  # nothing of an assistant reply fits: no loss to learn from
        start, _, reply = turns[-1]
        docs.append((ids, labels, start, reply))
    if spec.data.pack and not validation:
        packed = pack_documents(
            [(d[0], d[1]) for d in docs], max_len, tokenizer.eos_token_id, spec.data.packing
        )
        return packed, overlong
    return _rows(docs), overlong


def _message_spans(text: str, msgs: list[dict]) -> list[tuple[str, int, int]] | None:
    """(role, start, end) of each message's content in the rendered text, found in order; None
    when a content is missing (the template changed it beyond trimming)."""
    spans, cursor = [], 0
    for m in msgs:
        content = m["content"].strip()
        at = text.find(content, cursor)
        if at < 0:
            return None
        spans.append((m["role"], at, at + len(content)))
        cursor = at + len(content)
    return spans


def _mask(ids, offsets, text, spans, train_on: str, stops: set[int]):
    """Labels (the id where a token bears loss, else IGNORE) and, per assistant message,
    (first token, token after its end-of-turn, reply text)."""
    replies = [(s, e) for role, s, e in spans if role == "assistant"]
    trained = replies[-1:] if train_on == "last_assistant" else replies
    labels = list(ids) if train_on == "all" else [IGNORE] * len(ids)
    turns = []
    k = 0
    for s, e in replies:
        while k < len(ids) and offsets[k][1] <= s:
            k += 1
        first = k
        while k < len(ids) and offsets[k][0] < e:
            k += 1
        # The turn's closing whitespace and end-of-turn token: learning to stop.
        end = k
        while end < len(ids):
            if ids[end] in stops:
                end += 1
                break
            if text[offsets[end][0] : offsets[end][1]].strip():
                end = k  # no end-of-turn token right after the reply: close at the reply
                break
            end += 1
        if (s, e) in trained:
            labels[first:end] = ids[first:end]
        turns.append((first, end, text[s:e]))
    return labels, turns


def _rows(docs) -> pa.Table:
    """One conversation per row, with the offset and text of its last assistant reply."""
    table = table_of(
        [d[0] for d in docs], [d[1] for d in docs], [list(range(len(d[0]))) for d in docs]
    )
    table = table.append_column("prompt_length", pa.array([d[2] for d in docs], type=pa.int32()))
    return table.append_column(
        "reference_bytes",
        pa.array([list(d[3].encode("utf-8")) for d in docs], type=pa.list_(pa.uint8())),
    )


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    if "reference_bytes" not in rows:  # packed training rows
        return causal_lm.collate(rows, pad_id)
    return {
        **pad_inputs(rows["input_ids"], pad_id),
        "labels": pad(rows["labels"], IGNORE),
        "reference_bytes": pad(rows["reference_bytes"], 0, torch.uint8),
        "prompt_length": torch.as_tensor(list(rows["prompt_length"]), dtype=torch.long),
    }


def model_class(transformers, spec=None, config=None):
    return transformers.AutoModelForCausalLM


def loss_and_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, None]:
    """causal_lm's summed next-token loss over the loss-bearing tokens (the model sees only its
    inputs, not the reference columns)."""
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    return causal_lm.loss_and_outputs(model, {k: batch[k] for k in keys if k in batch})


def references(batch) -> list[str]:
    return texts_of(batch["reference_bytes"])


def generate(model, batch, tokenizer, gen_cfg, synced: bool) -> list[str] | None:
    """Each validation conversation's last reply, generated from the turns before it (the
    template's assistant header included), with the `generation:` settings."""
    if not gen_cfg.score_replies or "prompt_length" not in batch:
        return None
    ids = batch["input_ids"]
    sources = [ids[i, :n].tolist() for i, n in enumerate(batch["prompt_length"].tolist())]
    return generate_texts(
        model, tokenizer, sources, gen_cfg, synced, stop_ids=sorted(end_of_turn_ids(tokenizer))
    )


def predict(model, tokenizer, inputs: dict[str, list[str]], spec, max_new_tokens: int | None):
    """Batch prediction: {"prediction": the assistant reply to each conversation}; an over-long
    conversation keeps its last data.max_seq_length tokens."""
    prompts = [
        tokenizer.apply_chat_template(json.loads(m), tokenize=False, add_generation_prompt=True)
        for m in inputs["messages"]
    ]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    sources = [x[-spec.data.max_seq_length :] for x in ids]
    replies = generate_texts(
        model,
        tokenizer,
        sources,
        spec.generation,
        max_new_tokens=max_new_tokens,
        stop_ids=sorted(end_of_turn_ids(tokenizer)),
    )
    return {"prediction": replies}


def metrics(loss_sum: float, weight: float, preds, labels, label_names) -> dict[str, float]:
    """Loss, perplexity and loss-bearing tokens; with generated replies, ROUGE-L F-measure and
    exact match (after collapsing whitespace) against the reference replies."""
    out = causal_lm.metrics(loss_sum, weight, preds, labels, label_names)
    if preds:
        out["eval/rougeL"] = rouge(preds, labels)["eval/rougeL"]
        same = [_norm(p) == _norm(r) for p, r in zip(preds, labels)]
        out["eval/exact_match"] = sum(same) / len(same)
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
