"""The Optuna study's parts without the CLI: search spaces, the study database checks, the trial's link
to its study (report, prune), how a trial's end is told, and what a resume plans."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from gpt2exp.errors import UserError
from gpt2exp.pruning import PRUNER_ATTR, TrialLink
from gpt2exp.rundir import RunStatus
from gpt2exp.study import (
    SearchSpace,
    build_pruner,
    check_pruner_has_evaluations,
    check_storage,
    distribution,
    outcome,
    storage_url,
    studies_in,
    study_storage_url,
    trial_overrides,
)
from gpt2exp.sweep import SweepJob

D = optuna.distributions
optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- search spaces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tag(log, interval(1e-4, 1e-2))", D.FloatDistribution(1e-4, 1e-2, log=True)),
        ("interval(0.0, 0.2)", D.FloatDistribution(0.0, 0.2)),
        ("interval(1, 8)", D.FloatDistribution(1.0, 8.0)),
        ("tag(int, interval(1, 8))", D.IntDistribution(1, 8)),
        ("tag(int, log, interval(1, 64))", D.IntDistribution(1, 64, log=True)),
        ("range(1, 8)", D.IntDistribution(1, 7)),
        ("range(2, 11, step=3)", D.IntDistribution(2, 8, step=3)),
        ("range(0.0, 1.0, step=0.25)", D.FloatDistribution(0.0, 0.75, step=0.25)),
        ("choice(adamw, sgd)", D.CategoricalDistribution(["adamw", "sgd"])),
        ("choice(16, 32)", D.CategoricalDistribution([16, 32])),
    ],
)
def test_search_spaces_are_written_as_hydras_optuna_sweeper_writes_them(text, expected):
    assert distribution("k", text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("interval(1e-4", "(no viable alternative at input 'interval(1e-4')"),
        ("3e-4", "a single value"),
        ("interval(0.1, 0.01)", "(`low <= high` must hold, but got (low=0.1, high=0.01).)"),
        ("range(5, 1)", "the range is empty"),
    ],
)
def test_a_search_space_that_does_not_parse_is_one_line_naming_it(text, reason):
    with pytest.raises(UserError) as caught:
        distribution("optimizer.lr", text)
    message = str(caught.value)
    assert message.startswith(f"hydra.sweeper.params.optimizer.lr={text} is not a search space (")
    assert reason in message
    assert message.endswith(
        "; write e.g. tag(log, interval(1e-4, 1e-2)), interval(0.0, 0.2), range(1, 8) or choice(a, b)"
    )


def test_the_sweep_arguments_split_into_fixed_overrides_and_searched_parameters():
    space = SearchSpace.parse(
        {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"},
        ["trainer.max_steps=8", "optimizer.weight_decay=interval(0.0, 0.2)", "resume=auto", "+hparams_search=lr_wd"],
    )
    assert space.fixed == ["trainer.max_steps=8", "+hparams_search=lr_wd"]
    assert space.params == {
        "optimizer.lr": D.FloatDistribution(1e-4, 1e-2, log=True),
        "optimizer.weight_decay": D.FloatDistribution(0.0, 0.2),
    }
    assert space.example() == ["optimizer.lr=0.0001", "optimizer.weight_decay=0.0"]
    with pytest.raises(UserError, match=r"^optimizer.weight_decay=interval\(0.2, 0.1\) is not a search space \("):
        SearchSpace.parse({}, ["optimizer.weight_decay=interval(0.2, 0.1)"])  # named as written on the command line
    overrides = trial_overrides(space, {"optimizer.lr": 0.003}, 5, "lr wd", None)
    assert overrides == ["trainer.max_steps=8", "+hparams_search=lr_wd", "optimizer.lr=0.003"] + [
        "trial.number=5",
        "trial.study='lr wd'",
    ]


# -- the database --------------------------------------------------------------------------------


def test_the_study_lives_in_the_sweep_dir_unless_storage_names_another_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "multirun" / "d" / "t"
    assert storage_url(None, sweep_dir) == study_storage_url(sweep_dir) == f"sqlite:///{sweep_dir}/optuna.db"
    assert storage_url("sqlite:///studies.db", sweep_dir) == f"sqlite:///{tmp_path}/studies.db"  # made absolute
    assert storage_url("postgresql://host/db", sweep_dir) == "postgresql://host/db"


def make_study(url: str, name: str) -> optuna.Study:
    return optuna.create_study(study_name=name, storage=url)


def test_a_database_written_by_another_study_is_refused_and_left_as_it_was(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    url = study_storage_url(sweep_dir)
    make_study(url, "other")
    before = (sweep_dir / "optuna.db").read_bytes()
    with pytest.raises(UserError) as caught:
        check_storage(url, "lr_wd", resume=False, sweep_dir=sweep_dir)
    assert str(caught.value) == (
        f"{sweep_dir}/optuna.db was written by another study ('other'), not 'lr_wd'; start the new study in a "
        "new sweep dir, or continue that one with resume=<its sweep dir>"
    )
    with pytest.raises(UserError) as caught:
        check_storage(url, "other", resume=False, sweep_dir=sweep_dir)
    assert str(caught.value) == (
        f"{sweep_dir}/optuna.db already holds the study 'other'; continue it with resume={sweep_dir}, "
        "or start a new study in a new sweep dir"
    )
    with pytest.raises(UserError) as caught:
        check_storage(url, "lr_wd", resume=True, sweep_dir=sweep_dir)
    assert str(caught.value) == (
        f"{sweep_dir}/optuna.db holds 'other', not the study 'lr_wd' that {sweep_dir}/multirun.yaml records"
    )
    check_storage(url, "other", resume=True, sweep_dir=sweep_dir)  # its own study: resumable
    assert (sweep_dir / "optuna.db").read_bytes() == before
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["optuna.db"]


def test_a_shared_database_takes_a_new_study_and_a_file_that_is_no_study_database_is_refused(tmp_path):
    shared = f"sqlite:///{tmp_path}/shared.db"
    make_study(shared, "first")
    check_storage(shared, "second", resume=False, sweep_dir=tmp_path / "sweep")  # another name: fine there
    assert studies_in(shared) == ["first"]
    assert studies_in(f"sqlite:///{tmp_path}/absent.db") == []
    assert not (tmp_path / "absent.db").exists()  # looking does not create it
    (tmp_path / "notes.db").write_text("not sqlite at all " * 100)
    with pytest.raises(UserError, match=r"notes.db is not an Optuna study database \(file is not a database\)"):
        studies_in(f"sqlite:///{tmp_path}/notes.db")


# -- pruners -------------------------------------------------------------------------------------


def test_a_pruner_needs_periodic_evaluations():
    cfg = OmegaConf.create({"trainer": {"eval_every": 0}})
    with pytest.raises(UserError) as caught:
        check_pruner_has_evaluations({"_target_": "optuna.pruners.MedianPruner"}, cfg)
    assert str(caught.value) == (
        "the pruner MedianPruner stops trials on their periodic val/loss, but trainer.eval_every=0 evaluates only "
        "at the end; set trainer.eval_every (e.g. trainer.eval_every=50) or hydra/sweeper/pruner=none"
    )
    check_pruner_has_evaluations({"_target_": "optuna.pruners.NopPruner"}, cfg)
    check_pruner_has_evaluations(
        {"_target_": "optuna.pruners.MedianPruner"}, OmegaConf.create({"trainer": {"eval_every": 5}})
    )


def test_only_optunas_own_pruners_are_built_from_a_record():
    pruner = build_pruner({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 4})
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 4)
    with pytest.raises(UserError) as caught:
        build_pruner({"_target_": "os.system", "command": "true"})
    assert (
        str(caught.value)
        == "pruner 'os.system' is not one of Optuna's (optuna.pruners.*); choose hydra/sweeper/pruner=..."
    )


@pytest.mark.parametrize("name", ["median", "hyperband", "successive_halving", "none"])
def test_each_pruner_option_builds(name):
    import yaml

    from tests.conftest import CONF_DIR

    spec = yaml.safe_load((Path(CONF_DIR) / "hydra" / "sweeper" / "pruner" / f"{name}.yaml").read_text())
    assert isinstance(build_pruner(spec), optuna.pruners.BasePruner)


# -- the trial's link to its study ---------------------------------------------------------------


def study_with_pruner(tmp_path: Path) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1, "n_warmup_steps": 0}
    study = optuna.create_study(study_name="s", storage=url, pruner=build_pruner(spec))
    study.set_user_attr(PRUNER_ATTR, spec)
    return url, study


def test_a_trial_reports_each_evaluation_and_is_pruned_when_worse_than_the_median(tmp_path):
    url, study = study_with_pruner(tmp_path)
    first = study.ask()
    for step, value in ((4, 5.0), (8, 4.0)):
        first.report(value, step)
    study.tell(first, 4.0)
    second = study.ask()
    link = TrialLink.from_config(OmegaConf.create({"number": 1, "study": "s", "storage": url}), tmp_path, 12)
    assert link.active and link.number == second.number == 1
    assert link.should_prune(4, 4.5) is False  # better than the other trial (5.0) at step 4
    assert link.should_prune(4, 9.9) is False  # step 4 is already reported (a resumed trial repeats it)
    assert study.trials[1].intermediate_values == {4: 4.5}
    assert link.should_prune(6, 7.0) is False  # no other trial reported step 6: nothing to compare with
    assert link.should_prune(8, 4.5) is True  # worse than the other trial (4.0) at step 8
    assert link.should_prune(12, 9.0) is False  # the last step: reported, never pruned
    assert study.trials[1].intermediate_values == {4: 4.5, 6: 7.0, 8: 4.5, 12: 9.0}
    assert str(link.pruned(8, 4.5)) == "trial 1 pruned at step 8 (val/loss 4.5000)"


def test_a_signal_at_an_evaluation_step_stops_the_trial_after_the_study_got_that_steps_value(tmp_path, compose):
    """The resume goes on after the saved step: a value not reported before the signal would never be."""
    from gpt2exp.resume import fix_values_of_record
    from gpt2exp.trainer import Preempted, Trainer
    from tests.conftest import FAST

    url, study = study_with_pruner(tmp_path)
    study.ask()
    overrides = [*FAST, "trainer.max_steps=6", "trainer.eval_every=2", "trial.number=0", "trial.study=s"]
    run_dir = tmp_path / "0"
    run_dir.mkdir()
    trainer = Trainer(fix_values_of_record(compose([*overrides, f"trial.storage='{url}'"]), 1), run_dir)
    step = trainer.step

    def signalled_at_step_2() -> float:
        loss = step()
        if trainer.counters.step == 2:
            trainer.preemption.signal_name = "SIGTERM"  # as its handler records a signal
        return loss

    trainer.step = signalled_at_step_2
    with pytest.raises(Preempted):
        trainer.run(None)
    assert sorted(study.trials[0].intermediate_values) == [2]  # evaluated at 0 too, before any training: not told
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_outside_a_study_or_once_its_trial_ended_the_link_does_nothing(tmp_path):
    link = TrialLink.from_config(OmegaConf.create({"number": None, "study": None, "storage": None}), tmp_path, 8)
    assert not link.active and link.should_prune(4, 1e9) is False
    url, study = study_with_pruner(tmp_path)
    study.tell(study.ask(), 1.0)
    done = TrialLink.from_config(OmegaConf.create({"number": 0, "study": "s", "storage": url}), tmp_path, 8)
    assert not done.active and done.should_prune(4, 1e9) is False
    assert study.trials[0].intermediate_values == {}


def test_a_trial_without_storage_finds_the_database_of_its_sweep_dir(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "3").mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    url, study = study_with_pruner(sweep_dir)
    for _ in range(4):
        study.ask()
    link = TrialLink.from_config(OmegaConf.create({"number": 3, "study": "s", "storage": None}), sweep_dir / "3", 8)
    assert link.active and link.trial._trial_id == study.trials[3]._trial_id
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(UserError, match="lies in no sweep dir"):
        TrialLink.from_config(OmegaConf.create({"number": 3, "study": "s", "storage": None}), outside, 8)


# -- how a trial's end is told -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "returned", "expected"),
    [
        (RunStatus.completed, 5.25, ("complete", 5.25)),
        (RunStatus.early_stopped, 5.5, ("complete", 5.5)),
        (RunStatus.diverged, float("inf"), ("complete", float("inf"))),
        (RunStatus.pruned, 6.0, ("pruned", None)),
        (RunStatus.completed, None, ("complete", 4.75)),  # read from metrics.jsonl (a resume records it)
        (RunStatus.failed, None, ("fail", None)),
    ],
)
def test_a_trials_end_is_read_from_its_run_json(tmp_path, status, returned, expected):
    (tmp_path / "run.json").write_text(json.dumps({"status": status}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 8, "val/loss": 4.75}\n')
    assert outcome(tmp_path, returned) == expected


def test_a_pruned_job_of_a_sweep_is_done():
    job = SweepJob(1, ["trial.number=1"], Path("sweep/1"), RunStatus.pruned, 4, "1")
    assert job.action == "skip"


# -- resuming a study ----------------------------------------------------------------------------


def fake_job(sweep_dir: Path, num: int, overrides: list[str], status: str | None, checkpoint: int | None) -> Path:
    """A job dir as Hydra and a run leave it: .hydra/ files, run.json, a committed checkpoint."""
    import yaml

    job = sweep_dir / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if status is not None:
        (job / "run.json").write_text(json.dumps({"status": status, "checkpoints": "checkpoints"}))
    if checkpoint is not None:
        step = job / "checkpoints" / f"step_{checkpoint:08d}"
        step.mkdir(parents=True)
        (step / "manifest.json").write_text("{}")
    return job


def test_a_study_resume_plans_every_trial_from_its_state_and_its_job_dir(tmp_path):
    from gpt2exp.study import plan_study

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("hydra:\n  sweep:\n    subdir: ${hydra.job.num}\n")
    study = optuna.create_study(study_name="s", storage=study_storage_url(sweep_dir))
    space = {"optimizer.lr": D.FloatDistribution(1e-4, 1e-2, log=True)}
    trials = [study.ask(space) for _ in range(6)]
    lr = [t.params["optimizer.lr"] for t in trials]
    study.tell(trials[0], 5.0)
    study.tell(trials[1], state=optuna.trial.TrialState.PRUNED)
    study.tell(trials[2], state=optuna.trial.TrialState.FAIL)
    for n in range(3):
        fake_job(sweep_dir, n, [f"optimizer.lr={lr[n]}", f"trial.number={n}"], "completed", 8)
    fake_job(sweep_dir, 3, [f"optimizer.lr={lr[3]}", "trial.number=3"], "running", 12)  # killed: its lock is gone
    fake_job(sweep_dir, 4, [f"optimizer.lr={lr[4]}", "trial.number=4"], "pruned", 4)  # ended, never told
    # trial 5: asked, killed before its job started

    plan = plan_study(sweep_dir, study, 8, ["trainer.max_steps=8"], None)
    assert [(t.number, t.state, t.action) for t in plan.trials] == [
        (0, "complete", "skip"),
        (1, "pruned", "skip"),
        (2, "fail", "skip"),
        (3, "running", "resume from step 12"),
        (4, "running", "record its result"),
        (5, "running", "start"),
    ]
    assert [t.number for t in plan.to_continue] == [3, 4, 5] and plan.to_ask == 2
    assert plan.trials[3].job.launch_overrides(["trainer.num_threads=1"], "20260101-000000") == [
        f"optimizer.lr={lr[3]}",
        "trial.number=3",
        "trainer.num_threads=1",
        "resume=auto",
        "hydra.output_subdir=.hydra/resume-20260101-000000",
        "hydra.sweep.subdir='3'",
    ]
    assert plan.trials[5].job.launch_overrides([], "x") == [
        "trainer.max_steps=8",
        f"optimizer.lr={lr[5]}",
        "trial.number=5",
        "trial.study='s'",
        "hydra.sweep.subdir='5'",
    ]
    assert plan.summary_lines()[0] == (
        f"study 's' in {sweep_dir}: 6 of 8 trials (1 complete, 1 pruned, 1 fail, 3 running), 3 to continue, 2 to ask"
    )


def test_a_study_resume_replays_the_sweeps_command_and_refuses_what_it_cannot_change(tmp_path):
    from gpt2exp.overrides import parse
    from gpt2exp.study import resume_argv
    from gpt2exp.sweep import SweepRecord

    record = SweepRecord(
        dir=tmp_path / "sweep",
        sweeper="hydra_plugins.gpt2exp_optuna.optuna_sweeper.OptunaSweeper",
        task_overrides=["+hparams_search=lr_wd", "trainer.max_steps=8"],
        hydra_overrides=["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}/sweep", "hydra/sweeper/pruner=median"],
        sweeper_params={},
        subdir="${hydra.job.num}",
        cwd=str(tmp_path),
    )
    today = parse(["resume=x", "trainer.num_threads=1", "hydra.sweeper.n_trials=30"])
    assert resume_argv("train.py", [], today, record) == [
        "train.py",
        "--multirun",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.n_trials=30",
        f"hydra.sweep.dir='{tmp_path}/sweep'",  # quoted: a path may hold what Hydra's grammar takes only so
        "+hparams_search=lr_wd",
        "trainer.max_steps=8",
        f"resume='{tmp_path}/sweep'",
        "trainer.num_threads=1",
    ]
    with pytest.raises(UserError, match=r"^a study resume rebuilds each trial .* cannot change optimizer.lr=0.1;"):
        resume_argv("train.py", [], parse(["optimizer.lr=0.1"]), record)
    with pytest.raises(UserError) as caught:
        resume_argv("train.py", [], parse(["hydra/sweeper/pruner=none"]), record)
    assert str(caught.value) == (
        "a study resume keeps the sweep's Hydra settings and cannot change hydra/sweeper/pruner=none; "
        "only hydra.sweeper.n_trials, hydra/launcher=... and hydra.launcher.* may be given"
    )
