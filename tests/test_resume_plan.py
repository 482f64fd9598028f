"""How a sweep job (`-m ... resume=auto`, a requeued job, a trial) plans itself once Hydra made its dir:
resumed from its config of record, with the command line held to what a resume may change."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2exp.config import requested_values
from gpt2exp.errors import UserError
from gpt2exp.resume import fix_values_of_record, plan_job
from gpt2exp.rundir import start_run_json, write_config_of_record
from tests.conftest import FAST

JOB = [*FAST, "trainer.max_steps=6", "optimizer.lr=0.001"]


@pytest.fixture
def job_dir(tmp_path: Path, compose) -> Path:
    """A job dir as its first attempt left it: the config of record, run.json and a committed checkpoint."""
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    write_config_of_record(run_dir, fix_values_of_record(compose(JOB), 1))
    start_run_json(run_dir)
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002" / "manifest.json").write_text("{}")
    return run_dir


def test_a_requeued_job_resumes_from_its_record_with_what_a_resume_may_change(job_dir, compose):
    overrides = [*JOB, "trainer.max_steps=9", "resume=auto"]
    plan = plan_job(compose(overrides), job_dir, overrides)
    assert plan.resume_from is not None and plan.resume_from.run_dir == job_dir.resolve()
    assert (plan.config.trainer.max_steps, plan.config.optimizer.lr) == (9, 0.001)


def test_a_job_whose_command_line_changes_a_value_of_record_is_refused(job_dir, compose):
    overrides = [*JOB, "optimizer.lr=0.01", "resume=auto"]
    with pytest.raises(UserError) as refused:
        plan_job(compose(overrides), job_dir, overrides)
    assert str(refused.value).startswith(
        "resume cannot change optimizer.lr (recorded 0.001): the run is rebuilt from its config of record; "
        "allowed on resume: "
    )


def test_a_sweep_job_resumes_its_dir_without_resume_auto_and_a_call_from_python_refuses_it(job_dir, compose):
    """A requeued sweep job reruns its first attempt's command, which need not hold resume=auto."""
    plan = plan_job(compose(JOB), job_dir, JOB, in_sweep=True)
    assert plan.resume_from is not None and plan.resume_from.run_dir == job_dir.resolve()
    with pytest.raises(UserError, match=r"already holds a run; continue it with resume="):
        plan_job(compose(JOB), job_dir, JOB)


def test_an_override_to_the_default_value_is_held_to_the_record_too(job_dir, compose):
    """optimizer.lr=0.002 is adamw's default, so it composes as it would without the override."""
    overrides = [*JOB, "optimizer.lr=0.002", "resume=auto"]
    with pytest.raises(UserError, match=r"^resume cannot change optimizer.lr \(recorded 0.001\): "):
        plan_job(compose(overrides), job_dir, overrides)


def test_the_original_command_naming_groups_and_derived_values_is_accepted(job_dir, compose):
    """`scheduler=cosine` names scheduler.decay_steps, which the command leaves to be derived (null) and the
    record holds resolved (6): the same request, with or without the first launch's .hydra/config.yaml."""
    overrides = [*JOB, "scheduler=cosine", "optimizer=adamw", "resume=auto"]
    plan = plan_job(compose(overrides), job_dir, overrides)
    assert plan.config.scheduler.decay_steps == 6 and plan.config.optimizer.lr == 0.001


def test_local_paths_are_recorded_absolute_and_names_as_they_are(tmp_path, compose, monkeypatch):
    """A resume, evaluate or generate started from another dir finds the same files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a")
    (tmp_path / "scratch").mkdir()  # a dir named like gpt2exp's keyword: model.init=scratch stays the keyword
    cfg = compose([*FAST, "data=text_files", "data.files=[texts/a.txt,'texts/*.md',/abs/b.txt]", "model.init=scratch"])
    recorded = fix_values_of_record(cfg, 1)
    assert list(recorded.data.files) == [f"{tmp_path}/texts/a.txt", f"{tmp_path}/texts/*.md", "/abs/b.txt"]
    assert (recorded.model.init, recorded.data.tokenizer.name) == ("scratch", "bpe")
    hub = fix_values_of_record(compose([*FAST, "data=hf_dataset", "data.dataset=wikitext", "model.init=gpt2"]), 1)
    assert (hub.data.dataset, hub.model.init) == ("wikitext", "gpt2")  # no such local path: a hub name
    local = fix_values_of_record(
        compose([*FAST, "data=hf_dataset", "data.dataset=texts", "data.val_split='texts/*.md'", "model.init=texts"]), 1
    )
    assert (local.data.dataset, local.model.init) == (f"{tmp_path}/texts", f"{tmp_path}/texts")
    assert local.data.val_split == f"{tmp_path}/texts/*.md"  # validation files beside local data files
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train", "texts"]}')
    saved = fix_values_of_record(compose([*FAST, "data=hf_dataset", "data.dataset=saved", "data.val_split=texts"]), 1)
    assert (saved.data.dataset, saved.data.val_split) == (f"{tmp_path}/saved", "texts")  # a split's name, dir or not


def test_a_key_of_an_option_the_run_does_not_use_is_refused_on_resume(job_dir, compose):
    """The record's logger is none: logger.project composes against the default (wandb) but would do nothing."""
    overrides = [*(o for o in JOB if o != "logger=none"), "logger.project=mine", "resume=auto"]
    with pytest.raises(UserError) as refused:
        plan_job(compose(overrides), job_dir, overrides)
    assert str(refused.value) == (
        "logger.project applies only to logger=wandb or logger=wandb_tensorboard, not to logger=none; did you mean "
        "logger=wandb or logger=wandb_tensorboard?"
    )


def test_a_sweep_job_is_held_to_its_record_though_hydra_rewrote_its_first_config(job_dir, compose):
    """Hydra writes a sweep job's .hydra/config.yaml before the job runs: it is not the first launch's."""
    from omegaconf import OmegaConf

    overrides = [*JOB, "seed=2"]
    (job_dir / ".hydra").mkdir()
    (job_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose(overrides)))
    with pytest.raises(UserError, match=r"^resume cannot change seed \(recorded 1337\): "):
        plan_job(compose(overrides), job_dir, overrides, in_sweep=True)


@pytest.mark.parametrize("first_asked", [True, False])
def test_a_requeued_sweep_job_is_held_to_what_its_first_launch_asked_of_a_key_recorded_as_run(
    job_dir, compose, first_asked
):
    """trainer.compile=true runs uncompiled on a CPU and is recorded false. Hydra rewrites the job's
    .hydra/config.yaml with each attempt's command, so run.json's `requested` tells what the first asked."""
    from omegaconf import OmegaConf

    from gpt2exp.rundir import update_run_json

    overrides = [*JOB, "trainer.compile=true"]
    (job_dir / ".hydra").mkdir()
    (job_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose(overrides)))  # this attempt's
    update_run_json(job_dir, requested={**requested_values(compose(JOB)), "trainer.compile": first_asked})
    if first_asked:  # the first command, requeued
        assert plan_job(compose(overrides), job_dir, overrides, in_sweep=True).config.trainer.compile is False
    else:
        with pytest.raises(UserError, match=r"^resume cannot change trainer.compile \(recorded False\): "):
            plan_job(compose(overrides), job_dir, overrides, in_sweep=True)


def test_a_record_from_before_a_key_existed_resumes_with_its_command_naming_the_group(job_dir, compose):
    """model=gpt2_tiny gives model.activation and model.vocab_multiple today's defaults; the record predates them."""
    import yaml

    record = yaml.safe_load((job_dir / "config.yaml").read_text())
    del record["model"]["activation"], record["model"]["vocab_multiple"]
    (job_dir / "config.yaml").write_text(yaml.safe_dump(record))
    overrides = ["model=gpt2_tiny", *JOB, "resume=auto"]
    plan = plan_job(compose(overrides), job_dir, overrides)
    assert (plan.config.model.vocab_multiple, plan.config.model.activation.value) == (1, "gelu_new")


def test_a_resume_with_max_steps_below_the_checkpoint_of_an_unfinished_run_is_refused(job_dir, compose):
    """A typo (1 for 100) would mark the run completed at its step without training or evaluating. A sweep
    resume's jobs take the grid's max_steps instead, and end where they are (plan_job)."""
    from gpt2exp.resume import ResumeTarget, plan_run, refuse_max_steps_behind

    with pytest.raises(UserError) as refused:
        plan_run(str(job_dir), None, [f"resume={job_dir}", "trainer.max_steps=1"], compose)
    assert str(refused.value) == (
        "trainer.max_steps=1 is below step 2, where the run resumes; resume with trainer.max_steps=2 or more"
    )
    refuse_max_steps_behind(ResumeTarget(job_dir, None), 2)  # ends at its step: saved, evaluated, completed
