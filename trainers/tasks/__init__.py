"""Tasks: each a small module with the same few functions, chosen by name from `TASKS`.

Every task module provides:
    required_columns(data_cfg) -> list[str]       raw columns a row must have
    tokenize(table, tokenizer, spec, label_index) -> (pa.Table, n_overlong)
    collate(rows, pad_id) -> dict[str, torch.Tensor]
    model_class(transformers) -> the AutoModel class to load
    loss_and_outputs(model, batch) -> (summed loss, weight, predictions or None)
    metrics(sums, preds, labels, label_names) -> dict[str, float]
    METRICS: the metric keys every evaluation reports
A new task (summarization, QA) is a new module here plus one line in TASKS.
"""

from trainers.tasks import causal_lm, classification, masked_lm

TASKS = {
    "sequence_classification": classification,
    "causal_lm": causal_lm,
    "masked_lm": masked_lm,
}
