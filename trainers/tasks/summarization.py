"""Summarization: document -> summary, scored with ROUGE on generated text.

Two model shapes, told apart by the model config's `is_encoder_decoder`:
  encoder-decoder (T5, BART, the tiny-t5 preset): the document is the encoder input, the summary
    (+ EOS) the decoder labels;
  decoder-only (Llama-style): one sequence `<document>` + PROMPT_SUFFIX + `<summary>` + EOS, with
    loss on the summary tokens only (as causal_lm's prompt/response).
Over-long rows (data.overlong=truncate): the summary keeps at most half of data.max_seq_length
tokens and the document the rest, cut at its end (its beginning is kept).

Evaluation generates a summary per validation row (`generate`, settings from the `generation:`
block) and scores it against the reference text, which travels in the batch as UTF-8 bytes
(`reference_bytes`: torch batches hold tensors only). Generative question answering reuses the
functions here with a different prompt (trainers.tasks.question_answering).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from trainers.tasks.common import overlong_policy, pad, pad_inputs

IGNORE = -100
PROMPT_SUFFIX = "\nTL;DR: "  # decoder-only models: what follows the document, before the summary
# Metric keys every evaluation reports.
METRICS = (
    "eval/loss",
    "eval/perplexity",
    "eval/rouge1",
    "eval/rouge2",
    "eval/rougeL",
    "eval/gen_len",
)


def columns(data_cfg) -> dict[str, str]:
    """Canonical column -> the `data.` field naming the user's column."""
    return {"text": "text_column", "summary": "summary_column"}


def predict_inputs(data_cfg) -> list[str]:
    return ["text"]


def tokenize(table: pa.Table, tokenizer, spec, label_index=None) -> tuple[pa.Table, int]:
    summaries = table.column("summary").to_pylist()
    return tokenize_pairs(
        table.column("text").to_pylist(),
        summaries,
        summaries,
        table,
        tokenizer,
        spec,
        PROMPT_SUFFIX,
    )


def tokenize_pairs(
    sources: list[str],
    targets: list[str],
    references: list[str],
    table: pa.Table,
    tokenizer,
    spec,
    suffix: str,
) -> tuple[pa.Table, int]:
    """(source, target) text pairs -> model rows; `references` (what generations are scored
    against) ride along as UTF-8 bytes."""
    max_len = spec.data.max_seq_length
    enc_dec = is_encoder_decoder(spec)
    src = encode_sources(tokenizer, sources, enc_dec, suffix, max_len=None)
    eos = tokenizer.eos_token_id
    # Encoder-decoder targets take the tokenizer's special tokens (T5: </s>; BART: <s>...</s>);
    # a decoder's target continues the prompt, so no BOS there.
    tgt = [
        _ends_with(ids, eos)
        for ids in tokenizer(text_target=targets, add_special_tokens=enc_dec)["input_ids"]
    ]
    files, rows = table.column("_file").to_pylist(), table.column("_row").to_pylist()
    out: dict[str, list] = {"input_ids": [], "labels": [], "reference_bytes": []}
    if not enc_dec:
        out["prompt_length"] = []
    overlong = 0
    for i, (s, t) in enumerate(zip(src, tgt)):
        n = len(s) + len(t) if not enc_dec else max(len(s), len(t))
        policy = overlong_policy(n, spec, files[i], rows[i])
        if policy:
            overlong += 1
            if policy == "drop":
                continue
            s, t = _truncate(s, t, max_len, enc_dec, tokenizer, suffix)
        if enc_dec:
            out["input_ids"].append(s)
            out["labels"].append(t)
        else:
            out["input_ids"].append(s + t)
            out["labels"].append([IGNORE] * len(s) + t)
            out["prompt_length"].append(len(s))
        out["reference_bytes"].append(list(references[i].encode("utf-8")))
    lst = pa.list_(pa.int32())
    cols = {k: pa.array(v, type=lst) for k, v in out.items() if k != "prompt_length"}
    cols["reference_bytes"] = pa.array(out["reference_bytes"], type=pa.list_(pa.uint8()))
    if not enc_dec:
        cols["prompt_length"] = pa.array(out["prompt_length"], type=pa.int32())
    return pa.table(cols), overlong


def encode_sources(
    tokenizer, sources: list[str], enc_dec: bool, suffix: str, max_len: int | None
) -> list[list[int]]:
    """Model input ids per source text, the same in training and prediction: the tokenizer's own
    special tokens for encoders; document + suffix, no special tokens, for decoders. `max_len`
    cuts the document (None = no cut)."""
    if enc_dec:
        ids = tokenizer(sources)["input_ids"]
        return [_cut(x, max_len, tokenizer) for x in ids] if max_len else ids
    docs = tokenizer(sources, add_special_tokens=False)["input_ids"]
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if max_len:
        docs = [d[: max(1, max_len - len(tail))] for d in docs]
    return [d + tail for d in docs]


def _truncate(s, t, max_len, enc_dec, tokenizer, suffix):
    if enc_dec:
        return _cut(s, max_len, tokenizer), _cut(t, max_len, tokenizer)
    t = _cut(t, max(1, max_len // 2), tokenizer)
    tail = len(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    doc = s[: len(s) - tail]
    return doc[: max(1, max_len - len(t) - tail)] + s[len(s) - tail :], t


def _cut(ids: list[int], n: int, tokenizer) -> list[int]:
    """First n ids, keeping a closing special token (EOS) when there was one."""
    if len(ids) <= n:
        return ids
    return ids[: n - 1] + ids[-1:] if ids[-1] in tokenizer.all_special_ids else ids[:n]


def _ends_with(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


@functools.lru_cache(maxsize=8)
def _architecture(
    preset: str | None,
    source: str | None,
    gguf_file: str | None,
    revision: str | None,
    trust_remote_code: bool,
) -> bool:
    if preset:
        return preset == "tiny-t5"
    import transformers

    # The model's config only (no weights); cached per process, read on every tokenize batch.
    cfg = transformers.AutoConfig.from_pretrained(
        source, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code
    )
    return bool(getattr(cfg, "is_encoder_decoder", False))


def is_encoder_decoder(spec) -> bool:
    """Whether the run's model is an encoder-decoder (reads the config only, no weights)."""
    m = spec.model
    return _architecture(m.preset, m.source, m.gguf_file, m.revision, m.trust_remote_code)


def collate(rows: dict[str, Any], pad_id: int) -> dict[str, torch.Tensor]:
    out = {
        **pad_inputs(rows["input_ids"], pad_id),
        "labels": pad(rows["labels"], IGNORE),
        "reference_bytes": pad(rows["reference_bytes"], 0, torch.uint8),
    }
    if "prompt_length" in rows:
        out["prompt_length"] = torch.as_tensor(np.asarray(rows["prompt_length"]), dtype=torch.long)
    return out


def texts_of(byte_rows: torch.Tensor) -> list[str]:
    """UTF-8 byte rows (zero-padded) -> strings."""
    return [bytes(r.tolist()).rstrip(b"\0").decode("utf-8") for r in byte_rows]


def model_class(transformers, spec=None, config=None):
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def loss_and_outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Summed token cross-entropy over the target tokens, and the number of target tokens.
    Predictions come from `generate` (evaluation only)."""
    if "prompt_length" in batch:  # decoder-only: predict token t+1 from tokens <= t
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1]
        targets = batch["labels"][:, 1:]
    else:  # encoder-decoder: transformers shifts the labels into decoder inputs
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).logits
        targets = batch["labels"]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, (targets != IGNORE).sum().float(), None


def references(batch) -> list[str]:
    """The reference summaries of a batch (what `metrics` compares generations with)."""
    return texts_of(batch["reference_bytes"])


def generate(model, batch, tokenizer, gen_cfg, synced: bool) -> list[str]:
    """Generated text for every row of an evaluation batch (source part only)."""
    ids = batch["input_ids"]
    if "prompt_length" in batch:
        sources = [ids[i, :n].tolist() for i, n in enumerate(batch["prompt_length"].tolist())]
    else:
        sources = [row[mask.bool()].tolist() for row, mask in zip(ids, batch["attention_mask"])]
    return generate_texts(model, tokenizer, sources, gen_cfg, synced)


def generate_texts(
    model,
    tokenizer,
    sources: list[list[int]],
    gen_cfg,
    synced: bool = False,
    max_new_tokens: int | None = None,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Decode from each source (input ids from `encode_sources`) with the `generation:` settings.

    Args:
        model: a transformers/PEFT model or a DeepSpeed engine (its module generates).
        synced: ZeRO-3 on several ranks: every rank keeps stepping until all are done, since
            each forward gathers the sharded weights collectively.
        stop_ids: tokens that end generation (default the tokenizer's EOS); chat models stop at
            their end-of-turn token.
    """
    m = getattr(model, "module", model)
    enc_dec = bool(getattr(m.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(1, max(len(s) for s in sources))
    input_ids = torch.full((len(sources), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sources), width), dtype=torch.long)
    for i, s in enumerate(sources):
        # Encoders read right-padded input; decoders continue from the prompt's end, so left-pad.
        sl = slice(0, len(s)) if enc_dec else slice(width - len(s), width)
        input_ids[i, sl] = torch.as_tensor(s)
        mask[i, sl] = 1
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens or gen_cfg.max_new_tokens,
        num_beams=gen_cfg.num_beams,
        do_sample=gen_cfg.do_sample,
        repetition_penalty=gen_cfg.repetition_penalty,
        no_repeat_ngram_size=gen_cfg.no_repeat_ngram_size,
    )
    if gen_cfg.do_sample:
        kwargs.update(temperature=gen_cfg.temperature, top_p=gen_cfg.top_p)
    device = next(m.parameters()).device
    # use_cache=True: presets train with the KV cache off (packing); generation wants it.
    out = m.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        pad_token_id=pad,
        eos_token_id=stop_ids or tokenizer.eos_token_id,
        use_cache=True,
        synced_gpus=synced,
        **kwargs,
    )
    new = out if enc_dec else out[:, width:]
    return [t.strip() for t in tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]


def predict(model, tokenizer, inputs: dict[str, list[str]], spec, max_new_tokens: int | None):
    """Batch prediction (trainers.predict): {"prediction": generated summary per row}."""
    m = getattr(model, "module", model)
    enc_dec = bool(getattr(m.config, "is_encoder_decoder", False))
    sources = encode_sources(
        tokenizer, inputs["text"], enc_dec, PROMPT_SUFFIX, spec.data.max_seq_length
    )
    return {
        "prediction": generate_texts(
            model, tokenizer, sources, spec.generation, max_new_tokens=max_new_tokens
        )
    }


def metrics(loss_sum: float, weight: float, preds, labels, label_names) -> dict[str, float]:
    """Loss, perplexity, ROUGE-1/2/L F-measures (rouge-score, Porter stemming) averaged over rows,
    and the mean generated length in words."""
    loss = loss_sum / max(weight, 1.0)
    out = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}
    out.update(rouge(preds, labels))
    out["eval/gen_len"] = float(np.mean([len(p.split()) for p in preds])) if preds else 0.0
    return out


def rouge(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over (prediction, reference) pairs: `eval/rouge1`..."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(preds, refs)]
    return {
        f"eval/{k}": float(np.mean([s[k].fmeasure for s in scores])) if scores else 0.0
        for k in keys
    }
