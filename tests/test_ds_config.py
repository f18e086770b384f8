"""The generated DeepSpeed config follows the run config; user JSON and overrides win."""

import json

import pytest

from trainers.config_load import build_spec
from trainers.errors import ConfigError
from trainers.train.ds_config import build_ds_config

BASE = {"model": {"preset": "tiny-llama"}, "task": {"type": "causal_lm"}, "data": {"train_files": ["x"]}}


def test_zero3_offload_bf16_and_batch_sizes():
    spec = build_spec({**BASE, "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
                       "train": {"precision": "bf16", "micro_batch_size_per_worker": 4, "global_batch_size": 32,
                                 "max_grad_norm": 0.5},
                       "scaling": {"num_workers": 2}})
    cfg = build_ds_config(spec)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["bf16"] == {"enabled": True}
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 4, 32)
    assert cfg["gradient_clipping"] == 0.5


def test_user_json_and_overrides_are_merged_on_top(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 7}))
    spec = build_spec({**BASE, "deepspeed": {"zero_stage": 2, "config_file": str(f),
                                             "overrides": {"zero_optimization": {"overlap_comm": False}}}})
    cfg = build_ds_config(spec)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": False}
    assert cfg["steps_per_print"] == 7
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file=.*nope\.json: file not found"):
        build_spec({**BASE, "deepspeed": {"config_file": str(tmp_path / "nope.json")}})
