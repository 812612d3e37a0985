"""Training progress, for a person at a terminal and for a log file.

`StepBar` is the progress bar (in a terminal): Lightning's own bars count the batches of an
epoch, while a gptlab run is one step-counted stretch of training, so this one counts steps
to `trainer.max_steps` (from the resumed step on resume) and shows the losses, tokens/s and
the time left. `ProgressLog` writes a plain line per validation and at least every
`every_secs` seconds to the run's log file, and to the console when that is not a terminal
(a log file, a pipe, a batch job): see gptlab.console.
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


def figures(pl_module: pl.LightningModule, sep: str = ", ") -> str:
    """The newest training loss, validation loss and throughput, as far as known."""
    m = getattr(pl_module, "last_metrics", {})
    parts = []
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "val/loss" in m:
        parts.append(f"val {m['val/loss']:.4f}")
    if "tokens_per_sec" in m:
        parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
    return sep.join(parts)


class StepBar(ProgressBar):
    """Lightning's progress bar slot, counting steps (off in sweeps and off a terminal)."""

    def __init__(self, refresh_steps: int = 1):
        super().__init__()
        self.refresh_steps = refresh_steps
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and on_terminal() and not in_sweep():
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step",
                             desc="train", dynamic_ncols=True, file=sys.stderr, leave=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._bar is not None and (step % self.refresh_steps == 0
                                      or step == trainer.max_steps):
            self._bar.set_postfix_str(figures(pl_module), refresh=False)
            self._bar.update(step - self._bar.n)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(figures(pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # closed before the run's last lines


class ProgressLog(pl.Callback):
    """`step 250/2000 (12%) | loss 2.1340 | val 2.2010 | 12,345 tok/s | 0:00:31 elapsed,
    0:03:40 left`, at each validation and at least every `every_secs` seconds."""

    def __init__(self, every_secs: float = 30.0):
        self.every_secs = every_secs
        self._started = self._last = 0.0
        self._start_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._start_step = trainer.global_step

    @pl.utilities.rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if time.monotonic() - self._last >= self.every_secs:
            self._line(trainer, pl_module)

    @pl.utilities.rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._line(trainer, pl_module)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = now = time.monotonic()
        step, total = trainer.global_step, trainer.max_steps
        elapsed, done = now - self._started, step - self._start_step
        left = f", {clock(elapsed / done * (total - step))} left" if done > 0 else ""
        log.info(f"step {step}/{total} ({100 * step / total:.0f}%) | "
                 f"{figures(pl_module, ' | ')} | {clock(elapsed)} elapsed{left}",
                 extra={"progress": True})
