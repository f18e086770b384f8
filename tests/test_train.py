"""Real distributed fine-tuning: Ray Train (2 workers) + DeepSpeed ZeRO on gloo + PEFT, on CPU."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_spec

from trainers.preflight import has_checkpoint, prepare_run
from trainers.storage import LEASE_FILE
from trainers.train.launch import train
from trainers.train.loop import KillAfterStep

pytestmark = pytest.mark.slow


def _history(outcome):
    """Eval history of the run, from the last checkpoint's state file."""
    with open(os.path.join(outcome.checkpoint_path, "ferry_state.json")) as f:
        return json.load(f)


def _reload_eval_loss(export_dir, prepared, task_type, method):
    """Eval loss recomputed with plain transformers/peft (no Ferry model code) on the cached
    validation rows."""
    import transformers

    if method == "lora":
        import peft

        cls = (peft.AutoPeftModelForSequenceClassification if task_type == "sequence_classification"
               else peft.AutoPeftModelForCausalLM)
    else:
        cls = (transformers.AutoModelForSequenceClassification if task_type == "sequence_classification"
               else transformers.AutoModelForCausalLM)
    model = cls.from_pretrained(export_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    rows = pq.read_table(prepared.validation_path).to_pylist()
    loss_sum, weight = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            if task_type == "sequence_classification":
                logits = model(input_ids=ids).logits
                loss_sum += torch.nn.functional.cross_entropy(logits, torch.tensor([r["labels"]])).item()
                weight += 1
            else:
                out = model(input_ids=ids, position_ids=torch.tensor([r["position_ids"]]), use_cache=False)
                labels = torch.tensor(r["labels"][1:])
                n = int((labels != -100).sum())
                loss_sum += torch.nn.functional.cross_entropy(out.logits[0, :-1], labels, ignore_index=-100,
                                                              reduction="sum").item()
                weight += n
    assert tok.pad_token is not None
    return loss_sum / weight


def _matrix_spec(root, data_dir, kind: str, method: str, stage: int, **sections):
    lr = {"full": 3e-3, "lora": 2e-2 if kind == "lm" else 5e-3}[method]
    # LoRA adapts every linear layer here: q/v alone barely moves a random-init model.
    targets = (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
               if kind == "lm" else ["query", "key", "value", "dense"])
    return make_spec(root, kind, data_dir, method=method, deepspeed={"zero_stage": stage},
                     train={"learning_rate": lr, "eval_every_n_steps": 5},
                     lora={"target_modules": targets}, **sections)


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, data_dir):
    """Trained runs shared by the tests that only read them: each is trained once, on first use.
    `lm-lora-zero3` is stopped after step 12 (fault injection, max_failures=0) and resumed by a
    rerun with run.resume=must; `runs.stopped_marker` records that the kill happened."""
    from trainers.errors import TrainingFailedError

    root = tmp_path_factory.mktemp("shared-runs")
    done: dict = {}

    def get(name: str):
        if name in done:
            return done[name]
        kind, method, stage = name.split("-")
        # One preprocessing cache for all of them: the same data, tokenized once per model kind.
        spec = _matrix_spec(root / name, data_dir, kind, method, int(stage.removeprefix("zero")),
                            run={"name": name}, data={"cache_dir": str(root / "cache")})
        if name == "lm-lora-zero3":
            with pytest.raises(TrainingFailedError):
                # max_failures=0: the kill stops the run, like a lost driver or node would.
                train(prepare_run(spec), fault=KillAfterStep(12, str(root / "stopped")))
            get.stopped_marker = root / "stopped"
            get.had_checkpoint_after_stop = has_checkpoint(spec)
            spec = spec.model_copy(update={"run": spec.run.model_copy(update={"resume": "must"})})
        done[name] = (spec, train(prepare_run(spec)))
        return done[name]

    return get


@pytest.mark.parametrize(
    "kind, method, stage",
    [("cls", "full", 2), ("lm", "lora", 3), ("cls", "lora", 3), ("lm", "full", 2)],
    ids=["cls-full-zero2", "lm-lora-zero3", "cls-lora-zero3", "lm-full-zero2"],
)
def test_two_worker_training_learns_and_exports(runs, kind, method, stage):
    # Two of these runs are shared with the resume tests below (trained once): the ZeRO-2 full
    # fine-tune is their uninterrupted baseline, the ZeRO-3 LoRA run is the one stopped at step
    # 12 and resumed, so what it learned and exported is checked after a resume.
    spec, outcome = runs(f"{kind}-{method}-zero{stage}")
    before, final = outcome.metrics["before"], outcome.metrics["final"]
    assert outcome.metrics["steps"] == 2 * (outcome.data.train_rows // 2 // 4)
    # LoRA cannot touch a random-init model's embeddings, so the LM gains less than full tuning.
    assert final["eval/loss"] < before["eval/loss"] * {"cls": 0.8, "lm": 0.7 if method == "full" else 0.9}[kind]
    history = _history(outcome)["history"]
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    # Time blocked on Ray Data per evaluation window, as a share of the window's training time.
    assert all(0 <= h["train/ingest_wait_share"] < 1 for h in history if "train/loss" in h)
    if kind == "cls":
        assert {"eval/accuracy", "eval/f1", "eval/precision", "eval/recall", "eval/f1_pos"} <= set(final)
        assert final["eval/accuracy"] >= 0.9
        with open(os.path.join(outcome.export_dir, "labels.json")) as f:
            assert json.load(f) == ["neg", "pos"]
    else:
        assert final["eval/perplexity"] == pytest.approx(2.718281828 ** final["eval/loss"], rel=1e-6)
    if method == "lora":
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(outcome.export_dir, "adapter_model.safetensors"))
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.numel() > 0 for v in lora_b)  # not the empty ZeRO-3 adapter
        assert any(v.abs().sum() > 0 for v in lora_b)  # and trained (lora_B starts at zero)
    assert _history(outcome)["built_partitioned"] == (stage == 3)  # ZeRO-3: built inside zero.Init
    assert not os.path.exists(os.path.join(spec.run_dir, LEASE_FILE))  # the driver's lease is gone
    # The export reloads with plain transformers/peft and reproduces the final eval loss.
    reloaded = _reload_eval_loss(outcome.export_dir, outcome.data, spec.task.type, method)
    assert reloaded == pytest.approx(final["eval/loss"], rel=2e-3)
    if method == "lora":
        # --merge: the adapter merged into the base model is a plain transformers model.
        from trainers.saved import merge_adapter

        merged = merge_adapter(outcome.export_dir)
        assert _reload_eval_loss(merged, outcome.data, spec.task.type, "full") == pytest.approx(reloaded, rel=1e-4)


def test_workers_that_would_starve_ray_data_are_refused_up_front(ray_session, spec_factory):
    from trainers.errors import ConfigError

    cpus = int(ray_session.cluster_resources()["CPU"])
    spec = spec_factory("cls", scaling={"num_workers": cpus, "cpus_per_worker": 1})
    with pytest.raises(ConfigError, match=rf"scaling\.num_workers={cpus}: .* = {cpus + 1} CPUs, but the cluster has {cpus}"):
        train(prepare_run(spec))


def test_divergence_is_caught_without_a_sync_per_step_and_named():
    """The watch collects non-finite losses and gradient norms on the device and raises at the
    next check, naming the first bad step and the checkpoint kept (DeepSpeed's engine stands in
    as the two attributes the watch reads; tests/test_faults.py runs it for real)."""
    from types import SimpleNamespace

    from trainers.errors import DivergedError
    from trainers.train.loop import LoopState, _DivergenceWatch, divergence_reason

    inf = float("inf")
    assert divergence_reason([inf, inf], 0.5, 3) is None
    assert divergence_reason([inf, 7], 0.5, 9) == "gradient norm became non-finite (nan/inf) at step 7"
    assert divergence_reason([inf, inf], float("nan"), 9) == "evaluation loss became nan at step 9"
    spec = make_spec(Path("."), "cls", Path("."))
    engine = SimpleNamespace(device=torch.device("cpu"), get_global_grad_norm=lambda: 0.3)
    watch = _DivergenceWatch(engine, spec)
    state = LoopState(step=9, history=[{"train/step": 5, "eval/loss": 0.4}])
    for step, loss in [(6, 0.5), (7, float("nan")), (8, 0.2), (9, float("inf"))]:
        watch.loss(torch.tensor(loss), step)
        watch.grad_norm(step)
    with pytest.raises(DivergedError, match=r"training loss became non-finite \(nan/inf\) at step 7: stopped; the last "
                                            r"good checkpoint is kept: checkpoint_step_0000005 \(step 5\)"):
        watch.stop_if_diverged(state)


def test_train_shards_are_disjoint_and_cover_the_data(ray_session, spec_factory, tmp_path):
    import ray.train
    from conftest import write_jsonl
    from ray.train.torch import TorchTrainer

    from trainers.data.prepare import prepare_dataset
    from trainers.tasks import TASKS
    from trainers.train.launch import dataset_config, ray_datasets
    from trainers.train.loop import train_batches

    rows = [{"text": f"item number {i} is {'good' if i % 2 else 'bad'}", "label": str(i % 2)} for i in range(203)]
    f = write_jsonl(tmp_path / "unique.jsonl", rows)
    # Two prefetched batches: Ray Data collates them on two threads (the order test below).
    spec = spec_factory("cls", data={"train_files": [f]}, train={"prefetch_batches": 2})
    prepared = prepare_dataset(spec)

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        seen = [tuple(r["input_ids"]) for r in shard.iter_rows()]
        # The loop's own epochs, in the order the micro-batches arrive.
        epochs = [[b["input_ids"].tolist() for b in train_batches(shard, TASKS["sequence_classification"], spec, 0, e)]
                  for e in range(2)]
        with open(os.path.join(str(tmp_path), f"{config['run']}-rank{rank}.json"), "w") as fh:
            json.dump({"rows": seen, "epochs": epochs}, fh)

    for run in ("first", "second"):
        TorchTrainer(loop, train_loop_config={"run": run}, scaling_config=ray.train.ScalingConfig(num_workers=2),
                     run_config=ray.train.RunConfig(storage_path=str(tmp_path / "shards"), name=run),
                     datasets=ray_datasets(prepared), dataset_config=dataset_config()).fit()
    out = {(run, r): json.load(open(tmp_path / f"{run}-rank{r}.json")) for run in ("first", "second") for r in range(2)}
    # The same seed gives every worker the same micro-batches in the same order on every run: a
    # resume skips the batches its checkpoint consumed by count. Each epoch is shuffled anew.
    for r in range(2):
        first, second = out["first", r]["epochs"], out["second", r]["epochs"]
        assert first == second
        assert len(first[0]) == prepared.train_rows // 2 // spec.train.micro_batch_size_per_worker
        assert first[0] != first[1]
    seen = [set(map(tuple, out["first", r]["rows"])) for r in range(2)]
    everything = {tuple(r["input_ids"]) for r in pq.read_table(prepared.train_path).to_pylist()}
    assert len(everything) == prepared.train_rows  # every row is unique
    assert not seen[0] & seen[1]
    assert len(seen[0]) == len(seen[1]) == prepared.train_rows // 2
    assert len(everything - (seen[0] | seen[1])) <= 1  # an equal split drops at most world-1 rows


def test_stopped_run_resumes_on_rerun_and_completed_run_is_not_retrained(runs):
    from trainers.errors import ConfigError

    spec, resumed = runs("lm-lora-zero3")  # stopped after step 12, then rerun with resume=must
    assert runs.stopped_marker.exists() and runs.had_checkpoint_after_stop
    state = _history(resumed)
    assert [h["train/step"] for h in state["history"]][:2] == [5, 10]
    total = resumed.metrics["steps"]
    assert total == 2 * (resumed.data.train_rows // 2 // 4)
    # Rerunning a completed run continues from its last checkpoint: no extra steps, same metrics.
    auto = spec.model_copy(update={"run": spec.run.model_copy(update={"resume": "auto"})})
    again = train(prepare_run(auto))
    assert again.metrics["steps"] == total
    assert again.metrics["final"]["eval/loss"] == pytest.approx(resumed.metrics["final"]["eval/loss"], rel=1e-6)
    # resume=never refuses, before anything starts, to touch a run that has checkpoints.
    never = spec.model_copy(update={"run": spec.run.model_copy(update={"resume": "never"})})
    with pytest.raises(ConfigError, match=r"run\.resume=never: run\.name=lm-lora-zero3 already has checkpoints"):
        prepare_run(never)
    # A rerun of the same name with another config is refused too, naming what changed, instead
    # of silently resuming (or re-exporting) the old run.
    changed = auto.model_copy(update={"train": auto.train.model_copy(update={"learning_rate": 1e-3})})
    with pytest.raises(ConfigError, match=r"run\.name=lm-lora-zero3: this run finished earlier with a "
                                          r"different config \(changed: train\.learning_rate;"):
        prepare_run(changed)


def _count_syncs_main(rank: int, folder: str) -> None:
    """One gloo process: a real DeepSpeed ZeRO-2 engine on a tiny Llama; the host reads
    (aten._local_scalar_dense: `.item()`, `float(t)`, `bool(t)`) of four micro-steps (two optimizer
    steps) of Ferry's `train_micro_step` + the per-step gradient-norm watch, against the bare
    engine's forward/backward/step on the same batches."""
    import datetime

    import deepspeed
    import torch.distributed as dist
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    from trainers.tasks import causal_lm
    from trainers.train.loop import _DivergenceWatch, skip_unused_shm_build, train_micro_step

    class HostReads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.n += 1
            return func(*args, **(kwargs or {}))

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed reads
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=120))
    skip_unused_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    spec = make_spec(Path(folder), "lm", Path(folder))
    counts = {}
    for variant in ("bare", "ferry"):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config=ds_config, dist_init_required=False)
        watch = _DivergenceWatch(engine, spec)
        ids = torch.randint(1, 64, (4, 2, 16), generator=torch.Generator().manual_seed(1))
        HostReads.n = 0
        with HostReads():
            for micro in range(4):
                batch = {"input_ids": ids[micro], "labels": ids[micro].clone()}
                if variant == "bare":
                    loss = engine(**batch, use_cache=False).loss
                    engine.backward(loss)
                    engine.step()
                else:
                    train_micro_step(engine, causal_lm, batch, watch, micro // 2 + 1)
                    if engine.is_gradient_accumulation_boundary():
                        watch.grad_norm(micro // 2 + 1)
        counts[variant] = HostReads.n
    # The counter sees a host read when there is one (what the loop did before: loss.item()).
    with HostReads():
        HostReads.n = 0
        torch.ones(()).item()
    counts["control"] = HostReads.n
    with open(os.path.join(folder, "counts.json"), "w") as f:
        json.dump(counts, f)
    dist.destroy_process_group()


def test_a_micro_step_reads_nothing_on_the_host_beyond_the_bare_engine(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_count_syncs_main, args=(str(tmp_path),), nprocs=1, join=True)
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["control"] == 1
    assert counts["ferry"] == counts["bare"], counts
