"""Preemption signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) turned into a flag the training loop checks.

The handler only records the signal; the loop saves at the next step boundary, flushes the
loggers, marks run.json `preempted` and exits with EXIT_PREEMPTED, so a scheduler can requeue the
same command (with resume=auto) and it continues. A second signal changes nothing: the save already
under way finishes first. The previous handlers are restored on exit, so a sweep's next job in the
same process starts clean.

SIGUSR2 is the signal submitit (the SLURM launcher) sends before a time limit or preemption. Its
own handler requeues the job at once; here the run saves first and then hands the signal over to
that handler (`hand_over`), so the requeued job's `resume=auto` continues from the saved step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from gpt2exp.errors import EXIT_PREEMPTED

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "PreemptionFlag"]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum: int | None = None
        self._previous: dict[int, object] = {}
        self._handover: object = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._signum = signum
            self._handover = self._previous.get(signum)

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
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
