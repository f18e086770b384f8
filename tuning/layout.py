"""Where a search keeps its files: the experiment folder's layout, in one place.

The search writes these files and the report reads them back (on a finished, interrupted or copied
experiment), so both take the names from here.

Folder of an experiment (`<run.storage_path>/<tune.name>`):
    trial-<id>/               Tune's own trial folder (result.json, error.txt); also Tune's
                              tuner.pkl and experiment state beside them
    runs/trial-<id>/          each trial's Ray Train run (checkpoints, final/)
    runs/trial-<id>.json      the trial's plan and every start (fresh or resumed)
    ferry_search.json         the base config and tune block (what --report and --resume read)
    stop_reasons.json         the stopper's decisions
    ferry_tracking.json       the search's MLflow parent run (a resumed search goes on in it)
    report/                   trials.csv/.parquet, best.yaml, plots (see tuning.report)
    best/                     the best checkpoint, exported (HF format)
"""

from __future__ import annotations

import os

from tuning.config import SearchSpec

SEARCH_FILE = "ferry_search.json"
REASONS_FILE = "stop_reasons.json"
TRACKING_FILE = "ferry_tracking.json"
REPORT_DIR = "report"
BEST_DIR = "best"
TRIAL_PREFIX = "trial-"


def experiment_name(search: SearchSpec) -> str:
    return search.tune.name or f"{search.base.run.name}-tune"


def experiment_dir(search: SearchSpec) -> str:
    """`<run.storage_path>/<experiment name>` (the storage path is absolute once validated)."""
    return f"{search.base.run.storage_path.rstrip('/')}/{experiment_name(search)}"


def trial_name(trial_id: str) -> str:
    """Tune's folder of a trial and the name of the trial's Ray Train run."""
    return TRIAL_PREFIX + trial_id


def runs_dir(exp_dir: str) -> str:
    """Where the trials' Ray Train runs go (their run.storage_path)."""
    return os.path.join(exp_dir, "runs")


def trial_run_dir(exp_dir: str, trial_id: str) -> str:
    return os.path.join(runs_dir(exp_dir), trial_name(trial_id))


def trial_record_file(exp_dir: str, trial_id: str) -> str:
    return trial_run_dir(exp_dir, trial_id) + ".json"
