"""method=feature_extraction: a frozen model's pooled embeddings -> a feature cache -> a small head.

`train_features` is the entry point (driver side; `trainers.launch.train` dispatches here after its
checks). Stages:
  prepare_dataset (the spine's tokenized Parquet cache; a preset's tokenizer is trained there)
  -> extract_features: Ray Data `read_parquet` of the tokenized splits -> `map_batches` on an
     actor pool of features.num_actors (each actor loads the frozen model once) -> pooled hidden
     states of features.layer -> Parquet at `<cache_dir>/features-<key>/{train,validation}`,
     key = hash(tokenized cache key, model identity, pooling, layer). Written to a temporary
     folder and published by rename with a completion marker last, like the spine's cache; a
     rerun with the same key skips extraction ("feature cache hit").
  -> train_head: logistic regression (scikit-learn, on the driver) or a small MLP (torch; in
     process, or data-parallel through Ray Train when train rows >= features.distributed_min_rows)
  -> evaluate with `trainers.tasks.classification.metrics` (the keys fine-tuning reports)
  -> export `<run>/final`: head.safetensors, feature_head.json (head, pooling, layer, labels and a
     pointer to the frozen base; a preset's random-init base is saved in `final/base`), tokenizer,
     labels.json, metrics.json, ferry_run.yaml. `load_feature_model` loads it for predict/eval.

Train fields the MLP head uses: learning_rate, weight_decay, micro_batch_size_per_worker (rows per
step and worker), max_grad_norm; features.mlp_epochs replaces num_epochs. Scaling: actors reserve
scaling.cpus_per_worker/gpus_per_worker each; the distributed MLP uses scaling.num_workers.
LoRA and DeepSpeed settings do not apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from trainers.config import PACKAGE_PREFIX, RunSpec, dump_spec, resolve_package_path
from trainers.data import (
    _MARKER,
    PreparedData,
    _as_uri,
    _publish,
    _with_scheme,
    load_tokenizer,
    localize,
    prepare_dataset,
)
from trainers.launch import TrainingFailedError, TrainOutcome, _root_message
from trainers.model import _PRESETS, load_tokenizer_for, model_config
from trainers.tasks import classification

log = logging.getLogger("ferry.features")

_FEATURES_VERSION = 1  # bump when the feature cache format or the pooling code changes
_MLP_DROPOUT = 0.1
_LR_MAX_ITER = 2000
HEAD_FILE = "head.safetensors"
META_FILE = "feature_head.json"


@dataclass
class FeatureCache:
    """Where the extracted features live (travels to head workers as a dict)."""

    path: str
    dim: int
    train_rows: int
    validation_rows: int
    base_path: str | None  # a preset's frozen base, saved in the cache; None for pretrained models
    cache_hit: bool = False
    extract_s: float = 0.0

    @property
    def train_path(self) -> str:
        return self.path + "/train"

    @property
    def validation_path(self) -> str:
        return self.path + "/validation"


def train_features(spec: RunSpec) -> TrainOutcome:
    """Frozen features -> head -> metrics -> export, on the connected Ray cluster.

    Expects the driver-side checks (`trainers.launch.train`) to have passed.

    Raises:
        TrainingFailedError: the distributed head training failed.
    """
    t0 = time.perf_counter()
    data = prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))
    log.info("data: %d train / %d validation rows (cache %s)", data.train_rows, data.validation_rows,
             "hit" if data.cache_hit else "written")
    features = extract_features(spec, data)
    t_head = time.perf_counter()
    head, head_where = train_head(spec, features, data.label_names)
    x_val, y_val = _read_features(features.validation_path)
    metrics = evaluate_head(head, x_val, y_val, data.label_names)
    head_s = time.perf_counter() - t_head
    metrics.update({"train/wall_s": time.perf_counter() - t0, "features/extract_s": features.extract_s,
                    "features/head_s": head_s})
    summary = {"final": metrics, "before": None, "steps": 0, "method": spec.method,
               "task": spec.task.type, "head": spec.features.head, "head_trained": head_where,
               "feature_cache_hit": features.cache_hit, "feature_cache": features.path}
    export_dir = spec.run_dir + "/final"
    export_features(spec, data, features, head, summary, export_dir)
    log.info("%s head (%s): eval/accuracy %.4f, features %.1fs (%s), head %.1fs -> %s",
             spec.features.head, head_where, metrics["eval/accuracy"], features.extract_s,
             "cache hit" if features.cache_hit else "extracted", head_s, export_dir)
    return TrainOutcome(export_dir, summary, None, None, data)


def check_features(spec: RunSpec) -> list[str]:
    """Driver-side checks of the features block against the model's config (no weights loaded),
    and of the actor pool against the cluster when Ray is connected."""
    if spec.method != "feature_extraction":
        return []
    f, problems = spec.features, []
    try:
        cfg = model_config(spec, None, None)
    except (OSError, ValueError) as e:
        return [f"model.name_or_path={spec.model.name_or_path}: cannot read the model config ({e}). "
                "Fix the path or model id."]
    layers = getattr(cfg, "num_hidden_layers", None)
    if layers is not None and not -(layers + 1) <= f.layer <= layers:
        problems.append(
            f"features.layer={f.layer}: this model has {layers} layers, so the layer must be between "
            f"{-(layers + 1)} and {layers} (0 = embeddings, -1 = last). Pick a layer in that range."
        )
    if f.pooling == "cls" and _is_decoder_only(cfg):
        log.warning("features.pooling=cls on a decoder-only model (%s): its first token has seen "
                    "nothing else; mean or last_token pooling usually works better.", cfg.model_type)
    if "lora" in spec.model_fields_set or "deepspeed" in spec.model_fields_set:
        log.warning("method=feature_extraction: the lora and deepspeed blocks are ignored "
                    "(the model is frozen; the head trains without DeepSpeed).")
    import ray

    if ray.is_initialized():
        s = spec.scaling
        need = f.num_actors * s.cpus_per_worker + s.data_cpus
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if need > cpus + 1e-9:
            problems.append(
                f"features.num_actors={f.num_actors}: {f.num_actors} actors x scaling.cpus_per_worker="
                f"{s.cpus_per_worker:g} + scaling.data_cpus={s.data_cpus:g} = {need:g} CPUs, but the "
                f"cluster has {cpus:g}. Lower features.num_actors or scaling.cpus_per_worker."
            )
    return problems


def _is_decoder_only(cfg) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = cfg.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# --- extraction -------------------------------------------------------------------------------

def extract_features(spec: RunSpec, data: PreparedData) -> FeatureCache:
    """Pooled embeddings of every tokenized row, cached; a cache hit skips the model entirely."""
    import ray.data

    t0 = time.perf_counter()
    fs, root = pafs.FileSystem.from_uri(_as_uri(spec.cache_dir))
    key = feature_cache_key(spec, data)
    final = f"{root}/features-{key}"
    if fs.get_file_info(f"{final}/{_MARKER}").type == pafs.FileType.File:
        with fs.open_input_stream(f"{final}/{_MARKER}") as f:
            meta = json.loads(f.read())
        log.info("feature cache hit: %s", final)
        return FeatureCache(**{**meta, "path": _with_scheme(spec.cache_dir, final),
                               "base_path": _with_scheme(spec.cache_dir, meta["base_path"])
                               if meta["base_path"] else None,
                               "cache_hit": True, "extract_s": time.perf_counter() - t0})

    partial = f"{root}/features-{key}.partial-{uuid.uuid4().hex[:8]}"
    fs.create_dir(partial)
    base_ref = _pretrained_ref(spec)
    base_path = None
    if spec.model.preset:
        # A preset's random-init base exists nowhere else: build it once here (seeded), keep it
        # with its features, and let every actor (and later the export) load the same weights.
        _save_pretrained(_build_preset_base(spec, load_tokenizer(data.tokenizer_path)), fs, f"{partial}/base")
        base_path = f"{final}/base"
        base_ref = {"name_or_path": _with_scheme(spec.cache_dir, f"{partial}/base")}
    f = spec.features
    # Both splits in one pass through one actor pool (each actor loads the model once; an actor
    # start costs seconds), written partitioned by split, then moved to train/ and validation/.
    tagged = [ray.data.read_parquet(source).map_batches(_tag_split, batch_format="pyarrow",
                                                        fn_kwargs={"split": split})
              for split, source in (("train", data.train_path), ("validation", data.validation_path))]
    embedded = tagged[0].union(tagged[1]).map_batches(
        _Embedder,
        batch_size=f.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=f.num_actors),
        fn_constructor_kwargs={"base_ref": base_ref, "tokenizer_path": data.tokenizer_path,
                               "pooling": f.pooling, "layer": f.layer},
        num_cpus=spec.scaling.cpus_per_worker,
        num_gpus=spec.scaling.gpus_per_worker,
    )
    embedded.write_parquet(_with_scheme(spec.cache_dir, f"{partial}/by_split"), partition_cols=["split"])
    counts = {}
    for split in ("train", "validation"):
        fs.move(f"{partial}/by_split/split={split}", f"{partial}/{split}")
        counts[split] = _row_count(_with_scheme(spec.cache_dir, f"{partial}/{split}"))
    fs.delete_dir(f"{partial}/by_split")
    dim = _feature_dim(_with_scheme(spec.cache_dir, f"{partial}/train"))
    meta = {"dim": dim, "train_rows": counts["train"], "validation_rows": counts["validation"],
            "base_path": base_path}
    with fs.open_output_stream(f"{partial}/{_MARKER}") as fh:
        fh.write(json.dumps(meta).encode())
    _publish(fs, partial, final)
    elapsed = time.perf_counter() - t0
    log.info("features extracted: %d + %d rows x %d dims in %.1fs -> %s", counts["train"],
             counts["validation"], dim, elapsed, final)
    return FeatureCache(**{**meta, "path": _with_scheme(spec.cache_dir, final),
                           "base_path": _with_scheme(spec.cache_dir, base_path) if base_path else None,
                           "extract_s": elapsed})


def feature_cache_key(spec: RunSpec, data: PreparedData) -> str:
    """Hash of what determines the features: the tokenized data (its own content-hash key covers
    the files, tokenizer and preprocessing settings), the frozen model, pooling and layer."""
    tokenized_key = data.cache_path.rstrip("/").rsplit("/", 1)[-1]
    parts = [_FEATURES_VERSION, tokenized_key, _model_identity(spec), spec.features.pooling,
             spec.features.layer]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _model_identity(spec: RunSpec) -> list:
    m = spec.model
    if m.preset:
        # A preset's weights are its shape plus the seed of its random init.
        return ["preset", m.preset, m.preset_vocab_size, _PRESETS.get(m.preset), spec.run.seed]
    ident: list = [m.name_or_path, m.revision, m.gguf_file]
    source = m.source
    if source and os.path.isdir(source):
        # A local folder can be overwritten in place: its files' sizes and times identify it.
        for name in sorted(os.listdir(source)):
            st = os.stat(os.path.join(source, name))
            ident.append([name, st.st_size, st.st_mtime_ns])
    return ident


def _tag_split(batch: pa.Table, split: str) -> pa.Table:
    return batch.append_column("split", pa.array([split] * batch.num_rows, type=pa.string()))


class _Embedder:
    """One frozen model replica (a Ray Data actor): token ids -> pooled float32 features."""

    def __init__(self, base_ref: dict, tokenizer_path: str, pooling: str, layer: int):
        tokenizer = load_tokenizer(tokenizer_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.model = load_backbone(base_ref)
        self.pooling, self.layer = pooling, layer

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = {"input_ids": batch.column("input_ids").to_pylist(),
                "labels": batch.column("labels").to_pylist()}
        enc = classification.collate(rows, self.pad_id)
        with torch.inference_mode():
            vectors = embed(self.model, enc["input_ids"], enc["attention_mask"], self.pooling, self.layer)
        flat = pa.array(vectors.numpy().reshape(-1), type=pa.float32())
        features = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        return batch.drop_columns(["input_ids"]).append_column("features", features)


def embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
          layer: int) -> torch.Tensor:
    """Pooled hidden states [batch, hidden] of `layer` (0 = embeddings, -1 = last). Works with
    left or right padding: positions come from the attention mask."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = out.hidden_states[layer].float()
    mask = attention_mask.to(states.dtype)
    rows = torch.arange(states.shape[0])
    if pooling == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "cls":
        return states[rows, attention_mask.argmax(1)]  # first real token
    positions = torch.arange(states.shape[1]).expand_as(attention_mask)
    return states[rows, (positions * attention_mask).argmax(1)]  # last real token


def load_backbone(ref: dict):
    """The frozen AutoModel (no task head) named by `ref` (name_or_path, revision, gguf_file,
    trust_remote_code), in eval mode without gradients."""
    import transformers

    source = ref["name_or_path"]
    if source.startswith(PACKAGE_PREFIX):
        source = resolve_package_path(source)
    elif "://" in source:
        source = localize(source)
    model = transformers.AutoModel.from_pretrained(
        source, revision=ref.get("revision"), gguf_file=ref.get("gguf_file"),
        trust_remote_code=ref.get("trust_remote_code", False), dtype=torch.float32,
    )
    return model.eval().requires_grad_(False)


def _pretrained_ref(spec: RunSpec) -> dict:
    m = spec.model
    return {"name_or_path": m.name_or_path, "revision": m.revision, "gguf_file": m.gguf_file,
            "trust_remote_code": m.trust_remote_code}


def _build_preset_base(spec: RunSpec, tokenizer):
    import transformers

    torch.manual_seed(spec.run.seed)
    return transformers.AutoModel.from_config(model_config(spec, tokenizer, None)).eval()


def _save_pretrained(obj, fs, path: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ferry-") as tmp:
        obj.save_pretrained(tmp)
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


# --- head -------------------------------------------------------------------------------------

class _Standardize(torch.nn.Module):
    """(x - mean) / scale with the training features' statistics, stored with the head."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_head(kind: str, dim: int, num_labels: int, hidden: int) -> torch.nn.Sequential:
    """Logistic regression = standardize + linear; MLP = standardize + Linear-ReLU-Dropout-Linear."""
    if kind == "logistic_regression":
        return torch.nn.Sequential(_Standardize(dim), torch.nn.Linear(dim, num_labels))
    return torch.nn.Sequential(_Standardize(dim), torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                               torch.nn.Dropout(_MLP_DROPOUT), torch.nn.Linear(hidden, num_labels))


def train_head(spec: RunSpec, features: FeatureCache, label_names: list[str]
               ) -> tuple[torch.nn.Sequential, str]:
    """The trained head and where it trained ("driver" or "ray_train")."""
    f = spec.features
    mean, scale = _standardization(features.train_path)
    head = build_head(f.head, features.dim, len(label_names), f.mlp_hidden_size)
    head[0].mean.copy_(torch.from_numpy(mean))
    head[0].scale.copy_(torch.from_numpy(scale))
    if f.head == "logistic_regression":
        # scikit-learn holds the training features in driver memory (fine up to a few GB).
        return _fit_logistic_regression(spec, head, features), "driver"
    if features.train_rows >= f.distributed_min_rows:
        return _fit_mlp_distributed(spec, head, features), "ray_train"
    x, y = _read_features(features.train_path)
    torch.manual_seed(spec.run.seed)
    _fit_epochs(head, torch.from_numpy(x), torch.from_numpy(y), spec, spec.run.seed)
    return head.eval(), "driver"


def _fit_logistic_regression(spec: RunSpec, head, features: FeatureCache):
    from sklearn.linear_model import LogisticRegression

    x, y = _read_features(features.train_path)
    with torch.no_grad():
        z = head[0](torch.from_numpy(x)).numpy()
    clf = LogisticRegression(C=spec.features.regularization_c, max_iter=_LR_MAX_ITER,
                             random_state=spec.run.seed).fit(z, y)
    weight = np.zeros((head[1].out_features, z.shape[1]), dtype=np.float32)
    bias = np.zeros(head[1].out_features, dtype=np.float32)
    classes = clf.classes_.astype(int)
    if len(classes) == 2:
        # Binary: sklearn keeps one vector w with p(class 1) = sigmoid(w.x + b) = softmax([0, w.x + b]).
        weight[classes[1]], bias[classes[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        # A label absent from training keeps zero weights (never the argmax unless all tie).
        weight[classes], bias[classes] = clf.coef_, clf.intercept_
    with torch.no_grad():
        head[1].weight.copy_(torch.from_numpy(weight))
        head[1].bias.copy_(torch.from_numpy(bias))
    return head.eval()


def _fit_epochs(model, x: torch.Tensor, y: torch.Tensor, spec: RunSpec, seed: int) -> None:
    """features.mlp_epochs of shuffled AdamW steps over in-memory features (model may be DDP)."""
    t = spec.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(spec.features.mlp_epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(perm), t.micro_batch_size_per_worker):
            rows = perm[i:i + t.micro_batch_size_per_worker]
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

    from trainers.launch import _abs, _worker_resources

    trainer = TorchTrainer(
        _head_worker,
        train_loop_config={"spec": spec.model_dump(), "dim": features.dim,
                           "num_labels": head[-1].out_features,
                           "init": {k: v.numpy() for k, v in head.state_dict().items()}},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(spec),
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(name="head", storage_path=_abs(spec.run_dir)),
        datasets={"train": ray.data.read_parquet(features.train_path)},
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise TrainingFailedError(_root_message(e)) from e
    if result.error is not None:
        raise TrainingFailedError(_root_message(result.error))
    head.load_state_dict({k: torch.from_numpy(v) for k, v in result.return_value.items()})
    return head.eval()


def _head_worker(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-worker MLP training: config -> shard -> DDP model -> epochs of AdamW steps."""
    import ray.train
    import ray.train.torch

    spec = RunSpec.model_validate(config["spec"])
    torch.manual_seed(spec.run.seed)
    head = build_head("mlp", config["dim"], config["num_labels"], spec.features.mlp_hidden_size)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in config["init"].items()})
    model = ray.train.torch.prepare_model(head)
    # The shard is read once and kept in memory (rows x dim float32, small next to the model that
    # made them): streaming it again every epoch cost tens of seconds per epoch on a 2-core machine.
    x, y = _read_shard(ray.train.get_dataset_shard("train"))
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
    return classification.metrics(loss_sum, float(len(y)), logits.argmax(-1).tolist(), y.tolist(),
                                  label_names)


def _read_features(path: str) -> tuple[np.ndarray, np.ndarray]:
    fs, p = pafs.FileSystem.from_uri(_as_uri(path))
    table = pq.read_table(p, filesystem=fs, columns=["features", "labels"])
    return _matrix(table.column("features")), table.column("labels").to_numpy().astype(np.int64)


def _matrix(column) -> np.ndarray:
    """A (fixed-size) list<float32> column -> a [rows, dim] float32 array, without Python loops."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)


def _standardization(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training features, streamed batch by batch (the whole
    feature set need not fit in driver memory)."""
    fs, p = pafs.FileSystem.from_uri(_as_uri(path))
    n, total, squares = 0, 0.0, 0.0
    for fragment in pq.ParquetDataset(p, filesystem=fs).fragments:
        for batch in fragment.to_batches(columns=["features"]):
            x = _matrix(batch.column("features")).astype(np.float64)
            n, total, squares = n + len(x), total + x.sum(0), squares + (x * x).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    std[std < 1e-6] = 1.0  # a constant dimension carries nothing; do not divide by ~0
    return mean.astype(np.float32), std.astype(np.float32)


def _row_count(path: str) -> int:
    fs, p = pafs.FileSystem.from_uri(_as_uri(path))
    return sum(f.metadata.num_rows for f in pq.ParquetDataset(p, filesystem=fs).fragments)


def _feature_dim(path: str) -> int:
    fs, p = pafs.FileSystem.from_uri(_as_uri(path))
    return pq.ParquetDataset(p, filesystem=fs).schema.field("features").type.list_size


# --- export and loading -----------------------------------------------------------------------

def export_features(spec: RunSpec, data: PreparedData, features: FeatureCache, head, summary: dict,
                    export_dir: str) -> str:
    """Write `<run>/final`: the head, its metadata with a pointer to the frozen base (a preset's
    base is copied into `base/`), tokenizer, labels, metrics and the resolved config."""
    from safetensors.torch import save_file

    f = spec.features
    base = _pretrained_ref(spec)
    if features.base_path:
        base = {"name_or_path": "base", "in_export": True}
    meta = {"head": f.head, "feature_dim": features.dim, "num_labels": len(data.label_names),
            "mlp_hidden_size": f.mlp_hidden_size, "pooling": f.pooling, "layer": f.layer,
            "labels": data.label_names, "base": base, "max_seq_length": spec.data.max_seq_length}
    with tempfile.TemporaryDirectory(prefix="ferry-export-") as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(tmp, HEAD_FILE))
        if features.base_path:
            shutil.copytree(localize(features.base_path), os.path.join(tmp, "base"))
        load_tokenizer(data.tokenizer_path).save_pretrained(tmp)
        for name, obj in ((META_FILE, meta), ("labels.json", data.label_names), ("metrics.json", summary)):
            with open(os.path.join(tmp, name), "w") as fh:
                json.dump(obj, fh, indent=2)
        with open(os.path.join(tmp, "ferry_run.yaml"), "w") as fh:
            fh.write(dump_spec(spec))
        fs, path = pafs.FileSystem.from_uri(_as_uri(export_dir))
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)
    return export_dir


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
    head = build_head(meta["head"], meta["feature_dim"], meta["num_labels"], meta["mlp_hidden_size"])
    head.load_state_dict(load_file(os.path.join(local, HEAD_FILE)))
    return FeatureModel(load_backbone(base), head, meta["pooling"], meta["layer"]).eval()


def is_feature_export(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, META_FILE))
