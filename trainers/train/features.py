"""method=feature_extraction, end to end: features (cached) -> head -> metrics -> export.

`train_features` is the entry point; `trainers.train.launch.train` dispatches here after preflight
(the driver of a feature run beside the fine-tuning one; `trainers.features` holds its parts).
"""

from __future__ import annotations

import logging
import time

from trainers.export import TrainOutcome, export_features, summary
from trainers.features.extract import extract_features
from trainers.features.head import evaluate_head, read_features, train_head
from trainers.preflight import RunPlan

log = logging.getLogger("ferry.features")


def train_features(plan: RunPlan) -> TrainOutcome:
    """Frozen features -> head -> metrics -> export, on the connected Ray cluster.

    Raises:
        TrainingFailedError: the distributed head training failed.
    """
    spec, data = plan.spec, plan.data
    t0 = time.perf_counter()
    features = extract_features(spec, data)
    t_head = time.perf_counter()
    head, head_where, head_info = train_head(spec, features, data.label_names)
    x_val, y_val = read_features(features.validation_path)
    metrics = evaluate_head(head, x_val, y_val, data.label_names)
    head_s = time.perf_counter() - t_head
    metrics.update(
        {
            "train/wall_s": time.perf_counter() - t0,
            "features/extract_s": features.extract_s,
            "features/head_s": head_s,
        }
    )
    result = summary(
        spec,
        [metrics],
        None,
        0,
        head=spec.features.head,
        head_trained=head_where,
        feature_cache_hit=features.cache_hit,
        features_extracted_in=features.extracted_in,
        feature_cache=features.path,
        **head_info,
    )
    export_features(spec, data, features, head, result, spec.export_dir)
    log.info(
        "%s head (%s): eval/accuracy %.4f, features %.1fs (%s), head %.1fs -> %s",
        spec.features.head,
        head_where,
        metrics["eval/accuracy"],
        features.extract_s,
        "cache hit" if features.cache_hit else "extracted",
        head_s,
        spec.export_dir,
    )
    return TrainOutcome(spec.export_dir, result, None, None, data)
