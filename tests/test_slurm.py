"""The SLURM launcher against a real cluster (slurmctld + slurmd, no mock): a sweep runs as SLURM jobs;
the time-limit signal and a preemption each save, requeue, and the requeued job resumes bit-exact; a
`scancel`led job ends the sweep with one line instead of a wait for ever.

A cluster on this machine: `apt-get install slurm-wlm munge`, `scripts/slurm-cluster start`,
`export SLURM_CONF=/tmp/gpt2exp-slurm/slurm.conf` (found without the export too). Without a cluster
these tests skip with the reason; with GPT2EXP_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAST, run_cli
from tests.test_resume import assert_same_weights, final_weights, losses

pytestmark = pytest.mark.slow

# A run that trains for ~40 s on one core here: long enough to be cut by a signal at any moment of its
# first 40 s, with dropout so that a resume must restore the RNG to be bit-exact.
LONG = [
    *FAST,
    "model.dropout=0.1",
    "trainer.log_every=10",
    "trainer.eval_every=2500",
    "checkpoint.every_steps=500",
    "checkpoint.keep_last=2",
]


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]  # SLURM_CONF for every SLURM command and sweep the tests start
    partition: str  # the default partition
    urgent: str | None  # a partition of a higher PriorityTier, whose jobs preempt the default one's
    cpus: int  # CPUs of the (first) node of the default partition

    def run(self, *command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result

    def launcher(self, name: str, *args: str) -> list[str]:
        """The slurm preset sized for a CPU test node: 1 core, 1 GB, no GPU; jobs named `name`."""
        return [
            "hydra/launcher=slurm",
            f"hydra.launcher.partition={self.partition}",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            f"hydra.launcher.name={name}",
            *args,
        ]


def find_cluster() -> Cluster:
    required = os.environ.get("GPT2EXP_REQUIRE_SLURM") == "1"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"GPT2EXP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(f"no SLURM cluster: {reason} (apt-get install slurm-wlm munge; scripts/slurm-cluster start)")

    if shutil.which("sinfo") is None:
        unavailable("sinfo is not installed")
    scratch = Path(os.environ.get("GPT2EXP_SLURM_DIR", "/tmp/gpt2exp-slurm")) / "slurm.conf"
    conf = os.environ.get("SLURM_CONF") or next(
        (str(p) for p in (Path("/etc/slurm/slurm.conf"), scratch) if p.is_file()), str(scratch)
    )
    if not Path(conf).is_file():  # a SLURM command without its slurm.conf retries for 60 s
        unavailable(f"no slurm.conf at {conf}")
    env = {"SLURM_CONF": conf}
    try:
        sinfo = subprocess.run(
            ["sinfo", "--noheader", "--format=%P|%a|%t|%c"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        unavailable("sinfo did not answer in 30 s")
    if sinfo.returncode != 0:
        unavailable(f"sinfo failed: {sinfo.stderr.strip()}")
    rows = [line.split("|") for line in sinfo.stdout.split()]
    default = next((row for row in rows if row[0].endswith("*")), None)
    if default is None or default[1] != "up" or default[2].rstrip("*~#") not in ("idle", "mix"):
        unavailable(f"no default partition with a node up and free: {sinfo.stdout.strip()}")
    tiers = {}
    for line in subprocess.run(
        ["scontrol", "--oneliner", "show", "partition"], capture_output=True, text=True, env={**os.environ, **env}
    ).stdout.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        tiers[fields["PartitionName"]] = int(fields.get("PriorityTier", 1))
    partition = default[0].rstrip("*")
    urgent = next((p for p, tier in tiers.items() if tier > tiers.get(partition, 1)), None)
    return Cluster(env, partition, urgent, int(default[3]))


@pytest.fixture(scope="session")
def slurm() -> Cluster:
    return find_cluster()


@pytest.fixture
def job_name(slurm: Cluster, tmp_path: Path):
    """A job name of this test's own; whatever it left queued or running is cancelled at the end."""
    name = f"gpt2exp-test-{os.getpid()}-{tmp_path.name}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], env={**os.environ, **slurm.env}, timeout=60)


def start_sweep(slurm: Cluster, cwd: Path, sweep_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **slurm.env},
    )


def start_straight(cwd: Path, run_dir: Path, *args: str) -> subprocess.Popen:
    """The same run on this machine, uninterrupted, beside the SLURM job (each uses one core)."""
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2exp.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def slurm_job_id(sweep_dir: Path) -> str:
    """The SLURM job id of a one-job sweep, from submitit's folder for it."""
    [folder] = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    return folder


def final_state(slurm: Cluster, job_id: str) -> str:
    """The state of a job (or of each task of an array, one per line) once it has left RUNNING and COMPLETING:
    a sweep goes on once a job wrote its result, while its process may still be exiting."""
    deadline = time.monotonic() + 30
    while True:
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T %P", f"--jobs={job_id}"]
        states = sorted(slurm.run(*command).stdout.splitlines())
        if not any(" RUNNING " in s or " COMPLETING " in s for s in states) or time.monotonic() > deadline:
            return "\n".join(states)
        time.sleep(0.2)


def assert_saved_requeued_and_resumed_bit_exact(job: Path, straight: subprocess.Popen, straight_dir: Path, steps: int):
    info = json.loads((job / "run.json").read_text())
    assert info["status"] == "completed"
    [resume] = info["resumes"]
    saved = resume["step"]
    assert 0 < saved < steps
    log = (job / "train.log").read_text()
    assert f"SIGUSR2 received: saved step {saved}, stopping (exit 75)" in log
    assert "Requeued job" in log and f"resumed from step {saved} of run" in log
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    assert losses(job) == losses(straight_dir)
    assert [row[0] for row in losses(job)] == list(range(10, steps + 1, 10))  # each logged step once
    assert_same_weights(final_weights(job, steps), final_weights(straight_dir, steps))


def test_a_sweep_runs_as_an_array_of_slurm_jobs(slurm, job_name, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*slurm.launcher(job_name), *FAST, "trainer.max_steps=4", "optimizer.lr=1e-3,3e-3"]
    result = run_cli("gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path, env=slurm.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        info = json.loads((sweep_dir / job / "run.json").read_text())
        assert info["status"] == "completed" and info["step"] == 4
        assert f"lr: {lr}" in (sweep_dir / job / "config.yaml").read_text()
    tasks = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit() and "_" in p.name)
    array = tasks[0].split("_")[0]
    assert tasks == [f"{array}_0", f"{array}_1"]  # one array job, one task per sweep job
    assert final_state(slurm, array) == "\n".join(f"{t} COMPLETED {slurm.partition}" for t in tasks)


def test_a_request_sbatch_refuses_is_one_line_exit_2(slurm, job_name, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*slurm.launcher(job_name), "hydra.launcher.partition=no-such-partition", *FAST, "trainer.max_steps=2"]
    result = run_cli("gpt2exp.train", "-m", f"hydra.sweep.dir={sweep_dir}", *args, cwd=tmp_path, env=slurm.env)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = result.stderr.splitlines()
    assert line.startswith("error: SLURM refused the sweep's jobs (invalid partition specified: no-such-partition")
    assert line.endswith(
        "); set hydra.launcher.partition, mem_gb, gpus_per_node, cpus_per_task or timeout_min to what the cluster "
        "offers (sinfo lists its partitions)"
    )
    assert not sweep_dir.exists()  # what the launch wrote (multirun.yaml, submitit's files) is taken back


def test_the_time_limit_signal_saves_the_job_is_requeued_and_resumes_bit_exact(slurm, job_name, tmp_path):
    """--time=1 with the signal 12 s before it: SLURM checks time limits every 30 s, so SIGUSR2 comes 18-48 s
    after the start (one that comes while a slow machine still starts the run requeues it unsaved, hence
    max_num_timeout=3). For the signal to find the run still training whatever this machine's speed, the test
    holds the job's process (SIGSTOP) after its first checkpoint; SLURM sends SIGCONT with the signal, and the
    run saves at its next step boundary. Once saved, the requeued job's limit is raised to 10 minutes, so that
    it is not cut again (which would also work, only slower)."""
    steps = 2000
    sweep_dir, job, straight_dir = tmp_path / "sweep", tmp_path / "sweep" / "0", tmp_path / "straight"
    args = [*LONG, "checkpoint.every_steps=200", f"trainer.max_steps={steps}"]
    launcher = slurm.launcher(
        job_name, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=12", "hydra.launcher.max_num_timeout=3"
    )
    proc = start_sweep(slurm, tmp_path, sweep_dir, *launcher, "resume=auto", *args)
    straight = start_straight(tmp_path, straight_dir, *args)
    log = job / "train.log"
    wait_for("first checkpoint", lambda: (job / "checkpoints" / "step_00000200").is_dir(), proc)
    trainer_pid = int((job / ".lock").read_text())
    os.kill(trainer_pid, signal.SIGSTOP)
    if "received: saved step" in log.read_text():  # the signal came first: no need to hold the run
        os.kill(trainer_pid, signal.SIGCONT)
    wait_for("time-limit save", lambda: "SIGUSR2 received: saved step" in log.read_text(), proc, timeout=120)
    slurm.run("scontrol", "update", f"JobId={slurm_job_id(sweep_dir)}", "TimeLimit=10")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "this job is timed-out" in log.read_text()  # submitit's view: a time-out, not a preemption
    assert_saved_requeued_and_resumed_bit_exact(job, straight, straight_dir, steps)


def test_two_tasks_form_one_ddp_group_and_a_preemption_requeues_every_rank_which_resume_bit_exact(
    slurm, job_name, tmp_path
):
    """tasks_per_node=2: each SLURM task is one rank of one DDP group training one run (one run dir, each
    metrics step once). A job of the higher-PriorityTier partition then takes the node's cores: both ranks get
    SIGUSR2, save one checkpoint at the same step, SLURM requeues the job, and both resume from it. The result
    equals an uninterrupted `torchrun --nproc_per_node=2` run of the same config, bit for bit."""
    if slurm.urgent is None:
        pytest.skip(f"no partition of a higher PriorityTier than {slurm.partition} to preempt it from")
    if slurm.cpus < 2:
        pytest.skip(f"the node of {slurm.partition} has {slurm.cpus} CPU, two tasks need two")
    steps = 600
    args = [*LONG, "checkpoint.every_steps=100", f"trainer.max_steps={steps}"]
    sweep_dir, job, straight_dir = tmp_path / "sweep", tmp_path / "sweep" / "0", tmp_path / "straight"
    launcher = slurm.launcher(
        job_name, "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", "hydra.launcher.max_num_timeout=1"
    )
    proc = start_sweep(slurm, tmp_path, sweep_dir, *launcher, "resume=auto", *args)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    straight = subprocess.Popen(
        [*torchrun, "-m", "gpt2exp.train", *args, f"hydra.run.dir={straight_dir}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for("first checkpoint", lambda: (job / "checkpoints" / "step_00000100").is_dir(), proc)
    victim = slurm_job_id(sweep_dir)
    # every core of the node, so the victim's must be freed
    urgent = slurm.run(
        "sbatch", "--parsable", f"--partition={slurm.urgent}", f"--cpus-per-task={slurm.cpus}", "--mem=100M",
        "--time=1", f"--job-name={job_name}", "--output=/dev/null", "--wrap=sleep 1",
    ).stdout.strip()  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert final_state(slurm, urgent) == f"{urgent} COMPLETED {slurm.urgent}"
    assert final_state(slurm, victim) == f"{victim} COMPLETED {slurm.partition}"
    assert sorted(p.name for p in sweep_dir.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    info = json.loads((job / "run.json").read_text())
    assert info["world"] == {"world_size": 2, "strategy": "ddp"}
    assert [(r["world_size"], r["strategy"]) for r in info["resumes"]] == [(2, "ddp")]
    task_logs = [(sweep_dir / ".submitit" / victim / f"{victim}_{rank}_log.out").read_text() for rank in (0, 1)]
    for rank, task_log in enumerate(task_logs):  # each task was one rank; each got the signal and saved, then:
        assert task_log.count(f"global_rank={rank}(2)") == 2  # started twice
        assert "Caught signal SIGUSR2" in task_log
    assert "Requeued job" in task_logs[0]  # rank 0 requeued the job for both
    assert "Not checkpointing nor requeuing since I am a slave (procid=1)" in task_logs[1]
    assert_saved_requeued_and_resumed_bit_exact(job, straight, straight_dir, steps)


def test_a_cancelled_job_ends_the_sweep_with_one_line_instead_of_a_wait_for_ever(slurm, job_name, tmp_path):
    """Without accounting (sacct), submitit alone would wait for ever on a job that wrote no result."""
    sweep_dir, job = tmp_path / "sweep", tmp_path / "sweep" / "0"
    proc = start_sweep(slurm, tmp_path, sweep_dir, *slurm.launcher(job_name), *LONG, "trainer.max_steps=1000000")
    wait_for("first checkpoint", lambda: (job / "checkpoints" / "step_00000500").is_dir(), proc)
    job_id = slurm_job_id(sweep_dir)
    slurm.run("scancel", job_id)
    cancelled = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    waited = time.monotonic() - cancelled
    lines = stderr.strip().splitlines()
    assert proc.returncode == 69, stderr[-3000:]
    assert lines[-2] == (
        f"SLURM job {job_id} (sweep job #0) ended without a result (CANCELLED); "
        f"its log: {sweep_dir / '.submitit' / job_id / f'{job_id}_0_log.err'}"
    )
    assert (
        lines[-1]
        == f"error: 1 of 1 SLURM jobs of the sweep ended without a result; run what is left with resume={sweep_dir}"
    )
    assert waited < 60  # the state is asked every 2-30 s, then 15 s of grace for a late result file
    assert "Traceback" not in stderr
    info = json.loads((job / "run.json").read_text())  # scancel sends SIGTERM first: the run saved
    assert info["status"] == "preempted"
    assert (job / "checkpoints" / "latest").read_text().strip() == f"step_{info['step']:08d}"


def test_the_slurm_launcher_where_slurm_cannot_be_reached_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """No cluster needed: PATH without sbatch, as on a laptop."""
    args = ["-m", "hydra/launcher=slurm", *FAST, "trainer.max_steps=2"]
    result = run_cli("gpt2exp.train", *args, cwd=tmp_path, env={"PATH": str(tmp_path / "bin")})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: hydra/launcher=slurm needs SLURM's sbatch, which is not on PATH; run the command on a machine of "
        "the cluster (a login node), or set SLURM_CONF to its slurm.conf"
    ]
    assert list(tmp_path.iterdir()) == []
