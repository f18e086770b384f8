"""The one writer of a run's export (`<run>/final`): a plain Hugging Face folder.

`write_export` writes what every export holds (weights, tokenizer, labels.json, metrics.json,
ferry_run.yaml) to a temporary folder and copies it into place, so a half-written export is never
read. `export_model` is its fine-tuning form (full weights or a LoRA adapter, whose base travels
with it when it exists nowhere a plain `peft` load could find it); `export_checkpoint` exports any
committed checkpoint of a run, and `find_checkpoint` names the one that `best`, `last` or a step
means (train.export=best after a fit, `ferry export`); `export_features` writes a
feature-extraction head with the same writer. `summary` is metrics.json.
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
from trainers.errors import ConfigError
from trainers.features.extract import FeatureCache, pretrained_ref
from trainers.features.head import HEAD_FILE, META_FILE
from trainers.model import load_tokenizer, torch_dtype
from trainers.saved import load_saved
from trainers.stopping import best_evaluation
from trainers.storage import (
    BASE_DIR,
    RUN_CONFIG_FILE,
    STATE_FILE,
    committed_checkpoints,
    filesystem,
    is_uri,
    join,
    localize,
    read_json,
    upload_dir,
    with_scheme,
)


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
    *,
    exported_step: int | None = None,
    export: str | None = None,
    early_stop: dict | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """metrics.json of a run whose evaluations are `history` and that trained `steps` steps.

    `final` is the evaluation of the exported model (the one at `exported_step`; the last when
    not given), `best` the best by train.best_metric, `last` the last one, `before` the one
    before training. With `exported_step`: `exported_step` and `export` (how the model was
    chosen: best, last or step; default train.export). `early_stop` ({reason, step} or None),
    method, task, the training data's token figures (`data/packing_efficiency`,
    `data/trained_token_share` where they apply) and whatever the caller adds (e.g. the
    checkpoint it came from)."""
    last = dict(history[-1]) if history else {}
    final = next((h for h in history if h.get("train/step") == exported_step), last)
    chosen = {}
    if exported_step is not None:
        chosen = {"exported_step": exported_step, "export": export or spec.train.export}
    return {
        "final": dict(final),
        "best": best_evaluation(history, spec.train.best_metric, spec.train.best_metric_mode),
        "last": last,
        "before": before,
        "steps": steps,
        **chosen,
        "early_stop": early_stop,
        "method": spec.method,
        "task": spec.task.type,
        **(getattr(data, "stats", None) or {}),
        **extra,
    }


def exported_step(spec: RunSpec, history: list[dict]) -> int | None:
    """The optimizer step whose model train.export names: the last evaluation's, or (best) the
    one with the best train.best_metric (the last when none has a finite value)."""
    if not history:
        return None
    t = spec.train
    best = best_evaluation(history, t.best_metric, t.best_metric_mode)
    chosen = best if t.export == "best" and best is not None else history[-1]
    return int(chosen["train/step"])


def write_export(
    export_dir: str,
    spec: RunSpec,
    save_weights: Callable[[str], None],
    tokenizer,
    label_names: list[str] | None,
    metrics: dict[str, Any],
) -> str:
    """Write one export: `save_weights(folder)` puts the model files in, the rest is common. An
    earlier export in `export_dir` is replaced, not merged (its merged/ or base/ would be
    stale)."""
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
        fs, path = filesystem(export_dir)
        if fs.get_file_info(path).type.name == "Directory":
            fs.delete_dir(path)
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
    ZeRO-3 collectively, by every rank), in export.dtype (`export_dtype`): a full model's
    tensors and config.json's dtype, or a LoRA adapter (and the base that travels with it)."""
    adapter = spec.method == "lora"
    state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}

    def save_weights(folder: str) -> None:
        weights = cast_floats(state_dict, export_dtype(spec, adapter=adapter))
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        if not adapter:
            stamp_dtype(folder, export_dtype(spec, adapter=False))
            return
        _check_adapter_nonempty(folder)
        if base_travels_with_adapter(spec):
            _save_base(model, state_dict, folder, export_dir, export_dtype(spec, adapter=False))

    return write_export(export_dir, spec, save_weights, tokenizer, label_names, metrics)


def export_dtype(spec: RunSpec, adapter: bool) -> torch.dtype:
    """export.dtype resolved: an explicit dtype as it says; auto = fp32 for a LoRA adapter,
    train.precision's dtype for full weights (a full model, a merged model, a base that
    travels with its adapter)."""
    if spec.export.dtype != "auto":
        return torch_dtype(spec.export.dtype)
    return torch.float32 if adapter else torch_dtype(spec.train.precision)


def cast_floats(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Floating-point tensors in `dtype`; others (a quantized base's packed integers) as they
    are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def stamp_dtype(folder: str, dtype: torch.dtype) -> None:
    """config.json's dtype set to what the tensors are: transformers writes the dtype of the
    module it saves from, which is not the exported one when a state dict of another dtype is
    passed (a checkpoint consolidated in fp32, a bf16 export)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def export_checkpoint(
    spec: RunSpec,
    data,
    checkpoint: str,
    export_dir: str,
    extra: dict | None = None,
    run_state: dict | None = None,
    export: str | None = None,
) -> str:
    """Write a committed Ray Train checkpoint of the run (DeepSpeed ZeRO shards of any stage and
    world size, consolidated here with DeepSpeed's zero_to_fp32) as an export with the same
    layout as a finished run's `<run>/final`.

    Args:
        run_state: the run's latest loop state (`find_checkpoint`), when the run went on after
            this checkpoint: metrics.json then also shows the run's last evaluation, steps and
            early stop. Default: the checkpoint's own.
        export: how the checkpoint was chosen (best, last, step), for metrics.json.
    """
    tokenizer = load_tokenizer(data.tokenizer_path)
    local = localize(checkpoint)
    model = load_saved(spec, tokenizer, data, local)
    with open(os.path.join(local, STATE_FILE)) as f:
        state = json.load(f)
    run = run_state or state
    metrics = summary(
        spec,
        run.get("history") or [],
        run.get("before"),
        run["step"],
        data,
        exported_step=state["step"],
        export=export,
        early_stop=run.get("early_stop"),
        checkpoint=checkpoint,
        **(extra or {}),
    )
    return export_model(
        model, model.state_dict(), spec, tokenizer, data.label_names, metrics, export_dir
    )


def find_checkpoint(spec: RunSpec, which: str | int) -> tuple[int, str, dict]:
    """The committed checkpoint of the run that `which` names: "best" (by train.best_metric and
    best_metric_mode over the run's evaluations), "last", or an optimizer step.

    Returns:
        (its step, its path, the run's latest loop state: the whole evaluation history).

    Raises:
        ConfigError: the run has no committed checkpoint, or none at that step (the message
            lists the steps it has).
    """
    result = committed_checkpoints(spec.run_dir)
    if result is None:
        raise ConfigError(
            [
                f"run={spec.run_dir}: no committed checkpoint (the run never reached its first "
                "evaluation, or it is not a Ray Train run folder). Pass the folder of a run "
                "that saved one, i.e. one with checkpoint_step_* folders."
            ]
        )
    by_step = {
        int(metrics["train/step"]): with_scheme(spec.run_dir, ckpt.path)
        for ckpt, metrics in result.best_checkpoints or []
        if "train/step" in metrics
    }
    latest = read_json(join(with_scheme(spec.run_dir, result.checkpoint.path), STATE_FILE))
    t = spec.train
    step: int | None = which if isinstance(which, int) else latest["step"]
    if which == "best":
        best = best_evaluation(latest.get("history") or [], t.best_metric, t.best_metric_mode)
        step = int(best["train/step"]) if best else None
    if step not in by_step:
        have = ", ".join(str(s) for s in sorted(by_step))
        raise ConfigError(
            [
                f"--checkpoint={which}: "
                + (
                    f"the run has no committed checkpoint at step {step}"
                    if step is not None
                    else f"no evaluation of the run has a finite {t.best_metric}"
                )
                + f" (kept: train.keep_best_checkpoints={t.keep_best_checkpoints} best by "
                f"{t.best_metric}, and the last). Use one of the steps it has: {have}."
            ]
        )
    return step, by_step[step], latest


def base_travels_with_adapter(spec: RunSpec) -> bool:
    """Whether a LoRA export must carry its base model: a preset's random init exists nowhere
    else; a GGUF file is not a folder `peft` can load; a model inside an installed Python package
    lives at a site-packages path that is this machine's only. A Hub id or the user's own model
    folder is referenced as it is."""
    m = spec.model
    return bool(
        m.preset or m.gguf_file or (m.name_or_path and m.name_or_path.startswith("python-package:"))
    )


def _save_base(peft_model, state_dict, folder: str, export_dir: str, dtype: torch.dtype) -> None:
    """Save the (frozen, hence unchanged) base weights to <export>/base in HF format, in `dtype`,
    and point the adapter at them."""
    base = {}
    for key, value in state_dict.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        base[key.replace(".original_module.", ".")] = value
    inner = peft_model.get_base_model()
    model = type(inner)(inner.config).to(dtype)
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
        base = {
            "name_or_path": BASE_DIR,
            "in_export": True,
            "attn_implementation": spec.model.attn_implementation,
        }
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
