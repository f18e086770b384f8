"""Evaluate a saved model on the run's validation data, distributed like training.

`evaluate_checkpoint` is the entry point. It accepts anything `trainers.saved.load_saved` loads:
a Ferry export (`<run>/final`) or a Ray Train checkpoint folder of the run.
"""

from __future__ import annotations

import os
from typing import Any

from trainers.config import RunSpec
from trainers.data.prepare import PreparedData
from trainers.device import bind_device, compute_device
from trainers.errors import ConfigError, TrainingFailedError, root_message
from trainers.model import load_tokenizer
from trainers.preflight import prepare_data
from trainers.saved import load_saved
from trainers.storage import absolute, is_uri, localize
from trainers.tasks import TASKS
from trainers.train.launch import ray_datasets
from trainers.train.loop import evaluate, validation_batches


def evaluate_checkpoint(spec: RunSpec, checkpoint: str) -> dict[str, Any]:
    """Metrics (same keys as training's eval) of `checkpoint` on the run's validation set."""
    return evaluate_checkpoints(spec, [checkpoint])[0]


def evaluate_checkpoints(spec: RunSpec, checkpoints: list[str]) -> list[dict[str, Any]]:
    """Metrics of each checkpoint, in order, from one distributed evaluation: the data is
    prepared and the workers start once, then load and evaluate the checkpoints in turn.

    Raises:
        ConfigError: a missing checkpoint folder, data or resource problems (all at once).
        TrainingFailedError: an evaluation worker failed.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    missing = [c for c in checkpoints if not is_uri(c) and not os.path.isdir(c)]
    if missing:
        raise ConfigError(
            [
                f"--checkpoint={c}: folder not found. Pass <run>/final or a "
                "checkpoint_step_* folder of the run."
                for c in missing
            ]
        )
    data = prepare_data(spec)
    trainer = TorchTrainer(
        _eval_worker,
        train_loop_config={
            "spec": spec.model_dump(),
            "data": data.to_dict(),
            "checkpoints": [absolute(c) for c in checkpoints],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.gpus_per_worker > 0,
            resources_per_worker=spec.scaling.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=f"{spec.run.name}-eval", storage_path=absolute(spec.run.storage_path)
        ),
        datasets=ray_datasets(data, ("validation",)),
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingFailedError(root_message(e)) from e
    return result.return_value


def _eval_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    import ray.train
    import torch

    spec = RunSpec.model_validate(config["spec"])
    data = PreparedData(**config["data"])
    bind_device()  # before the collectives of `evaluate`
    device, dtype = compute_device(spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    task = TASKS[spec.task.type]
    tokenizer = load_tokenizer(data.tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = validation_batches(
        ray.train.get_dataset_shard("validation"), task, spec, pad_id, rank, world
    )
    out = []
    for checkpoint in config["checkpoints"]:
        model = load_saved(spec, tokenizer, data, localize(checkpoint)).to(device, dtype)
        with torch.no_grad():
            out.append(evaluate(model, batches, task, data, world, spec, tokenizer))
    return out
