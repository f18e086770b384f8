"""The pre-run checks every entry point shares: a rerun of an existing run.name must be the same
run (else it is refused with the keys that changed), and run.resume=restart starts over."""

import os

import pytest

from trainers.errors import ConfigError
from trainers.preflight import check_rerun, prepare_run, record_config, recorded_config


def test_a_changed_config_for_an_existing_run_is_refused_with_the_changed_keys(spec_factory):
    spec = spec_factory("cls", run={"name": "same"})
    assert check_rerun(spec) == [] and recorded_config(spec) is None  # a new run
    record_config(spec)  # what train() writes when the run starts
    assert check_rerun(spec) == []  # the same config resumes
    # How a run is watched or kept may change between reruns.
    assert check_rerun(spec_factory("cls", run={"name": "same"},
                                    train={"log_every_n_steps": 3},
                                    scaling={"max_failures": 2})) == []
    changed = spec_factory("cls", run={"name": "same"},
                           train={"learning_rate": 1e-3}, lora={"rank": 4})
    [problem] = check_rerun(changed)
    assert problem.startswith("run.name=same: this run already exists with a different config "
                              "(changed: lora.rank, train.learning_rate;")
    assert "Choose a new run.name, or set run.resume=restart" in problem
    restart = spec_factory("cls", run={"name": "same", "resume": "restart"},
                           train={"learning_rate": 1e-3})
    assert check_rerun(restart) == []


@pytest.mark.timeout(120)
def test_prepare_run_refuses_before_preparing_and_restart_clears_the_old_run(ray_session,
                                                                            spec_factory):
    spec = spec_factory("cls", run={"name": "again"})
    record_config(spec)
    marker = os.path.join(spec.run_dir, "checkpoint_step_0000010")
    os.makedirs(marker)
    with pytest.raises(ConfigError, match=r"changed: train\.learning_rate"):
        prepare_run(spec_factory("cls", run={"name": "again"}, train={"learning_rate": 1e-3}))
    assert os.path.isdir(marker)  # nothing of the old run was touched
    plan = prepare_run(spec_factory("cls", run={"name": "again", "resume": "restart"},
                                    train={"learning_rate": 1e-3}))
    assert not os.path.exists(spec.run_dir)  # the old run is gone; train() records the new one
    # The CLI writes the command's library log in <run>/logs while restart clears the run.
    record_config(spec)
    os.makedirs(os.path.join(spec.run_dir, "logs"))
    prepare_run(spec_factory("cls", run={"name": "again", "resume": "restart"}))
    assert os.listdir(spec.run_dir) == ["logs"]
    assert plan.total_steps == 2 * (plan.data.train_rows // 2 // 4)
