"""Memory levers and precision-aware loading: gradient checkpointing, the attention kernel,
quantization's refusals, weights built in the training dtype, and the export dtype."""

import json
import os

import pytest
import torch
from conftest import lm_rows, spec_with
from safetensors.torch import load_file

from trainers.config_load import build_spec
from trainers.errors import ConfigError
from trainers.model import build_model, check_checkpointing, load_tokenizer_for

LM = {
    "model": {"preset": "tiny-llama"},
    "task": {"type": "causal_lm"},
    "data": {"train_files": ["x"]},
}


def _spec(tmp_path=None, **sections):
    raw = {k: dict(v) for k, v in LM.items()}
    if tmp_path is not None:
        raw["run"] = {"name": "x", "storage_path": str(tmp_path / "runs")}
    return spec_with(raw, sections)


def _tokenizer(spec):
    return load_tokenizer_for(spec, lambda: iter([r["text"] for r in lm_rows(60)]))


def test_eager_and_sdpa_attention_give_the_same_logits():
    """Same seed, same weights, two kernels: the logits agree, padding masked included."""
    sdpa, eager = _spec(method="full"), _spec(method="full", model={"attn_implementation": "eager"})
    tok = _tokenizer(sdpa)
    a, b = build_model(sdpa, tok, None).eval(), build_model(eager, tok, None).eval()
    assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == "eager"
    tok.padding_side = "left"
    enc = tok(["the cat sat on the mat", "a dog"], return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the mask matters in this batch
    with torch.no_grad():
        la, lb = a(**enc).logits, b(**enc).logits
    real = enc["attention_mask"].bool()
    assert torch.allclose(la[real], lb[real], atol=1e-5)


def test_bf16_run_builds_its_weights_in_bf16(tmp_path):
    """A bf16 run's model is built in bf16 (preset and pretrained alike), not in fp32 first;
    LoRA adapters stay fp32 (PEFT's autocast_adapter_dtype), the rotary buffer too."""
    full = _spec(method="full", train={"precision": "bf16"})
    tok = _tokenizer(full)
    model = build_model(full, tok, None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    pretrained = _spec(
        model={"preset": None, "name_or_path": str(tmp_path / "m")},
        train={"precision": "bf16"},
        lora={"dropout": 0.0},
    )
    lora = build_model(pretrained, tok, None)
    dtypes = {n: p.dtype for n, p in lora.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for p in build_model(_spec(method="full"), tok, None).parameters()} == {
        torch.float32
    }


@pytest.mark.parametrize(
    "sections, expected",
    [
        (
            {"model": {"quantization": {"bits": 4}}},
            r"model\.quantization\.bits=4: bitsandbytes quantization needs a CUDA GPU "
            r"\(scaling\.gpus_per_worker=0\)\. Set scaling\.gpus_per_worker>=1 or drop model\.quantization\.",
        ),
        (
            {
                "model": {"quantization": {"bits": 4}},
                "method": "full",
                "scaling": {"gpus_per_worker": 1},
            },
            r"model\.quantization\.bits=4: a quantized base is frozen, so only LoRA adapters can train on "
            r"it \(method=full\)\. Set method=lora",
        ),
        (
            {
                "model": {"quantization": {"bits": 8}},
                "deepspeed": {"zero_stage": 3},
                "scaling": {"gpus_per_worker": 1},
            },
            r"model\.quantization\.bits=8: ZeRO-3 cannot partition bitsandbytes' packed weights "
            r"\(deepspeed\.zero_stage=3\)\. Set deepspeed\.zero_stage to 2 or less",
        ),
        (
            {"model": {"quantization": {"bits": 4}}, "scaling": {"gpus_per_worker": 1}},
            r"model\.quantization\.bits=4: model\.preset=tiny-llama is a random-init model",
        ),
        (
            {"model": {"quantization": {"bits": 4}}, "scaling": {"gpus_per_worker": 1}},
            r"model\.quantization\.bits=4: the bitsandbytes package is not installed\. "
            r"`pip install bitsandbytes` on a CUDA machine, or drop model\.quantization\.",
        ),
        (
            {"model": {"attn_implementation": "flash_attention_2"}},
            r"model\.attn_implementation=flash_attention_2: FlashAttention runs on CUDA GPUs only "
            r"\(scaling\.gpus_per_worker=0\)\. Set scaling\.gpus_per_worker>=1 or use "
            r"model\.attn_implementation=sdpa\.",
        ),
        (
            {
                "model": {"attn_implementation": "flash_attention_2"},
                "scaling": {"gpus_per_worker": 1},
            },
            r"model\.attn_implementation=flash_attention_2: the flash_attn package is not installed\. "
            r"`pip install flash-attn` on a CUDA machine, or use model\.attn_implementation=sdpa\.",
        ),
    ],
    ids=[
        "quant-on-cpu",
        "quant-full",
        "quant-zero3",
        "quant-preset",
        "no-bitsandbytes",
        "flash-on-cpu",
        "no-flash-attn",
    ],
)
def test_levers_that_cannot_run_are_refused_with_the_fix(sections, expected):
    with pytest.raises(ConfigError, match=expected):
        _spec(**sections)


def test_quantization_refusals_are_collected_at_once():
    with pytest.raises(ConfigError) as e:
        _spec(model={"quantization": {"bits": 4}}, method="full", deepspeed={"zero_stage": 3})
    quant = [p for p in e.value.problems if p.startswith("model.quantization.bits=4")]
    assert len(quant) == 5  # CPU, method, stage 3, preset, package missing


def test_checkpointing_on_a_model_without_it_is_refused(tmp_path):
    """OpenAI GPT (GPT-1) has no activation checkpointing in transformers: read from the class
    the run would build, from a config alone (no weights)."""
    folder = tmp_path / "gpt1"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "openai-gpt",
                "n_embd": 32,
                "n_layer": 1,
                "n_head": 2,
                "vocab_size": 100,
                "n_positions": 64,
            }
        )
    )
    spec = _spec(
        model={"preset": None, "name_or_path": str(folder)}, train={"gradient_checkpointing": True}
    )
    problems = check_checkpointing(spec, None, None)
    assert problems == [
        "train.gradient_checkpointing=True: OpenAIGPTLMHeadModel does not support activation "
        "checkpointing. Set train.gradient_checkpointing=false (lower "
        "train.micro_batch_size_per_worker or raise deepspeed.zero_stage to save memory instead)."
    ]
    assert check_checkpointing(_spec(train={"gradient_checkpointing": True}), None, None) == []


def _export_of(spec, tok):
    from trainers.export import export_model, summary

    model = build_model(spec, tok, None)
    export_model(
        model,
        model.state_dict(),
        spec,
        tok,
        None,
        summary(spec, [{"eval/loss": 1.0}], None, 1),
        spec.export_dir,
    )
    return spec.export_dir


def test_export_dtype_auto_full_weights_in_the_training_dtype_adapters_in_fp32(tmp_path):
    """export.dtype=auto: a bf16 full fine-tune exports bf16 tensors and says so in config.json,
    and transformers reloads it as bf16; a bf16 LoRA run exports an fp32 adapter (its
    travelling preset base in bf16); an explicit dtype is obeyed."""
    import transformers

    from trainers.saved import merge_adapter

    full = _spec(tmp_path, method="full", train={"precision": "bf16"})
    tok = _tokenizer(full)
    out = _export_of(full, tok)
    assert {t.dtype for t in load_file(os.path.join(out, "model.safetensors")).values()} == {
        torch.bfloat16
    }
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}

    lora = _spec(tmp_path, run={"name": "lora"}, train={"precision": "bf16"})
    out = _export_of(lora, tok)
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    base = load_file(os.path.join(out, "base", "model.safetensors"))
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    from trainers.export import export_dtype

    merged = merge_adapter(out, export_dtype(lora, adapter=False))
    assert {t.dtype for t in load_file(os.path.join(merged, "model.safetensors")).values()} == {
        torch.bfloat16
    }

    fp16 = _spec(tmp_path, run={"name": "fp16"}, method="full", export={"dtype": "fp16"})
    out = _export_of(fp16, tok)
    assert {t.dtype for t in load_file(os.path.join(out, "model.safetensors")).values()} == {
        torch.float16
    }
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float16"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(ray_session, tmp_path):
    """Checkpointing on vs off: the same loss and the same full gradients (gathered across the
    2 workers) for full fine-tuning and LoRA, at ZeRO-2 and ZeRO-3, in one real Ray Train run of
    a bf16 run, whose weights are built in bf16 (under ZeRO-3 inside zero.Init)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Nested, so Ray ships it by value (workers cannot import this test module).
    def _checkpointing_equivalence(config):
        """One Ray Train worker: for full and LoRA at ZeRO-2 and ZeRO-3, one forward/backward on a
        fixed batch with checkpointing off, then on (same seed, same weights); rank 0 writes the loss
        and the largest gradient difference of each case."""
        import deepspeed
        import ray.train
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_grad

        from trainers.model import load_tokenizer
        from trainers.train.ds_config import build_ds_config
        from trainers.train.loop import skip_unused_shm_build

        skip_unused_shm_build()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        rank = ray.train.get_context().get_world_rank()
        tok = load_tokenizer(config["tokenizer"])
        ids = torch.randint(4, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
        results = {}
        for method in ("full", "lora"):
            for stage in (2, 3):
                runs = []
                for checkpointing in (False, True):
                    spec = build_spec(
                        {
                            **config["spec"],
                            "method": method,
                            "deepspeed": {"zero_stage": stage},
                            "train": {
                                **config["spec"]["train"],
                                "gradient_checkpointing": checkpointing,
                            },
                        }
                    )
                    ds_config = build_ds_config(spec)
                    model = build_model(spec, tok, None, ds_config)
                    # bf16 from the start, under zero.Init too (its dtype: the DeepSpeed config's)
                    built = sorted(
                        {str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n}
                    )
                    optimizer = torch.optim.AdamW(
                        [p for p in model.parameters() if p.requires_grad]
                    )
                    engine, *_ = deepspeed.initialize(
                        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
                    )
                    engine.train()
                    inner = engine.module.get_base_model() if method == "lora" else engine.module
                    assert inner.is_activation_checkpointing == checkpointing
                    # What checkpointing saves: the bytes autograd keeps for backward (inside a
                    # checkpointed layer nothing is kept; it is recomputed in backward).
                    saved = [0]

                    def pack(t, saved=saved):
                        saved[0] += t.numel() * t.element_size()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        loss = engine(input_ids=ids, labels=ids).loss
                    engine.backward(loss)
                    grads = {
                        n: safe_get_full_grad(p).detach().float().cpu().clone()  # collective
                        for n, p in engine.module.named_parameters()
                        if p.requires_grad
                    }
                    runs.append((loss.item(), grads, built, saved[0]))
                    engine.destroy()
                (loss_off, off, built, saved_off), (loss_on, on, _, saved_on) = runs
                assert off.keys() == on.keys() and off
                results[f"{method}-zero{stage}"] = {
                    "loss_off": loss_off,
                    "loss_on": loss_on,
                    "params": len(off),
                    "built": built,
                    "saved_bytes": [saved_off, saved_on],
                    "max_grad": max(g.abs().max().item() for g in off.values()),
                    "max_diff": max((off[n] - on[n]).abs().max().item() for n in off),
                }
        if rank == 0:
            with open(config["out"], "w") as f:
                json.dump(results, f)

    spec = _spec(
        tmp_path,
        lora={"dropout": 0.0},
        train={"micro_batch_size_per_worker": 2, "global_batch_size": 4, "precision": "bf16"},
        scaling={"num_workers": 2},
    )
    tok = _tokenizer(spec)
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "results.json"
    raw = spec.model_dump(mode="json")
    TorchTrainer(
        _checkpointing_equivalence,
        train_loop_config={"spec": raw, "tokenizer": str(tmp_path / "tok"), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    results = json.loads(out.read_text())
    assert sorted(results) == ["full-zero2", "full-zero3", "lora-zero2", "lora-zero3"]
    for case, r in results.items():
        assert r["loss_on"] == pytest.approx(r["loss_off"], rel=1e-6), case
        assert r["built"] == ["torch.bfloat16"], case
        off_bytes, on_bytes = r["saved_bytes"]
        assert on_bytes < off_bytes / 2, case  # it really checkpointed
        assert r["max_grad"] > 0, case  # gradients flowed (LoRA: through the frozen layers)
        assert r["max_diff"] <= 1e-5 * max(1.0, r["max_grad"]), (case, r)
    assert results["lora-zero2"]["params"] < results["full-zero2"]["params"]
