"""Choose a base model before training: rank candidate pretrained models by cheap transfer signals.

`select_models` is the entry point (driver side, on a connected Ray; `ferry select`). For every
candidate (an HF id, a local folder, a GGUF file, a `python-package:` reference or a preset):
  the run's config with model.* replaced and data.max_rows = the budget
  -> prepare_dataset (the spine's tokenized Parquet cache, with the candidate's tokenizer)
  -> classification: extract_features (in process up to features.in_process_max_rows rows, else a
     Ray Data actor pool; the feature-extraction cache, same
     keys, so a later `method: feature_extraction` run of the winner starts from a cache hit), then
       * probe: the feature head's logistic regression (standardized features, C by
         cross-validation) under an outer stratified cross-validation over the sample (train and
         validation rows together; C chosen on the outer training folds only): accuracy, macro F1;
       * LogME (You, Liu, Wang, Long: "LogME: Practical Assessment of Pre-trained Models for
         Transfer Learning", ICML 2021): the log marginal evidence per row of a Bayesian linear
         model from the features to each one-hot label column, averaged over labels, with the
         paper's fixed-point updates of the prior and noise precisions;
     causal LM and chat: the base model's negative log-likelihood of the target tokens (the ones
     training puts loss on: responses, assistant turns) in process or on a Ray Data actor pool
     (the feature extraction's features.in_process_max_rows rule), as token
     perplexity and as bits per byte of target text (comparable across tokenizers: a tokenizer
     that splits words finer has lower per-token perplexity for the same model quality)
  -> tokenizer fertility (tokens per word) and unknown-token rate on the sample's text
  -> cost: parameters (`ferry plan`'s meta-device build, no weights), trainable parameters for
     the run's method, the plan's memory per worker for the run's scaling, and training FLOPs per
     token (6 N for full fine-tuning; 4 N_frozen + 6 N_trainable with LoRA: the frozen weights
     still need the backward pass through activations, not their own grads).
The ranking key is the task's probe score (accuracy, then F1, then LogME) or bits per byte; the
numbers behind it are in the table and the JSON. Every candidate's signals are cached under
data.cache_dir by what determines them, so a rerun reads them back without touching a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from trainers.config import RunSpec
from trainers.config_load import build_spec, dump_spec, set_path
from trainers.errors import ConfigError
from trainers.storage import join, read_json_if_any, write_bytes

SUPPORTED_TASKS = ("sequence_classification", "causal_lm", "chat")
DEFAULT_BUDGET_ROWS = 1000
_SELECT_VERSION = 1  # bump when a signal's definition changes: cached signals are then recomputed
_PROBE_FOLDS = 5
_LOGME_MAX_ITER = 11  # the paper's reference code: converges in at most 10 updates


@dataclass
class Candidate:
    """One ranked candidate: what it is, its signals, and its rank (1 = best)."""

    ref: str
    model: dict[str, Any]
    signals: dict[str, Any]
    cache_hit: bool
    seconds: float
    rank: int = 0


@dataclass
class Selection:
    """The ranking of `ferry select` and where its files are."""

    task: str
    ranked_by: str
    budget_rows: int
    candidates: list[Candidate] = field(default_factory=list)
    report_path: str | None = None
    config_path: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_models(
    spec: RunSpec, candidates: list[str], *, budget_rows: int = DEFAULT_BUDGET_ROWS
) -> Selection:
    """Rank `candidates` as base models for the run's task on a sample of its data.

    Args:
        spec: the validated run config (its model is replaced by each candidate in turn).
        candidates: base-model references (see `candidate_model`).
        budget_rows: rows read per split for the signals (data.max_rows of each candidate run).

    Returns:
        The ranking, best first; `write_selection` writes it and the winner's config.

    Raises:
        ConfigError: an unsupported task, a bad candidate, or a candidate config that fails the
            run's validation (every problem at once).
    """
    t0 = time.perf_counter()
    specs = candidate_specs(spec, candidates, budget_rows)
    rows = [_signals(ref, s, spec.method) for ref, s in specs.items()]
    key = _rank_key(spec.task.type)
    rows.sort(key=lambda c: _sort_value(c.signals, key))
    for i, row in enumerate(rows, 1):
        row.rank = i
    return Selection(
        task=spec.task.type,
        ranked_by=key,
        budget_rows=budget_rows,
        candidates=rows,
        seconds=round(time.perf_counter() - t0, 2),
    )


def candidate_model(ref: str) -> dict[str, Any]:
    """The `model:` section a candidate reference means.

    `preset:NAME` is a random-init preset; a path ending in `.gguf` (also under a
    `python-package:` reference) is a GGUF file in its folder; anything else is a Hub id, a local
    folder or a `python-package:` reference, as `model.name_or_path` takes it.
    """
    if ref.startswith("preset:"):
        return {"preset": ref.removeprefix("preset:")}
    if ref.endswith(".gguf"):
        folder, _, name = ref.rpartition("/")
        return {"name_or_path": folder or ".", "gguf_file": name}
    return {"name_or_path": ref}


def candidate_specs(spec: RunSpec, candidates: list[str], budget_rows: int) -> dict[str, RunSpec]:
    """Each candidate's run config (validated), keyed by its reference; all problems at once."""
    problems = []
    if spec.task.type not in SUPPORTED_TASKS:
        problems.append(
            f"task.type={spec.task.type}: ferry select ranks models for "
            f"{', '.join(SUPPORTED_TASKS)}. Compare other tasks with short `ferry train` runs."
        )
    if len(candidates) < 1 or len(set(candidates)) != len(candidates):
        problems.append(
            f"--candidates={candidates}: give one or more distinct base models. "
            "E.g. --candidates sentence-transformers/all-MiniLM-L6-v2 ./my-model"
        )
    if budget_rows < 2:
        problems.append(f"--budget-rows={budget_rows}: must be >= 2. Use e.g. 1000.")
    if problems:
        raise ConfigError(problems)
    base = spec.model_dump(mode="json")
    base["model"] = {k: v for k, v in base["model"].items() if k in _MODEL_KEEP}
    specs = {}
    for ref in candidates:
        raw = json.loads(json.dumps(base))
        raw["model"].update(candidate_model(ref))
        set_path(raw, "data.max_rows", budget_rows)
        if spec.task.type == "sequence_classification":
            # The frozen-feature pipeline: its settings (pooling, layer, actors) are the run's.
            raw["method"] = "feature_extraction"
        raw["stages"] = None
        try:
            specs[ref] = build_spec(raw)
        except ConfigError as e:
            problems += [f"candidate {ref}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return specs


# Settings of the run's model that hold for any candidate (the rest names the model).
_MODEL_KEEP = ("trust_remote_code", "preset_vocab_size")


def write_selection(selection: Selection, spec: RunSpec, out_dir: str) -> Selection:
    """Write `select.json` (the ranking) and `selected.yaml` (the run's config with the best
    candidate as its model, ready for `ferry train`) to `out_dir`."""
    best = selection.candidates[0]
    raw = spec.model_dump(mode="json")
    keep = {k: v for k, v in raw["model"].items() if k in _MODEL_KEEP}
    raw["model"] = {**keep, **best.model}
    config_text = (
        f"# The run's config with the best of {len(selection.candidates)} candidates from "
        f"`ferry select` ({best.ref}, ranked by {selection.ranked_by}).\n"
        f"#   ferry train {os.path.join(out_dir, 'selected.yaml')}\n"
    ) + dump_spec(build_spec(raw))
    selection.report_path = os.path.join(out_dir, "select.json")
    selection.config_path = os.path.join(out_dir, "selected.yaml")
    write_bytes(selection.config_path, config_text.encode())
    write_bytes(selection.report_path, json.dumps(selection.to_dict(), indent=2).encode())
    return selection


def summarize(selection: Selection) -> list[str]:
    """The ranked table as text lines (the numbers behind the ranking, best first)."""
    cls = selection.task == "sequence_classification"
    head = ["rank", "candidate"]
    head += ["probe acc", "probe F1", "LogME"] if cls else ["bits/byte", "token ppl"]
    head += ["fertility", "unk rate", "params", "GFLOP/token", "GiB/worker", "cached", "s"]
    lines = []
    for c in selection.candidates:
        s = c.signals
        row = [str(c.rank), c.ref]
        if cls:
            row += [_num(s["probe_accuracy"], 3), _num(s["probe_f1"], 3), _num(s["logme"], 3)]
        else:
            row += [_num(s["bits_per_byte"], 3), _num(s["token_perplexity"], 2)]
        row += [
            _num(s["fertility"], 2),
            _num(s["unk_rate"], 4),
            f"{s['parameters'] / 1e6:,.1f}M",
            _num(s["train_flops_per_token"] / 1e9, 3),
            _num(s["memory_per_worker_bytes"] / 2**30, 2),
            "yes" if c.cache_hit else "no",
            f"{c.seconds:.1f}",
        ]
        lines.append(row)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head)] + [fmt.format(*r) for r in lines]
    out.append(
        f"ranked by {selection.ranked_by} on {selection.budget_rows} rows per split; "
        f"{selection.seconds:.1f}s"
    )
    return out


def _signals(ref: str, spec: RunSpec, method: str) -> Candidate:
    """One candidate's signals: read back from the cache, or computed and cached. `method` is
    the run's own (a classification candidate's spec says feature_extraction: the probe)."""
    from trainers.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    data = prepare_dataset(spec)
    path = join(spec.cache_dir, f"select-{_signals_key(spec, data, method)}.json")
    cached = read_json_if_any(path)
    if cached is not None:
        return Candidate(ref, _model_section(spec), cached, True, time.perf_counter() - t0)
    from trainers.model import load_tokenizer

    tokenizer = load_tokenizer(data.tokenizer_path)
    signals: dict[str, Any] = {
        "train_rows": data.train_rows,
        "validation_rows": data.validation_rows,
    }
    if spec.task.type == "sequence_classification":
        signals.update(_classification_signals(spec, data))
    else:
        signals.update(_lm_signals(spec, data, tokenizer))
    signals.update(_tokenizer_signals(spec, tokenizer))
    signals.update(_cost(spec, method, tokenizer))
    write_bytes(path, json.dumps(signals).encode())
    return Candidate(ref, _model_section(spec), signals, False, time.perf_counter() - t0)


def _model_section(spec: RunSpec) -> dict[str, Any]:
    return spec.model.model_dump(exclude_defaults=True, mode="json")


def _signals_key(spec: RunSpec, data, method: str) -> str:
    from trainers.features.extract import feature_cache_key

    t = spec.train
    parts = [_SELECT_VERSION, spec.task.type, method, spec.lora.model_dump(mode="json")]
    # What the memory plan reads besides the model: the run's scaling and batch settings.
    parts += [
        spec.scaling.num_workers,
        spec.deepspeed.model_dump(mode="json"),
        [t.micro_batch_size_per_worker, t.precision, t.gradient_checkpointing],
        spec.model.attn_implementation,
    ]
    # The feature key covers the tokenized data (files, tokenizer, settings), the model's identity
    # and the pooling: everything the signals depend on, for LM tasks too.
    parts.append(feature_cache_key(spec, data))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _classification_signals(spec: RunSpec, data) -> dict[str, Any]:
    from trainers.features.extract import extract_features
    from trainers.features.head import read_features

    features = extract_features(spec, data)
    x_train, y_train = read_features(features.train_path)
    x_val, y_val = read_features(features.validation_path)
    x, y = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    accuracy, f1, folds = probe_scores(x, y, seed=spec.run.seed)
    return {
        "probe_accuracy": accuracy,
        "probe_f1": f1,
        "probe_folds": folds,
        "logme": logme(x, y),
        "feature_dim": int(x.shape[1]),
        "feature_cache": features.path,
    }


def probe_scores(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float, int]:
    """(accuracy, macro F1, folds) of the feature head's logistic regression
    (`trainers.features.head.fit_logistic_regression`: standardized, C by cross-validation)
    under stratified outer cross-validation: C is chosen on each outer training part only, never
    on the fold it is scored on. Fewer folds when the rarest label has fewer rows; none below 2."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from trainers.features.head import fit_logistic_regression

    counts = np.bincount(y)
    folds = int(min(_PROBE_FOLDS, counts[counts > 0].min()))
    if folds < 2 or len(np.unique(y)) < 2:
        return float("nan"), float("nan"), 0
    predicted = np.empty_like(y)
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, score_rows in outer.split(x, y):
        scaler = StandardScaler().fit(x[fit_rows])
        clf, _, _ = fit_logistic_regression(scaler.transform(x[fit_rows]), y[fit_rows], None, seed)
        predicted[score_rows] = clf.predict(scaler.transform(x[score_rows]))
    return (
        float(accuracy_score(y, predicted)),
        float(f1_score(y, predicted, average="macro")),
        folds,
    )


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., ICML 2021): mean over label columns of the maximized log evidence per row
    of y = f.w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), y the one-hot column. Higher is
    better; comparable across models on the same data (not across data sets).

    With F = U diag(s) V^T (thin SVD) and sigma = s^2, the evidence is
      D/2 log a + N/2 log b - 1/2 sum_i log(a + b sigma_i) - (D - k)/2 log a
      - b/2 |F m - y|^2 - a/2 |m|^2 - N/2 log 2 pi,   m = b (a I + b F^T F)^-1 F^T y,
    and a, b follow the paper's fixed point: gamma = sum b sigma / (a + b sigma),
    a = gamma / |m|^2, b = (N - gamma) / |F m - y|^2.

    One departure from the paper's code: an intercept (features and label columns centered). The
    paper fits none, so the mean feature direction stands in for the label prior, and on
    imbalanced labels that part dominates: on 600 rows of the reviews data MiniLM scored -0.665
    and a random-init model of its shape -0.663 uncentered; -0.622 and -0.656 centered.
    """
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(0)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s * s
    k = len(s)
    evidences = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        y -= y.mean()
        uy = u.T @ y  # y's coordinates in F's column space
        rest = float(y @ y - uy @ uy)  # the part no weights can fit
        a, b = 1.0, 1.0
        for _ in range(_LOGME_MAX_ITER):
            coef = b * s * uy / (a + b * sigma)  # m in the right-singular basis
            gamma = float((b * sigma / (a + b * sigma)).sum())
            m2 = float(coef @ coef)
            res2 = float(((s * coef - uy) ** 2).sum() + rest)
            a_new, b_new = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            done = abs(a_new / b_new - a / b) / (a / b) < 0.01
            a, b = a_new, b_new
            if done:
                break
        coef = b * s * uy / (a + b * sigma)
        m2 = float(coef @ coef)
        res2 = float(((s * coef - uy) ** 2).sum() + rest)
        evidence = (
            d / 2 * math.log(a)
            + n / 2 * math.log(b)
            - 0.5 * float(np.log(a + b * sigma).sum())
            - (d - k) / 2 * math.log(a)
            - b / 2 * res2
            - a / 2 * m2
            - n / 2 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def _lm_signals(spec: RunSpec, data, tokenizer) -> dict[str, Any]:
    """The base model's NLL of the target tokens of the training sample: in this process for a
    sample of at most features.in_process_max_rows rows (the feature extraction's rule: an actor
    pool's fixed cost outweighs a few thousand rows' forward passes), else on a Ray Data actor."""
    from trainers.features.extract import extraction_place, pretrained_ref

    scorer_kwargs = {
        "spec_dict": spec.model_dump(mode="json"),
        "base_ref": pretrained_ref(spec),
        "tokenizer_path": data.tokenizer_path,
    }
    size = spec.train.eval_batch_size_per_worker
    columns = ("nll", "tokens", "bytes")  # what `_TargetNLL` returns per batch, summed here
    if extraction_place(spec, data.train_rows) == "in_process":
        import pyarrow.parquet as pq

        from trainers.storage import filesystem

        scorer = _TargetNLL(**scorer_kwargs)
        fs, path = filesystem(data.train_path)
        table = pq.read_table(path, filesystem=fs)
        parts = [scorer(table.slice(i, size)) for i in range(0, table.num_rows, size)]
        nll, tokens, nbytes = (sum(p.column(c)[0].as_py() for p in parts) for c in columns)
    else:
        import ray.data

        sums = (
            ray.data.read_parquet(data.train_path)
            .map_batches(
                _TargetNLL,
                batch_size=size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=1),
                fn_constructor_kwargs=scorer_kwargs,
                num_cpus=spec.scaling.cpus_per_worker,
                num_gpus=spec.scaling.gpus_per_worker,
            )
            .sum(list(columns))
        )
        nll, tokens, nbytes = (sums[f"sum({c})"] for c in columns)
    return {
        "target_tokens": int(tokens),
        "token_perplexity": float(math.exp(min(nll / max(tokens, 1), 50.0))),
        "bits_per_byte": float(nll / math.log(2) / max(nbytes, 1)),
    }


class _TargetNLL:
    """One base-model replica (a Ray Data actor): tokenized rows -> summed NLL of their target
    tokens, their count, and the UTF-8 bytes of their text."""

    def __init__(self, spec_dict: dict, base_ref: dict, tokenizer_path: str):
        import torch
        import transformers

        from trainers.model import load_pretrained, load_tokenizer, model_config
        from trainers.tasks import TASKS

        spec = RunSpec.model_validate(spec_dict)
        self.task = TASKS[spec.task.type]
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cfg = model_config(spec, self.tokenizer, None)
        cls = self.task.model_class(transformers, spec, cfg)
        torch.manual_seed(spec.run.seed)
        if spec.model.preset:
            self.model = cls.from_config(cfg)
        else:
            from trainers.config import ModelConfig

            self.model = load_pretrained(cls, ModelConfig.model_validate(base_ref), config=cfg)
        self.model.eval().requires_grad_(False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = {c: batch.column(c).to_pylist() for c in batch.column_names}
        enc = self.task.collate(rows, self.pad_id)
        with torch.inference_mode():
            nll, tokens, _ = self.task.loss_and_outputs(self.model, enc)
        targets = enc["labels"][:, 1:]
        ids = enc["input_ids"][:, 1:]
        nbytes = sum(
            len(self.tokenizer.decode(ids[i][targets[i] != -100].tolist()).encode("utf-8"))
            for i in range(len(ids))
        )
        return pa.table({"nll": [float(nll)], "tokens": [int(tokens)], "bytes": [nbytes]})


def _tokenizer_signals(spec: RunSpec, tokenizer) -> dict[str, Any]:
    from trainers.analyze import read_target, tokenizer_stats

    texts, _, _ = read_target(spec, spec.data.max_rows or DEFAULT_BUDGET_ROWS)
    stats = tokenizer_stats(tokenizer, texts)
    return {"fertility": stats["fertility"], "unk_rate": stats["unk_rate"]}


def _cost(spec: RunSpec, method: str, tokenizer) -> dict[str, Any]:
    """The training cost of the candidate in the run's own settings (`ferry plan`'s model, built
    on the meta device: no weights): parameters, trainable parameters, the plan's memory per
    worker for the run's scaling, ZeRO stage and micro-batch, and training FLOPs per token:
    6 N full; 4 N_frozen + 6 N_trainable with LoRA (forward 2 N, backward through the
    activations 2 N, weight gradients 2 N only for trainable weights)."""
    from trainers.train.plan import plan_run

    # The candidate's signal config is feature extraction (classification): cost the run's method.
    plan = plan_run(spec.model_copy(update={"method": method}), tokenizer=tokenizer)
    total, trainable = plan.total_params, plan.trainable_params
    flops = 4 * (total - trainable) + 6 * trainable if method == "lora" else 6 * total
    return {
        "parameters": int(total),
        "trainable_parameters": int(trainable),
        "method": method,
        "train_flops_per_token": float(flops),
        "memory_per_worker_bytes": int(plan.current.gpu_bytes),
        "memory_plan": f"ZeRO-{plan.current.zero_stage}, micro-batch {plan.current.micro_batch}, "
        f"{plan.world} worker(s)",
    }


def _rank_key(task: str) -> str:
    return "probe_accuracy" if task == "sequence_classification" else "bits_per_byte"


def _sort_value(signals: dict[str, Any], key: str) -> tuple:
    def num(v, sign):  # NaN (no probe possible) ranks last
        return math.inf if v is None or v != v else sign * v

    if key == "probe_accuracy":
        return (num(signals[key], -1), num(signals["probe_f1"], -1), num(signals["logme"], -1))
    return (num(signals[key], 1),)


def _num(v: float | None, digits: int) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"
