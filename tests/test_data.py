"""Ray Data pipeline: row checks with file+row, bad-row policy, split, packing, cache."""

import json
import os
import re

import pyarrow.parquet as pq
import pytest
import torch
from conftest import classification_rows, lm_rows, write_jsonl

from trainers.config_load import build_spec
from trainers.data.files import check_data
from trainers.data.prepare import prepare_dataset
from trainers.errors import ConfigError, DataError
from trainers.model import load_tokenizer_for


def _prepare(spec):
    return prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))


def _bad_files(d):
    good = [json.dumps(r) for r in classification_rows(30)]
    files = {}
    lines = list(good)
    lines[6] = '{"text": "broken json", "label": '
    files["malformed.jsonl"] = (lines, r"malformed\.jsonl row 7: malformed JSON")
    lines = list(good)
    lines[3] = json.dumps({"text": "   ", "label": "pos"})
    files["empty_text.jsonl"] = (lines, r"empty_text\.jsonl row 4: missing or empty 'text'")
    lines = list(good)
    lines[9] = json.dumps({"label": "pos"})
    files["missing_text.jsonl"] = (lines, r"missing_text\.jsonl row 10: missing or empty 'text'")
    for name, (ls, _) in files.items():
        (d / name).write_text("\n".join(ls) + "\n")
    raw = b"\n".join(x.encode() for x in good[:5]) + b'\n{"text": "caf\xe9 \xff", "label": "pos"}\n' + \
        b"\n".join(x.encode() for x in good[5:]) + b"\n"
    (d / "latin1.jsonl").write_bytes(raw)
    files["latin1.jsonl"] = (None, r"latin1\.jsonl row 6: not valid UTF-8")
    csv_lines = ["text,label"] + [f"row {i} is fine,{'pos' if i % 2 else 'neg'}" for i in range(20)]
    csv_lines[12] = "an extra,field,here"
    (d / "fields.csv").write_text("\n".join(csv_lines) + "\n")
    files["fields.csv"] = (None, r"fields\.csv row 12: expected 2 fields, got 3")
    return files


def test_bad_rows_are_reported_with_file_and_row_and_nothing_trains(ray_session, spec_factory, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for name, (_, pattern) in _bad_files(d).items():
        spec = spec_factory("cls", data={"train_files": [str(d / name)]})
        with pytest.raises(DataError, match=r"data\.on_bad_rows=error: 1 bad rows .*first at .*" + pattern):
            _prepare(spec)
        # Rejected before anything was tokenized or cached, let alone trained.
        assert not os.path.exists(spec.cache_dir) or os.listdir(spec.cache_dir) == []


def test_skip_policy_counts_bad_rows_and_keeps_the_rest(ray_session, spec_factory, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    _bad_files(d)
    spec = spec_factory("cls", data={"train_files": [str(d / "malformed.jsonl"), str(d / "latin1.jsonl")],
                                     "on_bad_rows": "skip"})
    prepared = _prepare(spec)
    assert prepared.bad_rows == {"malformed JSON": 1, "not valid UTF-8": 1}
    assert prepared.train_rows + prepared.validation_rows == 59  # 30 + 31 rows, 2 bad


def test_unknown_label_and_missing_column_name_the_field(ray_session, spec_factory, tmp_path):
    rows = classification_rows(40)
    rows[17]["label"] = "meh"
    f = write_jsonl(tmp_path / "labels.jsonl", rows)
    spec = spec_factory("cls", data={"train_files": [f]}, task={"labels": ["neg", "pos"]})
    with pytest.raises(DataError, match=r"task\.labels=\['neg', 'pos'\]: label 'meh' in .*labels\.jsonl row 18"):
        _prepare(spec)
    spec = spec_factory("cls", data={"train_files": [f], "label_column": "stars"})
    problems = check_data(spec)
    assert any(p.startswith(f"data.train_files={f}: column 'stars' not found") for p in problems)
    spec = spec_factory("cls", data={"train_files": [str(tmp_path / "nope*.jsonl")]})
    assert check_data(spec) == [f"data.train_files={tmp_path}/nope*.jsonl: file not found. Fix the path or glob."]


def test_empty_training_data_is_rejected(ray_session, spec_factory, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match="no usable training rows"):
        _prepare(spec_factory("cls", data={"train_files": [str(f)]}))


def test_overlong_rows_follow_policy(ray_session, spec_factory, tmp_path):
    rows = classification_rows(60)
    rows[5]["text"] = " ".join(["really"] * 200)
    f = write_jsonl(tmp_path / "long.jsonl", rows)
    spec = spec_factory("cls", data={"train_files": [f], "overlong": "error", "validation_fraction": 0.01})
    with pytest.raises(DataError, match=r"long\.jsonl row 6: \d+ tokens > data\.max_seq_length=32"):
        _prepare(spec)
    dropped = _prepare(spec_factory("cls", data={"train_files": [f], "overlong": "drop", "validation_fraction": 0.01}))
    kept = _prepare(spec_factory("cls", data={"train_files": [f], "overlong": "truncate", "validation_fraction": 0.01}))
    assert dropped.train_rows + dropped.validation_rows == 59
    assert kept.train_rows + kept.validation_rows == 60
    lengths = [len(x) for x in pq.read_table(kept.train_path).column("input_ids").to_pylist()]
    assert max(lengths) == 32


def test_overlong_rule_is_one_rule_for_every_task(spec_factory):
    """Every task's tokenizer asks trainers.tasks.common.overlong_policy: fits -> None, else the
    configured policy, or under `error` the row, its length and the fixes (task-specific first)."""
    from trainers.tasks.common import overlong_policy

    for policy in ("truncate", "drop"):
        spec = spec_factory("cls", data={"max_seq_length": 8, "overlong": policy})
        assert overlong_policy(8, spec, "a.jsonl", 3) is None
        assert overlong_policy(9, spec, "a.jsonl", 3) == policy
    spec = spec_factory("lm", data={"max_seq_length": 8, "overlong": "error"})
    with pytest.raises(DataError, match=r"^a\.jsonl row 3: 9 tokens > data\.max_seq_length=8\. Raise "
                       r"data\.max_seq_length, set data\.pack=true or set data\.overlong=truncate\|drop\.$"):
        overlong_policy(9, spec, "a.jsonl", 3, fix=", set data.pack=true")


def test_csv_and_parquet_inputs_and_stable_split(ray_session, spec_factory, tmp_path):
    import pyarrow as pa

    rows = classification_rows(100)
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    a = _prepare(spec_factory("cls", data={"train_files": [str(tmp_path / "a.csv")]}))
    b = _prepare(spec_factory("cls", data={"train_files": [str(tmp_path / "b.parquet")]}))
    assert a.train_rows + a.validation_rows == 100 == b.train_rows + b.validation_rows
    assert 3 <= a.validation_rows <= 20  # validation_fraction=0.1 by a stable per-row hash
    assert a.label_names == ["neg", "pos"]


def test_cache_is_reused_and_partial_caches_are_ignored(ray_session, spec_factory, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", classification_rows(50))
    spec = spec_factory("cls", data={"train_files": [f]})
    first = _prepare(spec)
    assert not first.cache_hit
    # A half-written cache for the same key (crash mid-write) must never be read.
    os.rename(first.cache_path, first.cache_path + ".partial-dead")
    second = _prepare(spec)
    assert not second.cache_hit and second.cache_path == first.cache_path
    third = _prepare(spec)
    assert third.cache_hit and third.train_rows == first.train_rows
    # Any change to inputs or settings gives a new key.
    changed = _prepare(spec_factory("cls", data={"train_files": [f], "max_seq_length": 16}))
    assert not changed.cache_hit and changed.cache_path != first.cache_path


def test_packing_resets_positions_and_masks_boundaries(ray_session, spec_factory, tmp_path):
    f = write_jsonl(tmp_path / "lm.jsonl", lm_rows(80))
    prepared = _prepare(spec_factory("lm", data={"train_files": [f], "max_seq_length": 32}))
    t = pq.read_table(prepared.train_path).to_pylist()
    tok = load_tokenizer_for.__globals__["_train_tokenizer"]  # noqa: F841 (tokenizer is cached)
    from trainers.model import load_tokenizer

    eos = load_tokenizer(prepared.tokenizer_path).eos_token_id
    for row in t:
        assert len(row["input_ids"]) == 32
        for i, p in enumerate(row["position_ids"]):
            if p == 0:
                assert row["labels"][i] == -100  # no loss on a token whose context is another doc
            if i and p == 0 and row["labels"][i - 1] != -100:
                assert row["input_ids"][i - 1] == eos  # documents end in EOS
    assert prepared.train_tokens == 32 * len(t)
    # data.packing=best_fit (default): every document fits a row, so none is split.
    assert prepared.stats["data/whole_document_share"] == 1.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attn):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, use_cache=False, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    from trainers.tasks import causal_lm

    batch = causal_lm.collate({"input_ids": [packed[0].numpy()], "labels": [packed[0].numpy()],
                               "position_ids": [pos[0].numpy()]}, pad_id=0)
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0, 7:]
        alone = model(input_ids=b, use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)


def test_missing_config_data_file_is_a_config_error_before_ray(ray_session, spec_factory, tmp_path):
    """Refused by the driver's checks, before any Ray task or worker starts (train() reads the
    cluster's resources, hence the session Ray)."""
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    spec = spec_factory("cls", data={"train_files": [str(tmp_path / "missing.jsonl")]})
    with pytest.raises(ConfigError, match=r"data\.train_files=.*missing\.jsonl: file not found"):
        train(prepare_run(spec))


def test_json_array_files_are_read_with_row_numbers(ray_session, spec_factory, tmp_path):
    """A `.json` file holding one JSON array (Alpaca's format) is read like JSON Lines; a bad
    element is reported with its file and 1-based position."""
    import json as jsonlib

    from conftest import classification_rows

    rows = classification_rows(60, seed=3)
    good = tmp_path / "rows.json"
    good.write_text(jsonlib.dumps(rows, indent=1))
    spec = spec_factory("cls", data={"train_files": [str(good)]})
    assert check_data(spec) == []
    prepared = _prepare(spec)
    assert prepared.train_rows + prepared.validation_rows == 60
    bad = tmp_path / "bad.json"
    bad.write_text(jsonlib.dumps(rows[:4] + ["not a row"] + rows[4:10]))
    with pytest.raises(DataError, match=r"bad\.json row 5: not a JSON object"):
        _prepare(spec_factory("cls", data={"train_files": [str(bad)]}))
    broken = tmp_path / "broken.json"
    broken.write_text(jsonlib.dumps(rows)[:-5])
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        _prepare(spec_factory("cls", data={"train_files": [str(broken)]}))


# --- Hugging Face `datasets` data: .arrow files, save_to_disk folders, hf-hub: names ---------


def _chat_rows(n: int) -> list[dict]:
    """Classification rows with a nested chat column; row 4 has an empty text (a bad row)."""
    rows = classification_rows(n, seed=5)
    for r in rows:
        r["messages"] = [
            {"role": "user", "content": r["text"]},
            {"role": "assistant", "content": r["label"]},
        ]
    rows[3]["text"] = ""
    return rows


def _save_to_disk(rows, folder, **kwargs) -> str:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder), **kwargs)
    return str(folder)


def _read_as_prepare_does(path, spec=None):
    """One file through the training reader: canonical columns, 1-based _row, _error; with a
    chat spec, the conversation as the chat task reads it."""
    import pyarrow as pa

    from trainers.data.prepare import _read_file_batch

    columns = {"messages": "messages"} if spec else {"text": "text", "label": "label"}
    t = _read_file_batch(
        pa.table({"path": [path], "split": ["train"]}),
        columns,
        "auto",
        fraction=0.0,
        seed=0,
        max_rows=None,
        spec_dict=spec.model_dump() if spec else None,
    )
    return t.drop_columns(["_file"]).to_pylist()


def test_saved_dataset_folder_reads_like_the_same_jsonl(spec_factory, tmp_path):
    """A `save_to_disk` folder gives exactly its Arrow data files (not its JSON metadata, not the
    cache file a later `.map` leaves there) and the same rows, row numbers and bad rows as the
    JSONL of the same data; nested `messages` stay a list of dicts; check_data checks the
    folder's columns."""
    import datasets

    from trainers.data.files import expand_files, format_of, parse_file

    rows = _chat_rows(12)
    jsonl = write_jsonl(tmp_path / "chat.jsonl", rows)
    folder = _save_to_disk(rows, tmp_path / "chat")
    datasets.load_from_disk(folder).map(lambda r: {"n": 1})  # leaves cache-*.arrow in the folder
    assert any(f.startswith("cache-") for f in os.listdir(folder))
    files = expand_files([folder], "data.train_files")
    assert files == [f"{folder}/data-00000-of-00001.arrow"]
    assert format_of(files[0], "auto") == "arrow"

    records, errors = parse_file(files[0], "arrow", ["text", "label", "messages"])
    assert records == rows and errors == [None] * 12
    assert records[0]["messages"] == [
        {"role": "user", "content": rows[0]["text"]},
        {"role": "assistant", "content": rows[0]["label"]},
    ]
    from_arrow, from_jsonl = _read_as_prepare_does(files[0]), _read_as_prepare_does(jsonl)
    assert from_arrow == from_jsonl
    assert [r["_row"] for r in from_arrow] == list(range(1, 13))
    assert from_arrow[3]["_error"] == "missing or empty 'text'"
    chat = build_spec({"model": {"preset": "tiny-llama"}, "task": {"type": "chat"},
                       "data": {"train_files": [folder]}})
    chat_arrow = _read_as_prepare_does(files[0], chat)
    assert chat_arrow == _read_as_prepare_does(jsonl, chat)
    assert json.loads(chat_arrow[0]["messages"]) == rows[0]["messages"]
    assert check_data(spec_factory("cls", data={"train_files": [folder]})) == []
    spec = spec_factory("cls", data={"train_files": [folder], "text_column": "prompt"})
    assert check_data(spec) == [
        f"data.train_files={files[0]}: column 'prompt' not found (has: label, messages, text). "
        "Set the matching data.*_column or fix the file."
    ]

    # Several folders (one in two shards) by a glob or by their parent folder: shard order kept.
    _save_to_disk(rows[:5], tmp_path / "many" / "a", num_shards=2)
    _save_to_disk(rows[5:], tmp_path / "many" / "b")
    shards = [
        f"{tmp_path}/many/a/data-00000-of-00002.arrow",
        f"{tmp_path}/many/a/data-00001-of-00002.arrow",
        f"{tmp_path}/many/b/data-00000-of-00001.arrow",
    ]
    assert expand_files([str(tmp_path / "many" / "*")], "data.train_files") == shards
    assert expand_files([str(tmp_path / "many")], "data.train_files") == shards
    assert [
        r for f in shards for r in parse_file(f, "arrow", ["text", "label", "messages"])[0]
    ] == rows


def test_arrow_files_classlabels_and_column_checks(spec_factory, tmp_path):
    """A direct `.arrow` file (IPC stream as `datasets` writes it, or IPC file format), read
    with only the columns asked for; a `ClassLabel` column reads as its names (-1: no label);
    check_data checks columns against the schema; a non-Arrow `.arrow` file is named."""
    import datasets
    import pyarrow as pa

    from trainers.data.files import parse_file, peek_columns

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    folder = str(tmp_path / "cl")
    datasets.Dataset.from_dict(
        {"text": ["a", "b", "c"], "label": [1, 0, -1]}, features=features
    ).save_to_disk(folder)
    stream = f"{folder}/data-00000-of-00001.arrow"
    assert parse_file(stream, "arrow", ["label", "text"])[0] == [
        {"label": "pos", "text": "a"},
        {"label": "neg", "text": "b"},
        {"label": None, "text": "c"},
    ]

    table = pa.Table.from_pylist(classification_rows(6))
    file_format = tmp_path / "rows.arrow"
    with pa.OSFile(str(file_format), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert peek_columns(str(file_format), "arrow") == {"text", "label"}
    records, errors = parse_file(str(file_format), "arrow", ["text", "id"])
    assert records == [{"text": r["text"]} for r in classification_rows(6)]
    assert errors == [None] * 6

    spec = spec_factory("cls", data={"train_files": [str(file_format), stream]})
    assert check_data(spec) == []
    spec = spec_factory("cls", data={"train_files": [stream], "label_column": "stars"})
    assert check_data(spec) == [
        f"data.train_files={stream}: column 'stars' not found (has: label, "
        "text). Set the matching data.*_column or fix the file."
    ]

    (tmp_path / "fake.arrow").write_text('{"text": "not arrow"}\n')
    with pytest.raises(DataError, match=r"fake\.arrow: not an Arrow IPC stream or file"):
        parse_file(str(tmp_path / "fake.arrow"), "arrow", ["text"])


def test_dataset_dict_folder_is_refused_with_its_splits(spec_factory, tmp_path):
    import datasets

    from trainers.data.files import expand_files

    ds = datasets.Dataset.from_list(classification_rows(8))
    folder = str(tmp_path / "dd")
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(folder)
    message = (
        f"data.train_files={folder}: a DatasetDict folder with splits train, test. "
        f"Point at one split's folder, e.g. {folder}/train."
    )
    with pytest.raises(DataError) as e:
        expand_files([folder], "data.train_files")
    assert str(e.value) == message
    assert check_data(spec_factory("cls", data={"train_files": [folder]})) == [message]
    assert expand_files([f"{folder}/test"], "data.validation_files") == [
        f"{folder}/test/data-00000-of-00001.arrow"
    ]


@pytest.mark.timeout(60)
def test_hub_dataset_offline_is_one_clear_error(spec_factory, tmp_path, monkeypatch):
    """`hf-hub:NAME[:SPLIT]` offline fails at once with one message and the fix, no chained
    traceback; a name `load_dataset` can resolve without the network expands to its cache files;
    a config file does not take the entry for a path relative to itself."""
    import datasets

    from trainers.config_load import load_raw
    from trainers.data.files import expand_files, parse_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    entry = "hf-hub:ferry-tests/no-such-dataset:validation"
    with pytest.raises(DataError) as e:
        expand_files([entry], "data.train_files")
    assert re.fullmatch(
        r"data\.train_files=hf-hub:ferry-tests/no-such-dataset:validation: cannot load the Hub "
        r"dataset here: offline, no network or no such dataset \(.+\)\. Check the name, or run "
        r"datasets\.load_dataset\('ferry-tests/no-such-dataset', split='validation'\)"
        r"\.save_to_disk\(DIR\) where the network allows and set data\.train_files to DIR\.",
        str(e.value),
    )
    assert e.value.__cause__ is None and e.value.__suppress_context__
    problems = check_data(spec_factory("cls", data={"train_files": ["hf-hub:ferry-tests/none"]}))
    assert len(problems) == 1 and "split='train'" in problems[0]

    # load_dataset also takes a local folder of data files: the cache-file path without a network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "train.jsonl", classification_rows(5))
    files = expand_files([f"hf-hub:{tmp_path}/src"], "data.train_files")
    assert len(files) == 1 and files[0].startswith(str(tmp_path / "hf-cache"))
    assert parse_file(files[0], "arrow", ["text", "label"])[0] == classification_rows(5)

    (tmp_path / "run.yaml").write_text(f"data:\n  train_files: [{entry}, a.jsonl]\n")
    raw, _ = load_raw(tmp_path / "run.yaml")
    assert raw["data"]["train_files"] == [entry, str(tmp_path / "a.jsonl")]


def test_prepare_reads_a_saved_dataset_folder(ray_session, spec_factory, tmp_path):
    """Through Ray Data end to end: every row of a `save_to_disk` folder lands in train or
    validation, and its `ClassLabel` names are the labels."""
    import datasets

    rows = classification_rows(60, seed=7)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    folder = str(tmp_path / "reviews")
    datasets.Dataset.from_list(rows, features=features).save_to_disk(folder)
    prepared = _prepare(spec_factory("cls", data={"train_files": [folder]}))
    assert prepared.train_rows + prepared.validation_rows == 60
    assert prepared.label_names == ["neg", "pos"]
