"""Batch prediction on a real local Ray (actor pool) with tiny models saved in the export layout."""

import csv
import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import classification_rows, lm_rows, make_spec, write_jsonl

from trainers.errors import DataError
from trainers.model import build_model, load_tokenizer_for
from trainers.predict import check_predict_inputs, predict_dataset


def _export(tmp_path, data_dir, kind: str, method: str):
    """A random-init preset saved like a finished run's <run>/final (no training needed)."""
    from trainers.export import _save_base, export_dtype

    spec = make_spec(tmp_path, kind, data_dir, method=method,
                     scaling={"num_workers": 1, "cpus_per_worker": 0.5})
    texts = [r["text"] for r in (classification_rows(64) if kind == "cls" else lm_rows(64))]
    tok = load_tokenizer_for(spec, lambda: iter(texts))
    labels = ["neg", "pos"] if kind == "cls" else None
    model = build_model(spec, tok, labels)
    final = tmp_path / "final"
    model.save_pretrained(final)
    if method == "lora":
        _save_base(model, model.state_dict(), str(final), str(final),
                   export_dtype(spec, adapter=False))
    tok.save_pretrained(final)
    if labels:
        (final / "labels.json").write_text(json.dumps(labels))
    return spec, str(final)


def _two_input_files(tmp_path, rows_a, rows_b) -> list[str]:
    """rows_a as JSONL and rows_b as CSV, in tmp_path/in/."""
    (tmp_path / "in").mkdir()
    a = write_jsonl(tmp_path / "in" / "a.jsonl", rows_a)
    b = tmp_path / "in" / "b.csv"
    with open(b, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_b[0]))
        w.writeheader()
        w.writerows(rows_b)
    return [a, str(b)]


@pytest.mark.timeout(120)
def test_classification_predictions_keep_every_row_and_id(ray_session, tmp_path, data_dir):
    spec, final = _export(tmp_path, data_dir, "cls", "full")
    rows = classification_rows(30, seed=3)
    rows_a = [{"id": f"a-{i}", **r} for i, r in enumerate(rows[:17])]
    rows_b = [{"id": f"b-{i}", "text": r["text"]} for i, r in enumerate(rows[17:])]
    _two_input_files(tmp_path, rows_a, rows_b)
    out = tmp_path / "pred"
    summary = predict_dataset(spec, final, [str(tmp_path / "in" / "*")], str(out), batch_size=8)
    assert summary.rows == 30 and summary.input_files == 2 and summary.rows_per_s > 0
    assert "predicted 30 rows from 2 file(s)" in summary.line()
    table = pq.read_table(out)
    got = table.to_pylist()
    assert len(got) == 30
    # Input order (file by file, row by row) is kept; (file, row) joins back to the input too.
    assert [r["id"] for r in got] == [r["id"] for r in rows_a + rows_b]
    assert [(os.path.basename(r["file"]), r["row"]) for r in got] == (
        [("a.jsonl", i) for i in range(1, 18)] + [("b.csv", i) for i in range(1, 14)])
    assert [r["text"] for r in got] == [r["text"] for r in rows]
    for r in got:
        assert r["prediction"] in ("neg", "pos")
        assert math.isclose(r["prob_neg"] + r["prob_pos"], 1.0, abs_tol=1e-5)
        assert r["score"] == pytest.approx(r[f"prob_{r['prediction']}"])
    assert [r["label"] for r in got[:17]] == [r["label"] for r in rows_a]


@pytest.mark.timeout(120)
def test_causal_lm_generation_from_a_lora_export(ray_session, tmp_path, data_dir):
    spec, final = _export(tmp_path, data_dir, "lm", "lora")
    assert os.path.isdir(os.path.join(final, "base"))  # preset LoRA exports carry their base
    rows_a = [{"id": i, "text": "the cat sat on"} for i in range(5)]
    rows_b = [{"id": i, "text": "birds sing in"} for i in range(5, 9)]
    inputs = [write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)]
    out = tmp_path / "gen"
    summary = predict_dataset(spec, final, inputs, str(out), batch_size=4, max_new_tokens=3)
    got = pq.read_table(out).to_pylist()
    assert summary.rows == len(got) == 9
    assert [r["id"] for r in got] == list(range(9))
    assert all(isinstance(r["generation"], str) for r in got)
    # Greedy decoding: the same prompt gives the same continuation, whatever its batch.
    assert len({r["generation"] for r in got[:5]}) == 1
    assert not any(r["generation"].startswith("the cat sat on") for r in got)


def test_bad_inputs_fail_before_ray_with_the_file_and_fix(tmp_path, data_dir):
    spec, final = _export(tmp_path, data_dir, "cls", "full")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 1, "body": "no text column here"}])
    with pytest.raises(DataError, match=r"--input=.*bad\.jsonl: column 'text' not found "
                                        r"\(has: body, id\)\. Pass --set data\.text_column="):
        check_predict_inputs(spec, final, [bad], str(tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_text("")
    with pytest.raises(Exception, match=r"--output=.*full: folder is not empty"):
        check_predict_inputs(spec, final, [bad], str(tmp_path / "full"))
    # The CLI: one line, exit 2, no traceback, before any Ray start.
    (tmp_path / "run.yaml").write_text(
        f"model: {{preset: tiny-bert}}\ntask: {{type: sequence_classification}}\n"
        f"data: {{train_files: [{data_dir / 'cls.jsonl'}]}}\n")
    res = subprocess.run([sys.executable, "-m", "cluster.cli", "predict", "run.yaml", "--checkpoint",
                          final, "--input", bad, "--output", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "bad.jsonl: column 'text' not found" in res.stderr
    assert "started embedded Ray" not in res.stderr
