"""Waiting for a sweep's SLURM jobs: each ends with a result, or the sweep says which did not.

submitit learns that a job ended from `sacct`, which needs SLURM's accounting (slurmdbd). Without
it, a job that ends without writing its result (`scancel`, a node failure, an out-of-memory kill)
leaves submitit waiting for ever. Here a job's state comes from `squeue --states=all`, which the
controller answers with or without accounting (it keeps an ended job for MinJobAge, 300 s by
default); a job it no longer knows is asked of `sacct`, and one neither knows has ended too. A
requeued job (time limit, preemption) is PENDING or REQUEUED meanwhile, and is waited for.

When every job has ended, the jobs without a result are each named in one line, and the sweep
exits EXIT_JOBS_LOST: `resume=<sweep dir>` then runs what is left. A job that submitit did not
requeue after its signal (max_num_timeout used up) saved and stopped: one line each, exit
EXIT_PREEMPTED, instead of Hydra's traceback of submitit's exception.

Before anything is written, `check_reachable` refuses the slurm launcher where SLURM cannot be
reached (no sbatch, no slurm.conf, the controller down): one line, exit 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpt2exp.errors import EXIT_JOBS_LOST, EXIT_PREEMPTED, UserError

log = logging.getLogger(__name__)

__all__ = ["ENDED", "GONE", "JobStates", "check_reachable", "wait_for_results"]

# SLURM job states after which no result will come (PREEMPTED is left out: with PreemptMode=REQUEUE
# the job comes back; with CANCEL it ends, and is gone from squeue after MinJobAge).
ENDED = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}
)
GONE = "GONE"  # known to neither squeue nor sacct: the controller forgot the ended job
RESULT_GRACE_S = 15.0  # an ended job's result file may show up late on a shared filesystem (submitit waits 15 s too)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def check_reachable(launcher: str) -> None:
    """UserError unless this machine can submit to SLURM: sbatch on PATH and the controller answering."""
    fix = "run the command on a machine of the cluster (a login node), or set SLURM_CONF to its slurm.conf"
    if shutil.which("sbatch") is None:
        raise UserError(f"hydra/launcher={launcher} needs SLURM's sbatch, which is not on PATH; {fix}")
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):  # SLURM's commands would retry reading it for 60 s
        raise UserError(f"hydra/launcher={launcher}: SLURM_CONF names {conf}, which does not exist; {fix}")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"hydra/launcher={launcher}: `scontrol ping` failed ({exc}); {fix}") from None
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        down = [line.strip() for line in ping.stdout.splitlines() if " is DOWN" in line]
        errors = [line.strip() for line in ping.stderr.splitlines() if line.strip()]  # the last says why
        reason = (down or errors[-1:] or [f"exit {ping.returncode}"])[0]
        raise UserError(f"hydra/launcher={launcher}: SLURM's controller does not answer ({reason}); {fix}")


def refusal_reason(message: str) -> str:
    """sbatch's own reasons in one line, from submitit's report of a failed submission."""
    errors = [line.strip().removeprefix("sbatch: error: ") for line in message.splitlines() if "error:" in line]
    return "; ".join(dict.fromkeys(errors)) or message.strip().splitlines()[-1]


def take_back_refused_sweep(sweep_dir: Path, since: float) -> None:
    """After sbatch refused a sweep's first submission: remove what this launch wrote (multirun.yaml,
    submitit's files), so the corrected command starts clean. A sweep dir where a job ran is left."""
    from gpt2exp.sweep import holds_job_dirs

    if holds_job_dirs(sweep_dir):
        return
    for path in [*sorted(sweep_dir.rglob("*"), reverse=True), sweep_dir]:  # files before the dirs holding them
        with contextlib.suppress(OSError):  # a dir that still holds older files stays
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            elif path.lstat().st_mtime >= since:
                path.unlink()


class JobStates:
    """The states of SLURM jobs by id (`123` or an array task `123_4`), asked of squeue, then sacct."""

    def __init__(self, run: Callable[[list[str]], subprocess.CompletedProcess] = _run) -> None:
        self._run = run
        self._accounting: bool | None = None  # unknown until sacct is first needed

    def query(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        """{job id: state}; GONE for a job SLURM no longer knows; None when the controller did not answer."""
        mains = sorted({job_id.split("_")[0] for job_id in job_ids})
        listed = self._squeue(mains)
        if listed is None:
            return None
        missing = [job_id for job_id in job_ids if job_id not in listed]
        if missing:
            listed.update(self._sacct(missing))
        return {job_id: listed.get(job_id, GONE) for job_id in job_ids}

    def _squeue(self, mains: list[str]) -> dict[str, str] | None:
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(mains)}"]
        try:
            done = self._run(command)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("squeue failed (%s); still waiting", exc)
            return None
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:  # asked for jobs it no longer knows, and only those
                return {}
            log.warning("squeue failed (%s); still waiting", done.stderr.strip() or f"exit {done.returncode}")
            return None
        return dict(line.split("|", 1) for line in done.stdout.split() if "|" in line)

    def _sacct(self, job_ids: list[str]) -> dict[str, str]:
        if self._accounting is False:
            return {}
        command = ["sacct", "--noheader", "--parsable2", "--format=JobID,State", "--allocations"]
        command += [f"--jobs={','.join(job_ids)}"]
        try:
            done = self._run(command)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if done.returncode != 0:
            self._accounting = "accounting storage is disabled" not in done.stderr
            return {}
        self._accounting = True
        # sacct says "CANCELLED by 0": the first word is the state
        rows = (line.split("|", 1) for line in done.stdout.splitlines() if "|" in line)
        return {job_id: state.split()[0] for job_id, state in rows if state.strip()}


def _result_files(job: Any) -> list[Path]:
    """The result file of each task of a submitit job (one task, or one per rank)."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    return [task.paths.result_pickle for task in tasks]


def _has_result(job: Any) -> bool:
    return all(path.exists() for path in _result_files(job))


def wait_for_results(
    jobs: Sequence[Any], names: Sequence[str], sweep_dir: Path, states: JobStates | None = None
) -> list:
    """Hydra's JobReturn of every submitit job, once all have a result; if some ended without one,
    one line for each, then an `error:` line and exit EXIT_JOBS_LOST (no traceback).

    `names` say which sweep job each is, for those lines. The controller is asked every
    2 s at first, then less often (a tenth of the time waited so far, at most every 30 s).
    """
    try:
        return _wait_for_results(jobs, names, sweep_dir, states or JobStates())
    except KeyboardInterrupt as stop:  # Ctrl-C, or the launcher's flag (Interrupted): the jobs are SLURM's
        signum = getattr(getattr(stop, "flag", None), "signum", None) or signal.SIGINT
        running = " ".join(job.job_id for job in jobs if not _has_result(job))
        print(
            f"error: interrupted by {signal.Signals(signum).name}: the sweep's SLURM jobs go on ({running}); "
            f"scancel {running} stops them, each saving first; once they ended, resume={sweep_dir} runs what is left",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + signum) from None


def _wait_for_results(jobs: Sequence[Any], names: Sequence[str], sweep_dir: Path, states: JobStates) -> list:
    started = time.monotonic()
    ended_at: dict[str, float] = {}
    last_state: dict[str, str] = {}
    next_query = started
    while True:
        waiting = [job for job in jobs if not _has_result(job)]
        now = time.monotonic()
        if not waiting or all(now - ended_at.get(job.job_id, now) >= RESULT_GRACE_S for job in waiting):
            break
        if now >= next_query:
            answer = states.query([job.job_id for job in waiting])
            for job_id, state in (answer or {}).items():
                last_state[job_id] = state
                if state in ENDED or state == GONE:
                    ended_at.setdefault(job_id, now)
                else:
                    ended_at.pop(job_id, None)  # requeued after all
            next_query = now + min(30.0, max(2.0, (now - started) / 10))
        time.sleep(0.5)
    lost = [(job, name) for job, name in zip(jobs, names, strict=True) if not _has_result(job)]
    if not lost:
        returns = [job.results()[0] for job in jobs]
        _stop_if_not_requeued(jobs, names, returns, sweep_dir)
        return returns
    for job, name in lost:
        state = last_state.get(job.job_id, GONE)
        how = "no longer known to SLURM" if state == GONE else state
        line = f"SLURM job {job.job_id} ({name}) ended without a result ({how}); its log: {job.paths.stderr}"
        print(line, file=sys.stderr)
    print(
        f"error: {len(lost)} of {len(jobs)} SLURM jobs of the sweep ended without a result; "
        f"run what is left with resume={sweep_dir}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(EXIT_JOBS_LOST)


def _not_requeued(job_return: Any) -> str | None:
    """Why submitit did not requeue a job after its signal, if that is how the job ended: its handler raised
    UncompletedJobError("Job not requeued because: ...") in the task, which Hydra kept as the job's failure."""
    failure = getattr(job_return, "_return_value", None)  # read without `return_value`, which prints and raises
    if getattr(job_return, "status", None) is None or job_return.status.name != "FAILED":
        return None
    text = str(failure)
    prefix = "Job not requeued because:"
    return text.removeprefix(prefix).strip().rstrip(".") if text.startswith(prefix) else None


def _stop_if_not_requeued(jobs: Sequence[Any], names: Sequence[str], returns: list, sweep_dir: Path) -> None:
    stopped = [
        (job, name, why) for job, name, ret in zip(jobs, names, returns, strict=True) if (why := _not_requeued(ret))
    ]
    if not stopped:
        return
    for job, name, why in stopped:
        print(f"SLURM job {job.job_id} ({name}) stopped at its signal and was not requeued: {why}", file=sys.stderr)
    print(
        f"error: {len(stopped)} of {len(jobs)} SLURM jobs of the sweep were not requeued (raise "
        f"hydra.launcher.max_num_timeout or timeout_min); continue them with resume={sweep_dir}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(EXIT_PREEMPTED)
