"""Tasks: each a small module with the same few functions, chosen by name from `TASKS`.

Every task module provides:
    columns(data_cfg) -> {canonical: data field}   raw columns a row must have, e.g.
        {"text": "text_column"} (nested fields dotted: "conversation.messages_column"): rows
        are read into the canonical names
    predict_inputs(data_cfg) -> [canonical]         the columns the model reads in `ferry predict`
    tokenize(table, tokenizer, spec, label_index) -> (pa.Table, n_overlong)
    collate(rows, pad_id) -> dict[str, torch.Tensor]
    model_class(transformers, spec, config) -> the AutoModel class to load (config: the model's
        transformers config; summarization picks seq2seq or causal LM from it)
    loss_and_outputs(model, batch) -> (summed loss, weight, predictions or None)
    metrics(loss_sum, weight, preds, labels, label_names) -> dict[str, float]
    METRICS: the metric keys every evaluation reports
and optionally:
    optional_columns(data_cfg) -> {canonical: data field}   columns a row may lack
    read_row(record, data_cfg) -> (canonical values, bad-row reason)   builds the canonical
        columns (ROW_COLUMNS) from a raw record itself (chat: any format -> messages)
    NESTED: canonical columns that hold JSON structure rather than text (QA answers)
    check_row(row, spec) -> bad-row reason or None     a task rule on raw rows (QA answers)
    references(batch) -> list                         the `labels` metrics get (default: labels)
    generate(model, batch, tokenizer, gen_cfg, synced) -> list[str] | None
        evaluation predictions by decoding (summarization, generative QA)
    predict(model, tokenizer, inputs, spec, max_new_tokens) -> dict[str, list]
        batch prediction's output columns (else trainers.predict's own classify/generate)
A new task is a new module here plus one line in TASKS.
"""

from trainers.tasks import (
    causal_lm,
    chat,
    classification,
    masked_lm,
    question_answering,
    summarization,
)

TASKS = {
    "sequence_classification": classification,
    "causal_lm": causal_lm,
    "chat": chat,
    "masked_lm": masked_lm,
    "summarization": summarization,
    "question_answering": question_answering,
}
