"""method=feature_extraction: a frozen model's pooled embeddings -> a feature cache -> a small head.

`trainers.train.features.train_features` is the entry point (driver side;
`trainers.train.launch.train` dispatches there after preflight); this module extracts and caches
the features. Stages:
  prepare_dataset (the spine's tokenized Parquet cache; a preset's tokenizer is trained there)
  -> extract_features: Ray Data `read_parquet` of the tokenized splits -> `map_batches` on an
     actor pool of features.num_actors (each actor loads the frozen model once), or, for at most
     features.in_process_max_rows rows, the same embedder in the driver process (an actor pool's
     fixed cost outweighs small extractions) -> pooled hidden states of features.layer -> Parquet
     at `<cache_dir>/features-<key>/{train,validation}`, key = hash(tokenized cache key, model
     identity, pooling, layer). Written to a temporary folder and published by rename with a
     completion marker last, like the spine's cache; a rerun with the same key skips extraction
     ("feature cache hit").
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
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from trainers.config import ModelConfig, RunSpec
from trainers.data.prepare import PreparedData
from trainers.device import compute_device, compute_dtype
from trainers.model import (
    PRESETS,
    load_pretrained,
    load_tokenizer,
    model_config,
    requested_attention,
)
from trainers.storage import filesystem, publish, read_marker, with_scheme
from trainers.tasks.common import pad_flat

log = logging.getLogger("ferry.features")

_FEATURES_VERSION = 1  # bump when the feature cache format or the pooling code changes
# Forward batches per actor call: the rows of one call are sorted by length before batching, so a
# larger call cuts more padding; 16 keeps a call's rows (and its output) a few MB.
_BATCHES_PER_CALL = 16


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
    extracted_in: str | None = None  # "in_process" / "actor_pool" (extraction_place); None on a hit

    @property
    def train_path(self) -> str:
        return self.path + "/train"

    @property
    def validation_path(self) -> str:
        return self.path + "/validation"


def check_features(spec: RunSpec) -> list[str]:
    """Driver-side checks of the features block against the model's config (no weights loaded),
    and of the actor pool against the cluster when Ray is connected."""
    if spec.method != "feature_extraction":
        return []
    f, problems = spec.features, []
    try:
        cfg = model_config(spec, None, None)
    except (OSError, ValueError) as e:
        return [
            f"model.name_or_path={spec.model.name_or_path}: cannot read the model config ({e}). "
            "Fix the path or model id."
        ]
    layers = getattr(cfg, "num_hidden_layers", None)
    if layers is not None and not -(layers + 1) <= f.layer <= layers:
        problems.append(
            f"features.layer={f.layer}: this model has {layers} layers, so the layer must be "
            "between "
            f"{-(layers + 1)} and {layers} (0 = embeddings, -1 = last). Pick a layer in that range."
        )
    if f.pooling == "cls" and _is_decoder_only(cfg):
        log.warning(
            "features.pooling=cls on a decoder-only model (%s): its first token has seen "
            "nothing else; mean or last_token pooling usually works better.",
            cfg.model_type,
        )
    if "lora" in spec.model_fields_set or "deepspeed" in spec.model_fields_set:
        log.warning(
            "method=feature_extraction: the lora and deepspeed blocks are ignored "
            "(the model is frozen; the head trains without DeepSpeed)."
        )
    import ray

    if ray.is_initialized():
        s = spec.scaling
        need = f.num_actors * s.cpus_per_worker + s.data_cpus
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if need > cpus + 1e-9:
            problems.append(
                f"features.num_actors={f.num_actors}: {f.num_actors} actors x "
                "scaling.cpus_per_worker="
                f"{s.cpus_per_worker:g} + scaling.data_cpus={s.data_cpus:g} = {need:g} CPUs, but "
                "the "
                f"cluster has {cpus:g}. Lower features.num_actors or scaling.cpus_per_worker."
            )
    return problems


def _is_decoder_only(cfg) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = cfg.model_type
    return (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def extract_features(spec: RunSpec, data: PreparedData) -> FeatureCache:
    """Pooled embeddings of every tokenized row, cached; a cache hit skips the model entirely."""
    t0 = time.perf_counter()
    fs, root = filesystem(spec.cache_dir)
    key = feature_cache_key(spec, data)
    final = f"{root}/features-{key}"
    meta = read_marker(fs, final)
    if meta is not None:
        log.info("feature cache hit: %s", final)
        return FeatureCache(
            **{
                **meta,
                "path": with_scheme(spec.cache_dir, final),
                "base_path": with_scheme(spec.cache_dir, meta["base_path"])
                if meta["base_path"]
                else None,
                "cache_hit": True,
                "extract_s": time.perf_counter() - t0,
            }
        )

    partial = f"{root}/features-{key}.partial-{uuid.uuid4().hex[:8]}"
    fs.create_dir(partial)
    base_ref = pretrained_ref(spec)
    base_path = None
    if spec.model.preset:
        # A preset's random-init base exists nowhere else: build it once here (seeded), keep it
        # with its features, and let every actor (and later the export) load the same weights.
        _save_pretrained(
            _build_preset_base(spec, load_tokenizer(data.tokenizer_path)), fs, f"{partial}/base"
        )
        base_path = f"{final}/base"
        base_ref = {
            "name_or_path": with_scheme(spec.cache_dir, f"{partial}/base"),
            "attn_implementation": spec.model.attn_implementation,
        }
    rows = data.train_rows + data.validation_rows
    where = extraction_place(spec, rows)
    if where == "in_process":
        _embed_in_process(spec, data, base_ref, fs, partial)
    else:
        _embed_on_actor_pool(spec, data, base_ref, fs, partial)
    counts = {
        split: _row_count(with_scheme(spec.cache_dir, f"{partial}/{split}"))
        for split in ("train", "validation")
    }
    dim = _feature_dim(with_scheme(spec.cache_dir, f"{partial}/train"))
    meta = {
        "dim": dim,
        "train_rows": counts["train"],
        "validation_rows": counts["validation"],
        "base_path": base_path,
    }
    publish(fs, partial, final, meta)
    elapsed = time.perf_counter() - t0
    log.info(
        "features extracted: %d + %d rows x %d dims in %.1fs (%s) -> %s",
        counts["train"],
        counts["validation"],
        dim,
        elapsed,
        "in this process" if where == "in_process" else f"{spec.features.num_actors} actor(s)",
        final,
    )
    return FeatureCache(
        **{
            **meta,
            "path": with_scheme(spec.cache_dir, final),
            "base_path": with_scheme(spec.cache_dir, base_path) if base_path else None,
            "extract_s": elapsed,
            "extracted_in": where,
        }
    )


def extraction_place(spec: RunSpec, rows: int) -> str:
    """ "in_process" (this driver process) or "actor_pool" (Ray Data actors) for `rows` rows.

    An actor pool's fixed cost (an actor process, the model load, Ray Data's read, union and write
    tasks: 20-40 s on 2 cores) is more than a few thousand rows' forward passes of a small model,
    so small extractions (features.in_process_max_rows) run here. A run that asks for GPUs keeps
    the pool unless this process sees one: a driver on a CPU head node would be slower."""
    f = spec.features
    if rows > f.in_process_max_rows:
        return "actor_pool"
    if spec.scaling.gpus_per_worker > 0 and not torch.cuda.is_available():
        return "actor_pool"
    return "in_process"


def _embed_in_process(spec: RunSpec, data: PreparedData, base_ref: dict, fs, partial: str) -> None:
    """Both splits through one `_Embedder` in this process, written as `<partial>/<split>`; the
    rows of a split are sorted by length together (less padding than per-call sorting)."""
    f = spec.features
    embedder = _Embedder(
        spec.model_dump(), base_ref, data.tokenizer_path, f.pooling, f.layer, f.batch_size
    )
    for split, source in (("train", data.train_path), ("validation", data.validation_path)):
        src_fs, src = filesystem(source)
        table = pq.read_table(src, filesystem=src_fs)
        fs.create_dir(f"{partial}/{split}")
        pq.write_table(embedder(table), f"{partial}/{split}/part-00000.parquet", filesystem=fs)


def _embed_on_actor_pool(
    spec: RunSpec, data: PreparedData, base_ref: dict, fs, partial: str
) -> None:
    """Both splits through a Ray Data actor pool of features.num_actors, written as
    `<partial>/<split>`."""
    import ray.data

    f = spec.features
    # Both splits in one pass through one actor pool (each actor loads the model once; an actor
    # start costs seconds), written partitioned by split, then moved to train/ and validation/.
    tagged = [
        ray.data.read_parquet(source).map_batches(
            _tag_split, batch_format="pyarrow", fn_kwargs={"split": split}
        )
        for split, source in (("train", data.train_path), ("validation", data.validation_path))
    ]
    embedded = (
        tagged[0]
        .union(tagged[1])
        .map_batches(
            _Embedder,
            batch_size=rows_per_call(
                f.batch_size, f.num_actors, data.train_rows + data.validation_rows
            ),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=f.num_actors),
            fn_constructor_kwargs={
                "spec_dict": spec.model_dump(),
                "base_ref": base_ref,
                "tokenizer_path": data.tokenizer_path,
                "pooling": f.pooling,
                "layer": f.layer,
                "batch_size": f.batch_size,
                "threads": max(1, math.floor(spec.scaling.cpus_per_worker)),
            },
            num_cpus=spec.scaling.cpus_per_worker,
            num_gpus=spec.scaling.gpus_per_worker,
        )
    )
    embedded.write_parquet(
        with_scheme(spec.cache_dir, f"{partial}/by_split"), partition_cols=["split"]
    )
    for split in ("train", "validation"):
        fs.move(f"{partial}/by_split/split={split}", f"{partial}/{split}")
    fs.delete_dir(f"{partial}/by_split")


def rows_per_call(batch_size: int, num_actors: int, rows: int) -> int:
    """Rows Ray Data hands an actor per call: up to _BATCHES_PER_CALL forward batches (room to
    sort rows by length, few Ray round trips), but no more than each actor's even share, so
    that every actor of the pool gets work."""
    share = -(-rows // num_actors)
    share_in_batches = -(-share // batch_size) * batch_size
    return max(batch_size, min(batch_size * _BATCHES_PER_CALL, share_in_batches))


def feature_cache_key(spec: RunSpec, data: PreparedData) -> str:
    """Hash of what determines the features: the tokenized data (its own content-hash key covers
    the files, tokenizer and preprocessing settings), the frozen model, pooling and layer."""
    tokenized_key = data.cache_path.rstrip("/").rsplit("/", 1)[-1]
    parts = [
        _FEATURES_VERSION,
        tokenized_key,
        _model_identity(spec),
        spec.features.pooling,
        spec.features.layer,
    ]
    if compute_dtype(spec) != torch.float32:  # bf16/fp16 features differ; fp32 keys unchanged
        parts.append(str(compute_dtype(spec)))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _model_identity(spec: RunSpec) -> list:
    m = spec.model
    if m.preset:
        # A preset's weights are its shape plus the seed of its random init.
        return ["preset", m.preset, m.preset_vocab_size, PRESETS.get(m.preset), spec.run.seed]
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

    def __init__(
        self,
        spec_dict: dict,
        base_ref: dict,
        tokenizer_path: str,
        pooling: str,
        layer: int,
        batch_size: int,
        threads: int | None = None,
    ):
        spec = RunSpec.model_validate(spec_dict)
        if threads:
            # An actor: one torch thread per reserved CPU. Ray sets OMP_NUM_THREADS that way only
            # when the driver's environment left it unset, and torch's default (every core of the
            # node) makes two actors on one node fight over the cores. In process: left alone.
            torch.set_num_threads(threads)
        tokenizer = load_tokenizer(tokenizer_path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # On the actor's GPU, in the run's precision, when it has one (features stay float32).
        self.device, dtype = compute_device(spec)
        self.model = load_backbone(base_ref, dtype).to(self.device)
        self.pooling, self.layer, self.batch_size = pooling, layer, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = embed_rows(
            self.model,
            batch.column("input_ids"),
            self.pad_id,
            self.pooling,
            self.layer,
            self.batch_size,
            self.device,
        )
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        features = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        return batch.drop_columns(["input_ids"]).append_column("features", features)


def embed_rows(
    model,
    input_ids: pa.Array | pa.ChunkedArray,
    pad_id: int,
    pooling: str,
    layer: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Pooled features [rows, hidden] (float32) of token-id rows, in the rows' own order.

    Rows are sorted by length and embedded `batch_size` at a time, each forward padded only to
    its own longest row: rows of similar length share a batch, so little compute goes to padding.
    The features match an unsorted pass within float rounding (padding is masked out).
    """
    ids = input_ids.combine_chunks() if isinstance(input_ids, pa.ChunkedArray) else input_ids
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    values = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        picked = np.concatenate([values[starts[r] : starts[r] + lengths[r]] for r in rows])
        padded, mask = pad_flat(picked, lengths[rows], pad_id)
        with torch.inference_mode():
            vectors = embed(
                model,
                torch.from_numpy(padded).to(device),
                torch.from_numpy(mask.astype(np.int64)).to(device),
                pooling,
                layer,
            )
        if out is None:
            out = np.empty((len(order), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors.cpu().numpy()
    if out is None:  # an empty batch: its width is the model's hidden size
        return np.empty((0, model.config.hidden_size), dtype=np.float32)
    return out


def embed(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str, layer: int
) -> torch.Tensor:
    """Pooled hidden states [batch, hidden] of `layer` (0 = embeddings, -1 = last). Works with
    left or right padding: positions come from the attention mask."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = out.hidden_states[layer].float()
    mask = attention_mask.to(states.dtype)
    rows = torch.arange(states.shape[0], device=states.device)
    if pooling == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if pooling == "cls":
        return states[rows, attention_mask.argmax(1)]  # first real token
    positions = torch.arange(states.shape[1], device=states.device).expand_as(attention_mask)
    return states[rows, (positions * attention_mask).argmax(1)]  # last real token


def load_backbone(ref: dict, dtype: torch.dtype = torch.float32):
    """The frozen AutoModel (no task head) named by `ref` (a model config's name_or_path,
    revision, gguf_file, trust_remote_code), in `dtype`, in eval mode without gradients."""
    import transformers

    model = load_pretrained(transformers.AutoModel, ModelConfig.model_validate(ref), dtype=dtype)
    return model.eval().requires_grad_(False)


def pretrained_ref(spec: RunSpec) -> dict:
    m = spec.model
    return {
        "name_or_path": m.name_or_path,
        "revision": m.revision,
        "gguf_file": m.gguf_file,
        "trust_remote_code": m.trust_remote_code,
        "attn_implementation": m.attn_implementation,
    }


def _build_preset_base(spec: RunSpec, tokenizer):
    import transformers

    torch.manual_seed(spec.run.seed)
    return transformers.AutoModel.from_config(
        model_config(spec, tokenizer, None), attn_implementation=requested_attention(spec.model)
    ).eval()


def _save_pretrained(obj, fs, path: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ferry-") as tmp:
        obj.save_pretrained(tmp)
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)


def _row_count(path: str) -> int:
    fs, p = filesystem(path)
    return sum(f.metadata.num_rows for f in pq.ParquetDataset(p, filesystem=fs).fragments)


def _feature_dim(path: str) -> int:
    fs, p = filesystem(path)
    return pq.ParquetDataset(p, filesystem=fs).schema.field("features").type.list_size
