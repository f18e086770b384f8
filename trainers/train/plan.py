"""The GPU memory plan of a run: which ZeRO stage, offload and micro-batch fit, before any weights
load.

`plan_run` is the entry point (`ferry plan`, and the worker's check before `ferry train` builds
the model: `fit_problems`). The model is built on the meta device (shapes, no memory), LoRA
applied when method=lora, so parameter counts are the run's own. Every figure is bytes per GPU
(one rank: Ferry runs one worker per GPU, so the ranks are `--gpus`, default
scaling.num_workers).

Model states (exact: tests/test_plan.py sums the real tensors DeepSpeed holds per rank). With
N the trainable and F the frozen parameter count, e the training dtype's bytes (bf16/fp16 2,
fp32 4), w the ranks, P(n) = this rank's share of n elements as DeepSpeed partitions them
(stages 1-2: the flat group padded to a multiple of 2w, then split; stage 3: every parameter
split on its own, ceil(n_i / w) each):

- parameters: stage 0-2 e(N + F) (stages 1-2: N padded); stage 3 e·P(N + F).
- gradients: stage 0-1 e·N (full; stage 0 fp32 only is verified); stage 2-3 e·P(N).
- fp32 master copy: stages 1-3 always 4·P(N): DeepSpeed clones the partition even in fp32
  (stage 3 means to share it then, but compares a torch.device with a string, which is never
  equal: deepspeed 0.19 stage3.py); stage 0 4·N under bf16/fp16.
- Adam states: exp_avg + exp_avg_sq, 8 bytes per trainable element of this rank's partition.
- offload_optimizer moves master and Adam states to CPU memory (with an fp32 gradient copy);
  offload_params (stage 3) moves the parameter partitions too.

DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) give 2 + 18/w bytes per parameter (stage 2) for a 16-bit
run training every parameter; the GPU figure here agrees with them for that case (the test
checks it) and also covers fp32, LoRA's frozen base and padding. Their CPU figures multiply by a
1.5 "buffer factor"; the CPU column here is the exact tensor size.

Buffers (estimated, not in the exactness test): DeepSpeed's gradient reduction bucket at stages
1-3 (`reduce_bucket_size` elements, default 5e8, in fp32 at stage 1 and the training dtype at
2-3, twice with overlap_comm), and at stage 3 the gathered weights of the largest layer twice
(the one computing and the one prefetched).

Activations (an estimate: the GPU check compares it with the measured peak). Per decoder layer
and token, what autograd keeps for the backward pass, with h the hidden size, i the
intermediate size, a the attention heads, kv = key/value heads x head size:

    norms     2 (8 + e) h        two RMSNorms: fp32 upcast input and product, cast output
    attention e (3h + 3kv)       q, k, v, rotated q and k, attention output
              + 4a               sdpa/flash: the softmax log-sum-exp per head (fp32)
              + a s (4 + 2e)     eager only: the s x s scores per head (fp32 softmax, its cast,
                                 and the probabilities the value product keeps)
    mlp       e·4i (gated: gate, up, act(gate), product) or e·2i (ungated)
    lora      per adapted layer: (e + 1)·in (dropout output and mask) + e·r

times micro-batch b and sequence s = data.max_seq_length; times the layer count L (for an
encoder-decoder, encoder + decoder layers). With gradient checkpointing only each layer's input
is kept (e·h per token per layer) plus one layer's working set, recomputed in backward. The
output head adds b·s·V·(e + 8) (logits, their fp32 upcast for the loss and its log-softmax) for
a vocabulary V; classification heads add nothing worth counting.

Headroom: a row fits when its GPU total is at most 90% of the GPU's memory (`HEADROOM`): the
rest is for the CUDA context, the allocator's fragmentation and what this model leaves out.

Vocabulary: llama-1b and llama-8b fix their vocabulary (the real models' 128256, whatever the
trained tokenizer's size); other presets size it from the tokenizer when one is passed (the
worker's check passes the run's), else from model.preset_vocab_size (the trained tokenizer has at
most that many, so the plan is an upper bound); pretrained models from their config.json.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

from trainers.config import RunSpec
from trainers.errors import ConfigError
from trainers.model import apply_lora, model_config
from trainers.tasks import TASKS
from trainers.train.ds_config import build_ds_config

HEADROOM = 0.10
GIB = 1024**3
# DeepSpeed's defaults for the buckets Ferry's generated config leaves unset (deepspeed 0.19).
DS_REDUCE_BUCKET = int(5e8)


@dataclass
class PlanRow:
    """One combination of ZeRO stage, offload and micro-batch, in bytes per GPU."""

    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    gradient_accumulation: int | None
    params_bytes: int
    grads_bytes: int
    master_bytes: int
    optimizer_bytes: int
    buffers_bytes: int
    activation_bytes: int
    gpu_bytes: int
    cpu_bytes: int
    fits: bool | None

    @property
    def offloads(self) -> int:
        return int(self.offload_optimizer) + int(self.offload_params)

    def set_line(self, spec: RunSpec, world: int) -> str:
        """The `--set` overrides that turn the run's config into this row."""
        sets = [
            f"deepspeed.zero_stage={self.zero_stage}",
            f"deepspeed.offload_optimizer={str(self.offload_optimizer).lower()}",
        ]
        if self.offload_params or spec.deepspeed.offload_params:
            sets.append(f"deepspeed.offload_params={str(self.offload_params).lower()}")
        if world != spec.scaling.num_workers:
            sets.append(f"scaling.num_workers={world}")
        sets.append(f"train.micro_batch_size_per_worker={self.micro_batch}")
        t = spec.train
        if self.gradient_accumulation is not None:
            if t.gradient_accumulation_steps is not None:
                sets.append(f"train.gradient_accumulation_steps={self.gradient_accumulation}")
            elif t.global_batch_size is None and self.gradient_accumulation != 1:
                sets.append(f"train.global_batch_size={spec.global_batch}")
        return " ".join(f"--set {s}" for s in sets)


@dataclass
class MemoryPlan:
    """Every row, the config's own, and the cheapest that fits (None: nothing fits, or the GPU
    memory is unknown)."""

    model: str
    world: int
    gpu_memory_bytes: int | None
    trainable_params: int
    total_params: int
    seq_length: int
    global_batch: int
    rows: list[PlanRow]
    current: PlanRow
    cheapest_fit: PlanRow | None
    cheapest_fit_set: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["headroom"] = HEADROOM
        return out


def plan_run(
    spec: RunSpec,
    *,
    gpus: int | None = None,
    gpu_memory_bytes: int | None = None,
    tokenizer=None,
) -> MemoryPlan:
    """The memory plan of `spec` on `gpus` ranks (default scaling.num_workers), each with
    `gpu_memory_bytes` (None: no fit decision). `tokenizer` sizes a preset's vocabulary (see the
    module docstring)."""
    world = gpus or spec.scaling.num_workers
    shape = model_shape(spec, tokenizer)
    e = 4 if spec.train.precision == "fp32" else 2
    notes = []
    if spec.method == "feature_extraction":
        notes.append("method=feature_extraction trains no model weights: forward pass only")
    rows = []
    for stage, off_opt, off_par in _combinations():
        for mb in _micro_batches(spec.train.micro_batch_size_per_worker):
            rows.append(_row(spec, shape, e, world, stage, off_opt, off_par, mb, gpu_memory_bytes))
    current = _row(
        spec,
        shape,
        e,
        world,
        spec.deepspeed.zero_stage,
        spec.deepspeed.offload_optimizer,
        spec.deepspeed.offload_params and spec.deepspeed.zero_stage == 3,
        spec.train.micro_batch_size_per_worker,
        gpu_memory_bytes,
    )
    if all(r.gradient_accumulation is None for r in rows):
        notes.append(
            f"the global batch {spec.global_batch} does not split over {world} GPU(s) at any "
            "micro-batch: set train.global_batch_size to a multiple of the GPU count"
        )
    fitting = [r for r in rows if r.fits and r.gradient_accumulation is not None]
    cheapest = min(fitting, key=lambda r: (r.offloads, -r.micro_batch, r.zero_stage), default=None)
    return MemoryPlan(
        model=shape["name"],
        world=world,
        gpu_memory_bytes=gpu_memory_bytes,
        trainable_params=shape["trainable"],
        total_params=shape["total"],
        seq_length=spec.data.max_seq_length,
        global_batch=spec.global_batch,
        rows=rows,
        current=current,
        cheapest_fit=cheapest,
        cheapest_fit_set=cheapest.set_line(spec, world) if cheapest else None,
        notes=notes,
    )


def fit_problems(spec: RunSpec, gpu_memory_bytes: int, world: int, tokenizer=None) -> list[str]:
    """Why the run's own settings cannot fit a GPU of `gpu_memory_bytes` (empty: they fit),
    naming the `--set` line that would."""
    plan = plan_run(spec, gpus=world, gpu_memory_bytes=gpu_memory_bytes, tokenizer=tokenizer)
    row = plan.current
    if row.fits:
        return []
    need = (
        f"deepspeed.zero_stage={row.zero_stage}: the run needs {gib(row.gpu_bytes)} per GPU "
        f"(parameters {gib(row.params_bytes)}, gradients {gib(row.grads_bytes)}, optimizer "
        f"{gib(row.master_bytes + row.optimizer_bytes)}, activations "
        f"{gib(row.activation_bytes)}, buffers {gib(row.buffers_bytes)}) but a GPU has "
        f"{gib(gpu_memory_bytes)} ({1 - HEADROOM:.0%} usable, `ferry plan` shows every option)."
    )
    if plan.cheapest_fit_set:
        return [f"{need} It fits with: {plan.cheapest_fit_set}."]
    return [
        f"{need} No ZeRO stage, offload or micro-batch fits on {world} GPU(s): use more GPUs, "
        "method=lora, or a smaller model."
    ]


def refuse_if_unfit(spec: RunSpec, gpu_memory_bytes: int, world: int, tokenizer=None) -> None:
    """Raise ConfigError when the run cannot fit (`fit_problems`)."""
    problems = fit_problems(spec, gpu_memory_bytes, world, tokenizer)
    if problems:
        raise ConfigError(problems)


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def activation_bytes(
    shape: dict, *, micro_batch: int, seq: int, e: int, attn: str, checkpointing: bool
) -> int:
    """The activation estimate of the module docstring, in bytes."""
    b, s, h, a = micro_batch, seq, shape["hidden"], shape["heads"]
    mlp = (4 if shape["gated"] else 2) * shape["intermediate"]
    per_token = 2 * (8 + e) * h + e * (3 * h + 3 * shape["kv"] + mlp) + shape["lora_per_token"]
    per_token += a * s * (4 + 2 * e) if attn == "eager" else 4 * a
    layer = b * s * per_token
    layers = shape["layers"]
    body = (layers * b * s * e * h + layer) if checkpointing else layers * layer
    head = b * s * shape["vocab"] * (e + 8)
    return int(body + head)


def _combinations() -> list[tuple[int, bool, bool]]:
    combos = [(0, False, False)]
    combos += [(z, o, False) for z in (1, 2) for o in (False, True)]
    combos += [(3, o, p) for o in (False, True) for p in (False, True)]
    return combos


def _micro_batches(configured: int) -> list[int]:
    sizes = {2**k for k in range(0, 7)} | {configured}
    return sorted(n for n in sizes if n <= max(64, configured))


def _row(spec, shape, e, world, stage, off_opt, off_par, mb, gpu_memory) -> PlanRow:
    n_tr, n_all = shape["trainable"], shape["total"]
    part3_tr = sum(math.ceil(n / world) for n in shape["trainable_sizes"])
    part3_all = sum(math.ceil(n / world) for n in shape["all_sizes"])
    padded = _padded(n_tr, 2 * world)
    trains = spec.method != "feature_extraction"
    if stage == 0:
        params, grads = e * n_all, e * n_tr
        master = 4 * n_tr if e != 4 else 0
        adam = 8 * n_tr
    elif stage in (1, 2):
        params = e * (padded + n_all - n_tr)
        grads = e * n_tr if stage == 1 else e * (padded // world)
        master, adam = 4 * (padded // world), 8 * (padded // world)
    else:
        params, grads = e * part3_all, e * part3_tr
        master = 4 * part3_tr
        adam = 8 * part3_tr
    if not trains:
        grads = master = adam = 0
    cpu = 0
    if off_opt and trains:
        # With DeepSpeed's fp32 gradient partition on the host.
        cpu += master + adam + 4 * (part3_tr if stage == 3 else padded // world)
        master = adam = 0
        if stage == 3:
            grads = 0
    if off_par:
        cpu, params = cpu + params, 0
    buffers = _buffers(spec, shape, e, stage) if trains else 0
    acts = activation_bytes(
        shape,
        micro_batch=mb,
        seq=spec.data.max_seq_length,
        e=e,
        attn=getattr(spec.model, "attn_implementation", "sdpa"),
        checkpointing=getattr(spec.train, "gradient_checkpointing", False) and trains,
    )
    if not trains:
        acts = mb * spec.data.max_seq_length * e * shape["hidden"] * 4  # no graph kept
    gpu = params + grads + master + adam + buffers + acts
    fits = None if gpu_memory is None else gpu <= gpu_memory * (1 - HEADROOM)
    per_step = world * mb
    accum = spec.global_batch // per_step if spec.global_batch % per_step == 0 else None
    return PlanRow(
        zero_stage=stage,
        offload_optimizer=off_opt,
        offload_params=off_par,
        micro_batch=mb,
        gradient_accumulation=accum,
        params_bytes=params,
        grads_bytes=grads,
        master_bytes=master,
        optimizer_bytes=adam,
        buffers_bytes=buffers,
        activation_bytes=acts,
        gpu_bytes=gpu,
        cpu_bytes=cpu,
        fits=fits,
    )


def _buffers(spec: RunSpec, shape: dict, e: int, stage: int) -> int:
    if stage == 0:
        return 0
    zero = build_ds_config(spec).get("zero_optimization", {})
    # DeepSpeed allocates the whole configured bucket, whatever the model's size
    # (stage_1_and_2.py setup_buckets; stage3.py), in fp32 at stage 1.
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET))
    if not zero.get("contiguous_gradients", True):
        bucket = 0
    if stage == 3:
        return bucket * e + 2 * e * shape["largest_layer"]
    doubled = 2 if zero.get("overlap_comm", False) else 1  # double-buffered when overlapping
    return bucket * (4 if stage == 1 else e) * doubled


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def model_shape(spec: RunSpec, tokenizer) -> dict:
    """Layer sizes and parameter counts of the run's model, built on the meta device."""
    import transformers

    labels = spec.task.labels or (
        ["a", "b"] if spec.task.type == "sequence_classification" else None
    )
    cfg = model_config(spec, tokenizer, labels)
    with torch.device("meta"):
        model = TASKS[spec.task.type].model_class(transformers, spec, cfg).from_config(cfg)
        if spec.method == "lora":
            model = apply_lora(model, spec)
        elif spec.method == "feature_extraction":
            model.requires_grad_(False)
    params = list(model.parameters())  # tied weights once
    trainable = [p.numel() for p in params if p.requires_grad]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = _attr(text, "hidden_size", "d_model")
    heads = _attr(text, "num_attention_heads", "num_heads")
    head_dim = getattr(text, "head_dim", None) or _attr(text, "d_kv", default=hidden // heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = _attr(text, "num_hidden_layers", "num_layers") + (
        getattr(text, "num_decoder_layers", 0) or 0
    )
    names = [n for n, _ in model.named_modules()]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    e = 4 if spec.train.precision == "fp32" else 2
    lora = 0
    for _, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            keep = e + 1 if spec.lora.dropout > 0 else e
            lora += keep * module.in_features + e * spec.lora.rank
    return dict(
        name=spec.model.preset or spec.model.name_or_path or "?",
        trainable=sum(trainable),
        total=sum(p.numel() for p in params),
        trainable_sizes=trainable,
        all_sizes=[p.numel() for p in params],
        largest_layer=_largest_layer(model),
        hidden=hidden,
        heads=heads,
        kv=kv_heads * head_dim,
        intermediate=_attr(text, "intermediate_size", "d_ff", default=4 * hidden),
        layers=layers,
        gated=any(n.endswith("gate_proj") for n in names),
        vocab=out.out_features if isinstance(out, torch.nn.Linear) else 0,
        lora_per_token=lora // max(layers, 1),
    )


def _largest_layer(model) -> int:
    """Parameters of the largest module that ZeRO-3 gathers at once (a layer, or the embedding)."""
    return max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        default=0,
    )


def _attr(cfg, *names: str, default: int | None = None) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    if default is None:
        raise AttributeError(f"model config has none of {names}")
    return default


def parse_bytes(text: str, flag: str) -> int:
    """'80GiB', '80GB', '81920MiB' -> bytes; anything else is a ConfigError naming `flag`."""
    units = {"tib": 1024**4, "gib": GIB, "mib": 1024**2, "tb": 10**12, "gb": 10**9, "mb": 10**6}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", text or "")
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise ConfigError(
            [
                f"{flag}={text}: must be a positive size with a unit (TiB, GiB, MiB, TB, GB, MB). "
                "Write it like 80GiB, 80GB or 81920MiB."
            ]
        )
    return int(float(m.group(1)) * units[m.group(2).lower()])
