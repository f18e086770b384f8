"""Export any Ray Train checkpoint of a run (not only its last state) as a loadable HF model.

`export_checkpoint` is the entry point. The search uses it to publish each search's best
checkpoint: a trial's best evaluation is often not its last (it may have overfit afterwards, or
been stopped before training's own export ran).
"""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow.fs as pafs

from trainers.config import RunSpec, dump_spec
from trainers.data import PreparedData, load_tokenizer, localize


def export_checkpoint(spec: RunSpec, data: PreparedData, checkpoint: str, export_dir: str,
                      summary: dict | None = None) -> str:
    """Write `checkpoint` (DeepSpeed ZeRO shards of any stage/world size) to `export_dir` in the
    same layout as a finished run's `<run>/final`: adapter or full model, tokenizer, labels,
    metrics.json, ferry_run.yaml (and `base/` for a preset's random-init base under LoRA).

    Returns:
        export_dir.
    """
    from trainers.evaluate import load_for_eval
    from trainers.loop import STATE_FILE, _check_adapter_nonempty, _save_preset_base

    tokenizer = load_tokenizer(data.tokenizer_path)
    local = localize(checkpoint)
    model = load_for_eval(spec, tokenizer, data, local)
    with open(os.path.join(local, STATE_FILE)) as f:
        state = json.load(f)
    with tempfile.TemporaryDirectory(prefix="ferry-export-") as tmp:
        state_dict = model.state_dict()
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if spec.method == "lora":
            _check_adapter_nonempty(tmp)
            if spec.model.preset:
                _save_preset_base(model, state_dict, tmp, export_dir)
        tokenizer.save_pretrained(tmp)
        if data.label_names:
            with open(os.path.join(tmp, "labels.json"), "w") as f:
                json.dump(data.label_names, f)
        metrics = {"final": state["history"][-1] if state.get("history") else {},
                   "before": state.get("before"), "steps": state["step"], "method": spec.method,
                   "task": spec.task.type, "checkpoint": checkpoint, **(summary or {})}
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(tmp, "ferry_run.yaml"), "w") as f:
            f.write(dump_spec(spec))
        target = export_dir if "://" in export_dir else os.path.abspath(export_dir)
        fs, path = pafs.FileSystem.from_uri(target)
        fs.create_dir(path)
        pafs.copy_files(tmp, path, destination_filesystem=fs)
    return export_dir
