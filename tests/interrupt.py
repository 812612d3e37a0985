"""A test-only Lightning callback that sends a signal to its own process at a chosen point of
a run, once (a marker file remembers it fired), so that interruptions land exactly where a
test wants them. Added to a run as `+callbacks.interrupt._target_=interrupt.SignalAt`."""

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    def __init__(self, marker: str, signum: int = signal.SIGTERM, step: int | None = None,
                 when: str = "step"):
        self.marker, self.signum, self.step, self.when = Path(marker), signum, step, when

    def _fire(self) -> None:
        if not self.marker.exists():
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

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.when == "before_final_sample" and stage == "validate":
            self._fire()
