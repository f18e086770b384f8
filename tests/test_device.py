"""Device placement: every tensor a collective sees is on the engine's device, and the one
device/dtype decision for prediction, feature extraction, analysis and standalone evaluation.

How the collective test stays honest without a GPU. NCCL refuses a tensor that is not on the
rank's CUDA device; the bug it catches is a tensor built without an explicit device, which lands
on the process's default device (the CPU) while the engine is on CUDA. Two real gloo ranks
reproduce that mismatch with the roles turned around: the engine's device is the CPU (gloo can
reduce there) and the process's default device is `meta`, so a tensor built without
`device=` lands on `meta`. Every torch.distributed tensor collective is wrapped to refuse a
tensor that is not on the engine's device, as NCCL would. The loop's evaluation (uneven batches
per rank: the round count, the loss sums and the gathered predictions) and the collective
helpers run through it. Checked against the history: the evaluation as it was before its
collectives took the model's device (`torch.tensor([rounds])`) fails here. What this cannot
check on a CPU: that an object collective runs with the rank's CUDA device current (the helpers
enter `torch.cuda.device(device)` for a CUDA device; that line runs only on a GPU).
"""

import ast
import datetime
import json
import logging
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_DEVICE = torch.device("cpu")
_TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "reduce")


class _TinyClassifier(torch.nn.Module):
    """Token ids -> 2-class logits (mean of embeddings, then a linear layer)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(logits=self.out(self.emb(input_ids).mean(1)))


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(0, 16, (4, 5), generator=g),
            "attention_mask": torch.ones(4, 5, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g),
        }
        for _ in range(3)
    ]


def _refuse_off_device_tensors(device: torch.device) -> list[str]:
    """Wrap torch.distributed's tensor collectives to raise on a tensor not on `device` (what
    NCCL does with a CPU tensor); return the log of what they were handed."""
    seen: list[str] = []
    for name in _TENSOR_COLLECTIVES:
        real = getattr(dist, name)

        def strict(tensor, *args, _real=real, _name=name, **kwargs):
            tensors = tensor if isinstance(tensor, list | tuple) else [tensor]
            for t in tensors:
                seen.append(f"{_name}:{t.device}")
                if t.device != device:
                    raise RuntimeError(f"{_name} got a tensor on {t.device}, engine is on {device}")
            return _real(tensor, *args, **kwargs)

        setattr(dist, name, strict)
    for name in ("all_gather_object", "broadcast_object_list"):
        real = getattr(dist, name)

        def staged(*args, _real=real, **kwargs):
            if "device" in kwargs and kwargs["device"] is not None:
                assert torch.device(kwargs["device"]) == device, kwargs["device"]
            # The pickled bytes are staged on the current device (the engine's, see docstring).
            with torch.device(device):
                return _real(*args, **kwargs)

        setattr(dist, name, staged)
    return seen


def _rank_main(rank: int, folder: str) -> None:
    from trainers.tasks import classification
    from trainers.train.collectives import all_gather_objects, all_reduce, from_rank0
    from trainers.train.loop import evaluate

    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    model, batches = _TinyClassifier(), _batches()
    mine = [b for i, b in enumerate(batches) if i % 2 == rank]  # rank 0: 2 batches, rank 1: 1
    seen = _refuse_off_device_tensors(ENGINE_DEVICE)
    torch.set_default_device("meta")  # a tensor built without device= lands here, and fails
    try:
        data = types.SimpleNamespace(label_names=["a", "b"])
        metrics = evaluate(model, (mine, batches[0]), classification, data, 2)
        worst = all_reduce(torch.tensor([float(rank)], device=ENGINE_DEVICE), ENGINE_DEVICE, "max")
        ranks = all_gather_objects(rank, ENGINE_DEVICE)
        word = from_rank0("zero" if rank == 0 else "one", ENGINE_DEVICE)
    finally:
        torch.set_default_device("cpu")
    # Reference: the whole validation set in this process, without collectives.
    with torch.no_grad():
        loss = sum(
            torch.nn.functional.cross_entropy(
                model(b["input_ids"], b["attention_mask"]).logits, b["labels"], reduction="sum"
            ).item()
            for b in batches
        )
    out = {
        "eval_loss": metrics["eval/loss"],
        "reference_loss": loss / 12,
        "worst": worst.item(),
        "ranks": ranks,
        "word": word,
        "seen": seen,
    }
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def test_collectives_only_see_tensors_on_the_engine_device(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["eval_loss"] == pytest.approx(r["reference_loss"], rel=1e-6)
        assert r["worst"] == 1.0 and r["ranks"] == [0, 1] and r["word"] == "zero"
        # The evaluation's round count and loss sums went through the strict all-reduce.
        assert sum(s.startswith("all_reduce:") for s in r["seen"]) >= 3
        assert set(r["seen"]) == {"all_reduce:cpu"}


def test_every_collective_goes_through_the_helpers():
    """torch.distributed collectives are called in trainers/train/collectives.py alone, so every
    one takes the engine's device explicitly."""
    names = {*_TENSOR_COLLECTIVES, "all_gather_object", "broadcast_object_list", "barrier"}
    calls = []
    for folder, _, files in os.walk(os.path.join(ROOT, "trainers")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith(os.path.join("train", "collectives.py")):
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in names
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("dist", "torch.distributed")
                ):
                    calls.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.func.attr}")
    assert calls == []


def test_compute_device_cpu_runs_and_gpu_runs_without_cuda(spec_factory, caplog):
    from trainers.device import compute_device, compute_dtype

    cpu = spec_factory("lm", train={"precision": "bf16"})
    assert compute_device(cpu) == (torch.device("cpu"), torch.float32)
    gpu = spec_factory("lm", train={"precision": "bf16"}, scaling={"gpus_per_worker": 1})
    # On the driver and in every worker of a GPU run the dtype is the training precision's.
    assert compute_dtype(gpu) == torch.bfloat16
    if torch.cuda.is_available():
        assert compute_device(gpu) == (
            torch.device("cuda", torch.cuda.current_device()),
            torch.bfloat16,
        )
        return
    # Asked for a GPU in a process that has none: the CPU in float32, and the log says why.
    with caplog.at_level(logging.WARNING, logger="ferry.device"):
        assert compute_device(gpu) == (torch.device("cpu"), torch.float32)
    assert "scaling.gpus_per_worker=1 but this process sees no CUDA device" in caplog.text
    assert "Install a CUDA build of torch" in caplog.text
