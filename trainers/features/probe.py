"""The frozen probe beside a classification fine-tune: what the base model's features already do.

`run_probe` is the entry point (driver side, on a connected Ray, before the fit; off with
train.probe_baseline=false): the run's config as `method: feature_extraction` with a
logistic-regression head (`probe_spec`)
  -> extract_features on the run's own prepared data, so the same train/validation split (the
     feature cache: a rerun, a resume or another method on the same base reads it back)
  -> train_head (standardized features, C by cross-validation on the training features)
  -> evaluate_head on the validation features: `probe/accuracy`, `probe/f1`, ...
The numbers are exactly what `method: feature_extraction` would report for this config, so a
fine-tune that ends below them has a cheaper config that does better. `probe_verdict` says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trainers.config import RunSpec
from trainers.config_load import build_spec
from trainers.errors import ConfigError

log = logging.getLogger("ferry.probe")

# The smallest gap that counts as below the probe, however many validation rows there are.
_TIE = 0.002


@dataclass
class Probe:
    """The probe's validation metrics (`probe/<metric>`, numbers only: they are reported with the
    run's metrics) and how they were made."""

    metrics: dict[str, float] = field(default_factory=dict)
    regularization_c_from: str | None = None
    feature_cache_hit: bool | None = None
    feature_cache: str | None = None
    seconds: float = 0.0
    validation_rows: int = 0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wants_probe(spec: RunSpec) -> bool:
    """A classification fine-tune with train.probe_baseline on (feature extraction is the probe)."""
    return (
        spec.train.probe_baseline
        and spec.task.type == "sequence_classification"
        and spec.method != "feature_extraction"
    )


def probe_spec(spec: RunSpec) -> RunSpec:
    """The run's config as `method: feature_extraction` with a logistic-regression head: same
    model, data, split, pooling and seed.

    Raises:
        ConfigError: the feature-extraction config is not valid (e.g. a quantized base).
    """
    raw = spec.model_dump(mode="json")
    raw["method"] = "feature_extraction"
    raw["features"]["head"] = "logistic_regression"
    raw["stages"] = None
    return build_spec(raw)


def run_probe(spec: RunSpec, data) -> Probe:
    """The frozen probe of the run's base model on its prepared data (`trainers.data.prepare.
    PreparedData`). A probe that cannot run (no validation rows, a config feature extraction
    refuses) is skipped with the reason, never failing the run it stands beside."""
    from trainers.features.extract import extract_features
    from trainers.features.head import evaluate_head, read_features, train_head

    t0 = time.perf_counter()
    if not data.validation_rows:
        return Probe(skipped="no validation rows to score the probe on")
    try:
        frozen = probe_spec(spec)
    except ConfigError as e:
        return Probe(skipped="feature extraction refuses this config: " + "; ".join(e.problems))
    features = extract_features(frozen, data)
    head, _, info = train_head(frozen, features, data.label_names)
    x, y = read_features(features.validation_path)
    scores = evaluate_head(head, x, y, data.label_names)
    metrics = {f"probe/{k.removeprefix('eval/')}": v for k, v in scores.items()}
    metrics["probe/regularization_c"] = info["head_regularization_c"]
    probe = Probe(
        metrics=metrics,
        regularization_c_from=info["head_regularization_c_from"],
        feature_cache_hit=features.cache_hit,
        feature_cache=features.path,
        seconds=round(time.perf_counter() - t0, 2),
        validation_rows=len(y),
    )
    log.info(
        "frozen probe: accuracy %.4f, F1 %.4f (%s features, %.1fs)",
        metrics["probe/accuracy"],
        metrics["probe/f1"],
        "cached" if features.cache_hit else "extracted",
        probe.seconds,
    )
    return probe


def probe_gain(final: dict[str, Any], probe: Probe) -> dict[str, float]:
    """The fine-tune's metric minus the probe's, for each metric both have (`accuracy`, `f1`,
    ...; loss is left out: lower is better there)."""
    return {
        name: final[f"eval/{name}"] - value
        for key, value in probe.metrics.items()
        if (name := key.removeprefix("probe/")) != "loss" and f"eval/{name}" in final
    }


def probe_verdict(
    gain: dict[str, float], method: str, best_metric: str, validation_rows: int
) -> str | None:
    """One line when the fine-tune ended below its frozen probe, else None. Judged on the metric
    the run ranks its checkpoints by (train.best_metric) when the probe has it, else accuracy; a
    gap of one validation row or less is a tie (on 200 rows one row moves accuracy by 0.005)."""
    name = best_metric.removeprefix("eval/")
    name = name if name in gain else "accuracy"
    if name not in gain or gain[name] >= -max(_TIE, 1.0 / max(validation_rows, 1)) - 1e-12:
        return None
    rank = ", LoRA rank" if method == "lora" else ""
    return (
        f"the fine-tune ended below the frozen probe ({name} {gain[name]:+.4f}): likely too few "
        f"steps, the learning rate{rank} or overfitting; `method: feature_extraction` does the "
        "probe's job for a fraction of the cost (--set method=feature_extraction)"
    )
