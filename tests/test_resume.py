"""Resume: bit-identical continuation, preemption, resume=auto, the run lock, W&B reattach, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from gpt2exp.preemption import EXIT_PREEMPTED
from tests.conftest import FAST, run_cli, trade_two_token_ids

pytestmark = pytest.mark.slow

# dropout on, so the RNG state matters; a checkpoint and an eval every 4 steps
EXACT = [
    *FAST,
    "model.dropout=0.1",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=10",
    "scheduler.warmup_steps=3",
    "optimizer.lr=3e-3",
]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["train/loss"], r["lr"]) for r in rows(run_dir) if "train/loss" in r]


def final_weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert different == [], f"tensors differ: {different[:5]}"


def train_cli(cwd: Path, run_dir: Path, *args: str, timeout: float = 300):
    return run_cli("gpt2exp.train", *EXACT, f"hydra.run.dir={run_dir}", *args, cwd=cwd, timeout=timeout)


def snapshot(run_dir: Path) -> dict[str, tuple]:
    """Every path under `run_dir`, hidden ones and directories included, with each file's size and sha256:
    what a refused resume must leave byte-identical."""
    tree: dict[str, tuple] = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_symlink():
            tree[str(p.relative_to(run_dir))] = ("link", os.readlink(p))
        elif p.is_dir():
            tree[str(p.relative_to(run_dir))] = ("dir",)
        else:
            data = p.read_bytes()
            tree[str(p.relative_to(run_dir))] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return tree


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 40 steps without interruption (long enough that a kill lands mid-run)."""
    cwd = tmp_path_factory.mktemp("straight")
    result = train_cli(cwd, cwd / "run", "trainer.max_steps=40")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def test_interrupted_and_resumed_equals_straight(tmp_path, straight):
    """6 steps (horizon fixed at 40), then resume to 40: crosses evals and checkpoints at 8, 12, ..."""
    run = tmp_path / "run"
    first = train_cli(tmp_path, run, "trainer.max_steps=6", "scheduler.decay_steps=40")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=40", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6 of run" in second.stdout + second.stderr
    assert_same_weights(final_weights(run, 40), final_weights(straight, 40))
    assert losses(run) == losses(straight)
    assert [r["step"] for r in rows(run)] == list(range(0, 41))


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "process ended early"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def spawn(cwd: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2exp.train", *EXACT, f"hydra.run.dir={run_dir}", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_at_a_random_step_then_resume_equals_straight(tmp_path, straight):
    seed = int(os.environ.get("GPT2EXP_TEST_SEED") or random.randrange(2**32))
    kill_at = random.Random(seed).randint(5, 14)
    replay = f"killed at step {kill_at} (replay with GPT2EXP_TEST_SEED={seed})"
    print(replay)
    run = tmp_path / "run"
    proc = spawn(tmp_path, run, "trainer.max_steps=40")
    wait_for_step(run, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the background save of step 4 may still be writing at an early kill: then no checkpoint was committed
    committed = sorted(
        int(m.parent.name.removeprefix("step_")) for m in (run / "checkpoints").glob("step_*/manifest.json")
    )
    resumed = run_cli("gpt2exp.train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, f"{replay}: {resumed.stderr[-3000:]}"
    assert_same_weights(final_weights(run, 40), final_weights(straight, 40))
    assert losses(run) == losses(straight), replay
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    if committed:  # resumed from the newest committed checkpoint
        assert ([r["step"] for r in info["resumes"]], info.get("restarts", [])) == ([committed[-1]], []), replay
    else:  # started again from step 0, in its run dir
        assert (info["resumes"], len(info["restarts"])) == ([], 1), replay


def test_sigterm_saves_at_the_step_boundary_and_exits_75(tmp_path, straight):
    run = tmp_path / "run"
    proc = spawn(tmp_path, run, "trainer.max_steps=40")
    wait_for_step(run, proc, 5)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # a second signal in a row changes nothing
    proc.wait(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr.read()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "preempted"
    stopped_at = rows(run)[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    # the requeued job reruns its original command line, with resume=auto
    again = run_cli(
        "gpt2exp.train", *EXACT, f"hydra.run.dir={run}", "trainer.max_steps=40", "resume=auto", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(final_weights(run, 40), final_weights(straight, 40))
    assert losses(run) == losses(straight)


def test_resume_keeps_the_first_hydra_dir_and_appends_the_log(tmp_path):
    run = tmp_path / "run"
    assert train_cli(tmp_path, run, "trainer.max_steps=4", "scheduler.decay_steps=8").returncode == 0
    hydra_before = {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}
    log_before = (run / "train.log").read_text()
    config_before = (run / "config.yaml").read_bytes()
    result = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")} == hydra_before
    resume_dirs = list((run / ".hydra").glob("resume-*"))
    assert len(resume_dirs) == 1 and (resume_dirs[0] / "overrides.yaml").exists()
    log_after = (run / "train.log").read_text()
    assert log_after.startswith(log_before) and "resumed from step 4" in log_after[len(log_before) :]
    assert (run / "config.yaml").read_bytes() == config_before


def test_raising_max_steps_continues_at_the_final_lr(tmp_path):
    run = tmp_path / "run"
    assert train_cli(tmp_path, run, "trainer.max_steps=8", "optimizer.lr=1e-3").returncode == 0
    result = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["scheduler"]["decay_steps"] == 8 and record["trainer"]["max_steps"] == 8
    lrs = {r["step"]: r["lr"] for r in rows(run) if "lr" in r}
    assert [lrs[s] for s in (9, 10, 11, 12)] == pytest.approx([1e-4] * 4)  # min_lr_ratio 0.1 x peak


def test_a_run_under_a_path_with_spaces_and_accents_resumes(tmp_path):
    """The launcher hands the resolved run dir to Hydra quoted: its grammar takes neither unquoted."""
    cwd = tmp_path / "José's runs"
    cwd.mkdir()
    first = run_cli("gpt2exp.train", *EXACT, "trainer.max_steps=4", "hydra.run.dir=runs/a", cwd=cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    more = run_cli("gpt2exp.train", "resume=runs/a", "trainer.max_steps=6", cwd=cwd)
    assert more.returncode == 0, more.stderr[-3000:]
    again = run_cli("gpt2exp.train", *EXACT, "trainer.max_steps=8", "hydra.run.dir=runs/a", "resume=auto", cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    run = cwd / "runs" / "a"
    assert [r["step"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [4, 6]
    assert [r["step"] for r in rows(run)] == list(range(0, 9))


def test_a_run_on_files_named_relative_to_its_launch_dir_resumes_from_another_dir(tmp_path):
    """The config of record holds data.files made absolute; the requeued original command still matches."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    (launch / "texts").mkdir(parents=True)
    elsewhere.mkdir()
    line = "Now is the winter of our discontent made glorious summer by this sun of York.\n"
    (launch / "texts" / "play.txt").write_text(line * 800)
    args = [*EXACT, "data=text_files", "data.files=[texts/play.txt]", "hydra.run.dir=run"]
    first = run_cli("gpt2exp.train", *args, "trainer.max_steps=4", cwd=launch)
    assert first.returncode == 0, first.stderr[-3000:]
    run = launch / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["files"] == [str(launch / "texts" / "play.txt")]
    more = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=6", cwd=elsewhere)
    assert more.returncode == 0, more.stderr[-3000:]
    requeued = run_cli("gpt2exp.train", *args, "trainer.max_steps=8", "resume=auto", cwd=launch)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert [r["step"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [4, 6]


def test_a_run_on_validation_files_named_relative_to_its_launch_dir_resumes_on_them_from_another_dir(tmp_path):
    """data.val_split beside local data files is a path: recorded absolute, so a resume from a dir holding
    other files under the same relative name still evaluates on the run's own."""
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    line = "Now is the winter of our discontent made glorious summer by this sun of York."
    for root, copies in ((launch, 3), (elsewhere, 7)):  # elsewhere's val/ is other text
        (root / "val").mkdir(parents=True)
        (root / "val" / "v.jsonl").write_text(
            "".join(json.dumps({"text": f"{line} {i}"}) + "\n" for i in range(copies))
        )
    (launch / "train").mkdir()
    (launch / "train" / "t.jsonl").write_text("".join(json.dumps({"text": line * 8}) + "\n" for _ in range(200)))
    args = [*EXACT, "data=hf_dataset", "data.dataset=train", "data.val_split='val/*.jsonl'", "hydra.run.dir=run"]
    first = run_cli("gpt2exp.train", *args, "data.tokenizer.vocab_size=300", "trainer.max_steps=4", cwd=launch)
    assert first.returncode == 0, first.stderr[-3000:]
    run = launch / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["val_split"] == str(launch / "val" / "*.jsonl")
    more = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=8", cwd=elsewhere)
    assert more.returncode == 0, more.stderr[-3000:]
    logged = re.findall(r"token cache \S+: (\d+) train and (\d+) val tokens", (run / "train.log").read_text())
    assert logged == [("33800", "72")]  # built once: the resume read the run's own validation files, not elsewhere's
    requeued = run_cli(
        "gpt2exp.train", *args, "data.tokenizer.vocab_size=300", "trainer.max_steps=10", "resume=auto", cwd=launch
    )
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert [r["step"] for r in json.loads((run / "run.json").read_text())["resumes"]] == [4, 8]


def test_resume_auto_starts_fresh_after_a_kill_before_the_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=300", "checkpoint.every_steps=0", "resume=auto"]
    proc = spawn(tmp_path, run, *args)
    wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not list((run / "checkpoints").glob("step_*"))
    again = train_cli(tmp_path, run, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == list(range(0, 301))


def test_a_second_process_in_a_locked_run_dir_gets_exit_2(tmp_path):
    from gpt2exp.rundir import RunLock

    run = tmp_path / "run"
    assert train_cli(tmp_path, run, "trainer.max_steps=4", "scheduler.decay_steps=8").returncode == 0
    with RunLock(run):  # taking the lock writes this process's pid into .lock: snapshot while holding it
        before = snapshot(run)
        result = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=8", cwd=tmp_path)
        after = snapshot(run)
    assert result.returncode == 2
    assert f"error: run dir {run} is in use by another process (pid {os.getpid()})" in result.stderr
    assert after == before
    assert not list((run / ".hydra").glob("resume-*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("finished")
    run = cwd / "run"
    result = train_cli(cwd, run, "trainer.max_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def resume_fails(cwd: Path, run: Path, *args: str) -> str:
    """Run a resume that must be refused; `run` and `cwd` (every file, byte for byte) stay as they were."""
    before = snapshot(run), snapshot(cwd)
    result = run_cli("gpt2exp.train", *args, cwd=cwd)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (snapshot(run), snapshot(cwd)) == before
    return errors[0]


def test_resume_of_a_missing_path(tmp_path, finished):
    error = resume_fails(tmp_path, finished, f"resume={tmp_path / 'nope'}")
    assert error == f"error: path does not exist: {tmp_path / 'nope'}; pass a run dir or a checkpoint dir"


def test_resume_of_a_dir_that_is_not_a_run_dir(tmp_path, finished):
    error = resume_fails(tmp_path, finished, f"resume={tmp_path}")
    assert error == (
        f"error: {tmp_path} is neither a gpt2exp run dir (config.yaml and run.json) nor a checkpoint dir "
        "(checkpoints/step_*), nor a sweep dir (multirun.yaml); pass a run dir such as outputs/<date>/<time>, "
        "one of its checkpoints/step_* dirs, or a sweep dir such as multirun/<date>/<time>"
    )


def test_resume_of_a_run_dir_without_checkpoints_restarts_it_from_its_config(tmp_path, finished):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_bytes((finished / "config.yaml").read_bytes())
    (empty / "run.json").write_text("{}")
    result = run_cli("gpt2exp.train", f"resume={empty}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {empty} has no checkpoint: restarting it from step 0 with its config of record" in result.stdout
    assert [r["step"] for r in rows(empty)] == list(range(0, 9))
    assert_same_weights(final_weights(empty, 8), final_weights(finished, 8))


def test_a_forbidden_override_names_the_keys_and_the_allowed_ones(tmp_path, finished):
    error = resume_fails(tmp_path, finished, f"resume={finished}", "optimizer.lr=0.5", "model.n_layer=3")
    assert "resume cannot change model.n_layer (recorded 2), optimizer.lr (recorded 0.003)" in error
    assert "allowed on resume: device, trainer.max_steps" in error


def test_the_original_command_line_is_accepted_on_resume(tmp_path, finished):
    """A requeued job reruns its full command: overrides equal to the record are not changes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)  # resuming writes into the run dir: never into the module's fixture
    result = run_cli(
        "gpt2exp.train", *EXACT, f"hydra.run.dir={run}", "trainer.max_steps=8", f"resume={run}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_multirun_with_resume_is_refused(tmp_path, finished):
    error = resume_fails(tmp_path, finished, "-m", f"resume={finished}")
    assert error == (
        "error: -m cannot be combined with resume=<run dir>; resume a sweep with resume=<multirun/<date>/<time>>, "
        "or use -m ... resume=auto to let each job continue its own dir"
    )


def test_an_older_checkpoint_is_refused(tmp_path, finished):
    older = finished / "checkpoints" / "step_00000004"
    error = resume_fails(tmp_path, finished, f"resume={older}")
    assert "step_00000004 is older than this run's newest checkpoint step_00000008" in error


def test_a_checkpoint_that_does_not_match_its_config(tmp_path, finished):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    record = (copy / "config.yaml").read_text().replace("n_embd: 32", "n_embd: 64")
    (copy / "config.yaml").write_text(record)
    error = resume_fails(tmp_path, copy, f"resume={copy}", "trainer.max_steps=9")
    assert "does not match the model its config describes" in error


@pytest.mark.parametrize(
    ("name", "damage", "problem", "fix"),
    [
        ("run.json", b'{"run_id": "ab', "Unterminated string starting at: line 1 column 12 (char 11)",
         "(it holds the run's id, W&B id and status)"),
        ("run.json", b"[]", "not a JSON object", "(it holds the run's id, W&B id and status)"),
        ("config.yaml", b"model: [unclosed\n", "while parsing a flow sequence",
         "(a resume rebuilds the run from it)"),
    ],
    ids=["run.json-cut", "run.json-list", "config.yaml-bad-yaml"],
)  # fmt: skip
def test_a_damaged_record_is_refused_in_one_line(tmp_path, finished, name, damage, problem, fix):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / name).write_bytes(damage)
    error = resume_fails(tmp_path, copy, f"resume={copy}", "trainer.max_steps=9")
    record = "the run's record" if name == "run.json" else "the run's config of record"
    assert error == f"error: {copy / name} does not read as {record} ({problem}); restore it {fix}"


def test_a_data_cache_whose_tokenizer_gives_other_ids_is_refused(tmp_path, finished):
    """The run's own tokenizer (its copy in the run dir) is what the cache must match on resume."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    trade_two_token_ids(copy / "tokenizer")
    before = snapshot(copy)
    result = run_cli("gpt2exp.train", f"resume={copy}", "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # the cache is compared when the data is prepared, in the run's lock: the lock holds this launch's
    # pid; nothing else changes
    after = snapshot(copy)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == {".lock"}
    error = errors[0]
    assert error.startswith("error: the data cache's tokenizer (")
    assert error.endswith(
        f"gives other token ids than the tokenizer this run trained with ({copy / 'tokenizer'}): resuming would "
        "train on other tokens. The cache was built again: the training text is not the run's (a data file edited "
        "or replaced; a file several data.files patterns match is now read once), or another tokenizers version "
        "built it (run.json names the run's); restore the run's data or resume with data.cache_dir set to the run's "
        "cache, or start a new run"
    )


def test_a_pickled_object_in_optimizer_pt_is_refused_and_never_runs(tmp_path, finished):
    import pickle
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = copy / "checkpoints" / "step_00000008"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    error = resume_fails(tmp_path, copy, f"resume={copy}", "trainer.max_steps=9")
    assert "refusing to unpickle" in error
    assert not marker.exists()


def test_wandb_offline_reattaches_the_same_run(tmp_path):
    run = tmp_path / "run"
    wandb = ["logger=wandb", "logger.mode=offline"]
    first = train_cli(tmp_path, run, *wandb, "trainer.max_steps=4", "scheduler.decay_steps=8")
    assert first.returncode == 0, first.stderr[-3000:]
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    second = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=8", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["wandb_id"] == wandb_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{wandb_id}") for p in offline)
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["trainer"]["wandb_id"] == wandb_id
    steps = [r["step"] for r in rows(run)]
    assert steps == sorted(set(steps)) == list(range(0, 9))


def test_a_fresh_start_never_overwrites_an_existing_run(tmp_path, finished):
    error = resume_fails(tmp_path, finished, *EXACT, f"hydra.run.dir={finished}", "trainer.max_steps=8")
    assert error == (
        f"error: {finished} already holds a run; continue it with resume={finished} (or resume=auto), "
        "or choose another hydra.run.dir"
    )
