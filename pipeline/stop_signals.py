"""Graceful stop: the signals that ask a training run to stop, and the exit code that says "relaunch me".

Clusters stop a job with a signal and a grace period, then SIGKILL: Kubernetes (eviction,
pre-emption) and Slurm (time limit, pre-emption, ``scancel``) send SIGTERM; Slurm's
``--signal=USR1@SECONDS`` sends SIGUSR1 before the time limit; a user presses Ctrl-C (SIGINT). While
``catch_stop_signals`` is active, the first of these only records the request: the training loop
finishes its step, all ranks agree to stop after the same step, rank 0 writes a training state for
it, and every rank exits with ``RELAUNCH_EXIT_CODE`` (``pipeline/trainer.py``, ``train_dist.py``).

A repeat within ``REPEAT_WINDOW_SECONDS`` of the first signal is the same request: Paddle's launcher
sends SIGTERM to each worker up to three times 0.2 s apart (``ProcessContext.terminate``), and under
Slurm a worker may get the scheduler's signal and the launcher's. A signal after that window ends
the process at once with the signal's default action; every training state is written atomically
(``pipeline/files.py``), so the previous one stays complete and resumable.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: a temporary failure, try again. Codes 2 (bad input) and 3 (NaN stop) mean
# the opposite: a relaunch would fail the same way. Launch scripts import it from here.
RELAUNCH_EXIT_CODE = 75
# Longer than the launcher's burst of three SIGTERMs (0.4 s, more on a loaded machine), shorter than
# a user's second Ctrl-C after reading "stopping after this step".
REPEAT_WINDOW_SECONDS = 2.0


class StopRequest:
    """What the stop signals asked for so far; ``requested`` is read by the training loop each step."""

    def __init__(self, clock=time.monotonic):
        self.signal_name: str | None = None  # the first stop signal received
        self.count = 0  # stop signals received, repeats included
        self._first_at: float | None = None
        self._clock = clock

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signal_name is not None

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler: record the first request; repeats within the window are the same request;
        a later one ends the process with the signal's default action."""
        # No logging here: a handler runs between two bytecodes of the loop, perhaps inside a log call.
        now = self._clock()
        self.count += 1
        if self._first_at is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            return
        if now - self._first_at < REPEAT_WINDOW_SECONDS:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Route the stop signals to a fresh ``StopRequest`` while the block runs; the previous handlers
    come back after it. Outside the main thread Python cannot install handlers: the request then
    never comes and the signals keep their previous effect."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """For a process that has stopped gracefully and is exiting with ``RELAUNCH_EXIT_CODE``: a signal
    now (the launcher stops the workers still alive once one has exited) could only turn that code
    into a death by signal. SIGKILL still ends it."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
