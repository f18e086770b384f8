"""The run config's schema: one pydantic model per concern, composed into `RunSpec`.

Schema only: loading YAML, `--set` overrides, cross-field rules and error formatting live in
`trainers.config_load`; checks that need the data, the model or the cluster live in
`trainers.preflight` and the modules it calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.stopping import EarlyStoppingConfig
from trainers.storage import EXPORT_DIR, join


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = Field(
        "ferry-run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; with storage_path it identifies the run. Rerunning the same name "
        "resumes it.",
    )
    storage_path: str = Field(
        "./ferry-runs",
        description="Where checkpoints, the preprocessing cache and the export go. A local path or "
        "a "
        "pyarrow URI (s3://, gs://). Must be shared by all nodes on a multi-node cluster.",
    )
    storage_shared: bool | None = Field(
        None,
        description="Declare that the local run.storage_path (and data.cache_dir, if set) is a "
        "mount "
        "every node shares (NFS, PVC). Required for a local path on a multi-node cluster, where it "
        "is then verified on each node (seconds); URIs are shared by nature. None = not declared.",
    )
    seed: int = Field(0, description="Seed for model init, data order and dropout.")
    stage_baseline: bool = Field(
        False,
        description="With stages: also run the last stage from the original model "
        "(<run.name>-<stage>-baseline), so the report shows the task metric without the earlier "
        "stages.",
    )
    resume: Literal["auto", "never", "must", "restart"] = Field(
        "auto",
        description="auto: continue from the run's last committed checkpoint if one exists (the "
        "config must match the one the run started with); must: fail if there is none; never: "
        "fail if one exists (use a new run.name); restart: delete the earlier run of this name "
        "(checkpoints and export) and start over.",
    )


class QuantizationConfig(_Strict):
    """model.quantization: the frozen base model's weights stored in 4 or 8 bits (bitsandbytes),
    computed in `compute_dtype`; only the LoRA adapters train."""

    bits: Literal[4, 8] = Field(
        ..., description="Bits per base weight: 4 (QLoRA, ~0.5 byte/param) or 8 (~1 byte/param)."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4",
        description="4-bit data type: nf4 (normal-float, QLoRA's choice, more accurate) or fp4.",
    )
    double_quant: bool = Field(
        True,
        description="4-bit: quantize the quantization constants too (~0.4 bit/param saved, "
        "slightly slower).",
    )
    compute_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None,
        description="dtype the 4-bit weights are dequantized to for each matmul; default "
        "train.precision's (bf16 for a bf16 run). fp32 is slower and gains little.",
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
    preset: (
        Literal["tiny-llama", "tiny-bert", "tiny-t5", "small-llama", "llama-1b", "llama-8b"] | None
    ) = Field(
        None,
        description="Build a random-init model with a tokenizer trained on the training text "
        "(no download). tiny-*: ~100k parameters for tests (tiny-t5 is an encoder-decoder); "
        "small-llama: a few million; llama-1b / llama-8b: the Llama-3.2-1B / Llama-3.1-8B shapes "
        "and vocabulary (128256), for memory plans and GPU benchmarks.",
    )
    preset_vocab_size: int = Field(
        512, ge=64, le=65536, description="Vocabulary size of the tokenizer trained for a preset."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Only for sources you trust."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch's fused attention; memory linear in sequence "
        "length where its kernels allow, falls back to eager for models without it), eager "
        "(plain matmuls: the seq^2 score matrix is materialized, slowest, most memory) or "
        "flash_attention_2 (CUDA only, needs the flash-attn package; fastest, fp16/bf16 only).",
    )
    quantization: QuantizationConfig | None = Field(
        None,
        description="QLoRA: load the frozen base in 4 or 8 bits through bitsandbytes (CUDA GPU, "
        "method=lora, ZeRO stage <= 2). Cuts base-weight memory ~4x (4-bit) at some speed and "
        "accuracy cost; None = full-precision base.",
    )

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
    type: Literal[
        "sequence_classification",
        "causal_lm",
        "chat",
        "masked_lm",
        "summarization",
        "question_answering",
    ] = Field(
        ...,
        description="What the model learns: text -> label; next-token prediction; chat / "
        "instruction SFT (conversations through the chat template, loss on assistant turns); "
        "masked-token prediction (encoders, domain adaptation); document -> summary; question + "
        "context -> answer.",
    )
    qa_style: Literal["extractive", "generative"] = Field(
        "extractive",
        description="question_answering: extractive = predict the answer span in the context "
        "(SQuAD; encoder models); generative = write the answer (decoder or encoder-decoder "
        "models).",
    )
    mlm_probability: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="masked_lm: share of tokens masked (fixed per row, so "
        "evaluation is deterministic).",
    )
    labels: list[str] | None = Field(
        None,
        description="Classification label set in index order; default: sorted distinct training "
        "labels.",
    )


ChatRole = Literal["system", "user", "assistant"]


# Per format: the turns column, role key, content key and role names its own docs use.
CONVERSATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "messages": {
        "messages_column": "messages",
        "role_key": "role",
        "content_key": "content",
        "roles": {"system": "system", "user": "user", "assistant": "assistant"},
    },
    "sharegpt": {
        "messages_column": "conversations",
        "role_key": "from",
        "content_key": "value",
        "roles": {"system": "system", "human": "user", "gpt": "assistant"},
    },
}


class ConversationConfig(_Strict):
    """task.type=chat: how rows hold conversations. Every format becomes a list of
    {role, content} messages, which the chat template turns into tokens."""

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: Any) -> Any:
        """Unset names take the format's own (sharegpt: conversations/from/value)."""
        if not isinstance(data, dict):
            return data
        fmt = data.get("format", "messages")
        defaults = CONVERSATION_DEFAULTS.get(fmt, CONVERSATION_DEFAULTS["messages"])
        return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}

    format: Literal["messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "messages",
        description="messages: a list of {role, content} per row (OpenAI/TRL); sharegpt: a list "
        "of {from, value} (human/gpt/system); alpaca: instruction, optional input, output; "
        "prompt_completion: one user prompt and its assistant completion.",
    )
    messages_column: str | None = Field(
        None,
        description="messages/sharegpt: the column holding the turns; default messages "
        "(messages) or conversations (sharegpt).",
    )
    role_key: str | None = Field(
        None, description="Key of a turn's role; default role (messages) or from (sharegpt)."
    )
    content_key: str | None = Field(
        None, description="Key of a turn's text; default content (messages) or value (sharegpt)."
    )
    roles: dict[str, ChatRole] | None = Field(
        None,
        description="Role names in the data -> system/user/assistant; default the format's own "
        "(sharegpt: human->user, gpt->assistant, system->system). A role not listed is a bad row.",
    )
    instruction_column: str = Field("instruction", description="alpaca: the instruction.")
    input_column: str = Field(
        "input",
        description="alpaca: optional context, appended to the instruction after a newline.",
    )
    output_column: str = Field("output", description="alpaca: the reply to learn.")
    prompt_column: str = Field("prompt", description="prompt_completion: the user turn.")
    completion_column: str = Field(
        "completion", description="prompt_completion: the assistant turn to learn."
    )
    system_column: str | None = Field(
        None, description="alpaca/prompt_completion: optional column with a system prompt per row."
    )


class DataConfig(_Strict):
    train_files: list[str] = Field(
        ...,
        min_length=1,
        description="Training files: paths, globs, folders or pyarrow URIs; a folder written by "
        "datasets' save_to_disk, or hf-hub:NAME[:SPLIT] (a Hub dataset, split default train, "
        "loaded on the driver).",
    )
    validation_files: list[str] = Field(
        default_factory=list,
        description="Validation files, written like data.train_files; empty = split off the "
        "training data.",
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "arrow"] = Field(
        "auto",
        description="File format; auto = from the extension (.jsonl/.json, .csv, "
        ".parquet, .arrow). jsonl reads JSON Lines and also a file holding one JSON array of "
        "rows; arrow reads Arrow IPC stream or file data (what datasets writes).",
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
    max_seq_length: int = Field(
        128, ge=8, description="Tokens per sequence (packed length for LM)."
    )
    pack: bool = Field(
        True,
        description="Causal LM and chat training rows: pack documents (conversations) into full "
        "rows of max_seq_length, attention kept within each; how rows are filled: data.packing.",
    )
    packing: Literal["best_fit", "concat"] = Field(
        "best_fit",
        description="With data.pack: best_fit keeps every document that fits a row whole "
        "(best-fit decreasing; longer ones become full rows plus a packed remainder), a few "
        "slots of EOS filler per row; concat joins documents and cuts every max_seq_length "
        "tokens: every slot used, documents split across rows.",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Rows longer than max_seq_length: cut, skip, or fail (causal LM: only when "
        "unpacked; chat: truncate keeps whole leading turns, ending after an assistant turn).",
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
    conversation: ConversationConfig = Field(
        default_factory=ConversationConfig,
        description="task.type=chat: the data format and its column and role names.",
    )
    chat_template: str | None = Field(
        None,
        description="task.type=chat: the chat template; default the tokenizer's own (its "
        "tokenizer config or GGUF file). A built-in name (chatml, llama3, zephyr) or a Jinja "
        "template string.",
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant",
        description="task.type=chat: which tokens carry loss: every assistant turn (with its "
        "end-of-turn token), the last one only, or every token.",
    )

    def column(self, field: str) -> str:
        """The user's column named by a field of this section, dotted for nested ones
        (`conversation.messages_column`)."""
        value: Any = self
        for part in field.split("."):
            value = getattr(value, part)
        return value


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
    eval_every_n_steps: int = Field(
        50, ge=1, description="Evaluate (and checkpoint) every N steps."
    )
    eval_batch_size_per_worker: int = Field(
        16, ge=1, description="Sequences per eval forward pass."
    )
    eval_before_training: bool = Field(True, description="Evaluate the starting model first.")
    probe_baseline: bool = Field(
        True,
        description="Classification: before fine-tuning, score a logistic regression on the "
        "base model's frozen features (method=feature_extraction's head, cached) on the same "
        "split, and report it beside the result (probe/*).",
    )
    keep_best_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept, ranked by best_metric."
    )
    best_metric: str = Field(
        "eval/loss", description="Metric that ranks checkpoints (and picks the best export)."
    )
    best_metric_mode: Literal["min", "max"] = Field("min", description="Lower or higher is better.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None,
        description="Stop the run after an evaluation that shows overfitting, a plateau or no "
        "improvement of best_metric (the rule ferry tune applies to trials); {} = on with the "
        "default thresholds, None = off (train to the end).",
    )
    export: Literal["best", "last"] = Field(
        "best",
        description="What <run>/final holds: the best evaluated checkpoint (by best_metric) or "
        "the last state. best costs one load of that checkpoint on the driver when it is not the "
        "last.",
    )
    log_every_n_steps: int = Field(10, ge=1, description="Progress line every N optimizer steps.")
    prefetch_batches: int = Field(
        2,
        ge=0,
        description="Micro-batches Ray Data reads, collates and moves to the device ahead of the "
        "step, in a background thread: hides data latency (train/ingest_wait_share) at the cost "
        "of one micro-batch of memory each; 0 = read in the step.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in backward instead of keeping them "
        "(non-reentrant checkpointing): activation memory drops to about one layer's worth, at "
        "~30% more compute per step.",
    )


class GenerationConfig(_Strict):
    """Decoding settings for generative tasks (summarization, generative QA): evaluation and
    predict."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per row.")
    num_beams: int = Field(1, ge=1, description="Beam search width; 1 = greedy (or sampling).")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Sampling temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep this probability mass."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="> 1 discourages repeating tokens."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Forbid repeating n-grams of this size (0 = off)."
    )
    score_replies: bool = Field(
        True,
        description="task.type=chat: at every evaluation, generate each validation "
        "conversation's last assistant reply and score it (eval/rougeL, eval/exact_match); "
        "false = loss and perplexity only (cheaper). Summarization and QA always generate.",
    )


class FeaturesConfig(_Strict):
    """method=feature_extraction: frozen model -> pooled embeddings (cached) -> a small head."""

    pooling: Literal["mean", "cls", "last_token"] = Field(
        "mean",
        description="How token states become one vector: masked mean, first token "
        "(encoders' [CLS]) or last real token (decoders).",
    )
    layer: int = Field(
        -1,
        description="Hidden layer to pool: -1 = last, 0 = embeddings, "
        "negative counts from the end.",
    )
    head: Literal["logistic_regression", "mlp"] = Field(
        "logistic_regression", description="Classifier trained on the features."
    )
    mlp_hidden_size: int = Field(256, ge=1, description="MLP head: hidden units.")
    mlp_epochs: int = Field(50, ge=1, description="MLP head: passes over the features.")
    regularization_c: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Logistic regression: inverse L2 strength (scikit-learn C); smaller = "
        "stronger. None = chosen by 5-fold cross-validation on the training features.",
    )
    batch_size: int = Field(32, ge=1, description="Rows per embedding forward pass.")
    num_actors: int = Field(1, ge=1, description="Embedding actors (model loaded once per actor).")
    in_process_max_rows: int = Field(
        5_000,
        ge=0,
        description="At or below this many rows (train + validation) features are extracted in "
        "the driver process instead of on a Ray Data actor pool: a pool's fixed cost (actor "
        "start, model load, read and write tasks; 20-40 s) outweighs a few thousand rows' "
        "forward passes. Runs asking for GPUs keep the pool unless the driver has one. "
        "0 = always the actor pool.",
    )
    distributed_min_rows: int = Field(
        200_000,
        ge=1,
        description="MLP head: at or above this many training rows it trains "
        "data-parallel with Ray Train (scaling.num_workers); below, in one process.",
    )


class StageConfig(_Strict):
    """One stage of a chained run (e.g. domain adaptation, then the task)."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Stage name; its run is <run.name>-<name>.",
    )
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted-key overrides applied to the config for this stage "
        "(e.g. task.type: causal_lm, data.train_files: [...]). A later stage starts from the "
        "previous stage's exported model.",
    )


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="ZeRO stage 0-3: 1 shards optimizer state, 2 + gradients, 3 + weights.",
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
    num_workers: int = Field(
        1, ge=1, description="Training worker processes (one per GPU on GPU nodes)."
    )
    cpus_per_worker: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Logical CPUs each worker reserves."
    )
    gpus_per_worker: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="GPUs each worker reserves (0 = CPU training)."
    )
    data_cpus: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="Logical CPUs kept free for Ray Data; with none, data reads wait forever.",
    )

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What each training worker reserves, as Ray Train's ScalingConfig takes it."""
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res

    max_failures: int = Field(
        0,
        ge=0,
        description="Worker/node failures tolerated; each resumes from the last checkpoint.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed across nodes: PACK/SPREAD prefer few/many nodes; "
        "STRICT_PACK needs one node that holds them all, STRICT_SPREAD one node per worker "
        "(both checked against the cluster before the run starts).",
    )


class ExportConfig(_Strict):
    """How `<run>/final` stores weights (which checkpoint it holds is train.export)."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype of the exported tensors (config.json says the same). auto: full "
        "weights (method=full, a merged model, a base that travels with an adapter) in "
        "train.precision's dtype, which is what the run computed in, so no precision is lost "
        "and bf16 halves the files; LoRA adapters in fp32: they are tiny, and fp32 merges into a "
        "base of any dtype without rounding twice.",
    )


class TrackingConfig(_Strict):
    """Where a run's metrics go besides its own files. Every run always keeps its reported metrics
    (`<run>/report/history.jsonl`) and curves (`<run>/report/curves.png`); these add MLflow and
    TensorBoard, logged on the driver's node from what the workers report."""

    mlflow: bool = Field(
        False,
        description="Log to MLflow: the resolved config as params, every reported metric at its "
        "optimizer step, tags, and metrics.json + curves.png as artifacts. Costs a few seconds of "
        "start-up (import, store).",
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: a server (http://host:5000) or a database "
        "(sqlite:///path.db); default sqlite:///<run.storage_path>/mlflow.db (a local storage "
        "path only). An unreachable server warns once and training goes on.",
    )
    experiment: str | None = Field(
        None,
        description="MLflow experiment name; default run.name (ferry tune: the search's name, "
        "with one child run per trial under the search's run).",
    )
    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files to <run>/tensorboard (view with "
        "`tensorboard --logdir <run.storage_path>`).",
    )


class RunSpec(_Strict):
    """One complete run: what to adapt, how, on what data, with what resources."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    method: Literal["full", "lora", "feature_extraction"] = Field(
        "lora",
        description="Full fine-tuning, LoRA adapters, or a frozen model's features + a head.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    task: TaskConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="The export's weight dtype (export.dtype)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="MLflow and TensorBoard logging (both off by default; the metrics history "
        "and curves are always written).",
    )
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
        return self.data.cache_dir or join(self.run.storage_path, "_cache")

    @property
    def run_dir(self) -> str:
        """Ray Train's folder of the run: checkpoints, and the export in `final/`."""
        return join(self.run.storage_path, self.run.name)

    @property
    def export_dir(self) -> str:
        """Where the trained model is written in plain Hugging Face format."""
        return join(self.run_dir, EXPORT_DIR)


PACKAGE_PREFIX = "python-package:"


def resolve_package_path(ref: str) -> str:
    """`python-package:mod/sub/dir` -> the absolute path of sub/dir inside installed module `mod`.

    The package is located without importing it (some model packages import heavy runtimes).
    """
    import importlib.util

    module, _, sub = ref.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package '{module}' is not installed; pip install it (underscores -> dashes)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ValueError(f"'{sub}' not found in package '{module}' ({path})")
    return str(path)
