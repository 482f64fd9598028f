"""checkpoint.dir: a run's checkpoints on another disk, in `<checkpoint.dir>/<run id>/`, found through run.json.

Unit tier: where run.json says the checkpoints are (rundir.checkpoints_root), what a fresh start
records, a manager committing, rotating, keeping the best and quarantining there (in the background
too), what a checkpoint dir there resolves to, the config key and the refused resume. Slow tier: the
real CLI with the checkpoints in a tmp dir: bit-exact resume, ckpt/generate/evaluate/report on the
run dir, a corrupt newest checkpoint quarantined there, a changed checkpoint.dir and a wiped
location refused in one line with nothing written, and a sweep whose jobs share one checkpoint.dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gpt2exp.checkpoint import CheckpointManager
from gpt2exp.errors import UserError
from gpt2exp.rundir import (
    check_checkpoints_dir,
    checkpoints_root,
    existing_checkpoints_root,
    start_run_json,
    write_config_of_record,
)
from gpt2exp.targets import Target, resolve_target
from tests.conftest import FAST, run_cli
from tests.test_checkpoint import bump, clone_weights, flip_byte, latest, make_cfg, make_stateful, steps
from tests.test_resume import EXACT, assert_same_weights, final_weights, losses, rows, snapshot
from tests.test_targets import make_checkpoint


def write_run_json(run: Path, **fields) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps({"run_id": "abc123", "status": "completed", **fields}))
    return run


def wiped_message(run: Path, root: Path) -> str:
    return (
        f"the checkpoints of run {run} are recorded (run.json) at {root}, which does not exist; "
        "mount or restore that disk and try again, or start a new run"
    )


# -- where run.json says they are ----------------------------------------------------------------


def test_the_default_and_runs_recorded_before_checkpoint_dir_read_the_run_dir(tmp_path):
    run = tmp_path / "run"
    assert checkpoints_root(run) == run / "checkpoints"  # nothing recorded yet
    write_run_json(run)  # a run.json from before checkpoint.dir
    assert checkpoints_root(run) == run / "checkpoints"
    write_run_json(run, checkpoints="checkpoints")  # the default, relative: a copied run dir reads its own
    assert checkpoints_root(run) == run / "checkpoints"
    write_run_json(run, checkpoints=str(tmp_path / "scratch" / "abc123"))
    assert checkpoints_root(run) == tmp_path / "scratch" / "abc123"


def test_a_fresh_start_records_and_makes_the_checkpoints_dir(tmp_path, compose, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative checkpoint.dir is taken from the launch dir
    outside, inside = tmp_path / "outside", tmp_path / "inside"
    for run, overrides in ((outside, ["checkpoint.dir=scratch"]), (inside, [])):
        run.mkdir()
        write_config_of_record(run, compose(overrides))
        info = start_run_json(run)
        if run == outside:
            root = tmp_path / "scratch" / info["run_id"]
            assert info["checkpoints"] == str(root) and root.is_dir()
            assert (root / "run_dir").read_text() == f"{run}\n"
            assert sorted(os.listdir(run)) == ["config.yaml", "run.json"]
        else:
            assert info["checkpoints"] == "checkpoints" and (run / "checkpoints").is_dir()


def test_a_gone_location_outside_the_run_dir_is_one_line_and_the_default_is_not(tmp_path):
    gone = tmp_path / "scratch" / "abc123"
    run = write_run_json(tmp_path / "run", checkpoints=str(gone))
    with pytest.raises(UserError) as exc:
        existing_checkpoints_root(run)
    assert str(exc.value) == wiped_message(run, gone)
    plain = write_run_json(tmp_path / "plain", checkpoints="checkpoints")  # never saved: restarts, as before
    assert existing_checkpoints_root(plain) == plain / "checkpoints"


# -- the manager there ---------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_the_manager_commits_rotates_keeps_the_best_and_quarantines_where_run_json_says(tmp_path, async_save):
    run, root = tmp_path / "run", tmp_path / "scratch" / "abc123"
    run.mkdir()
    manager = CheckpointManager(make_cfg(keep_last=2, keep_best=1, async_save=async_save), run)
    write_run_json(run, checkpoints=str(root))  # as Trainer.run's fresh start does, after the manager is built
    root.mkdir(parents=True)
    stateful = make_stateful()
    weights = {}
    for step, loss in ((1, 1.0), (2, 3.0), (3, 2.0), (4, 4.0)):
        bump(stateful["model"])
        assert manager.save(step, stateful, {"val/loss": loss}, force=True).wait() == root / f"step_{step:08d}"
        weights[step] = clone_weights(stateful["model"])
    manager.close()
    assert steps(root) == {"step_00000001", "step_00000003", "step_00000004"}  # the best (1) and the last two
    assert latest(root) == "step_00000004\n"
    assert sorted(os.listdir(run)) == ["run.json"]  # no checkpoints/ in the run dir

    flip_byte(root / "step_00000004" / "model.safetensors")
    restored = make_stateful(seed=1)
    reader = CheckpointManager(make_cfg(), run)
    loaded = reader.load(restored)
    reader.close()
    assert loaded.path == root / "step_00000003" and loaded.step == 3
    assert all((restored["model"].state_dict()[k] == v).all() for k, v in weights[3].items())
    assert [p.name.startswith("step_00000004-") for p in (root / "corrupt").iterdir()] == [True]
    assert latest(root) == "step_00000003\n" and sorted(os.listdir(run)) == ["run.json"]


def test_a_checkpoint_dir_there_names_its_run_unless_the_run_points_elsewhere(tmp_path):
    root = tmp_path / "scratch" / "abc123"
    run = write_run_json(tmp_path / "run", checkpoints=str(root))
    (run / "config.yaml").write_text("seed: 1\n")
    checkpoint = make_checkpoint(root / "step_00000005")
    (root / "run_dir").write_text(f"{run}\n")
    assert resolve_target(checkpoint) == Target(run_dir=run, checkpoint=checkpoint)
    write_run_json(run, checkpoints="checkpoints")  # the run named no longer keeps its checkpoints there
    assert resolve_target(checkpoint) == Target(run_dir=None, checkpoint=checkpoint)


# -- the key -------------------------------------------------------------------------------------


def test_the_key_is_null_by_default_fixed_on_resume_and_checked_before_anything_is_written(tmp_path, compose):
    from gpt2exp.config import typed
    from gpt2exp.resume import allowed_keys_text, is_resumable_key

    assert compose().checkpoint.dir is None
    assert compose(["checkpoint.dir=/scratch/ckpts"]).checkpoint.dir == "/scratch/ckpts"
    assert typed({"checkpoint": {"every_steps": 5}}).checkpoint.dir is None  # a config of record from before
    assert not is_resumable_key("checkpoint.dir") and is_resumable_key("checkpoint.keep_last")
    assert "checkpoint (not checkpoint.dir)" in allowed_keys_text()
    check_checkpoints_dir(str(tmp_path / "not" / "yet" / "made"))  # made at the first launch
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError) as exc:
        check_checkpoints_dir(str(tmp_path / "a_file" / "ckpts"))
    assert str(exc.value) == (
        f"checkpoint.dir={tmp_path / 'a_file' / 'ckpts'}: {tmp_path / 'a_file'} is not a directory; "
        "name a directory for checkpoints"
    )


def test_a_resume_naming_another_checkpoint_dir_is_refused_naming_where_they_are(tmp_path, compose):
    from gpt2exp.resume import plan_run

    root = tmp_path / "scratch" / "abc123"
    run = write_run_json(tmp_path / "run", checkpoints=str(root), status="preempted")
    root.mkdir(parents=True)
    write_config_of_record(run, compose([*FAST, "checkpoint.dir=scratch"]))

    def plan(*overrides: str):
        return plan_run(str(run), None, [f"resume={run}", *overrides], compose)

    with pytest.raises(UserError) as exc:
        plan("checkpoint.dir=/elsewhere")
    assert str(exc.value) == (
        f"resume cannot change checkpoint.dir (recorded 'scratch'): the checkpoints of {run} are in {root} "
        "and stay there; resume without checkpoint.dir"
    )
    assert plan("checkpoint.dir=scratch").config.checkpoint.dir == "scratch"  # as first given: accepted
    assert plan("checkpoint=default").config.checkpoint.dir == "scratch"  # the section again keeps it
    assert plan().resume_from.restart  # no checkpoint there yet: restarts from step 0


# -- the real CLI --------------------------------------------------------------------------------


def train_cli(cwd: Path, run_dir: Path, *args: str):
    return run_cli("gpt2exp.train", *EXACT, f"hydra.run.dir={run_dir}", *args, cwd=cwd)


def one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """12 steps without interruption, checkpoints in the run dir."""
    cwd = tmp_path_factory.mktemp("straight")
    result = train_cli(cwd, cwd / "run", "trainer.max_steps=12")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """6 steps (horizon 12) with checkpoint.dir=scratch (relative), then resumed to 12: (run dir, checkpoints dir)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    run = cwd / "run"
    first = train_cli(
        cwd, run, "trainer.max_steps=6", "scheduler.decay_steps=12", "checkpoint.dir=scratch", "checkpoint.keep_last=2"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    info = json.loads((run / "run.json").read_text())
    root = cwd / "scratch" / info["run_id"]
    assert info["checkpoints"] == str(root) and (root / "run_dir").read_text() == f"{run}\n"
    assert steps(root) == {"step_00000004", "step_00000006"} and latest(root) == "step_00000006\n"
    assert not (run / "checkpoints").exists()
    second = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=12", cwd=cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6 of run" in second.stdout + second.stderr
    return run, root


@pytest.mark.slow
def test_a_run_with_its_checkpoints_elsewhere_rotates_there_and_resumes_bit_exact(elsewhere, straight):
    run, root = elsewhere
    assert steps(root) == {"step_00000008", "step_00000012"} and latest(root) == "step_00000012\n"
    assert not (run / "checkpoints").exists() and sorted(os.listdir(root / "..")) == [root.name]
    assert_same_weights(load_file(root / "step_00000012" / "model.safetensors"), final_weights(straight, 12))
    assert losses(run) == losses(straight)
    assert [r["step"] for r in rows(run)] == list(range(0, 13))


@pytest.mark.slow
def test_ckpt_generate_evaluate_and_report_find_them_through_the_run_dir(elsewhere, tmp_path):
    run, root = elsewhere
    listed = run_cli("gpt2exp.ckpt", "list", str(run), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    table = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(row[0], "verified" in row) for row in table] == [("8", True), ("12", True)]
    verified = run_cli("gpt2exp.ckpt", "verify", str(run), cwd=tmp_path)
    assert (verified.returncode, verified.stdout) == (0, "step_00000008: ok\nstep_00000012: ok\n")
    one = run_cli("gpt2exp.ckpt", "list", str(root / "step_00000008"), cwd=tmp_path)  # names its run
    assert one.returncode == 0 and [line.split()[0] for line in one.stdout.splitlines()] == ["step", "8"]

    args = ("--max-new-tokens", "6", "--seed", "3")
    by_run = run_cli("gpt2exp.generate", str(run), *args, cwd=tmp_path)
    by_checkpoint = run_cli("gpt2exp.generate", str(root / "step_00000012"), *args, cwd=tmp_path)
    assert by_run.returncode == 0 and by_run.stdout and by_run.stdout == by_checkpoint.stdout, by_run.stderr

    evaluated = run_cli("gpt2exp.evaluate", str(run), "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    out = json.loads(evaluated.stdout)
    assert (out["checkpoint"], out["step"]) == (str(root / "step_00000012"), 12)
    assert out["loss"] == out["logged_val_loss"] == [r["val/loss"] for r in rows(run) if "val/loss" in r][-1]

    reported = run_cli("gpt2exp.report", str(run), cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-3000:]
    row = [line for line in (run / "report.md").read_text().splitlines() if line.startswith("| run ")][
        -1
    ]  # header first
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4:] == ["12", "1,536", cells[6], "completed", "1 (step 6)"]


@pytest.mark.slow
def test_another_checkpoint_dir_on_resume_is_one_line_and_changes_nothing(elsewhere, tmp_path):
    run, root = elsewhere
    before = (snapshot(run), snapshot(root))
    error = one_error_line(run_cli("gpt2exp.train", f"resume={run}", f"checkpoint.dir={tmp_path / 'b'}", cwd=tmp_path))
    assert error == (
        f"error: resume cannot change checkpoint.dir (recorded 'scratch'): the checkpoints of {run} are in "
        f"{root} and stay there; resume without checkpoint.dir"
    )
    same = run_cli("gpt2exp.train", f"resume={run}", "checkpoint.dir=scratch", cwd=tmp_path)  # as first given
    assert (
        same.returncode == 0
        and same.stdout.strip() == f"run {run} is complete at step 12; raise trainer.max_steps to continue"
    )
    assert (snapshot(run), snapshot(root)) == before and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_wiped_checkpoints_dir_is_one_line_for_every_command_and_nothing_is_written(elsewhere, tmp_path):
    run, root = elsewhere
    before = snapshot(run)
    aside = root.with_name(root.name + ".aside")
    root.rename(aside)
    try:
        commands = [
            ("gpt2exp.train", f"resume={run}", "trainer.max_steps=16"),
            (
                "gpt2exp.train",
                *EXACT,
                f"hydra.run.dir={run}",
                "resume=auto",
                "trainer.max_steps=16",
                "checkpoint.dir=scratch",
                "checkpoint.keep_last=2",
            ),  # a requeued job: must not start the run over
            ("gpt2exp.ckpt", "verify", str(run)),
            ("gpt2exp.ckpt", "list", str(run)),
            ("gpt2exp.generate", str(run)),
            ("gpt2exp.evaluate", str(run)),
        ]
        for module, *args in commands:
            error = one_error_line(run_cli(module, *args, cwd=run.parent))
            assert error == f"error: {wiped_message(run, root)}", module
        assert snapshot(run) == before and not root.exists()
    finally:
        aside.rename(root)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_there_is_quarantined_there_and_the_previous_one_used(tmp_path):
    run = tmp_path / "run"
    first = train_cli(
        tmp_path,
        run,
        "trainer.max_steps=4",
        "scheduler.decay_steps=8",
        "checkpoint.every_steps=2",
        f"checkpoint.dir={tmp_path / 'scratch'}",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "scratch" / json.loads((run / "run.json").read_text())["run_id"]
    flip_byte(root / "step_00000004" / "model.safetensors")
    second = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "step_00000004 failed verification: model.safetensors fails its sha256 check" in log
    assert "resumed from step 2 of run" in log
    assert [p.name.startswith("step_00000004-") for p in (root / "corrupt").iterdir()] == [True]
    assert steps(root) == {"step_00000002", "step_00000004", "step_00000006"}  # step 4 trained and saved again
    assert latest(root) == "step_00000006\n"
    assert not (run / "checkpoints").exists()
    listed = run_cli("gpt2exp.ckpt", "list", str(run), cwd=tmp_path)
    assert "moved aside: corrupt/step_00000004-" in listed.stdout


@pytest.mark.slow
def test_sweep_jobs_share_a_checkpoint_dir_and_a_sweep_resume_finds_theirs(tmp_path):
    sweep_dir, scratch = tmp_path / "sweep", tmp_path / "scratch"
    args = [
        *FAST,
        "trainer.max_steps=4",
        "checkpoint.every_steps=2",
        "trainer.eval_every=2",
        f"checkpoint.dir={scratch}",
    ]
    launched = run_cli(
        "gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args, "optimizer.lr=1e-3,2e-3", cwd=tmp_path
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    roots = {job: Path(json.loads((sweep_dir / job / "run.json").read_text())["checkpoints"]) for job in "01"}
    assert sorted(p.name for p in scratch.iterdir()) == sorted(root.name for root in roots.values())
    assert all(steps(root) == {"step_00000002", "step_00000004"} for root in roots.values())
    assert not any((sweep_dir / job / "checkpoints").exists() for job in "01")

    info = json.loads((sweep_dir / "1" / "run.json").read_text())
    (sweep_dir / "1" / "run.json").write_text(json.dumps({**info, "status": "preempted"}))  # as a preempted job
    aside = roots["1"].with_name("aside")
    roots["1"].rename(aside)
    error = one_error_line(run_cli("gpt2exp.train", f"resume={sweep_dir}", "trainer.max_steps=6", cwd=tmp_path))
    assert error == f"error: {wiped_message(sweep_dir / '1', roots['1'])}"
    aside.rename(roots["1"])
    done = run_cli("gpt2exp.train", f"resume={sweep_dir}", "trainer.max_steps=6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preempted at step 4" in done.stdout and "resume from step 4" in done.stdout
    assert steps(roots["1"]) == {"step_00000004", "step_00000006"}  # keep_last 2
    assert steps(roots["0"]) == {"step_00000002", "step_00000004"}  # completed: left as it was
