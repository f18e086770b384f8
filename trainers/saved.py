"""The one loader of what Ferry saved: an export (`<run>/final`: full model, LoRA adapter, or a
feature-extraction head with its frozen base) or a Ray Train checkpoint folder (DeepSpeed ZeRO
shards of any stage and world size, consolidated with DeepSpeed's own zero_to_fp32).

`load_saved` is the entry point (evaluation, prediction, checkpoint export); `merge_adapter`
writes a LoRA export merged into its base as a plain model. A LoRA adapter is loaded with the
model class of its own PEFT task type, so every task Ferry trains loads and merges the same way.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from trainers.checkpoints import raise_if_damaged, verify_checkpoint
from trainers.config import RunSpec
from trainers.features.head import is_feature_export, load_feature_model
from trainers.model import build_model, requested_attention
from trainers.storage import (
    BASE_DIR,
    DS_TAG,
    MERGED_DIR,
    filesystem,
    is_uri,
    localize,
    read_json,
    upload_dir,
)
from trainers.tasks import TASKS

# PEFT task type (adapter_config.json) -> the transformers auto class of its base model.
_PEFT_BASE_CLASS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def load_saved(spec: RunSpec, tokenizer, data, folder: str):
    """A model (eval mode, float32) with the weights saved in local `folder`, with the run's
    attention kernel."""
    import transformers

    if is_checkpoint(folder):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        raise_if_damaged(folder, verify_checkpoint(folder))
        model = build_model(_fp32_rebuild(spec), tokenizer, data.label_names)
        full = os.path.join(folder, DS_TAG, "mp_rank_00_model_states.pt")
        if spec.deepspeed.zero_stage == 0:
            # Without ZeRO there are no shards to consolidate (zero_to_fp32 fails on them): rank 0
            # saved the whole module.
            state = torch.load(full, map_location="cpu", weights_only=False)["module"]
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lora_" in k or spec.method == "full"]:
            raise RuntimeError(
                f"checkpoint {folder} does not match the model: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        return model.eval()
    if is_feature_export(folder):  # method=feature_extraction: frozen base + trained head
        return load_feature_model(folder)
    attention = requested_attention(spec.model)
    if is_adapter(folder):
        return load_adapter(folder, attention)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = TASKS[spec.task.type].model_class(transformers, spec, cfg)
    return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()


def _fp32_rebuild(spec: RunSpec) -> RunSpec:
    """The run's model as the consolidated fp32 weights of a checkpoint load into: built in fp32
    whatever train.precision (the checkpoint keeps fp32 master weights), and a quantized base
    in full precision (only its adapter is exported, and bitsandbytes needs a CUDA GPU that
    the machine reading the checkpoint may lack)."""
    return spec.model_copy(
        update={
            "train": spec.train.model_copy(update={"precision": "fp32"}),
            "model": spec.model.model_copy(update={"quantization": None}),
        }
    )


def is_checkpoint(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, DS_TAG))


def is_adapter(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "adapter_config.json"))


def load_adapter(folder: str, attn_implementation: str | None = None):
    """A LoRA export as a PeftModel in float32: its base loaded with the class its task type
    names, from the export's own `base/` when it carries one (a moved or downloaded export still
    loads), with `attn_implementation` (None: transformers' default, sdpa where supported)."""
    import peft
    import transformers

    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    base_ref = cfg["base_model_name_or_path"]
    own_base = os.path.join(folder, BASE_DIR)
    if os.path.isdir(own_base):
        base_ref = own_base
    cls = getattr(transformers, _PEFT_BASE_CLASS[cfg["task_type"]])
    base = cls.from_pretrained(
        base_ref, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return peft.PeftModel.from_pretrained(base, folder).eval()


def merge_adapter(export_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the LoRA adapter merged into its base model to `<export_dir>/merged` (plain HF:
    weights, tokenizer, labels) in `dtype`, for any task Ferry trains. The merge itself runs in
    fp32. A QLoRA adapter is merged into its base as the checkpoint holds it (full precision),
    not into the 4-bit copy it trained against: the merged model differs from the training-time
    one by that quantization error, which is what a full-precision model can carry."""
    from transformers import AutoTokenizer

    local = localize(export_dir)
    merged = load_adapter(local).merge_and_unload().to(dtype)
    out = os.path.join(local, MERGED_DIR)
    merged.save_pretrained(out, safe_serialization=True)
    # A complete model folder: the tokenizer and label names travel with the weights.
    AutoTokenizer.from_pretrained(local).save_pretrained(out)
    if os.path.exists(os.path.join(local, "labels.json")):
        shutil.copy(os.path.join(local, "labels.json"), out)
    if is_uri(export_dir):
        upload_dir(out, f"{export_dir}/{MERGED_DIR}")
    return f"{export_dir}/{MERGED_DIR}"


def read_export_metrics(export_dir: str) -> dict:
    """An export's metrics.json."""
    return read_json(f"{export_dir}/metrics.json")


def export_exists(export_dir: str) -> bool:
    fs, path = filesystem(export_dir)
    return fs.get_file_info(f"{path}/metrics.json").type.name == "File"
