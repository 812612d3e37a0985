"""Test-only Lightning callbacks, added to a run from the command line (tests/ is on the
subprocess's path), e.g. `+callbacks.interrupt._target_=interrupt.SignalAt`: a signal to the
run's own process at a chosen point (once: a marker file remembers it fired), a failure at a
chosen step, and a slower pace."""

import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    def __init__(self, marker: str, signum: int = signal.SIGTERM, step: int | None = None,
                 when: str = "step", rank: int = 0):
        self.marker, self.signum, self.step, self.when = Path(marker), signum, step, when
        self.rank = rank  # in data-parallel training, the rank whose process gets the signal
        self._my_rank = 0

    def _fire(self) -> None:
        if self._my_rank == self.rank and not self.marker.exists():
            self.marker.write_text(str(self.signum))
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "step" and trainer.global_step == self.step:
            self._fire()

    def on_validation_start(self, trainer, pl_module) -> None:
        # during a validation (the final one with when="final_validation")
        if (self.when == "final_validation" and trainer.state.fn == "validate") or (
                self.when == "validation" and trainer.global_step == self.step):
            self._fire()

    def setup(self, trainer, pl_module, stage) -> None:
        self._my_rank = trainer.global_rank
        # as fit starts: after the run was opened, before the first step
        if self.when == "setup":
            self._fire()

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.when == "before_final_sample" and stage == "validate":
            self._fire()


class RaiseAt(pl.Callback):
    """An unexpected failure (a bug) at a chosen step (in data-parallel training, of one
    rank's process)."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"boom at step {self.step}")


class Pace(pl.Callback):
    """Slows training down to `seconds` a step, so that a test can act during a run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
