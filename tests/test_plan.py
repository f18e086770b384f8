"""`ferry plan`: the model-state bytes equal the tensors DeepSpeed really holds per rank, the
activation estimate moves the right way, the CLI's output and --set line, the refusal message,
and every shipped example plans."""

import glob
import json
import os

import pytest

from cluster.cli import main
from trainers.config_load import build_spec, load_config
from trainers.errors import ConfigError
from trainers.train.plan import (
    GIB,
    activation_bytes,
    model_shape,
    parse_bytes,
    plan_run,
    refuse_if_unfit,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


def _spec(stage: int, method: str = "full", preset: str = "small-llama"):
    return build_spec(
        {
            "model": {"preset": preset},
            "method": method,
            "task": {"type": "causal_lm"},
            "data": {"train_files": ["x"], "max_seq_length": 16},
            "train": {"micro_batch_size_per_worker": 2},
            "deepspeed": {"zero_stage": stage},
            "scaling": {"num_workers": 2},
        }
    )


def _llama_1b_bf16():
    return build_spec(
        {
            "model": {"preset": "llama-1b"},
            "method": "full",
            "task": {"type": "causal_lm"},
            "data": {"train_files": ["x"]},
            "train": {"precision": "bf16"},
            "scaling": {"num_workers": 8},
        }
    )


CASES = {"zero0-full": (0, "full"), "zero2-full": (2, "full"), "zero3-full": (3, "full"),
         "zero3-lora": (3, "lora")}  # fmt: skip


def test_model_states_equal_the_tensors_deepspeed_holds_per_rank(ray_session, tmp_path):
    """2 Ray Train workers, real deepspeed.initialize on gloo, fp32 (the CPU's precision): after
    one backward and one step, each rank sums the bytes of the tensors it holds, and the plan's
    row for that stage and 2 ranks names the same bytes within 1% (DeepSpeed's padding is
    mirrored, not covered by the tolerance: the observed difference is Adam's step scalars)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = str(tmp_path)
    llama = plan_run(_llama_1b_bf16())
    n_llama = llama.total_params
    assert n_llama == 1_235_814_400  # Llama-3.2-1B
    # Plain data into the closure: Ray's workers cannot import this test module.
    cases = {
        n: (stage, _spec(stage, m, "tiny-llama").model_dump()) for n, (stage, m) in CASES.items()
    }

    def loop(_):
        import deepspeed
        import torch
        import torch.distributed as dist

        from trainers.config import RunSpec
        from trainers.model import build_model
        from trainers.train.ds_config import build_ds_config
        from trainers.train.loop import skip_unused_shm_build

        skip_unused_shm_build()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        rank = ray.train.get_context().get_world_rank()

        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)

        measured = {}
        for name, (stage, raw) in cases.items():
            spec = RunSpec.model_validate(raw)
            ds = build_ds_config(spec)
            model = build_model(spec, None, None, ds)
            trainable = [p for p in model.parameters() if p.requires_grad]
            engine, opt, _, _ = deepspeed.initialize(
                model=model,
                optimizer=torch.optim.AdamW(trainable, lr=1e-3),
                config=ds,
                dist_init_required=False,
            )
            x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(rank))
            engine.backward(engine(input_ids=x, labels=x).loss)
            params = list(engine.module.parameters())
            frozen = [p for p in params if not p.requires_grad]
            master = []
            if stage == 0:
                held, grads = size(params), size(p.grad for p in params)
            elif stage == 2:
                # Trainable weights live in DeepSpeed's flat (padded) buffer; frozen ones stay.
                held = size(opt.bit16_groups_flat) + size(frozen)
                averaged = opt.averaged_gradients
                groups = averaged.values() if isinstance(averaged, dict) else averaged
                grads = sum(size(g) for g in groups if g is not None)
                master = opt.single_partition_of_fp32_groups
            else:
                held = size(p.ds_tensor for p in params)  # this rank's partitions only
                grads = size([opt.grad_partitions_flat_buffer])
                # A master that shares the partition's storage would not be a copy.
                master = [
                    f
                    for f, w in zip(
                        opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat
                    )
                    if f.data_ptr() != w.data_ptr()
                ]
            engine.step()
            adam = getattr(opt, "optimizer", opt)
            states = [t for s in adam.state.values() for t in s.values() if torch.is_tensor(t)]
            measured[name] = {"params": held, "grads": grads, "master": size(master),
                              "optimizer": size(states)}  # fmt: skip
            del engine, opt, model
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        measured["deepspeed_estimate"] = estimate_zero2_model_states_mem_needs(
            n_llama, num_gpus_per_node=8, cpu_offload=False
        )[1]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(measured, f)

    TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray")),
    ).fit()
    for rank in (0, 1):
        measured = json.load(open(tmp_path / f"rank{rank}.json"))
        for name, (stage, method) in CASES.items():
            row = plan_run(_spec(stage, method, "tiny-llama")).current
            planned = {"params": row.params_bytes, "grads": row.grads_bytes,
                       "master": row.master_bytes, "optimizer": row.optimizer_bytes}  # fmt: skip
            for key, real in measured[name].items():
                assert real == pytest.approx(planned[key], rel=0.01, abs=256), (rank, name, key)
    # The cases differ where they should: ZeRO-3 splits the weights, LoRA trains few of them.
    m = json.load(open(tmp_path / "rank0.json"))
    assert m["zero3-full"]["params"] * 1.9 < m["zero2-full"]["params"]
    assert m["zero3-lora"]["optimizer"] * 20 < m["zero3-full"]["optimizer"]
    assert m["zero3-full"]["master"] == pytest.approx(m["zero3-full"]["optimizer"] / 2, rel=1e-3)
    # DeepSpeed's estimator counts 2 + 18/w bytes per parameter for a 16-bit ZeRO-2 run training
    # every parameter; 4/w of them is the fp32 gradient copy that exists only inside the
    # optimizer step, after the activations are freed, so the plan's peak leaves it out.
    row, n = llama.current, llama.total_params
    states = row.params_bytes + row.grads_bytes + row.master_bytes + row.optimizer_bytes
    assert states + 4 * n // 8 == pytest.approx(m["deepspeed_estimate"], rel=1e-6)


def test_activation_estimate_moves_with_sequence_batch_checkpointing_and_attention():
    shape = model_shape(_spec(2), None)

    def act(seq=256, mb=2, attn="sdpa", ckpt=False):
        return activation_bytes(shape, micro_batch=mb, seq=seq, e=2, attn=attn, checkpointing=ckpt)

    assert act(seq=512) == 2 * act(seq=256)  # sdpa: linear in the sequence
    assert act(mb=4) == 2 * act(mb=2)
    assert act(ckpt=True) < act() / 2  # only layer inputs and one layer's working set
    assert act(ckpt=True, mb=4) > act(ckpt=True)
    assert act(attn="eager") > act()  # eager keeps the s x s scores
    assert act(attn="eager", seq=512) > 2 * act(attn="eager", seq=256)  # quadratic part
    # The vocabulary's logits are a fixed share that checkpointing cannot remove.
    assert act(ckpt=True) > 2 * shape["vocab"] * 256 * (2 + 8)


def test_ferry_plan_output_json_and_set_line(capsys):
    config = os.path.join(ROOT, "examples", "plan_llama_8b.yaml")
    assert main(["plan", config, "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "llama-8b: 8,030,261,248 of 8,030,261,248 parameters trained; sequence 2048" in out
    assert "8 GPU(s) x 80.0 GiB (90% usable)" in out
    line = (
        "--set deepspeed.zero_stage=2 --set deepspeed.offload_optimizer=false "
        "--set train.micro_batch_size_per_worker=2"
    )
    assert f"cheapest fit: {line}" in out
    assert main(["plan", config, "--gpus", "8", "--gpu-memory", "80GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cheapest_fit_set"] == line
    assert plan["current"]["zero_stage"] == 3 and plan["current"]["fits"] is False
    assert plan["current"]["params_bytes"] == 2 * 8_030_261_248 // 8
    assert len(plan["rows"]) == 9 * 7  # 9 stage/offload combinations x micro-batches 1..64
    # The --set line gives a valid config that fits and keeps the global batch.
    overrides = line.replace("--set ", "").split()
    fixed = load_config(config, overrides)
    again = plan_run(fixed, gpus=8, gpu_memory_bytes=80 * GIB)
    assert again.current.fits and fixed.global_batch == plan["global_batch"] == 256
    assert main(["plan", config, "--gpu-memory", "80 gigs"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory=80 gigs: must be a positive size with a unit" in err


def test_gpu_memory_sizes_parse():
    assert parse_bytes("80GiB", "--gpu-memory") == 80 * GIB
    assert parse_bytes("80GB", "--gpu-memory") == 80 * 10**9
    assert parse_bytes("81920MiB", "--gpu-memory") == 80 * GIB
    with pytest.raises(ConfigError, match=r"--gpu-memory=80: must be a positive size"):
        parse_bytes("80", "--gpu-memory")


def test_a_run_that_cannot_fit_is_refused_naming_the_lever():
    spec = _spec(2)  # small-llama, fp32, ZeRO-2, micro-batch 2, 2 workers
    # ZeRO-2's gradient bucket alone (5e8 fp32 elements) exceeds 1 GiB; ZeRO-0 has none.
    with pytest.raises(ConfigError) as e:
        refuse_if_unfit(spec, GIB, world=2)
    (message,) = e.value.problems
    assert message.startswith("deepspeed.zero_stage=2: the run needs 1.9 GiB per GPU (")
    assert "but a GPU has 1.0 GiB (90% usable" in message
    assert message.endswith(
        "It fits with: --set deepspeed.zero_stage=0 --set deepspeed.offload_optimizer=false "
        "--set train.micro_batch_size_per_worker=2."
    )
    with pytest.raises(ConfigError, match="No ZeRO stage, offload or micro-batch fits on 2 GPU"):
        refuse_if_unfit(spec, 1024**2, world=2)
    refuse_if_unfit(spec, 80 * GIB, world=2)  # fits: no error


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_plans(path):
    from trainers.stages import stage_specs

    spec = load_config(path)
    runs = (
        [s.model_copy(update={"model": spec.model}) for _, s in stage_specs(spec)]
        if spec.stages
        else [spec]
    )
    for run in runs:
        plan = plan_run(run, gpu_memory_bytes=80 * GIB)
        assert plan.total_params >= plan.trainable_params > 0 or run.method == "feature_extraction"
        assert plan.current.gpu_bytes > plan.current.params_bytes > 0
        assert plan.cheapest_fit is not None, path
