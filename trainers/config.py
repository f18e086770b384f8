"""The run config: one YAML file, one pydantic model per concern, validated once on the driver.

`load_config` is the entry point: YAML + `--set` overrides -> `RunSpec`, raising one `ConfigError`
that lists every problem as `"<dotted.key>=<value>: <rule>. <fix>."`. Checks that need the data
files or the model live beside the code that knows them (`trainers.data.check_data`,
`trainers.model.check_lora_fits`) and report in the same format.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """One or more config problems, each formatted `"<dotted.key>=<value>: <rule>. <fix>."`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = Field(
        "ferry-run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; with storage_path it identifies the run. Rerunning the same name resumes it.",
    )
    storage_path: str = Field(
        "./ferry-runs",
        description="Where checkpoints, the preprocessing cache and the export go. A local path or a "
        "pyarrow URI (s3://, gs://). Must be shared by all nodes on a multi-node cluster.",
    )
    storage_shared: bool | None = Field(
        None,
        description="Declare that the local run.storage_path (and data.cache_dir, if set) is a mount "
        "every node shares (NFS, PVC). Required for a local path on a multi-node cluster, where it "
        "is then verified on each node (seconds); URIs are shared by nature. None = not declared.",
    )
    seed: int = Field(0, description="Seed for model init, data order and dropout.")
    stage_baseline: bool = Field(
        False,
        description="With stages: also run the last stage from the original model "
        "(<run.name>-<stage>-baseline), so the report shows the task metric without the earlier stages.",
    )
    resume: Literal["auto", "never", "must"] = Field(
        "auto",
        description="auto: continue from the run's last committed checkpoint if one exists; "
        "must: fail if there is none; never: fail if one exists (use a new run.name).",
    )


class ModelConfig(_Strict):
    name_or_path: str | None = Field(
        None,
        description="Hugging Face model id, local directory, or `python-package:<module>/<subdir>` "
        "for a model shipped inside an installed Python package (offline).",
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file to load (dequantized to torch weights by transformers)."
    )
    preset: Literal["tiny-llama", "tiny-bert", "tiny-t5", "small-llama"] | None = Field(
        None,
        description="Build a small random-init model with a tokenizer trained on the training text "
        "(no download). tiny-*: ~100k parameters for tests (tiny-t5 is an encoder-decoder); "
        "small-llama: a few million.",
    )
    preset_vocab_size: int = Field(
        512, ge=64, le=65536, description="Vocabulary size of the tokenizer trained for a preset."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Only for sources you trust."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")

    @field_validator("name_or_path")
    @classmethod
    def _check_package_path(cls, v: str | None) -> str | None:
        # Checked here, resolved where loaded: the config stays portable to other machines
        # (a rendered Kubernetes job must not carry this machine's site-packages path).
        if v is not None and v.startswith(PACKAGE_PREFIX):
            resolve_package_path(v)
        return v

    @property
    def source(self) -> str | None:
        """What from_pretrained loads: name_or_path with `python-package:` resolved."""
        if self.name_or_path and self.name_or_path.startswith(PACKAGE_PREFIX):
            return resolve_package_path(self.name_or_path)
        return self.name_or_path


class LoraConfig(_Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r: adapter size; higher = more capacity.")
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="LoRA scaling (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: detected per architecture."
    )


class TaskConfig(_Strict):
    type: Literal["sequence_classification", "causal_lm", "masked_lm", "summarization",
                  "question_answering"] = Field(
        ...,
        description="What the model learns: text -> label; next-token prediction; masked-token "
        "prediction (encoders, domain adaptation); document -> summary; question + context -> answer.",
    )
    qa_style: Literal["extractive", "generative"] = Field(
        "extractive",
        description="question_answering: extractive = predict the answer span in the context "
        "(SQuAD; encoder models); generative = write the answer (decoder or encoder-decoder models).",
    )
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="masked_lm: share of tokens masked (fixed per row, so "
        "evaluation is deterministic)."
    )
    labels: list[str] | None = Field(
        None,
        description="Classification label set in index order; default: sorted distinct training labels.",
    )


class DataConfig(_Strict):
    train_files: list[str] = Field(
        ..., min_length=1, description="Training files: paths, globs or pyarrow URIs."
    )
    validation_files: list[str] = Field(
        default_factory=list, description="Validation files; empty = split off the training data."
    )
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        "auto", description="File format; auto = from the extension."
    )
    text_column: str = Field("text", description="Input text column (plain text for causal LM).")
    label_column: str = Field("label", description="Label column (classification).")
    prompt_column: str | None = Field(
        None, description="Causal LM: prompt column; loss is taken on the response only."
    )
    response_column: str | None = Field(None, description="Causal LM: response column.")
    summary_column: str = Field("summary", description="Summarization: target summary column.")
    question_column: str = Field("question", description="Question answering: question column.")
    context_column: str = Field("context", description="Question answering: context column.")
    answers_column: str = Field(
        "answers",
        description="Question answering: SQuAD-style answers, {text: [...], answer_start: [...]} "
        "(a JSON object or its JSON string); the first answer is trained on, all count in EM/F1.",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of training rows held out when no validation_files."
    )
    split_seed: int = Field(0, description="Seed of the train/validation split (stable per row).")
    max_seq_length: int = Field(128, ge=8, description="Tokens per sequence (packed length for LM).")
    pack: bool = Field(True, description="Causal LM: pack documents into full sequences.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Rows longer than max_seq_length (unpacked): cut, skip, or fail."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="Rows with missing/empty text, unknown label or bad encoding."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Read at most this many rows per split (quick experiments)."
    )
    cache_dir: str | None = Field(
        None, description="Preprocessed-data cache; default <storage_path>/_cache."
    )


class TrainConfig(_Strict):
    num_epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides num_epochs)."
    )
    learning_rate: float = Field(
        1e-4, gt=0, allow_inf_nan=False, description="Peak learning rate (AdamW)."
    )
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup."
    )
    micro_batch_size_per_worker: int = Field(8, ge=1, description="Sequences per forward pass.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, description="Micro-batches per optimizer step; default derived or 1."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Sequences per optimizer step over all workers "
        "= micro_batch_size_per_worker * num_workers * gradient_accumulation_steps.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision. bf16 needs hardware support; fp16 needs a GPU."
    )
    eval_every_n_steps: int = Field(50, ge=1, description="Evaluate (and checkpoint) every N steps.")
    eval_batch_size_per_worker: int = Field(16, ge=1, description="Sequences per eval forward pass.")
    eval_before_training: bool = Field(True, description="Evaluate the starting model first.")
    keep_best_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, ranked by best_metric.")
    best_metric: str = Field("eval/loss", description="Metric that ranks checkpoints.")
    best_metric_mode: Literal["min", "max"] = Field("min", description="Lower or higher is better.")
    log_every_n_steps: int = Field(10, ge=1, description="Progress line every N optimizer steps.")


class GenerationConfig(_Strict):
    """Decoding settings for generative tasks (summarization, generative QA): evaluation and predict."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per row.")
    num_beams: int = Field(1, ge=1, description="Beam search width; 1 = greedy (or sampling).")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep this probability mass.")
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False,
                                      description="> 1 discourages repeating tokens.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")


class FeaturesConfig(_Strict):
    """method=feature_extraction: frozen model -> pooled embeddings (cached) -> a small head."""

    pooling: Literal["mean", "cls", "last_token"] = Field(
        "mean", description="How token states become one vector: masked mean, first token "
        "(encoders' [CLS]) or last real token (decoders)."
    )
    layer: int = Field(-1, description="Hidden layer to pool: -1 = last, 0 = embeddings, "
                       "negative counts from the end.")
    head: Literal["logistic_regression", "mlp"] = Field(
        "logistic_regression", description="Classifier trained on the features."
    )
    mlp_hidden_size: int = Field(256, ge=1, description="MLP head: hidden units.")
    mlp_epochs: int = Field(50, ge=1, description="MLP head: passes over the features.")
    regularization_c: float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="Logistic regression: inverse L2 strength (scikit-learn C); smaller = stronger.",
    )
    batch_size: int = Field(32, ge=1, description="Rows per embedding forward pass.")
    num_actors: int = Field(1, ge=1, description="Embedding actors (model loaded once per actor).")
    distributed_min_rows: int = Field(
        200_000, ge=1, description="MLP head: at or above this many training rows it trains "
        "data-parallel with Ray Train (scaling.num_workers); below, in one process."
    )


class StageConfig(_Strict):
    """One stage of a chained run (e.g. domain adaptation, then the task)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Stage name; its run is <run.name>-<name>.")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted-key overrides applied to the config for this stage "
        "(e.g. task.type: causal_lm, data.train_files: [...]). A later stage starts from the "
        "previous stage's exported model.",
    )


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage 0-3: 1 shards optimizer state, 2 + gradients, 3 + weights."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory.")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON whose keys override the generated config."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys merged over the generated DeepSpeed config."
    )


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1, description="Training worker processes (one per GPU on GPU nodes).")
    cpus_per_worker: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Logical CPUs each worker reserves."
    )
    gpus_per_worker: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="GPUs each worker reserves (0 = CPU training)."
    )
    data_cpus: float = Field(
        1.0, gt=0, allow_inf_nan=False,
        description="Logical CPUs kept free for Ray Data; with none, data reads wait forever.",
    )
    max_failures: int = Field(
        0, ge=0, description="Worker/node failures tolerated; each resumes from the last checkpoint."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed across nodes: PACK/SPREAD prefer few/many nodes; "
        "STRICT_PACK needs one node that holds them all, STRICT_SPREAD one node per worker "
        "(both checked against the cluster before the run starts).",
    )


class RunSpec(_Strict):
    """One complete run: what to adapt, how, on what data, with what resources."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    method: Literal["full", "lora", "feature_extraction"] = Field(
        "lora", description="Full fine-tuning, LoRA adapters, or a frozen model's features + a head."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    task: TaskConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    stages: list[StageConfig] | None = Field(
        None,
        description="Run these stages in order as one command (domain adaptation: continued "
        "pretraining, then the task); each stage's output in <storage_path>/<run.name>-<stage>.",
    )

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step, derived from the batch-size fields."""
        if self.train.gradient_accumulation_steps is not None:
            return self.train.gradient_accumulation_steps
        per_step = self.train.micro_batch_size_per_worker * self.scaling.num_workers
        if self.train.global_batch_size is not None:
            return max(1, self.train.global_batch_size // per_step)
        return 1

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch_size_per_worker * self.scaling.num_workers * self.grad_accum

    @property
    def cache_dir(self) -> str:
        return self.data.cache_dir or _join(self.run.storage_path, "_cache")

    @property
    def run_dir(self) -> str:
        return _join(self.run.storage_path, self.run.name)


PACKAGE_PREFIX = "python-package:"


def resolve_package_path(ref: str) -> str:
    """`python-package:mod/sub/dir` -> the absolute path of sub/dir inside installed module `mod`.

    The package is located without importing it (some model packages import heavy runtimes).
    """
    import importlib.util

    module, _, sub = ref.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package '{module}' is not installed; pip install it (underscores -> dashes)")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ValueError(f"'{sub}' not found in package '{module}' ({path})")
    return str(path)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML run config, apply `key.path=value` overrides, validate everything.

    A `tune:` block (read by `ferry tune`) is ignored here, with a warning, so one file serves both.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    raw, problems = load_raw(path, overrides)
    if raw.pop("tune", None) is not None:
        logging.getLogger("ferry.config").warning(
            "config has a tune: block; it is ignored here (run `ferry tune` to search)")
    return build_spec(raw, problems)


def load_raw(path: str | os.PathLike | None, overrides: list[str] | None = None
             ) -> tuple[dict[str, Any], list[str]]:
    """The config file as a mapping with paths resolved and overrides applied, not yet validated.

    Returns:
        (mapping, problems found in the overrides).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config={path}: file not found. Pass the path to a YAML run config."])
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"config={path}: not valid YAML ({e}). Fix the YAML syntax."]) from e
        if not isinstance(raw, dict):
            raise ConfigError([f"config={path}: top level must be a mapping. Use `key: value` lines."])
        # Relative data/storage paths mean "relative to the config file", so a config runs the same
        # from any working directory.
        raw = _resolve_relative_paths(raw, p.parent)
    problems: list[str] = []
    for item in overrides or []:
        problems += _apply_override(raw, item)
    return raw, problems


def build_spec(raw: dict[str, Any], problems: list[str] | None = None) -> RunSpec:
    """Validate a config mapping (schema + cross-field rules), raising one ConfigError."""
    problems = list(problems or [])
    spec = None
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        problems += [_format_pydantic_error(err) for err in e.errors()]
    if spec is not None:
        problems += check_rules(spec)
    if problems:
        raise ConfigError(problems)
    assert spec is not None
    # Workers run in other directories (and on other nodes): pin local output paths now.
    for section, key in (("run", "storage_path"), ("data", "cache_dir")):
        obj = getattr(spec, section)
        value = getattr(obj, key)
        if value and "://" not in value and not os.path.isabs(value):
            setattr(obj, key, os.path.abspath(value))
    return spec


def check_rules(spec: RunSpec) -> list[str]:
    """Cross-field rules the libraries do not check (Ray accepts num_workers=0, DeepSpeed stage 4...)."""
    p: list[str] = []
    m, t, s, d, ds = spec.model, spec.train, spec.scaling, spec.data, spec.deepspeed
    sources = [x for x in (m.name_or_path, m.preset) if x]
    if len(sources) != 1:
        p.append(
            f"model.name_or_path={m.name_or_path}: exactly one of model.name_or_path or model.preset "
            "is required. Set a model id/directory or a preset (tiny-llama, tiny-bert, small-llama)."
        )
    if m.gguf_file and not m.name_or_path:
        p.append(
            f"model.gguf_file={m.gguf_file}: needs model.name_or_path (the directory or repo holding "
            "the file). Set model.name_or_path to the folder that contains the GGUF file."
        )
    p += _check_task_model(spec)
    if ds.offload_params and ds.zero_stage != 3:
        p.append(
            f"deepspeed.offload_params={ds.offload_params}: parameter offload needs ZeRO stage 3 "
            f"(deepspeed.zero_stage={ds.zero_stage}). Set deepspeed.zero_stage=3 or offload_params=false."
        )
    if ds.offload_optimizer and ds.zero_stage == 0:
        p.append(
            "deepspeed.offload_optimizer=True: optimizer offload needs ZeRO stage >= 1. "
            "Set deepspeed.zero_stage to 1, 2 or 3."
        )
    if ds.config_file and not Path(ds.config_file).is_file():
        p.append(f"deepspeed.config_file={ds.config_file}: file not found. Fix the path.")
    if s.gpus_per_worker == 0 and t.precision == "fp16":
        p.append(
            "train.precision=fp16: fp16 training needs a GPU (scaling.gpus_per_worker=0). "
            "Use fp32 or bf16 on CPU."
        )
    p += _check_batch_sizes(spec)
    task = spec.task.type
    if task == "causal_lm" and bool(d.prompt_column) != bool(d.response_column):
        p.append(
            f"data.prompt_column={d.prompt_column}: prompt_column and response_column go together. "
            "Set both (instruction tuning) or neither (plain text)."
        )
    if task == "sequence_classification" and (d.prompt_column or d.response_column):
        p.append(
            f"data.prompt_column={d.prompt_column}: prompt/response columns are for causal_lm. "
            "Remove them or set task.type=causal_lm."
        )
    if spec.task.labels is not None and len(set(spec.task.labels)) != len(spec.task.labels):
        p.append(f"task.labels={spec.task.labels}: labels must be distinct. Remove duplicates.")
    if spec.task.labels is not None and len(spec.task.labels) < 2:
        p.append(f"task.labels={spec.task.labels}: need at least 2 labels. List every class.")
    metric = t.best_metric
    if not metric.startswith(("eval/", "train/")):
        p.append(
            f"train.best_metric={metric}: must be a reported metric such as eval/loss, eval/accuracy "
            "or eval/f1. Use one of those."
        )
    return p


# Which presets can learn which task (pretrained models are checked when loaded).
_PRESET_TASKS = {
    "tiny-bert": {"sequence_classification", "masked_lm", "question_answering:extractive"},
    "tiny-llama": {"sequence_classification", "causal_lm", "summarization",
                   "question_answering:generative"},
    "small-llama": {"sequence_classification", "causal_lm", "summarization",
                    "question_answering:generative"},
    "tiny-t5": {"summarization", "question_answering:generative"},
}


def _check_task_model(spec: RunSpec) -> list[str]:
    task = spec.task.type
    key = f"{task}:{spec.task.qa_style}" if task == "question_answering" else task
    p = []
    preset = spec.model.preset
    if preset and key not in _PRESET_TASKS[preset]:
        fits = sorted(n for n, tasks in _PRESET_TASKS.items() if key in tasks)
        p.append(
            f"model.preset={preset}: cannot be trained for task.type={task}"
            + (f" ({spec.task.qa_style})" if task == "question_answering" else "")
            + f". Use model.preset {' or '.join(fits) or '(none fits)'} or another task."
        )
    if task == "masked_lm" and spec.method == "lora":
        p.append(
            "method=lora: masked_lm (continued pretraining of an encoder) trains the full model here, "
            "so the next stage can load it as a plain checkpoint. Set method=full for this stage."
        )
    if spec.method == "feature_extraction" and task != "sequence_classification":
        p.append(
            f"method=feature_extraction: trains a classifier head on frozen features, so it needs "
            f"task.type=sequence_classification (got {task}). Use method full or lora for {task}."
        )
    return p


def _check_batch_sizes(spec: RunSpec) -> list[str]:
    t, s = spec.train, spec.scaling
    if s.num_workers < 1:
        return []
    per_step = t.micro_batch_size_per_worker * s.num_workers
    if t.global_batch_size is None:
        return []
    if t.global_batch_size % per_step:
        return [
            f"train.global_batch_size={t.global_batch_size}: must be divisible by "
            f"scaling.num_workers*train.micro_batch_size_per_worker={per_step}. Change one of them."
        ]
    accum = t.gradient_accumulation_steps
    if accum is not None and accum * per_step != t.global_batch_size:
        return [
            f"train.global_batch_size={t.global_batch_size}: must equal scaling.num_workers*"
            f"train.micro_batch_size_per_worker*train.gradient_accumulation_steps={accum * per_step}. "
            "Set only one of global_batch_size and gradient_accumulation_steps."
        ]
    return []


_FIXES = {
    "extra_forbidden": "Remove it or fix the spelling",
    "missing": "Add it to the config",
    "literal_error": "Use one of the allowed values",
    "finite_number": "Use a finite number",
    "greater_than": "Use a larger value",
    "greater_than_equal": "Use a larger value",
    "less_than": "Use a smaller value",
    "less_than_equal": "Use a smaller value",
    "string_pattern_mismatch": "Use letters, digits, '.', '_' and '-' only",
}


def _format_pydantic_error(err: dict[str, Any]) -> str:
    key = ".".join(str(x) for x in err["loc"])
    value = err.get("input")
    if err["type"] == "missing":
        value = "<missing>"
    elif isinstance(value, dict):
        value = "{...}"
    rule = err["msg"][0].lower() + err["msg"][1:]
    fix = _FIXES.get(err["type"], "Fix the value in the config or with --set")
    if err["type"] == "extra_forbidden":
        fix += f" (allowed here: {', '.join(_allowed_keys(err['loc']))})"
    return f"{key}={value}: {rule}. {fix}."


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _apply_override(raw: dict[str, Any], item: str) -> list[str]:
    if "=" not in item:
        return [f"--set {item}: expected key.path=value. Example: --set train.learning_rate=3e-4."]
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    try:
        set_path(raw, key.strip(), value)
    except ValueError as e:
        return [f"{key}={text}: {e}. Override a key inside a section."]
    return []


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `raw["a"]["b"]["c"] = value` for dotted="a.b.c", creating sections as needed."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{part} is not a section")
        node = nxt
    node[parts[-1]] = value


# Input files are relative to the config file; outputs (storage_path, cache_dir) to the working
# directory, like every other CLI tool's output flags.
_PATH_KEYS = {("data", "train_files"), ("data", "validation_files"), ("deepspeed", "config_file")}


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            return str((base / v).resolve())
        return v

    for section, key in _PATH_KEYS:
        sec = raw.get(section)
        if isinstance(sec, dict) and key in sec:
            val = sec[key]
            sec[key] = [fix(x) for x in val] if isinstance(val, list) else fix(val)
    # Stage overrides name files the same way (`data.train_files: [domain.jsonl]`).
    for stage in raw.get("stages") or []:
        overrides = stage.get("set") if isinstance(stage, dict) else None
        for dotted in [".".join(k) for k in _PATH_KEYS]:
            if isinstance(overrides, dict) and dotted in overrides:
                val = overrides[dotted]
                overrides[dotted] = [fix(x) for x in val] if isinstance(val, list) else fix(val)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        candidate = base / model["name_or_path"]
        if model["name_or_path"].startswith((".", "/")) or candidate.is_dir():
            model["name_or_path"] = fix(model["name_or_path"])
    return raw


def dump_spec(spec: RunSpec) -> str:
    """The resolved config as YAML (what `ferry validate` prints and the export records)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
