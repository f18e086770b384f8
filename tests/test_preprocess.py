"""`ferry preprocess`, called in-process on the session's Ray: the cache `ferry train` reads, its
counts, and its rows decoded with the loss-bearing tokens marked."""

import io
import json
import random

import pyarrow.parquet as pq
import pytest
from conftest import NEG, POS, classification_rows, write_jsonl

from cluster.cli import main
from trainers.config_load import load_config
from trainers.data.inspect import print_samples
from trainers.model import load_tokenizer
from trainers.preflight import prepare_run

# Prompts and responses share no word, so a loss on a prompt token shows as a prompt word.
PROMPT_WORDS = ["alpha", "bravo", "charlie", "delta", "golf", "hotel"]
RESPONSE_WORDS = ["xylophone", "yodel", "zeppelin", "walrus", "quartz", "jigsaw"]


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": "ask " + " ".join(rng.sample(PROMPT_WORDS, 2)) + " then",
            "response": " " + " ".join(rng.sample(RESPONSE_WORDS, rng.randint(1, 3))),
        }
        for _ in range(n)
    ]


@pytest.fixture
def instruct_config(tmp_path):
    """40 good training pairs and one with an empty response, 10 validation pairs."""
    train = _pairs(40, seed=0)
    write_jsonl(
        tmp_path / "train.jsonl", train[:7] + [{"prompt": "ask alpha", "response": ""}] + train[7:]
    )
    write_jsonl(tmp_path / "val.jsonl", _pairs(10, seed=1))
    (tmp_path / "run.yaml").write_text(
        f"run: {{name: pp, storage_path: {tmp_path / 'runs'}}}\n"
        "model: {preset: tiny-llama}\n"
        "task: {type: causal_lm}\n"
        "data: {train_files: [train.jsonl], validation_files: [val.jsonl], prompt_column: prompt,"
        " response_column: response, max_seq_length: 32, pack: false, on_bad_rows: skip}\n"
        "train: {micro_batch_size_per_worker: 4}\n"
        "scaling: {num_workers: 2}\n"
    )
    return tmp_path / "run.yaml", train


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]  # every stdout line is JSON


def _cache_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("cache: "))


def test_loss_falls_on_responses_only_and_counts_match_the_cache(
    ray_session, instruct_config, capsys
):
    config, train = instruct_config
    assert main(["preprocess", str(config), "--json", "--show", "5"]) == 0
    summary, *samples = _json_lines(capsys.readouterr().out)
    assert summary["summary"] is True and summary["cache_hit"] is False
    assert summary["train_rows"] == 40 and summary["validation_rows"] == 10
    assert summary["bad_rows"] == {"missing or empty 'response'": 1}
    tok = load_tokenizer(f"{summary['cache_path']}/tokenizer")
    lengths = [
        len(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        + len(tok(r["response"], add_special_tokens=False)["input_ids"])
        + 1
        for r in train
    ]
    assert summary["train_tokens"] == sum(lengths)  # prompt + response + EOS, every row
    cached = pq.read_table(f"{summary['cache_path']}/train").to_pylist()
    by_text = {r["prompt"] + r["response"] + "</s>": r for r in train}
    assert [s["row"] for s in samples] == [0, 1, 2, 3, 4]
    for s in samples:
        pair = by_text[s["text"]]  # the decoded row is the pair itself, EOS token shown
        assert s["segments"] == [[pair["prompt"], False], [pair["response"] + "</s>", True]]
        assert s["loss_text"] == pair["response"] + "</s>" and s["loss_spans"] == [s["loss_text"]]
        assert not any(w in s["loss_text"] for w in PROMPT_WORDS)
        assert s["tokens"] == len(cached[s["row"]]["input_ids"])
        assert (
            s["loss_tokens"]
            == len(tok(pair["response"], add_special_tokens=False)["input_ids"]) + 1
        )

    # Packed rows: several documents (and EOS padding) per row; prompts still bear no loss.
    assert (
        main(["preprocess", str(config), "--json", "--show", "2", "--set", "data.pack=true"]) == 0
    )
    summary, *samples = _json_lines(capsys.readouterr().out)
    assert summary["cache_hit"] is False and len(samples) == 2
    for s in samples:
        assert s["tokens"] == 32 and len(s["loss_spans"]) >= 2
        assert not any(w in s["loss_text"] for w in PROMPT_WORDS)
        assert any(w in s["loss_text"] for w in RESPONSE_WORDS)
        assert "".join(piece for piece, _ in s["segments"]) == s["text"]


def test_second_run_hits_the_cache_that_train_reads(ray_session, instruct_config, capsys):
    config, _ = instruct_config
    assert main(["preprocess", str(config), "--show", "1"]) == 0
    first = capsys.readouterr().out
    assert main(["preprocess", str(config), "--show", "1"]) == 0
    second = capsys.readouterr().out
    assert _cache_line(first).endswith(" (written)")
    assert _cache_line(second) == _cache_line(first).replace("(written)", "(hit: reused)")
    assert "train: 40 rows" in second and "validation: 10 rows" in second
    assert "bad rows skipped: 1 (1 missing or empty 'response')" in second
    # Not a terminal: the response and its EOS inside brackets, the prompt outside.
    shown = second.split("train row 0: ")[1].splitlines()[1]
    assert shown.startswith("ask ") and shown.endswith("</s>]]") and shown.count("[[") == 1
    # `ferry train`'s own preparation (checks, data, step plan) reads this cache.
    plan = prepare_run(load_config(config))
    assert plan.data.cache_hit
    assert _cache_line(second) == f"cache: {plan.data.cache_path} (hit: reused)"


def test_classification_rows_show_their_label(ray_session, tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", classification_rows(60))
    (tmp_path / "run.yaml").write_text(
        f"run: {{name: cls, storage_path: {tmp_path / 'runs'}}}\n"
        "model: {preset: tiny-bert}\n"
        "task: {type: sequence_classification}\n"
        "data: {train_files: [train.jsonl], max_seq_length: 32}\n"
    )
    assert main(["preprocess", str(tmp_path / "run.yaml"), "--json", "--show", "3"]) == 0
    summary, *samples = _json_lines(capsys.readouterr().out)
    assert summary["train_rows"] + summary["validation_rows"] == 60 and len(samples) == 3
    for s in samples:
        assert s["text"].startswith("[CLS] this product is ") and s["text"].endswith(" [SEP]")
        words = set(s["text"].split())
        assert s["label"] == ("pos" if words & set(POS) else "neg") and not words & set(
            NEG if s["label"] == "pos" else POS
        )
        assert s["loss_tokens"] == 0 and s["loss_spans"] == [] and s["loss_text"] == ""


def test_bad_input_is_one_message_before_ray(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(
        f"run: {{name: bad, storage_path: {tmp_path / 'runs'}}}\n"
        "model: {preset: tiny-llama}\n"
        "task: {type: causal_lm}\n"
        "data: {train_files: [missing.jsonl]}\n"
    )
    assert main(["preprocess", str(tmp_path / "run.yaml"), "--show", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "missing.jsonl: file not found" in err
    assert "--show=-1: must be >= 0" in err


def test_a_terminal_gets_colour_instead_of_brackets():
    sample = {
        "row": 0,
        "tokens": 4,
        "loss_tokens": 2,
        "segments": [["ask [b]", False], [" yes", True]],
    }
    plain, coloured = io.StringIO(), io.StringIO()
    print_samples([sample], color=False, file=plain)
    print_samples([sample], color=True, file=coloured)
    assert plain.getvalue() == "train row 0: 4 tokens, 2 with loss\nask [b][[ yes]]\n"
    # Rich markup in the data is shown as text; the loss span alone is bold green.
    assert "\x1b[2mask [b]\x1b[0m\x1b[1;32m yes\x1b[0m" in coloured.getvalue()
