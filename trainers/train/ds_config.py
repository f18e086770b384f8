"""The DeepSpeed config, generated from the run config, with the user's JSON/overrides on top."""

from __future__ import annotations

import json
from typing import Any

from trainers.config import RunSpec


def build_ds_config(spec: RunSpec) -> dict[str, Any]:
    """ZeRO stage, offload, precision, batch sizes and clipping as a DeepSpeed config dict."""
    ds, t = spec.deepspeed, spec.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {
            "device": "cpu",
            "pin_memory": spec.scaling.gpus_per_worker > 0,
        }
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.scaling.gpus_per_worker > 0}
    if ds.zero_stage == 3:
        # Lets rank 0 gather a full 16-bit state dict for the HF export (PEFT+ZeRO-3 otherwise
        # saves empty adapters: peft#2500).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_worker,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.global_batch,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        # We pass a torch AdamW: DeepSpeed's fused/CPU Adam kernels JIT-compile (~90 s) and are
        # not needed at the sizes Ferry trains on CPU.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if ds.config_file:
        with open(ds.config_file) as f:
            cfg = _merge(cfg, json.load(f))
    return _merge(cfg, ds.overrides)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
