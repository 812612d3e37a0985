"""Ctrl-C and SIGTERM: stop at the next point where the run can stop cleanly.

The first SIGINT or SIGTERM only sets a flag; training checks it at the end of each step (after
that step's checkpoint) and the other phases of a run between them, and the run ends KILLED,
resumable. A second signal stops at once (KeyboardInterrupt).

Lightning installs a SIGTERM handler of its own when `fit` or `validate` starts; it would end
training from inside its loop (mid-validation too) without the checkpoint. The run's callback
installs ours again from `on_train_start` and `on_validation_start`, which Lightning calls
after its own installation: a documented hook, but an order Lightning does not promise.
tests/test_resume.py's signal tests fail if that order changes.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from gptlab.errors import StopRequested

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self, quiet: bool = False) -> None:
        self.signum: int | None = None
        self.quiet = quiet
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        """(Re)install the handler; the first call saves the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._saved.setdefault(sig, previous)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._saved.clear()

    def check(self) -> None:
        """Raise StopRequested if a stop was asked for."""
        if self.signum is not None:
            raise StopRequested(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            print(f"\ngptlab: {signal.Signals(signum).name} received, stopping at the end of "
                  "this step (send it again to stop at once)", file=sys.stderr, flush=True)
