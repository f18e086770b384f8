"""Evaluate a saved model on the run's validation data, distributed like training.

`evaluate_checkpoint` is the entry point. It accepts either a Ferry export (`<run>/final`, HF
format: full model or LoRA adapter; or method=feature_extraction's head with its frozen base) or a
Ray Train checkpoint folder (DeepSpeed ZeRO shards, consolidated with DeepSpeed's own zero_to_fp32,
so any ZeRO stage and worker count loads).
"""

from __future__ import annotations

import os
from typing import Any

from trainers.config import ConfigError, RunSpec
from trainers.data import PreparedData, check_data, load_tokenizer, localize, prepare_dataset
from trainers.model import load_tokenizer_for


def evaluate_checkpoint(spec: RunSpec, checkpoint: str) -> dict[str, Any]:
    """Metrics (same keys as training's eval) of `checkpoint` on the run's validation set."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainers.launch import TrainingFailedError, _datasets, _root_message

    if "://" not in checkpoint and not os.path.isdir(checkpoint):
        raise ConfigError([f"--checkpoint={checkpoint}: folder not found. Pass <run>/final or a "
                           "checkpoint_step_* folder of the run."])
    problems = check_data(spec)
    if problems:
        raise ConfigError(problems)
    data = prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))
    trainer = TorchTrainer(
        _eval_worker,
        train_loop_config={"spec": spec.model_dump(), "data": data.to_dict(),
                           "checkpoint": os.path.abspath(checkpoint) if "://" not in checkpoint else checkpoint},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.gpus_per_worker > 0,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(name=f"{spec.run.name}-eval", storage_path=os.path.abspath(spec.run.storage_path) if "://" not in spec.run.storage_path else spec.run.storage_path),
        datasets={"validation": _datasets(data)["validation"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingFailedError(_root_message(e)) from e
    return result.return_value


def _eval_worker(config: dict[str, Any]) -> dict[str, float]:
    import ray.train
    import torch

    from trainers.loop import _evaluate, _my_validation_batches
    from trainers.tasks import TASKS

    spec = RunSpec.model_validate(config["spec"])
    data = PreparedData(**config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = TASKS[spec.task.type]
    tokenizer = load_tokenizer(data.tokenizer_path)
    model = load_for_eval(spec, tokenizer, data, localize(config["checkpoint"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = _my_validation_batches(ray.train.get_dataset_shard("validation"), task, spec, pad_id, rank, world)
    with torch.no_grad():
        metrics = _evaluate(model, batches, task, data, world, spec, tokenizer)
    return metrics


def load_for_eval(spec: RunSpec, tokenizer, data: PreparedData, folder: str):
    """A model with the checkpoint's weights: HF export (adapter or full), a feature-extraction
    export (`trainers.features.load_feature_model`) or DeepSpeed shards."""
    import torch
    import transformers

    from trainers.loop import DS_TAG
    from trainers.model import build_model
    from trainers.tasks import TASKS

    if os.path.isdir(os.path.join(folder, DS_TAG)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = build_model(spec, tokenizer, data.label_names)
        full = os.path.join(folder, DS_TAG, "mp_rank_00_model_states.pt")
        if spec.deepspeed.zero_stage == 0:
            # Without ZeRO there are no shards to consolidate (zero_to_fp32 fails on them): rank 0
            # saved the whole module.
            state = torch.load(full, map_location="cpu", weights_only=False)["module"]
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lora_" in k or spec.method == "full"]:
            raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        return model.eval()
    from trainers.features import is_feature_export, load_feature_model

    if is_feature_export(folder):  # method=feature_extraction: frozen base + trained head
        return load_feature_model(folder)
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        import json

        import peft

        with open(os.path.join(folder, "adapter_config.json")) as f:
            peft_task = json.load(f).get("task_type")
        peft_cls = {"SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
                    "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
                    "SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
                    "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering}[peft_task]
        return peft_cls.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = TASKS[spec.task.type].model_class(transformers, spec, cfg)
    return cls.from_pretrained(folder, dtype=torch.float32).eval()
