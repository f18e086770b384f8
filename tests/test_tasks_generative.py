"""Summarization and question answering: metrics on hand-checked examples, and real tiny runs
(Ray Train + DeepSpeed + PEFT on CPU) that learn, evaluate a saved model and predict."""

import json
import os
import random

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from trainers.config_load import build_spec
from trainers.errors import DataError
from trainers.tasks import question_answering as qa
from trainers.tasks import summarization

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sits", "sleeps", "big", "small",
         "old", "new", "park", "home", "tree"]


def summary_rows(n: int, seed: int = 0) -> list[dict]:
    """Summary = the document's first three words: learnable by copying."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 10))]
        rows.append({"text": " ".join(words), "summary": " ".join(words[:3])})
    return rows


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """The answer is the word after the cue 'key is', one or two words into the context (a tiny
    random-init encoder learns that in a few dozen steps; anywhere in the context takes hundreds)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.choice(WORDS)
        before = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 1)))
        after = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        context = f"{before} the key is {answer} . {after}".strip()
        start = context.index("key is ") + len("key is ")
        rows.append({"question": "what is the key ?", "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def _spec(tmp_path, preset, task, train_file, **sections):
    raw = {
        "run": {"name": "g", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": preset},
        "method": "full",
        "task": task,
        "data": {"train_files": [train_file], "max_seq_length": 32, "validation_fraction": 0.15},
        "train": {"learning_rate": 3e-3, "max_steps": 30, "eval_every_n_steps": 30,
                  "micro_batch_size_per_worker": 8, "eval_batch_size_per_worker": 16,
                  "log_every_n_steps": 100},
        "generation": {"max_new_tokens": 6},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return build_spec(raw)


# --- metrics on fixed predictions, values worked out by hand ---------------------------------

def test_rouge_matches_hand_counts():
    # "the cat sat on the mat" vs "the cat lay on the mat": 5 of 6 unigrams shared (the x2, cat,
    # on, mat); bigrams the-cat, on-the, the-mat: 3 of 5; longest common subsequence 5 of 6.
    got = summarization.rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert got == {"eval/rouge1": pytest.approx(5 / 6), "eval/rouge2": pytest.approx(3 / 5),
                   "eval/rougeL": pytest.approx(5 / 6)}
    # Averaged over rows: a perfect row and a disjoint one. Stemming: "cats" matches "cat".
    got = summarization.rouge(["a b c", "x y"], ["a b c", "p q"])
    assert got["eval/rouge1"] == pytest.approx(0.5) and got["eval/rougeL"] == pytest.approx(0.5)
    assert summarization.rouge(["cats run"], ["cat running"])["eval/rouge1"] == pytest.approx(1.0)
    m = summarization.metrics(6.0, 3.0, ["one two three four"], ["one two"], None)
    # rouge1: P 2/4, R 2/2 -> F 2/3; loss = 6/3 tokens; gen_len in words.
    assert m["eval/loss"] == 2.0 and m["eval/rouge1"] == pytest.approx(2 / 3)
    assert m["eval/gen_len"] == 4.0 and set(summarization.METRICS) <= set(m)


def test_squad_exact_match_and_f1_match_hand_counts():
    assert qa.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert qa.normalize_answer("An apple, a day") == "apple day"
    assert qa.exact_match("The Eiffel Tower", "eiffel tower") == 1.0
    assert qa.exact_match("in 1889", "1889") == 0.0
    assert qa.f1_score("in 1889", "1889") == pytest.approx(2 / 3)  # P 1/2, R 1 -> 2/3
    assert qa.f1_score("the big red dog", "a red dog barked") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert qa.f1_score("", "1889") == 0.0
    # Best over the gold answers per row, then the mean over rows.
    m = qa.metrics(3.0, 2.0, ["in 1889", "Paris"], [["1889", "in 1889"], ["London"]], None)
    assert m == {"eval/loss": 1.5, "eval/exact_match": 0.5, "eval/f1": 0.5}
    m = qa.metrics(0.0, 1.0, ["in 1889"], [["1889"]], None)
    assert m["eval/exact_match"] == 0.0 and m["eval/f1"] == pytest.approx(2 / 3)


def test_squad_answers_are_parsed_and_checked(tmp_path):
    spec = _spec(tmp_path, "tiny-bert", {"type": "question_answering"}, "x.jsonl")
    ctx = "the key is red ."
    good = {"question": "q", "context": ctx,
            "answers": json.dumps({"text": ["red"], "answer_start": [11]})}
    assert qa.check_row(good, spec) is None
    as_list = {**good, "answers": json.dumps([{"text": "red", "answer_start": 11}])}
    assert qa.check_row(as_list, spec) is None
    moved = {**good, "answers": json.dumps({"text": ["red"], "answer_start": [3]})}
    assert qa.check_row(moved, spec) == "answer not found in context ('red' at answer_start=3)"
    no_start = {**good, "answers": json.dumps({"text": ["red"]})}
    assert "answer_start" in qa.check_row(no_start, spec)
    gen = _spec(tmp_path, "tiny-t5", {"type": "question_answering", "qa_style": "generative"}, "x.jsonl")
    assert qa.check_row({**good, "answers": "red"}, gen) is None  # generative: a plain string
    assert qa.parse_answers("red", extractive=False) == (["red"], None)


def test_best_span_stays_in_the_context_and_in_order():
    import torch

    start = torch.tensor([[9.0, 0.0, 1.0, 5.0, 0.0]])
    end = torch.tensor([[9.0, 0.0, 4.0, 0.0, 2.0]])
    in_context = torch.tensor([[False, True, True, True, True]])  # position 0 is [CLS]
    # Best start 3 (5.0); end must be >= 3: position 4 (2.0) beats 3 (0.0).
    assert qa.best_spans(start, end, in_context) == [(3, 4)]
    assert qa.best_spans(start, end, in_context, max_tokens=1) == [(2, 2)]


def test_preset_task_table_rejects_a_mismatch():
    from trainers.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.preset=tiny-t5: cannot be trained for "
                                          r"task.type=question_answering \(extractive\)"):
        build_spec({"model": {"preset": "tiny-t5"}, "task": {"type": "question_answering"},
                    "data": {"train_files": ["x.jsonl"]}})


# --- real runs ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_t5_summarization_learns_and_predicts_in_order(ray_session, tmp_path):
    from trainers.predict import predict_dataset
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    data = write_jsonl(tmp_path / "sum.jsonl", summary_rows(120))
    spec = _spec(tmp_path, "tiny-t5", {"type": "summarization"}, data,
                 train={"max_steps": 40, "eval_every_n_steps": 40})
    outcome = train(prepare_run(spec))
    before, final = outcome.metrics["before"], outcome.metrics["final"]
    assert final["eval/loss"] < before["eval/loss"] * 0.7
    for key in ("eval/rouge1", "eval/rouge2", "eval/rougeL"):
        assert 0.0 <= final[key] <= 1.0
    assert final["eval/rouge1"] > before["eval/rouge1"]

    inputs = [{"id": i, "text": r["text"]} for i, r in enumerate(summary_rows(11, seed=5))]
    out = tmp_path / "pred"
    summary = predict_dataset(spec, outcome.export_dir, [write_jsonl(tmp_path / "in.jsonl", inputs)],
                              str(out), batch_size=4)
    got = pq.read_table(out).to_pylist()
    assert summary.rows == len(got) == 11
    assert [r["id"] for r in got] == list(range(11))
    assert [r["text"] for r in got] == [r["text"] for r in inputs]
    assert all(isinstance(r["prediction"], str) for r in got)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_decoder_summarization_lora_on_two_zero3_workers(ray_session, tmp_path):
    """Decoder-only prompt -> summary with LoRA; ZeRO-3 on 2 ranks generates with synced_gpus
    (an uneven validation split makes one rank decode a spare batch)."""
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    data = write_jsonl(tmp_path / "sum.jsonl", summary_rows(100, seed=1))
    spec = _spec(tmp_path, "tiny-llama", {"type": "summarization"}, data, method="lora",
                 lora={"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
                 train={"learning_rate": 2e-2, "max_steps": 8, "eval_every_n_steps": 8,
                        "micro_batch_size_per_worker": 4, "eval_batch_size_per_worker": 4},
                 deepspeed={"zero_stage": 3},
                 scaling={"num_workers": 2, "cpus_per_worker": 1})
    outcome = train(prepare_run(spec))
    final = outcome.metrics["final"]
    assert set(summarization.METRICS) <= set(final)
    assert final["eval/loss"] < outcome.metrics["before"]["eval/loss"]
    assert os.path.exists(os.path.join(outcome.export_dir, "adapter_config.json"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_extractive_qa_learns_and_predicts_spans(ray_session, tmp_path):
    from trainers.predict import predict_dataset
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(120))
    spec = _spec(tmp_path, "tiny-bert", {"type": "question_answering"}, data,
                 train={"max_steps": 45, "eval_every_n_steps": 45})
    outcome = train(prepare_run(spec))
    before, final = outcome.metrics["before"], outcome.metrics["final"]
    assert final["eval/loss"] < before["eval/loss"] * 0.7
    assert final["eval/exact_match"] > before["eval/exact_match"] + 0.5
    assert 1.0 >= final["eval/f1"] >= final["eval/exact_match"]

    rows = qa_rows(9, seed=7)
    inputs = [{"id": i, "question": r["question"], "context": r["context"]} for i, r in enumerate(rows)]
    out = tmp_path / "pred"
    predict_dataset(spec, outcome.export_dir, [write_jsonl(tmp_path / "in.jsonl", inputs)],
                    str(out), batch_size=4)
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == list(range(9))
    for r in got:  # a predicted answer is a piece of its own context
        assert r["context"][r["answer_start"]:].startswith(r["prediction"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_generative_qa_t5_lora_export_evaluates_to_the_same_metrics(ray_session, tmp_path):
    from trainers.evaluate import evaluate_checkpoint
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    rows = qa_rows(80, seed=2)
    for r in rows[::2]:  # generative answers may be plain strings
        r["answers"] = r["answers"]["text"][0]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = _spec(tmp_path, "tiny-t5", {"type": "question_answering", "qa_style": "generative"},
                 data, method="lora", lora={"target_modules": ["q", "k", "v", "o", "wi", "wo"]},
                 train={"learning_rate": 1e-2, "max_steps": 10, "eval_every_n_steps": 10})
    outcome = train(prepare_run(spec))
    final = outcome.metrics["final"]
    assert set(qa.METRICS) <= set(final)
    assert final["eval/loss"] < outcome.metrics["before"]["eval/loss"]
    again = evaluate_checkpoint(spec, outcome.export_dir)
    for key in qa.METRICS:
        assert again[key] == pytest.approx(final[key], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_qa_answer_outside_its_context_is_rejected_with_file_and_row(ray_session, tmp_path):
    from trainers.data.prepare import prepare_dataset
    from trainers.model import load_tokenizer_for

    rows = qa_rows(20)
    rows[6]["answers"]["answer_start"] = [0]  # the context does not start with the answer
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    spec = _spec(tmp_path, "tiny-bert", {"type": "question_answering"}, data)
    with pytest.raises(DataError, match=r"1 bad rows \(1 answer not found in context\); first at "
                                        r".*bad\.jsonl row 7: answer not found in context"):
        prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))
