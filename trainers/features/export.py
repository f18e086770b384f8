"""Write a feature-extraction export through the one export writer (`trainers.export`)."""

from __future__ import annotations

import json
import os
import shutil

from safetensors.torch import save_file

from trainers.config import RunSpec
from trainers.data.prepare import PreparedData
from trainers.export import write_export
from trainers.features.extract import FeatureCache, pretrained_ref
from trainers.features.head import HEAD_FILE, META_FILE
from trainers.model import load_tokenizer
from trainers.storage import BASE_DIR, localize


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
