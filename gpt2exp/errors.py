"""The exceptions a user is meant to read, and the exit code each one ends the process with.

    0   completed, or stopped early (val/loss stopped improving: trainer.early_stop_patience)
    2   bad input (`UserError`): one `error: ...` line, nothing on disk changed
    3   diverged (`Diverged`): the loss became NaN or infinite; the run dir says so
    69  a sweep's SLURM job ended without a result (scancel, node failure): each named; resume=<sweep dir>
    74  a checkpoint could not be saved (`SaveFailed`): disk full, permission denied; earlier ones intact
    75  preempted: saved at a step boundary after a signal; requeue the same command with resume=auto
    128 + signal (130 Ctrl-C, 143 SIGTERM): a signal in the launcher, before the run started; nothing written
    1   anything unexpected (a traceback)

None of these but the last reaches the terminal as a traceback.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_JOBS_LOST = 69  # sysexits' EX_UNAVAILABLE: a SLURM job of a sweep ended without its result (gpt2exp.slurm)
EXIT_SAVE_FAILED = 74  # sysexits' EX_IOERR
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "temporary failure, retry"


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it. Raised before anything is written."""


class RunStopped(Exception):
    """A run that started and then had to stop: the message is one line for the user, the run dir records it."""

    exit_code = 1


class Diverged(RunStopped):
    """The loss became NaN or infinite; final (a rerun would diverge again, bit for bit)."""

    exit_code = EXIT_DIVERGED


class SaveFailed(RunStopped):
    """A checkpoint could not be written; its partial files are gone and earlier checkpoints are intact."""

    exit_code = EXIT_SAVE_FAILED


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one error line and exit (with the usage exit code unless told otherwise)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
