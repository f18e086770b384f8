"""The one writer of a run's export (`<run>/final`): a plain Hugging Face folder.

`write_export` writes what every export holds (weights, tokenizer, labels.json, metrics.json,
ferry_run.yaml) to a temporary folder and copies it into place, so a half-written export is never
read. `export_model` is its fine-tuning form (full weights or a LoRA adapter, whose base travels
with it when it exists nowhere a plain `peft` load could find it); `export_checkpoint` exports any
committed checkpoint of a run; `export_features` writes a feature-extraction head with the same
writer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file

from trainers.config import RunSpec
from trainers.config_load import dump_spec
from trainers.data.prepare import PreparedData
from trainers.features.extract import FeatureCache, pretrained_ref
from trainers.features.head import HEAD_FILE, META_FILE
from trainers.model import load_tokenizer
from trainers.saved import load_saved
from trainers.storage import BASE_DIR, RUN_CONFIG_FILE, STATE_FILE, is_uri, localize, upload_dir


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    export_dir: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    data: Any  # trainers.data.prepare.PreparedData
    # trainers.tracking.RunTracking.summary(): curves, MLflow run, TensorBoard folder, problems.
    tracking: dict[str, Any] | None = None


def summary(
    spec: RunSpec,
    history: list[dict],
    before: dict | None,
    steps: int,
    data: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """metrics.json: the last evaluation (`final`), the one before training, steps, method, task,
    the training data's token figures (`data/packing_efficiency`, `data/trained_token_share`
    where they apply) and whatever the caller adds (e.g. the checkpoint it came from)."""
    return {
        "final": dict(history[-1]) if history else {},
        "before": before,
        "steps": steps,
        "method": spec.method,
        "task": spec.task.type,
        **(getattr(data, "stats", None) or {}),
        **extra,
    }


def write_export(
    export_dir: str,
    spec: RunSpec,
    save_weights: Callable[[str], None],
    tokenizer,
    label_names: list[str] | None,
    metrics: dict[str, Any],
) -> str:
    """Write one export: `save_weights(folder)` puts the model files in, the rest is common."""
    with tempfile.TemporaryDirectory(prefix="ferry-export-") as tmp:
        save_weights(tmp)
        tokenizer.save_pretrained(tmp)
        if label_names:
            with open(os.path.join(tmp, "labels.json"), "w") as f:
                json.dump(label_names, f)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
            f.write(dump_spec(spec))
        upload_dir(tmp, export_dir)
    return export_dir


def export_model(
    model,
    state_dict: dict[str, torch.Tensor],
    spec: RunSpec,
    tokenizer,
    label_names: list[str] | None,
    metrics: dict[str, Any],
    export_dir: str,
) -> str:
    """Export a trained model (a PeftModel under LoRA) whose full `state_dict` was gathered (under
    ZeRO-3 collectively, by every rank). Weights are saved in float32 whatever the training
    precision."""
    state_dict = {k: v.detach().to(torch.float32).cpu() for k, v in state_dict.items()}

    def save_weights(folder: str) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        if spec.method == "lora":
            _check_adapter_nonempty(folder)
            if base_travels_with_adapter(spec):
                _save_base(model, state_dict, folder, export_dir)

    return write_export(export_dir, spec, save_weights, tokenizer, label_names, metrics)


def export_checkpoint(
    spec: RunSpec, data, checkpoint: str, export_dir: str, extra: dict | None = None
) -> str:
    """Write a committed Ray Train checkpoint of the run (DeepSpeed ZeRO shards of any stage and
    world size) as an export with the same layout as a finished run's `<run>/final`."""
    tokenizer = load_tokenizer(data.tokenizer_path)
    local = localize(checkpoint)
    model = load_saved(spec, tokenizer, data, local)
    with open(os.path.join(local, STATE_FILE)) as f:
        state = json.load(f)
    metrics = summary(
        spec,
        state.get("history") or [],
        state.get("before"),
        state["step"],
        data,
        checkpoint=checkpoint,
        **(extra or {}),
    )
    return export_model(
        model, model.state_dict(), spec, tokenizer, data.label_names, metrics, export_dir
    )


def base_travels_with_adapter(spec: RunSpec) -> bool:
    """Whether a LoRA export must carry its base model: a preset's random init exists nowhere
    else; a GGUF file is not a folder `peft` can load; a model inside an installed Python package
    lives at a site-packages path that is this machine's only. A Hub id or the user's own model
    folder is referenced as it is."""
    m = spec.model
    return bool(
        m.preset or m.gguf_file or (m.name_or_path and m.name_or_path.startswith("python-package:"))
    )


def _save_base(peft_model, state_dict, folder: str, export_dir: str) -> None:
    """Save the (frozen, hence unchanged) base weights to <export>/base in HF format and point
    the adapter at them."""
    base = {}
    for key, value in state_dict.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        base[key.replace(".original_module.", ".")] = value
    inner = peft_model.get_base_model()
    model = type(inner)(inner.config)
    # Every base weight accounted for; tied weights (lm_head) may be absent from the dict.
    missing, unexpected = model.load_state_dict(base, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise RuntimeError(
            f"cannot rebuild the base model: missing {missing}, unexpected {unexpected}"
        )
    model.save_pretrained(os.path.join(folder, BASE_DIR), safe_serialization=True)
    cfg_path = os.path.join(folder, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    # PEFT resolves the base relative to the working directory, so a local export names its own
    # base folder absolutely; a remote export keeps the portable relative name, which Ferry's
    # loader resolves against the export (trainers.saved).
    cfg["base_model_name_or_path"] = (
        BASE_DIR if is_uri(export_dir) else os.path.join(os.path.abspath(export_dir), BASE_DIR)
    )
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def _check_adapter_nonempty(folder: str) -> None:
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    if not lora or any(v.numel() == 0 for v in lora.values()):
        raise RuntimeError(
            "exported LoRA adapter is empty (ZeRO-3 parameters were not gathered before saving)"
        )


def export_features(
    spec: RunSpec, data: PreparedData, features: FeatureCache, head, metrics: dict, export_dir: str
) -> str:
    """Write `<run>/final`: the head, its metadata with a pointer to the frozen base (a preset's
    base is copied into `base/`), tokenizer, labels, metrics and the resolved config."""
    f = spec.features
    base = pretrained_ref(spec)
    if features.base_path:
        base = {"name_or_path": BASE_DIR, "in_export": True}
    meta = {
        "head": f.head,
        "feature_dim": features.dim,
        "num_labels": len(data.label_names),
        "mlp_hidden_size": f.mlp_hidden_size,
        "pooling": f.pooling,
        "layer": f.layer,
        "labels": data.label_names,
        "base": base,
        "max_seq_length": spec.data.max_seq_length,
    }

    def save_weights(folder: str) -> None:
        save_file(
            {k: v.contiguous() for k, v in head.state_dict().items()},
            os.path.join(folder, HEAD_FILE),
        )
        if features.base_path:
            shutil.copytree(localize(features.base_path), os.path.join(folder, BASE_DIR))
        with open(os.path.join(folder, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)

    return write_export(
        export_dir,
        spec,
        save_weights,
        load_tokenizer(data.tokenizer_path),
        data.label_names,
        metrics,
    )
