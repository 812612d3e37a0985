"""Training progress: a bar in a terminal, a plain line per validation (and at least every
`every_secs` seconds) for a log file, a pipe or a batch job.

Lightning's own bars count batches of an epoch; a gptlab run is one step-counted stretch of
training, so this bar counts steps to `trainer.max_steps` (from the resumed step on resume)
and shows the losses, tokens/s and the time left.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar
from tqdm import tqdm

from gptlab.console import in_sweep, log, on_terminal


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress(ProgressBar):
    def __init__(self, every_secs: float = 30.0, refresh_steps: int = 1):
        super().__init__()
        self.every_secs, self.refresh_steps = every_secs, refresh_steps
        self._enabled = True
        self._bar: tqdm | None = None
        self._started = self._last_line = 0.0
        self._start_step = 0

    # -- Lightning's ProgressBar interface ---------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # -- what the run does -------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self._started = self._last_line = time.monotonic()
        self._start_step = trainer.global_step
        if on_terminal() and not in_sweep():
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step",
                             desc="train", dynamic_ncols=True, file=sys.stderr, leave=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._enabled:
            return
        step = trainer.global_step
        if self._bar is not None and (step % self.refresh_steps == 0
                                      or step == trainer.max_steps):
            self._bar.set_postfix_str(self._figures(pl_module), refresh=False)
            self._bar.update(step - self._bar.n)
        if time.monotonic() - self._last_line >= self.every_secs:
            self._line(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._line(trainer, pl_module)
            if self._bar is not None:
                self._bar.set_postfix_str(self._figures(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # closed before the run's last lines

    # -- formatting --------------------------------------------------------------------------
    @staticmethod
    def _figures(pl_module: pl.LightningModule) -> str:
        m = getattr(pl_module, "last_metrics", {})
        parts = []
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "val/loss" in m:
            parts.append(f"val {m['val/loss']:.4f}")
        if "tokens_per_sec" in m:
            parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
        return ", ".join(parts)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_line = now = time.monotonic()
        step, total = trainer.global_step, trainer.max_steps
        elapsed = now - self._started
        done = step - self._start_step
        left = elapsed / done * (total - step) if done > 0 else None
        text = (f"step {step}/{total} ({100 * step / total:.0f}%) | "
                f"{self._figures(pl_module).replace(', ', ' | ')} | {clock(elapsed)} elapsed"
                + (f", {clock(left)} left" if left is not None else ""))
        log.info(text, extra={"progress": True})
