"""gpt2exp.slurm without a cluster: job states from squeue and sacct answers, and how the sweep's wait ends.
(tests/test_slurm.py runs the same code against a real cluster.)"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2exp import slurm
from gpt2exp.slurm import GONE, JobStates, wait_for_results


class Answers:
    """A stand-in for running squeue and sacct: each command's (exit code, stdout, stderr) by its name."""

    def __init__(self, **answers: tuple[int, str, str]) -> None:
        self.answers = answers
        self.commands: list[list[str]] = []

    def __call__(self, command: list[str]) -> subprocess.CompletedProcess:
        self.commands.append(command)
        code, out, err = self.answers[command[0]]
        return subprocess.CompletedProcess(command, code, out, err)


NO_ACCOUNTING = (1, "", "Slurm accounting storage is disabled\n")


def test_squeue_states_of_plain_jobs_and_array_tasks():
    answers = Answers(squeue=(0, "7_0|RUNNING\n7_1|CANCELLED\n9|REQUEUED\n", ""), sacct=NO_ACCOUNTING)
    states = JobStates(answers).query(["7_0", "7_1", "9"])
    assert states == {"7_0": "RUNNING", "7_1": "CANCELLED", "9": "REQUEUED"}
    assert answers.commands == [
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", "--jobs=7,9"]
    ]  # one call for all, sacct not asked


def test_a_job_squeue_no_longer_knows_is_asked_of_sacct():
    answers = Answers(squeue=(0, "7_0|RUNNING\n", ""), sacct=(0, "7_1|CANCELLED by 0\n", ""))
    assert JobStates(answers).query(["7_0", "7_1"]) == {"7_0": "RUNNING", "7_1": "CANCELLED"}
    assert answers.commands[1][-1] == "--jobs=7_1"


def test_a_job_neither_knows_is_gone_and_without_accounting_sacct_is_asked_once():
    answers = Answers(squeue=(1, "", "slurm_load_jobs error: Invalid job id specified\n"), sacct=NO_ACCOUNTING)
    states = JobStates(answers)
    assert states.query(["12"]) == {"12": GONE}
    assert states.query(["12"]) == {"12": GONE}
    assert [c[0] for c in answers.commands] == ["squeue", "sacct", "squeue"]


def test_a_controller_that_does_not_answer_says_nothing():
    answers = Answers(squeue=(1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"))
    assert JobStates(answers).query(["12"]) is None


class FakeJob:
    """What wait_for_results uses of a submitit job: its id, task count, result and log paths."""

    def __init__(self, folder: Path, job_id: str, has_result: bool) -> None:
        self.job_id, self.num_tasks = job_id, 1
        self.paths = type("Paths", (), {"result_pickle": folder / f"{job_id}_result.pkl", "stderr": folder / "err"})
        if has_result:
            self.paths.result_pickle.write_text("")

    def results(self) -> list[str]:
        return [f"return of {self.job_id}"]


class States:
    def __init__(self, *answers: dict[str, str] | None) -> None:
        self.answers = list(answers)

    def query(self, job_ids):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def no_waiting(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(slurm.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))


def test_jobs_that_all_wrote_their_result_return_them(tmp_path, no_waiting):
    jobs = [FakeJob(tmp_path, "5_0", True), FakeJob(tmp_path, "5_1", True)]
    assert wait_for_results(jobs, ["#0", "#1"], tmp_path, States({})) == ["return of 5_0", "return of 5_1"]


def test_a_cancelled_job_ends_the_wait_after_the_grace_with_one_line_each_and_exit_69(tmp_path, no_waiting, capsys):
    """A requeued job (PENDING again) is waited for; only jobs that stay ended without a result are lost."""
    jobs = [FakeJob(tmp_path, "5_0", True), FakeJob(tmp_path, "5_1", False), FakeJob(tmp_path, "6", False)]
    states = States(
        {"5_1": "RUNNING", "6": "REQUEUED"}, {"5_1": "CANCELLED", "6": "PENDING"}, {"5_1": "CANCELLED", "6": GONE}
    )
    with pytest.raises(SystemExit) as stopped:
        wait_for_results(jobs, ["sweep job #0", "sweep job #1", "sweep job #2"], tmp_path / "sweep", states)
    assert stopped.value.code == 69
    sweep_dir, log = tmp_path / "sweep", tmp_path / "err"
    assert capsys.readouterr().err.splitlines() == [
        f"SLURM job 5_1 (sweep job #1) ended without a result (CANCELLED); its log: {log}",
        f"SLURM job 6 (sweep job #2) ended without a result (no longer known to SLURM); its log: {log}",
        f"error: 2 of 3 SLURM jobs of the sweep ended without a result; run what is left with resume={sweep_dir}",
    ]


def test_a_result_that_shows_up_within_the_grace_is_taken(tmp_path, monkeypatch):
    job = FakeJob(tmp_path, "8", False)
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] > 10:  # COMPLETED seen at 0 s, the file lands 10 s later (a slow shared filesystem)
            job.paths.result_pickle.write_text("")

    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(slurm.time, "sleep", sleep)
    assert wait_for_results([job], ["#0"], tmp_path, States({"8": "COMPLETED"})) == ["return of 8"]


def test_an_unanswered_query_keeps_waiting(tmp_path, no_waiting):
    job = FakeJob(tmp_path, "8", False)
    states = States(*[None] * 50, {"8": "FAILED"})
    with pytest.raises(SystemExit):
        wait_for_results([job], ["#0"], tmp_path, states)
    assert states.answers == [{"8": "FAILED"}]  # all 50 silent answers were waited through


def test_ctrl_c_while_waiting_says_the_jobs_go_on_and_how_to_stop_them(tmp_path, monkeypatch, capsys):
    """The jobs are SLURM's: stopping the command stops the wait, not them."""
    jobs = [FakeJob(tmp_path, "7_0", True), FakeJob(tmp_path, "7_1", False), FakeJob(tmp_path, "7_2", False)]

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(slurm.time, "sleep", interrupted)
    with pytest.raises(SystemExit) as stopped:
        wait_for_results(jobs, ["#0", "#1", "#2"], tmp_path / "sweep", States({"7_1": "RUNNING", "7_2": "PENDING"}))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "error: interrupted by SIGINT: the sweep's SLURM jobs go on (7_1 7_2); scancel 7_1 7_2 stops them, each "
        f"saving first; once they ended, resume={tmp_path / 'sweep'} runs what is left"
    ]


FIX = "run the command on a machine of the cluster (a login node), or set SLURM_CONF to its slurm.conf"


def test_the_slurm_launcher_without_sbatch_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(slurm.UserError) as refused:
        slurm.check_reachable("slurm")
    assert str(refused.value) == f"hydra/launcher=slurm needs SLURM's sbatch, which is not on PATH; {FIX}"


def test_a_slurm_conf_that_is_not_there_is_refused_without_the_60_s_of_retries(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: pytest.fail("scontrol must not be asked"))
    with pytest.raises(slurm.UserError) as refused:
        slurm.check_reachable("submitit_slurm")
    conf = tmp_path / "slurm.conf"
    assert str(refused.value) == f"hydra/launcher=submitit_slurm: SLURM_CONF names {conf}, which does not exist; {FIX}"


@pytest.mark.parametrize(
    ("stdout", "stderr", "said"),
    [
        (
            "Slurmctld(primary) at vm is DOWN\n*****\n** RESTORE SLURMCTLD DAEMON TO SERVICE **\n*****\n",
            "",
            "Slurmctld(primary) at vm is DOWN",
        ),
        (
            "",
            "scontrol: error: fetch_config: DNS SRV lookup failed\nscontrol: fatal: Could not establish a config\n",
            "scontrol: fatal: Could not establish a config",
        ),
    ],
)
def test_a_controller_that_does_not_answer_is_refused_naming_why(monkeypatch, stdout, stderr, said):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    answer = subprocess.CompletedProcess(["scontrol", "ping"], 1, stdout, stderr)
    monkeypatch.setattr(slurm.subprocess, "run", lambda command, **k: answer)
    with pytest.raises(slurm.UserError) as refused:
        slurm.check_reachable("slurm")
    assert str(refused.value) == f"hydra/launcher=slurm: SLURM's controller does not answer ({said}); {FIX}"


def test_a_controller_that_answers_passes(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    up = subprocess.CompletedProcess(["scontrol", "ping"], 0, "Slurmctld(primary) at vm is UP\n", "")
    monkeypatch.setattr(slurm.subprocess, "run", lambda command, **k: up)
    slurm.check_reachable("slurm")


def test_the_launcher_module_imports_without_hydra_submitit_launcher(monkeypatch):
    """Hydra's plugin scan imports every hydra_plugins module at each start and prints any ImportError: without
    the `sweeps` extra the module must import cleanly and just define no launcher."""
    module_name = "hydra_plugins.gpt2exp_slurm.slurm_launcher"
    for hidden in ("", ".config", ".submitit_launcher"):
        monkeypatch.setitem(sys.modules, f"hydra_plugins.hydra_submitit_launcher{hidden}", None)
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    assert not hasattr(importlib.import_module(module_name), "SlurmLauncher")
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    assert hasattr(importlib.import_module(module_name), "SlurmLauncher")


def test_a_job_submitit_did_not_requeue_is_one_line_each_and_exit_75(tmp_path, no_waiting, capsys):
    """max_num_timeout used up: submitit's handler raised in the job (after the run saved), which Hydra keeps as
    the job's failure; without this its traceback would end the sweep."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import UncompletedJobError

    done, stopped = JobReturn(), JobReturn()
    done.status, done._return_value = JobStatus.COMPLETED, 4.2
    stopped.status, stopped._return_value = (
        JobStatus.FAILED,
        UncompletedJobError("Job not requeued because: timed-out too many times."),
    )
    jobs = [FakeJob(tmp_path, "7_0", True), FakeJob(tmp_path, "7_1", True)]
    jobs[0].results, jobs[1].results = (lambda: [done]), (lambda: [stopped])
    with pytest.raises(SystemExit) as ended:
        wait_for_results(jobs, ["sweep job #0", "sweep job #1"], tmp_path / "sweep", States({}))
    assert ended.value.code == 75
    assert capsys.readouterr().err.splitlines() == [
        "SLURM job 7_1 (sweep job #1) stopped at its signal and was not requeued: timed-out too many times",
        "error: 1 of 2 SLURM jobs of the sweep were not requeued (raise hydra.launcher.max_num_timeout or "
        f"timeout_min); continue them with resume={tmp_path / 'sweep'}",
    ]


def test_a_job_that_failed_otherwise_is_left_to_hydra(tmp_path, no_waiting):
    from hydra.core.utils import JobReturn, JobStatus

    failed = JobReturn()
    failed.status, failed._return_value = JobStatus.FAILED, ValueError("a bug")
    job = FakeJob(tmp_path, "9", True)
    job.results = lambda: [failed]
    assert wait_for_results([job], ["sweep job #0"], tmp_path, States({})) == [failed]  # Hydra shows its traceback
