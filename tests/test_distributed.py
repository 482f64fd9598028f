"""Training on several processes: torchrun with DDP and FSDP2 on 2 CPU processes (gloo).

Every guarantee of a one-process run, on 2 processes: interrupted-and-resumed equals straight bit for bit
(dropout on), one run dir and one record written by rank 0, sharded checkpoints that load with
`from_pretrained`, resharding 2 -> 1 and 1 -> 2, a signal to one rank stopping all of them with one
checkpoint, a killed rank restarted by torchrun, a corrupt shard making every rank fall back, and the
bad inputs (one line, exit 2, nothing written). The measured tolerance of resharding: weights within
1e-5 of the one-process straight run (1.8e-6 measured for 2 -> 1, 0.0 for 1 -> 2): RESHARD_TOLERANCE.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, REPO, run_cli
from tests.test_checkpoint import rewrite_manifest_entry

pytestmark = pytest.mark.slow

RESHARD_TOLERANCE = 1e-5
# 6 steps of 2 micro-batches of 4 sequences (a global batch of 8: 4 per rank), dropout on
RUN = [
    *(a for a in FAST if not a.startswith("trainer.num_threads")),
    "model.dropout=0.1",
    "trainer.grad_accum_steps=2",
    "trainer.eval_batches=3",
    "trainer.num_samples=0",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "checkpoint.every_steps=2",
    "scheduler.warmup_steps=2",
    "scheduler.decay_steps=6",  # the same schedule whether a run stops at step 4 or 6
]


def torchrun(cwd: Path, nproc: int, *args: str, extra: tuple[str, ...] = (), timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]
    return subprocess.run(
        [*command, "-m", "gpt2exp.train", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def rank_exit_codes(result: subprocess.CompletedProcess) -> list[int]:
    """Each rank's exit code as torchrun reports a failed group."""
    return sorted(int(code) for code in re.findall(r"exitcode\s*: (-?\d+) \(pid", result.stderr))


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows(run_dir)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- DDP and FSDP: straight, and cut at step 4 then resumed ---------------------------------------------


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def pair(request, tmp_path_factory):
    """(straight run dir, cut run dir before its resume, resumed run dir) for one strategy."""
    strategy = request.param
    cwd = tmp_path_factory.mktemp(strategy)
    # DDP saves in the background (checkpoint.async_save's default), FSDP synchronously
    wandb = ("logger=wandb", "logger.mode=offline", f"checkpoint.async_save={strategy == 'ddp'}")
    ok(torchrun(cwd, 2, *RUN, *wandb, f"distributed={strategy}", "trainer.max_steps=6"))  # default run dir
    (straight,) = (cwd / "outputs").glob("*/*")
    cut = f"hydra.run.dir={cwd / 'cut'}"
    ok(torchrun(cwd, 2, *RUN, *wandb, f"distributed={strategy}", "trainer.max_steps=4", cut))
    shutil.copytree(cwd / "cut", cwd / "cut-before-resume")
    ok(torchrun(cwd, 2, f"resume={cwd / 'cut'}", "trainer.max_steps=6"))
    return strategy, straight, cwd / "cut-before-resume", cwd / "cut"


def test_resumed_on_the_same_world_equals_the_straight_run_bit_for_bit(pair):
    strategy, straight, _, resumed = pair
    assert curve(resumed) == curve(straight)  # every train/loss and val/loss, each step once
    ours, theirs = weights(resumed, 6), weights(straight, 6)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), strategy
    info = json.loads((resumed / "run.json").read_text())
    assert info["world"] == {"world_size": 2, "strategy": strategy}
    assert [(r["step"], r["world_size"], r["strategy"]) for r in info["resumes"]] == [(4, 2, strategy)]
    # one W&B run (rank 0's), reattached by the resume: one offline run dir per launch, all of the same id
    launches = sorted(p.name for p in (resumed / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and {name.rsplit("-", 1)[1] for name in launches} == {info["wandb_id"]}


def test_one_run_dir_one_record_and_only_rank_0_writes_outside_checkpoints(pair):
    strategy, straight, _, _ = pair
    assert sorted(p.name for p in straight.iterdir()) == [
        ".hydra",
        ".lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "run.json",
        "tokenizer",
        "train.log",
        "wandb",
    ]
    assert sorted(p.name for p in (straight / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert [r["step"] for r in rows(straight)] == [0, 1, 2, 3, 4, 5, 6]
    log = (straight / "train.log").read_text()
    assert log.count("finished at step 6") == 1 and log.count("model: ") == 1  # rank 0's lines, once
    saves = re.findall(r"saved checkpoint (step_\d+) (in the background )?in", log)
    background = "in the background " if strategy == "ddp" else ""
    assert saves == [(f"step_{s:08d}", background) for s in (2, 4, 6)]


def test_a_sharded_checkpoint_holds_every_rank_s_files_and_loads_with_from_pretrained(pair):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    _, straight, _, _ = pair
    path = straight / "checkpoints" / "step_00000006"
    files = set(json.loads((path / "manifest.json").read_text())["files"])
    assert {"model.safetensors", "config.json", "trainer_state.json", "optimizer_state.json"} <= files
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= files
    assert {"rng/rank_00000.json", "rng/rank_00001.json"} <= files and "optimizer.pt" not in files
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == files
    model = GPT2LMHeadModel.from_pretrained(path)
    saved = weights(straight, 6)
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
    assert "lm_head.weight" not in saved  # the tied head is written once, as the embedding
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.decode(tokenizer("ROMEO: speak")["input_ids"]) == "ROMEO: speak"
    assert run_cli("gpt2exp.ckpt", "verify", str(straight), cwd=straight).returncode == 0


def test_a_corrupt_shard_makes_every_rank_fall_back_to_the_same_older_checkpoint(pair, tmp_path):
    _, straight, cut, _ = pair
    run = shutil.copytree(cut, tmp_path / "run")
    shard = run / "checkpoints" / "step_00000004" / "optimizer" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 finds it
    shard.write_bytes(bytes(data))
    result = torchrun(tmp_path, 2, f"resume={run}", "trainer.max_steps=6")
    ok(result)
    assert "step_00000004 failed verification: optimizer/__1_0.distcp fails its sha256 check" in result.stdout
    assert [p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir()] == ["step_00000004"]
    assert curve(run) == curve(straight)  # steps 3-6 trained again from step 2, on both ranks alike
    ours, theirs = weights(run, 6), weights(straight, 6)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# -- resharding ------------------------------------------------------------------------------------------

NO_DROPOUT = [*RUN, "model.dropout=0.0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    ok(run_cli("gpt2exp.train", *NO_DROPOUT, "trainer.max_steps=6", f"hydra.run.dir={cwd / 'run'}", cwd=cwd))
    return cwd / "run"


def test_a_2_process_fsdp_run_resumes_on_1_process(one_process, tmp_path):
    cut = tmp_path / "cut"
    ok(torchrun(tmp_path, 2, *NO_DROPOUT, "distributed=fsdp", "trainer.max_steps=4", f"hydra.run.dir={cut}"))
    refused = run_cli("gpt2exp.train", f"resume={cut}", "trainer.max_steps=6", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: distributed=fsdp needs several processes")
    ok(run_cli("gpt2exp.train", f"resume={cut}", "trainer.max_steps=6", "distributed=auto", cwd=tmp_path))
    assert max_difference(weights(cut, 6), weights(one_process, 6)) <= RESHARD_TOLERANCE
    ours, theirs = curve(cut), curve(one_process)
    assert [r[0] for r in ours] == [r[0] for r in theirs] == list(range(7))
    assert all(abs(a[1] - b[1]) <= 1e-5 for a, b in zip(ours[1:], theirs[1:], strict=True))
    resumed = [r for r in rows(cut) if r["step"] == 5][0]
    assert resumed["lr"] == [r for r in rows(one_process) if r["step"] == 5][0]["lr"]


def test_a_1_process_run_resumes_on_2_processes(one_process, tmp_path):
    cut = tmp_path / "cut"
    ok(run_cli("gpt2exp.train", *NO_DROPOUT, "trainer.max_steps=4", f"hydra.run.dir={cut}", cwd=tmp_path))
    ok(torchrun(tmp_path, 2, f"resume={cut}", "trainer.max_steps=6"))
    assert max_difference(weights(cut, 6), weights(one_process, 6)) <= RESHARD_TOLERANCE
    ours, theirs = curve(cut), curve(one_process)  # val/loss: the mean of both ranks' windows
    assert all(abs(a[2] - b[2]) <= 1e-6 for a, b in zip(ours, theirs, strict=True) if b[2] is not None)
    info = json.loads((cut / "run.json").read_text())
    assert info["world"] == {"world_size": 1, "strategy": "single"}
    assert [(r["world_size"], r["strategy"]) for r in info["resumes"]] == [(2, "ddp")]


# -- stopping together ---------------------------------------------------------------------------------

LONG = [*FAST, "trainer.max_steps=100000", "trainer.log_every=1", "trainer.eval_every=0", "trainer.num_samples=0"]


def start(cwd: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra]
    return subprocess.Popen(
        [*command, "-m", "gpt2exp.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for(check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker torchrun started as `rank`."""
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_one_checkpoint_and_exit_75(tmp_path):
    run = tmp_path / "run"
    no_periodic = ("checkpoint.every_steps=0", "checkpoint.every_minutes=0")
    launcher = start(tmp_path, *LONG, *no_periodic, f"hydra.run.dir={run}")
    wait_for(lambda: logged_steps(run) > 5)
    os.kill(rank_pid(launcher, 1), signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    result = subprocess.CompletedProcess(launcher.args, launcher.returncode, "", stderr)
    assert rank_exit_codes(result) == [75, 75]
    (saved,) = [p.name for p in (run / "checkpoints").glob("step_*")]
    step = int(saved.split("_")[1])
    assert json.loads((run / "run.json").read_text())["status"] == "preempted"
    assert rows(run)[-1]["step"] == step
    assert json.loads((run / "checkpoints" / saved / "trainer_state.json").read_text())["trainer"]["step"] == step


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_as_the_straight_one(tmp_path):
    args = [*RUN, "scheduler.decay_steps=40", "trainer.max_steps=40", "checkpoint.every_steps=10", "resume=auto"]
    args += ["trainer.eval_every=10"]
    straight = tmp_path / "straight"
    ok(torchrun(tmp_path, 2, *args, f"hydra.run.dir={straight}"))
    run = tmp_path / "run"
    launcher = start(tmp_path, *args, f"hydra.run.dir={run}", extra=("--max-restarts=1",))
    wait_for(lambda: (run / "checkpoints" / "latest").is_file() and logged_steps(run) > 13)
    os.kill(rank_pid(launcher, 1), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, stdout[-2000:] + stderr[-4000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and len(info["resumes"]) == 1
    assert curve(run) == curve(straight)
    ours, theirs = weights(run, 40), weights(straight, 40)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


RANK0_FAILS = """
import errno, os, sys
import gpt2exp.checkpoint as checkpoint
reported = checkpoint._check_reported

def fail_on_rank_0(tmp, files):  # the manifest of step 4, on rank 0 alone: the other rank never sees it
    if "step_00000004" in str(tmp):
        raise {error}
    return reported(tmp, files)

checkpoint._check_reported = fail_on_rank_0
from gpt2exp.train import main
sys.exit(main())
"""
DISK_FULL = 'OSError(errno.ENOSPC, "No space left on device")'
BUG = 'ValueError("a bug in the manifest")'


@pytest.mark.parametrize(
    ("error", "on_save_error", "async_save"),
    [(DISK_FULL, "warn", True), (DISK_FULL, "stop", False), (BUG, "warn", True)],
)
def test_a_save_that_fails_on_rank_0_alone_ends_alike_on_every_rank(tmp_path, error, on_save_error, async_save):
    """Rank 0's own steps of a commit (the manifest here) fail on no other rank: the others hear of it
    through the commit's collectives, where they used to wait for rank 0 until the group's timeout. An I/O
    error is a failed save on every rank; a bug stops every rank, whatever on_save_error says."""
    script = tmp_path / "fail_on_rank_0.py"
    script.write_text(RANK0_FAILS.format(error=error))
    run = tmp_path / "run"
    args = [
        *RUN,
        "trainer.max_steps=6",
        f"checkpoint.on_save_error={on_save_error}",
        f"checkpoint.async_save={async_save}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(
        [*command, *args, f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env
    )
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    if error == BUG:
        assert rank_exit_codes(result) == [1, 1]
        assert "ValueError: a bug in the manifest" in result.stderr
        assert "RankFailed: another rank failed: a bug in the manifest" in result.stderr
        assert checkpoints == ["step_00000002"]
    elif on_save_error == "warn":
        ok(result)
        assert checkpoints == ["step_00000002", "step_00000006"]
        assert rows(run)[-1]["step"] == 6 and json.loads((run / "run.json").read_text())["status"] == "completed"
    else:
        assert rank_exit_codes(result) == [74, 74]
        assert checkpoints == ["step_00000002"] and rows(run)[-1]["step"] == 4
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")] == []


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["distributed=ddp"],
            "error: distributed=ddp needs several processes: start it with torchrun --nproc_per_node=N "
            "-m gpt2exp.train ... (or use distributed=auto for one process)",
        ),
        (
            ["distributed.backend=nccl", "device=cpu"],
            "error: distributed.backend=nccl needs CUDA GPUs, and this run has none; "
            "use distributed.backend=gloo (or auto) on a CPU",
        ),
    ],
)
def test_a_strategy_without_torchrun_or_nccl_without_cuda_is_refused(tmp_path, args, error):
    result = run_cli("gpt2exp.train", *FAST, *args, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, error + "\n")
    assert list(tmp_path.iterdir()) == []


def test_a_global_batch_the_world_cannot_split_is_refused_once(tmp_path):
    result = torchrun(tmp_path, 2, *FAST, "trainer.batch_size=3")
    error = (
        "error: the global batch of 3 sequences (trainer.batch_size=3 x trainer.grad_accum_steps=1) cannot be "
        "split over 2 processes; make it a multiple of 2 or start 1, 3 processes"
    )
    assert result.stderr.count(error) == 1 and rank_exit_codes(result) == [2, 2]
    assert list(tmp_path.iterdir()) == []


def test_resuming_a_sharded_checkpoint_into_another_shape_is_refused_with_nothing_changed(pair, tmp_path):
    _, _, cut, _ = pair
    run = shutil.copytree(cut, tmp_path / "run")
    for config in (run / "checkpoints").glob("step_*/config.json"):
        config.write_text(config.read_text().replace('"n_embd": 32', '"n_embd": 64'))
        rewrite_manifest_entry(config.parent, "config.json")  # not corruption: a checkpoint of another shape
    before = snapshot(run)
    result = run_cli("gpt2exp.train", f"resume={run}", "trainer.max_steps=6", "distributed=auto", cwd=tmp_path)
    assert result.returncode == 2
    assert re.fullmatch(
        r"error: checkpoint \S+step_00000004 does not match the model its config describes \(n_embd 64 in the "
        r"checkpoint, 32 in config.yaml\); resume with the run's own config\n",
        result.stderr,
    )
    assert snapshot(run) == before
