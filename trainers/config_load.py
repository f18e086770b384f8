"""Loading a run config: YAML + `--set` overrides -> a validated `RunSpec`, every problem at once.

`load_config` is the entry point. It raises one `ConfigError` listing every problem as
`"<dotted.key>=<value>: <rule>. <fix>."`: schema errors (pydantic, reworded) and the cross-field
rules the libraries do not check (`check_rules`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from trainers.chat_templates import TEMPLATES, is_template_source
from trainers.config import DataConfig, RunSpec
from trainers.errors import ConfigError
from trainers.storage import is_hub_dataset, is_uri


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with YAML 1.2's floats: 1.1 reads `1e-4` (no dot) as a string, so a learning rate
    written the way everyone writes it would fail validation."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse config YAML (files, `--set` values, search spaces) with YAML 1.2 number rules."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  a SafeLoader subclass


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML run config, apply `key.path=value` overrides, validate everything.

    A `tune:` block (read by `ferry tune`) is ignored here, with a warning, so one file serves both.

    Raises:
        ConfigError: listing every problem found, one per line.
    """
    raw, problems = load_raw(path, overrides)
    if raw.pop("tune", None) is not None:
        logging.getLogger("ferry.config").warning(
            "config has a tune: block; it is ignored here (run `ferry tune` to search)"
        )
    return build_spec(raw, problems)


def load_raw(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The config file as a mapping with paths resolved and overrides applied, not yet validated.

    Returns:
        (mapping, problems found in the overrides).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                [f"config={path}: file not found. Pass the path to a YAML run config."]
            )
        try:
            raw = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"config={path}: not valid YAML ({e}). Fix the YAML syntax."]) from e
        if not isinstance(raw, dict):
            raise ConfigError(
                [f"config={path}: top level must be a mapping. Use `key: value` lines."]
            )
        # Relative data/storage paths mean "relative to the config file", so a config runs the same
        # from any working directory.
        raw = _resolve_relative_paths(raw, p.parent)
    problems: list[str] = []
    for item in overrides or []:
        problems += apply_override(raw, item)
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
        if value and not is_uri(value) and not os.path.isabs(value):
            setattr(obj, key, os.path.abspath(value))
    return spec


def check_rules(spec: RunSpec) -> list[str]:
    """Cross-field rules the libraries do not check (Ray accepts num_workers=0, DeepSpeed stage
    4...)."""
    p: list[str] = []
    m, t, s, d, ds = spec.model, spec.train, spec.scaling, spec.data, spec.deepspeed
    sources = [x for x in (m.name_or_path, m.preset) if x]
    if len(sources) != 1:
        p.append(
            f"model.name_or_path={m.name_or_path}: exactly one of model.name_or_path or "
            "model.preset "
            "is required. Set a model id/directory or a preset (tiny-llama, tiny-bert, "
            "small-llama)."
        )
    if m.gguf_file and not m.name_or_path:
        p.append(
            f"model.gguf_file={m.gguf_file}: needs model.name_or_path (the directory or repo "
            "holding "
            "the file). Set model.name_or_path to the folder that contains the GGUF file."
        )
    p += _check_task_model(spec)
    if ds.offload_params and ds.zero_stage != 3:
        p.append(
            f"deepspeed.offload_params={ds.offload_params}: parameter offload needs ZeRO stage 3 "
            f"(deepspeed.zero_stage={ds.zero_stage}). Set deepspeed.zero_stage=3 or "
            "offload_params=false."
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
    p += check_levers(spec)
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
    p += _check_chat(spec)
    if spec.task.labels is not None and len(set(spec.task.labels)) != len(spec.task.labels):
        p.append(f"task.labels={spec.task.labels}: labels must be distinct. Remove duplicates.")
    if spec.task.labels is not None and len(spec.task.labels) < 2:
        p.append(f"task.labels={spec.task.labels}: need at least 2 labels. List every class.")
    p += _check_tracking(spec)
    if d.packing != "best_fit" and not (d.pack and spec.task.type in ("causal_lm", "chat")):
        logging.getLogger("ferry.config").warning(
            "data.packing=%s is ignored: only causal_lm and chat training rows are packed, "
            "with data.pack=true",
            d.packing,
        )
    metric = t.best_metric
    if not metric.startswith(("eval/", "train/")):
        p.append(
            f"train.best_metric={metric}: must be a reported metric such as eval/loss, "
            "eval/accuracy "
            "or eval/f1. Use one of those."
        )
    if t.early_stopping is not None and spec.method == "feature_extraction":
        p.append(
            "train.early_stopping={...}: method=feature_extraction trains its head without "
            "evaluation steps, so nothing would stop it early. Remove train.early_stopping."
        )
    return p


def check_levers(spec: RunSpec) -> list[str]:
    """The memory levers that need a CUDA GPU or a package: flash_attention_2 and bitsandbytes
    quantization. Checked where the config is validated; the packages must be importable there
    too (a driver without them usually means workers without them: one image)."""
    m, s, ds = spec.model, spec.scaling, spec.deepspeed
    p = []
    if m.attn_implementation == "flash_attention_2":
        if s.gpus_per_worker == 0:
            p.append(
                "model.attn_implementation=flash_attention_2: FlashAttention runs on CUDA GPUs "
                "only (scaling.gpus_per_worker=0). Set scaling.gpus_per_worker>=1 or use "
                "model.attn_implementation=sdpa."
            )
        if not _importable("flash_attn"):
            p.append(
                "model.attn_implementation=flash_attention_2: the flash_attn package is not "
                "installed. `pip install flash-attn` on a CUDA machine, or use "
                "model.attn_implementation=sdpa."
            )
    q = m.quantization
    if q is None:
        return p
    shown = f"model.quantization.bits={q.bits}"
    if s.gpus_per_worker == 0:
        p.append(
            f"{shown}: bitsandbytes quantization needs a CUDA GPU (scaling.gpus_per_worker=0). "
            "Set scaling.gpus_per_worker>=1 or drop model.quantization."
        )
    if spec.method != "lora":
        p.append(
            f"{shown}: a quantized base is frozen, so only LoRA adapters can train on it "
            f"(method={spec.method}). Set method=lora or drop model.quantization."
        )
    if ds.zero_stage == 3:
        p.append(
            f"{shown}: ZeRO-3 cannot partition bitsandbytes' packed weights "
            "(deepspeed.zero_stage=3). Set deepspeed.zero_stage to 2 or less (a 4-bit base is "
            "small enough to replicate), or drop model.quantization."
        )
    if m.preset:
        p.append(
            f"{shown}: model.preset={m.preset} is a random-init model built from a config; "
            "quantization applies to a pretrained checkpoint. Set model.name_or_path, or drop "
            "model.quantization."
        )
    if m.gguf_file:
        p.append(
            f"{shown}: a GGUF file is already quantized (transformers dequantizes it on load). "
            "Drop model.gguf_file or model.quantization."
        )
    if not _importable("bitsandbytes"):
        p.append(
            f"{shown}: the bitsandbytes package is not installed. `pip install bitsandbytes` "
            "on a CUDA machine, or drop model.quantization."
        )
    return p


def _importable(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _check_tracking(spec: RunSpec) -> list[str]:
    """MLflow's default store is a SQLite file beside the runs, which needs a local path; a file
    store is refused by MLflow 3 itself (it raises unless MLFLOW_ALLOW_FILE_STORE is set)."""
    tr, storage = spec.tracking, spec.run.storage_path
    if not tr.mlflow:
        ignored = [k for k in ("mlflow_uri", "experiment") if getattr(tr, k) is not None]
        if ignored:
            logging.getLogger("ferry.config").warning(
                "tracking.%s is ignored: tracking.mlflow=false", " and tracking.".join(ignored)
            )
        return []
    uri = tr.mlflow_uri
    if uri is None and is_uri(storage) and not storage.startswith("file://"):
        return [
            f"tracking.mlflow_uri=None: the default MLflow store is "
            f"sqlite:///<run.storage_path>/mlflow.db, and run.storage_path={storage} is not a "
            "local path. Set tracking.mlflow_uri to a tracking server (http://host:5000)."
        ]
    if uri is not None and (uri.startswith("file:") or ("://" not in uri and uri != "databricks")):
        return [
            f"tracking.mlflow_uri={uri}: MLflow 3 refuses a plain folder (file store). Use a "
            "database such as sqlite:////abs/path/mlflow.db, or a server (http://host:5000)."
        ]
    return []


# Which presets can learn which task (pretrained models are checked when loaded).
_PRESET_TASKS = {
    "tiny-bert": {"sequence_classification", "masked_lm", "question_answering:extractive"},
    "tiny-llama": {
        "sequence_classification",
        "causal_lm",
        "chat",
        "summarization",
        "question_answering:generative",
    },
    "small-llama": {
        "sequence_classification",
        "causal_lm",
        "chat",
        "summarization",
        "question_answering:generative",
    },
    "tiny-t5": {"summarization", "question_answering:generative"},
}
# The Llama-shaped presets learn what the small Llama does.
_PRESET_TASKS["llama-1b"] = _PRESET_TASKS["llama-8b"] = _PRESET_TASKS["small-llama"]


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
            "method=lora: masked_lm (continued pretraining of an encoder) trains the full model "
            "here, "
            "so the next stage can load it as a plain checkpoint. Set method=full for this stage."
        )
    if spec.method == "feature_extraction" and task != "sequence_classification":
        p.append(
            f"method=feature_extraction: trains a classifier head on frozen features, so it needs "
            f"task.type=sequence_classification (got {task}). Use method full or lora for {task}."
        )
    return p


def _check_chat(spec: RunSpec) -> list[str]:
    """Chat settings only mean something for task.type=chat; a template must be one we know."""
    d = spec.data
    if spec.task.type != "chat":
        defaults = DataConfig.model_fields
        return [
            f"data.{key}={getattr(d, key)}: only task.type=chat reads it. Set task.type=chat or "
            "remove it."
            for key in ("chat_template", "train_on", "conversation")
            if getattr(d, key) != (defaults[key].get_default(call_default_factory=True))
        ]
    p = []
    if (
        d.chat_template
        and d.chat_template not in TEMPLATES
        and not is_template_source(d.chat_template)
    ):
        p.append(
            f"data.chat_template={d.chat_template}: neither a built-in template nor a Jinja "
            f"template. Use one of {', '.join(sorted(TEMPLATES))}, or a Jinja string that loops "
            "over messages ({% for message in messages %}...)."
        )
    if d.prompt_column or d.response_column:
        p.append(
            f"data.prompt_column={d.prompt_column}: task.type=chat reads its columns from "
            "data.conversation. Use data.conversation.format=prompt_completion with "
            "data.conversation.prompt_column/completion_column."
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
            "train.micro_batch_size_per_worker*"
            f"train.gradient_accumulation_steps={accum * per_step}. "
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
        # An optional section (`X | None`) lists the keys of X.
        kinds = get_args(getattr(field, "annotation", None)) or (
            getattr(field, "annotation", None),
        )
        sections = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return sorted(model.model_fields)


def apply_override(raw: dict[str, Any], item: str) -> list[str]:
    if "=" not in item:
        return [f"--set {item}: expected key.path=value. Example: --set train.learning_rate=3e-4."]
    key, _, text = item.partition("=")
    try:
        value = load_yaml(text) if text != "" else ""
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
        if (
            isinstance(v, str)
            and v
            and not is_uri(v)
            and not is_hub_dataset(v)
            and not os.path.isabs(v)
        ):
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


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as dotted keys: `{"train": {"learning_rate": 1e-4}}` ->
    `{"train.learning_rate": 1e-4}` (the keys `--set` takes). Lists and empty sections stay
    values."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def dump_spec(spec: RunSpec) -> str:
    """The resolved config as YAML (what `ferry validate` prints and the export records)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
