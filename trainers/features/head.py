"""The head trained on frozen features (logistic regression or a small MLP), its metrics, and
the model a feature-extraction export loads as (frozen base + pooling + head).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainers.config import RunSpec
from trainers.device import bind_device
from trainers.errors import TrainingFailedError, root_message
from trainers.features.extract import FeatureCache, embed, load_backbone
from trainers.storage import absolute, filesystem, localize
from trainers.tasks import classification

_MLP_DROPOUT = 0.1
_LR_MAX_ITER = 2000
_CV_FOLDS = 5
_CV_CS = [float(x) for x in np.logspace(-4, 2, 13)]  # C from 1e-4 to 100, half a decade apart
HEAD_FILE = "head.safetensors"
META_FILE = "feature_head.json"


class _Standardize(torch.nn.Module):
    """(x - mean) / scale with the training features' statistics, stored with the head."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_head(kind: str, dim: int, num_labels: int, hidden: int) -> torch.nn.Sequential:
    """Logistic regression = standardize + linear; MLP = standardize +
    Linear-ReLU-Dropout-Linear."""
    if kind == "logistic_regression":
        return torch.nn.Sequential(_Standardize(dim), torch.nn.Linear(dim, num_labels))
    return torch.nn.Sequential(
        _Standardize(dim),
        torch.nn.Linear(dim, hidden),
        torch.nn.ReLU(),
        torch.nn.Dropout(_MLP_DROPOUT),
        torch.nn.Linear(hidden, num_labels),
    )


def train_head(
    spec: RunSpec, features: FeatureCache, label_names: list[str]
) -> tuple[torch.nn.Sequential, str, dict[str, Any]]:
    """The trained head, where it trained ("driver" or "ray_train") and what was chosen while
    training it (for metrics.json: the logistic regression's C and how it was chosen)."""
    f = spec.features
    mean, scale = _standardization(features.train_path)
    head = build_head(f.head, features.dim, len(label_names), f.mlp_hidden_size)
    head[0].mean.copy_(torch.from_numpy(mean))
    head[0].scale.copy_(torch.from_numpy(scale))
    if f.head == "logistic_regression":
        # scikit-learn holds the training features in driver memory (fine up to a few GB).
        head, info = _fit_logistic_regression(spec, head, features)
        return head, "driver", info
    if features.train_rows >= f.distributed_min_rows:
        return _fit_mlp_distributed(spec, head, features), "ray_train", {}
    x, y = read_features(features.train_path)
    torch.manual_seed(spec.run.seed)
    _fit_epochs(head, torch.from_numpy(x), torch.from_numpy(y), spec, spec.run.seed)
    return head.eval(), "driver", {}


def _fit_logistic_regression(spec: RunSpec, head, features: FeatureCache):
    """scikit-learn's logistic regression on the standardized features (`fit_logistic_regression`),
    copied into the head's linear layer."""
    x, y = read_features(features.train_path)
    with torch.no_grad():
        z = head[0](torch.from_numpy(x)).numpy()
    clf, c, how = fit_logistic_regression(z, y, spec.features.regularization_c, spec.run.seed)
    weight = np.zeros((head[1].out_features, z.shape[1]), dtype=np.float32)
    bias = np.zeros(head[1].out_features, dtype=np.float32)
    classes = clf.classes_.astype(int)
    if len(classes) == 2:
        # Binary: sklearn keeps one vector w with p(class 1) = sigmoid(w.x + b)
        # = softmax([0, w.x + b]).
        weight[classes[1]], bias[classes[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        # A label absent from training keeps zero weights (never the argmax unless all tie).
        weight[classes], bias[classes] = clf.coef_, clf.intercept_
    with torch.no_grad():
        head[1].weight.copy_(torch.from_numpy(weight))
        head[1].bias.copy_(torch.from_numpy(bias))
    return head.eval(), {"head_regularization_c": c, "head_regularization_c_from": how}


def fit_logistic_regression(z: np.ndarray, y: np.ndarray, c: float | None, seed: int):
    """(classifier, C, how C was chosen) for standardized features `z`: the feature head's rule,
    also `ferry select`'s probe. Without an explicit `c`, C is chosen by cross-validation on
    these rows only (a fixed C=1 overfit 384 MiniLM features on 800 rows: accuracy 0.655
    against 0.78 at the cross-validated C), so the default head is never worse than a tuned
    plain one."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    if c is None:
        counts = np.bincount(y)
        # A label with no training row at all is not a fold problem: only the present ones count.
        folds = int(min(_CV_FOLDS, counts[counts > 0].min())) if len(y) else 0
        if folds >= 2:
            # Scored by log loss, the quantity eval/loss reports (and what ranks checkpoints by
            # default): accuracy would pick among Cs that tie on a small validation fold.
            cv = LogisticRegressionCV(
                Cs=_CV_CS,
                cv=folds,
                scoring="neg_log_loss",
                max_iter=_LR_MAX_ITER,
                random_state=seed,
            ).fit(z, y)
            c, how = float(cv.C_[0]), f"{folds}-fold cross-validation"
        else:  # a class with a single training row: no fold could hold it out
            c, how = 1.0, "default (too few rows per class to cross-validate)"
    else:
        how = "features.regularization_c"
    clf = LogisticRegression(C=c, max_iter=_LR_MAX_ITER, random_state=seed).fit(z, y)
    return clf, c, how


def _fit_epochs(model, x: torch.Tensor, y: torch.Tensor, spec: RunSpec, seed: int) -> None:
    """features.mlp_epochs of shuffled AdamW steps over in-memory features (model may be DDP)."""
    t = spec.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(spec.features.mlp_epochs):
        # Drawn on the CPU (the same order on any device), then moved to index x and y.
        perm = torch.randperm(len(y), generator=order).to(y.device)
        for i in range(0, len(perm), t.micro_batch_size_per_worker):
            rows = perm[i : i + t.micro_batch_size_per_worker]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            opt.step()


def _fit_mlp_distributed(spec: RunSpec, head, features: FeatureCache):
    """Data-parallel MLP training (plain torch DDP) on Ray Train, each worker streaming its shard
    of the feature Parquet; rank 0 returns the weights."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _head_worker,
        train_loop_config={
            "spec": spec.model_dump(),
            "dim": features.dim,
            "num_labels": head[-1].out_features,
            "init": {k: v.numpy() for k, v in head.state_dict().items()},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.gpus_per_worker > 0,
            resources_per_worker=spec.scaling.resources_per_worker,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(name="head", storage_path=absolute(spec.run_dir)),
        datasets={"train": ray.data.read_parquet(features.train_path)},
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingFailedError(root_message(e)) from e
    if result.error is not None:
        raise TrainingFailedError(root_message(result.error))
    head.load_state_dict({k: torch.from_numpy(v) for k, v in result.return_value.items()})
    return head.eval()


def _head_worker(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-worker MLP training: config -> shard -> DDP model -> epochs of AdamW steps."""
    import ray.train
    import ray.train.torch

    spec = RunSpec.model_validate(config["spec"])
    device = bind_device()  # before DDP's collectives
    torch.manual_seed(spec.run.seed)
    head = build_head("mlp", config["dim"], config["num_labels"], spec.features.mlp_hidden_size)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in config["init"].items()})
    model = ray.train.torch.prepare_model(head)  # moved to `device`, wrapped in DDP
    # The shard is read once and kept in memory (rows x dim float32, small next to the model that
    # made them): streaming it again every epoch cost tens of seconds per epoch on a 2-core machine.
    x, y = _read_shard(ray.train.get_dataset_shard("train"))
    x, y = x.to(device), y.to(device)
    rank = ray.train.get_context().get_world_rank()
    # Ray's equal split gives every worker the same row count, hence the same number of steps
    # (DDP needs all ranks in every all-reduce).
    _fit_epochs(model, x, y, spec, spec.run.seed + rank)
    if rank != 0:
        return {}
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().numpy() for k, v in inner.state_dict().items()}


def _read_shard(shard) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
        xs.append(_matrix(batch.column("features")))
        ys.append(batch.column("labels").to_numpy().astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def evaluate_head(head, x: np.ndarray, y: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Fine-tuning's classification metrics; eval/loss = mean cross-entropy of the head."""
    with torch.no_grad():
        logits = head.eval()(torch.from_numpy(x))
        labels = torch.from_numpy(y).long()
        loss_sum = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return classification.metrics(
        loss_sum, float(len(y)), logits.argmax(-1).tolist(), y.tolist(), label_names
    )


def read_features(path: str) -> tuple[np.ndarray, np.ndarray]:
    fs, p = filesystem(path)
    table = pq.read_table(p, filesystem=fs, columns=["features", "labels"])
    return _matrix(table.column("features")), table.column("labels").to_numpy().astype(np.int64)


def _matrix(column) -> np.ndarray:
    """A (fixed-size) list<float32> column -> a [rows, dim] float32 array, without Python loops."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return (
        column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)
    )


def _standardization(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training features, streamed batch by batch (the whole
    feature set need not fit in driver memory)."""
    fs, p = filesystem(path)
    n, total, squares = 0, 0.0, 0.0
    for fragment in pq.ParquetDataset(p, filesystem=fs).fragments:
        for batch in fragment.to_batches(columns=["features"]):
            x = _matrix(batch.column("features")).astype(np.float64)
            n, total, squares = n + len(x), total + x.sum(0), squares + (x * x).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    std[std < 1e-6] = 1.0  # a constant dimension carries nothing; do not divide by ~0
    return mean.astype(np.float32), std.astype(np.float32)


class FeatureModel(torch.nn.Module):
    """Frozen base + pooling + head, called like a transformers classifier: `.logits` out."""

    def __init__(self, backbone, head: torch.nn.Sequential, pooling: str, layer: int):
        super().__init__()
        self.backbone, self.head, self.pooling, self.layer = backbone, head, pooling, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vectors = embed(self.backbone, input_ids, attention_mask, self.pooling, self.layer)
        return SequenceClassifierOutput(logits=self.head(vectors))


def load_feature_model(export_dir: str) -> FeatureModel:
    """A feature-extraction export (`<run>/final`) as a model mapping token batches to logits."""
    from safetensors.torch import load_file

    local = localize(export_dir)
    with open(os.path.join(local, META_FILE)) as fh:
        meta = json.load(fh)
    base = dict(meta["base"])
    if base.pop("in_export", False):
        base["name_or_path"] = os.path.join(local, base["name_or_path"])
    head = build_head(
        meta["head"], meta["feature_dim"], meta["num_labels"], meta["mlp_hidden_size"]
    )
    head.load_state_dict(load_file(os.path.join(local, HEAD_FILE)))
    return FeatureModel(load_backbone(base), head, meta["pooling"], meta["layer"]).eval()


def is_feature_export(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, META_FILE))
