"""Stopping a stage cleanly: Ctrl-C or SIGTERM (what cluster schedulers send before they kill a
job) asks the loop to save, then stop at the end of the current update; a non-finite loss on any
process stops every process with one message.

The loop shares both facts across processes (parallel.gather_rows), so all of them stop at the
same update and none waits forever."""

from __future__ import annotations

import signal
import threading

from ..errors import GenrecalError

_SIGNALS = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143)}


class StopRequests:
    """While active, SIGINT and SIGTERM set `requested` instead of killing the process.

    A second signal of the same kind restores the default behaviour and re-raises it at once
    (Ctrl-C twice quits without saving). Outside the main thread signals cannot be caught: the
    object then does nothing.
    """

    def __init__(self):
        self.requested: int | None = None  # the signal number that asked to stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame) -> None:
        if self.requested == signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = signum


class Interrupted(GenrecalError):
    """The run stopped on a signal after saving a checkpoint; exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = _SIGNALS.get(signum, ("signal", 1))[1]


def signal_name(signum: int) -> str:
    return _SIGNALS.get(signum, (f"signal {signum}", 1))[0]
