"""Exports load with plain transformers + peft, and merge, for every task and model kind Ferry
trains (LoRA on encoder, decoder and encoder-decoder presets). No training is needed to check
the files: the weights come from the same `export_model` a finished run calls. The GGUF and
packaged-model bases are checked on the exports of real runs (tests/test_models.py)."""

import json
import os

import pytest
import torch
from conftest import classification_rows, lm_rows

from trainers.config_load import build_spec
from trainers.export import export_model, summary
from trainers.model import build_model, load_tokenizer_for
from trainers.saved import load_adapter, load_saved, merge_adapter

QA_ROWS = [{"question": "what is the key ?", "context": "the key is red . big dog",
            "answers": {"text": ["red"], "answer_start": [11]}}] * 8


def _lora_export(tmp_path, model, task, texts, labels=None, **task_extra):
    """A LoRA model of `model` for `task`, with non-zero adapter weights, exported like a run."""
    spec = build_spec({"run": {"name": "x", "storage_path": str(tmp_path / "runs")},
                       "model": model, "task": {"type": task, **task_extra},
                       "data": {"train_files": ["x"]}, "lora": {"rank": 4}})
    tok = load_tokenizer_for(spec, lambda: iter(texts))
    peft_model = build_model(spec, tok, labels)
    with torch.no_grad():  # a trained adapter is not the identity: make merging matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    export_model(peft_model, peft_model.state_dict(), spec, tok, labels,
                 summary(spec, [{"eval/loss": 1.0}], None, 1), spec.export_dir)
    return spec, tok, peft_model.eval()


def _inputs(tok, task, preset=None, extra=None):
    if (extra or {}).get("qa_style") == "extractive":
        enc = tok(["what is the key ?"], ["the key is red . big dog"], return_tensors="pt")
        enc.pop("token_type_ids", None)
        return dict(enc)
    ids = tok(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    out = {"input_ids": ids}
    if preset == "tiny-t5":
        out["decoder_input_ids"] = ids[:, :3]
    return out


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.start_logits if hasattr(out, "start_logits") and out.start_logits is not None \
        else out.logits


@pytest.mark.parametrize("preset,task,extra,texts,labels", [
    ("tiny-t5", "summarization", {}, [r["text"] for r in lm_rows(40)], None),
    ("tiny-t5", "question_answering", {"qa_style": "generative"}, [r["context"] for r in QA_ROWS],
     None),
    ("tiny-bert", "question_answering", {"qa_style": "extractive"},
     [r["context"] + " " + r["question"] for r in QA_ROWS], None),
    ("tiny-llama", "summarization", {}, [r["text"] for r in lm_rows(40)], None),
    ("tiny-bert", "sequence_classification", {}, [r["text"] for r in classification_rows(40)],
     ["neg", "pos"]),
    ("tiny-llama", "causal_lm", {}, [r["text"] for r in lm_rows(40)], None),
], ids=["t5-summarization", "t5-generative-qa", "bert-extractive-qa", "llama-summarization",
        "bert-classification", "llama-causal-lm"])
def test_lora_export_loads_and_merges_for_every_task(tmp_path, preset, task, extra, texts, labels):
    import peft
    import transformers

    spec, tok, trained = _lora_export(tmp_path, {"preset": preset}, task, texts, labels, **extra)
    inputs = _inputs(tok, task, preset, extra)
    expected = _logits(trained, inputs)
    # Ferry's own loader (eval, predict)...
    loaded = load_saved(spec, tok, None, spec.export_dir)
    assert torch.allclose(_logits(loaded, inputs), expected, atol=1e-5)
    # ...plain peft, from the export folder alone...
    with open(os.path.join(spec.export_dir, "adapter_config.json")) as f:
        task_type = json.load(f)["task_type"]
    auto = {"SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
            "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering,
            "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
            "CAUSAL_LM": peft.AutoPeftModelForCausalLM}[task_type]
    plain = auto.from_pretrained(spec.export_dir).eval()
    assert torch.allclose(_logits(plain, inputs), expected, atol=1e-5)
    # ...and merged into a plain transformers model (`ferry train --merge`).
    merged_dir = merge_adapter(spec.export_dir)
    merged_cls = {"SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
                  "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
                  "SEQ_CLS": transformers.AutoModelForSequenceClassification,
                  "CAUSAL_LM": transformers.AutoModelForCausalLM}[task_type]
    merged = merged_cls.from_pretrained(merged_dir).eval()
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    assert torch.allclose(_logits(merged, inputs), expected, atol=1e-4)


def check_adapter_export_stands_alone(export_dir: str, auto_peft, auto_merged, inputs: dict):
    """A LoRA export whose base exists nowhere a plain `peft` load could find it (GGUF file,
    site-packages) carries the base in HF format and points the adapter at it: plain peft loads
    it from the export alone, like Ferry's own loader, and `--merge` gives the same outputs."""
    with open(os.path.join(export_dir, "adapter_config.json")) as f:
        base_ref = json.load(f)["base_model_name_or_path"]
    assert base_ref == os.path.join(export_dir, "base")  # not site-packages, not a temp folder
    assert os.path.exists(os.path.join(base_ref, "model.safetensors"))
    expected = _logits(auto_peft.from_pretrained(export_dir).eval(), inputs)
    assert torch.allclose(_logits(load_adapter(export_dir), inputs), expected, atol=1e-5)
    merged = auto_merged.from_pretrained(merge_adapter(export_dir)).eval()
    assert torch.allclose(_logits(merged, inputs), expected, atol=1e-3)
