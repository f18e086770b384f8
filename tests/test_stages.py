"""Domain adaptation as chained stages: masked-LM continued pretraining, then the task from its
weights; resume at the stage and step where a run stopped; perplexity and task metric reported."""

import json
import os
import time

import pyarrow as pa
import pytest
import torch
import yaml
from conftest import classification_rows, write_jsonl

from trainers.config_load import build_spec, load_config
from trainers.errors import ConfigError
from trainers.stages import run_stages, stage_specs


def _raw(tmp_path, data_dir, domain, **top):
    raw = {
        "run": {"name": "da", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-bert"},
        "method": "lora",
        "lora": {"rank": 4},
        "task": {"type": "sequence_classification"},
        "data": {"train_files": [str(data_dir / "cls.jsonl")], "max_seq_length": 32},
        "train": {"learning_rate": 3e-3, "max_steps": 20, "eval_every_n_steps": 5,
                  "micro_batch_size_per_worker": 8, "keep_best_checkpoints": 10},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
        "stages": [
            {"name": "domain", "set": {"task.type": "masked_lm", "method": "full",
                                       "data.train_files": [str(domain)], "train.max_steps": 12}},
            {"name": "task"},
        ],
    }
    raw.update(top)
    return raw


def test_stage_specs_chain_models_and_check_every_stage(tmp_path, data_dir):
    spec = build_spec(_raw(tmp_path, data_dir, data_dir / "lm.jsonl", run={
        "name": "da", "storage_path": str(tmp_path / "runs"), "stage_baseline": True}))
    plan = stage_specs(spec)
    labels = [label for label, _ in plan]
    assert labels == ["stages[0] (domain)", "stages[1] (task)", "stages[1] (task) (baseline)"]
    first, second, baseline = (s for _, s in plan)
    assert (first.task.type, first.method, first.model.preset) == ("masked_lm", "full", "tiny-bert")
    assert first.run.name == "da-domain" and first.stages is None
    # The task stage loads stage 1's export; the baseline starts from the original model.
    assert second.model.name_or_path == first.run_dir + "/final" and second.model.preset is None
    assert (second.task.type, second.method, second.train.max_steps) == ("sequence_classification", "lora", 20)
    assert baseline.model.preset == "tiny-bert" and baseline.run.name == "da-task-baseline"

    bad = _raw(tmp_path, data_dir, data_dir / "lm.jsonl")
    bad["stages"][0]["set"]["method"] = "lora"
    bad["stages"][1]["set"] = {"train.learning_rate": -1}
    bad["stages"].append({"name": "domain"})
    with pytest.raises(ConfigError) as e:
        stage_specs(build_spec(bad))
    text = str(e.value)
    assert "stage names must be distinct" in text
    assert "stages[0] (domain): method=lora: masked_lm" in text
    assert "stages[1] (task): train.learning_rate=-1" in text


def test_stage_file_paths_are_relative_to_the_config(tmp_path, data_dir):
    (tmp_path / "cfg").mkdir()
    write_jsonl(tmp_path / "cfg" / "domain.jsonl", [{"text": "a b c"}])
    raw = _raw(tmp_path, data_dir, "domain.jsonl")
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(raw))
    spec = load_config(tmp_path / "cfg" / "run.yaml")
    first = stage_specs(spec)[0][1]
    assert first.data.train_files == [str(tmp_path / "cfg" / "domain.jsonl")]


def test_masked_lm_masks_are_static_and_near_the_rate():
    from transformers import BertTokenizerFast

    from trainers.config_load import build_spec as bs
    from trainers.model import _train_tokenizer
    from trainers.tasks import masked_lm

    texts = [r["text"] for r in classification_rows(200)]
    tok = _train_tokenizer("tiny-bert", 200, iter(texts))
    assert tok.mask_token_id is not None and not isinstance(tok, BertTokenizerFast)
    spec = bs({"model": {"preset": "tiny-bert"}, "task": {"type": "masked_lm"}, "method": "full",
               "data": {"train_files": ["x"]}})
    table = pa.table({"text": texts, "_file": ["f"] * len(texts), "_row": list(range(len(texts)))})
    out1, _ = masked_lm.tokenize(table, tok, spec)
    out2, _ = masked_lm.tokenize(table, tok, spec)
    assert out1.equals(out2)  # same rows -> same masks (deterministic evaluation)
    labels = out1.column("labels").to_pylist()
    ids = out1.column("input_ids").to_pylist()
    chosen = sum(x != -100 for row in labels for x in row)
    maskable = sum(len(row) - 2 for row in ids)  # [CLS] and [SEP] are never chosen
    assert 0.10 < chosen / maskable < 0.22
    masked = sum(i == tok.mask_token_id for row in ids for i in row)
    assert 0.65 < masked / chosen < 0.95  # ~80 % of chosen positions become [MASK]
    assert all(row[0] == -100 and row[-1] == -100 for row in labels)


@pytest.mark.slow
def test_domain_adaptation_chain_resumes_in_stage_two(ray_session, tmp_path, data_dir):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    from trainers.errors import TrainingFailedError
    from trainers.train.loop import KillAfterStep

    # Unlabeled in-domain text: the same review language as the task, without labels.
    domain = write_jsonl(tmp_path / "domain.jsonl",
                         [{"text": r["text"]} for r in classification_rows(400, seed=7)])
    raw = _raw(tmp_path, data_dir, domain, run={"name": "da", "storage_path": str(tmp_path / "runs"),
                                                "stage_baseline": True})
    spec = build_spec(raw)
    task_run = tmp_path / "runs" / "da-task"

    # Stage 2 loses its worker after step 14 (stage 1 has only 12 steps, so it finishes).
    with pytest.raises(TrainingFailedError):
        run_stages(spec, fault=KillAfterStep(14, str(tmp_path / "killed"), delay_s=3))
    assert (tmp_path / "killed").exists()
    stage1_final = tmp_path / "runs" / "da-domain" / "final"
    stage1_mtime = os.path.getmtime(stage1_final / "metrics.json")
    early = task_run / "checkpoint_step_0000005"
    assert early.is_dir() and not (task_run / "final").exists()
    early_mtime = os.path.getmtime(early)
    restart = time.time()

    outcome = run_stages(spec)
    assert [s.status for s in outcome.stages] == ["complete", "resumed"]
    assert os.path.getmtime(stage1_final / "metrics.json") == stage1_mtime  # stage 1 not rerun
    # Stage 2 continued from its checkpoint: the step-5 checkpoint was not written again.
    assert os.path.getmtime(early) == early_mtime < restart
    final2 = json.loads((task_run / "final" / "metrics.json").read_text())
    assert final2["steps"] == 20

    # Stage 2 started from stage 1's weights, not from a fresh preset init.
    adapter_cfg = json.loads((task_run / "final" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(stage1_final)
    stage1 = AutoModelForMaskedLM.from_pretrained(stage1_final)
    stage2 = AutoPeftModelForSequenceClassification.from_pretrained(task_run / "final")
    key = "embeddings.word_embeddings.weight"
    s1 = stage1.bert.state_dict()[key]
    s2 = stage2.get_base_model().bert.state_dict()[key]
    assert torch.equal(s1, s2)
    torch.manual_seed(0)
    fresh = BertForMaskedLM(BertConfig(**{**stage1.config.to_dict()}))
    assert not torch.allclose(fresh.bert.state_dict()[key], s1)

    # Held-out domain perplexity fell during stage 1; the report compares with the baseline.
    ppl = outcome.summary["domain_perplexity"]
    assert ppl["after"] < 0.8 * ppl["before"], ppl
    task = outcome.summary["task_metric"]
    assert task["metric"] == "eval/accuracy"
    assert 0 <= task["with_stages"] <= 1 and 0 <= task["without_stages"] <= 1
    assert outcome.baseline is not None and outcome.baseline.status == "ran"
    report = json.loads((tmp_path / "runs" / "da" / "stages.json").read_text())
    assert report["summary"] == json.loads(json.dumps(outcome.summary))
    assert [s["status"] for s in report["stages"]] == ["complete", "resumed"]

    # A finished stage whose config changed is refused, naming the stage and the fix.
    raw["stages"][0]["set"]["train.max_steps"] = 13
    with pytest.raises(ConfigError, match=r"stages\[0\] \(domain\): run.name=da-domain: this run "
                                          r"finished earlier with a different config \(changed: "):
        run_stages(build_spec(raw))
