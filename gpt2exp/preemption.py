"""Preemption signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) turned into a flag the training loop checks.

The handler only records the signal; the loop saves at the next step boundary, flushes the
loggers, marks run.json `preempted` and exits with EXIT_PREEMPTED, so a scheduler can requeue the
same command (with resume=auto) and it continues. A second signal changes nothing: the save already
under way finishes first. The previous handlers are restored on exit, so a sweep's next job in the
same process starts clean.

Where nothing can be lost by stopping at once (start-up: data preparation, model build), the flag
is `interrupting()`: the handler then raises `Interrupted` (a KeyboardInterrupt, which libraries
already clean up after) instead of waiting for a step boundary. A flag entered while another one is
installed takes over a signal the outer one already received, and hands a signal over past it; one
it received that nothing inside acted on (the work ended normally) goes to the outer one on exit.

SIGUSR2 is the signal submitit (the SLURM launcher) sends before a time limit or preemption. Its
own handler requeues the job at once; here the run saves first and then hands the signal over to
that handler (`hand_over`), so the requeued job's `resume=auto` continues from the saved step.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from gpt2exp.errors import EXIT_PREEMPTED

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "Interrupted", "PreemptionFlag"]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(KeyboardInterrupt):
    """A signal received while the flag was `interrupting()`: the work under way stopped at once."""

    def __init__(self, flag: PreemptionFlag):
        super().__init__(flag.signal_name)
        self.flag = flag


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum: int | None = None
        self._previous: dict[int, object] = {}
        self._outside: dict[int, object] = {}  # per signal, the first handler that is not a PreemptionFlag's
        self._handover: object = None
        self._interrupting = False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def signum(self) -> int | None:
        return self._signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._signum = signum
            self._handover = self._outside.get(signum)
        if self._interrupting:
            self._interrupting = False  # once: a second signal must not break the clean-up of the first
            raise Interrupted(self)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[PreemptionFlag]:
        """Inside, a signal raises `Interrupted` at once (a signal received before, on entry)."""
        if self.requested:
            raise Interrupted(self)
        self._interrupting = True
        try:
            yield self
        finally:
            self._interrupting = False

    def hand_over(self) -> None:
        """Call the handler the received signal had before ours (e.g. submitit's requeue), if any.

        Call it after the checkpoint is saved and the run is closed; Python's own SIGINT handler is
        skipped (it would only raise KeyboardInterrupt).
        """
        handler = self._handover
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self._signum, None)

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous[sig] = previous
                outer = getattr(previous, "__self__", None)
                if isinstance(outer, PreemptionFlag):  # nested: hand over past it, take over what it received
                    self._outside[sig] = outer._outside.get(sig)
                    self._take_over(outer)
                else:
                    self._outside[sig] = previous
        return self

    def _take_over(self, outer: PreemptionFlag) -> None:
        if outer.requested and not self.requested:
            self.signal_name, self._signum, self._handover = outer.signal_name, outer._signum, outer._handover

    def __exit__(self, exc_type: object, *exc: object) -> None:
        previous = self._previous.get(self._signum) if self._signum is not None else None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        outer = getattr(previous, "__self__", None)
        if exc_type is None and self.requested and isinstance(outer, PreemptionFlag):
            # received after the work inside last looked (a job's end: W&B finish, the last record):
            # the flag around it gets the signal, as if it came now (a sweep stops before its next job)
            outer._handle(self._signum, None)
