"""The `ferry` CLI end to end, as a user runs it: subprocesses, embedded local Ray."""

import json
import re

import pytest
from conftest import classification_rows, run_ferry, write_jsonl


@pytest.fixture
def config(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", classification_rows(200))
    (tmp_path / "run.yaml").write_text(
        "# tiny CLI test run\n"
        "run: {name: cli, storage_path: runs}\n"
        "model: {preset: tiny-bert}\n"
        "method: full\n"
        "task: {type: sequence_classification}\n"
        "data: {train_files: [train.jsonl], max_seq_length: 32}\n"
        "train: {learning_rate: 3.0e-3, num_epochs: 2, micro_batch_size_per_worker: 4, eval_every_n_steps: 20, log_every_n_steps: 5}\n"
        "deepspeed: {zero_stage: 1}\n"
        "scaling: {num_workers: 2}\n"
    )
    return tmp_path


def test_validate_prints_config_or_every_error_without_traceback(config):
    ok = run_ferry("validate", "run.yaml", cwd=config)
    assert ok.returncode == 0, ok.stderr
    assert "zero_stage: 1" in ok.stdout and "learning_rate: 0.003" in ok.stdout
    bad = run_ferry("validate", "run.yaml", "--set", "train.learning_rate=-1", "--set", "lora.rnk=2",
                 "--set", "deepspeed.zero_stage=7", cwd=config)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "train.learning_rate=-1: input should be greater than 0" in bad.stderr
    assert "lora.rnk=2: extra inputs are not permitted" in bad.stderr
    assert "deepspeed.zero_stage=7: input should be less than or equal to 3" in bad.stderr
    cols = run_ferry("validate", "run.yaml", "--set", "data.text_column=body", cwd=config)
    assert cols.returncode == 2 and "column 'body' not found (has: label, text)" in cols.stderr


# What Ray, Ray Data, Ray Train, DeepSpeed, transformers, torch and Python's warnings print.
LIBRARY_LINE = re.compile(r"INFO|WARNING|Warning|pid=\d|TrainingReport|Execution plan|"
                          r"execution finished|core_worker|accelerator")
# Ferry's own lines: its log records and worker lines, the summary table and the paths after it.
FERRY_LINE = re.compile(r"^(\[ferry\] |model: |curves: |training data: |\s*ferry: \d+ steps|[┏┃┡│└])")


@pytest.mark.slow
def test_train_then_eval_from_the_cli(config):
    run = run_ferry("train", "run.yaml", cwd=config)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "[ferry] step 5/" in out and "tok/s" in out and "ETA" in out  # live progress
    assert "eval/accuracy" in run.stdout  # the before/after summary table
    # The terminal holds Ferry's lines only: worker lines (progress), the controller's
    # evaluation lines, the driver's summary; the libraries' output is kept in the run's log.
    lines = [line for line in out.splitlines() if line.strip()]
    assert [line for line in lines if not FERRY_LINE.match(line)] == []
    assert [line for line in lines if LIBRARY_LINE.search(line)] == []
    for shown in ("[ferry] eval before training: eval/loss", "[ferry] eval @ step 20: eval/loss",
                  "[ferry] exported to", "│ eval/accuracy"):
        assert shown in out, shown
    [log] = (config / "runs" / "cli" / "logs").glob("train-*.log")
    assert f"[ferry] library logs: {log}" in run.stderr
    kept = log.read_text()
    # The driver's Ray Data plans, and worker lines after their process as Ray prints them.
    assert "Execution plan of Dataset" in kept
    assert re.search(r"^\(RayTrainWorker pid=\d+\) Reporting training result 1: TrainingReport",
                     kept, re.M)
    assert "[ferry] eval @ step 20:" in kept  # the log has Ferry's lines too
    final = config / "runs" / "cli" / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["final"]["eval/accuracy"] >= 0.9
    # The export and a Ray checkpoint folder (DeepSpeed ZeRO shards) evaluate the same, in one
    # `ferry eval` (one data preparation, one worker start).
    ckpt = sorted(p for p in (config / "runs" / "cli").iterdir() if p.name.startswith("checkpoint_step_"))[-1]
    ev = run_ferry("eval", "run.yaml", "--checkpoint", str(final), "--checkpoint", str(ckpt), cwd=config)
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert list(got) == [str(final), str(ckpt)]
    assert got[str(final)]["eval/loss"] == pytest.approx(metrics["final"]["eval/loss"], rel=1e-3)
    assert got[str(final)]["eval/accuracy"] == pytest.approx(metrics["final"]["eval/accuracy"])
    # The last checkpoint is the last evaluation; final/ is the best one (train.export=best).
    assert got[str(ckpt)]["eval/loss"] == pytest.approx(metrics["last"]["eval/loss"], rel=1e-3)


def test_runtime_error_is_one_message_and_nonzero_exit(config):
    res = run_ferry("train", "run.yaml", "--set", "data.train_files=[missing.jsonl]", cwd=config)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "data.train_files=" in res.stderr and "missing.jsonl: file not found" in res.stderr


def test_verbose_shows_the_libraries_again(config):
    """The quiet terminal itself is checked on the CLI training run above; here the switch."""
    from cluster.cli import build_parser

    parse = build_parser().parse_args
    assert not parse(["train", "run.yaml"]).verbose
    assert parse(["--verbose", "train", "run.yaml"]).verbose
    assert parse(["train", "run.yaml", "--verbose"]).verbose

    # --verbose shows the libraries again (here a new data cache: Ray Data's plans and stats).
    pre = run_ferry("preprocess", "run.yaml", "--set", "data.max_seq_length=24", "--show", "0",
                 "--verbose", cwd=config)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "Execution plan of Dataset" in pre.stderr and "library logs" not in pre.stderr
    assert not (config / "runs" / "cli" / "logs").exists()  # nothing was diverted
