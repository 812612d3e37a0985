"""The one LightningModule: next-token cross-entropy, AdamW and the learning-rate schedule
around any plain `nn.Module` language model.

Every metric is recorded at the global step (the number of optimizer updates made, counting
the one a training step makes), handed straight to the loggers: Lightning's own step count
for logging lags by one and restarts differently after a resume.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.data.windows import summed_cross_entropy
from gptlab.run.optim import build_optimizer
from gptlab.run.schedule import LRSchedule, Steps


class LitLM(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        schedule: str = "cosine",
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        fused: bool | None = None,
        name: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        muon_precision: str = "auto",
        compile: bool = False,
        checkpoint_info: dict[str, Any] | None = None,
        steps: Steps | None = None,
    ):
        super().__init__()
        self.model = model
        self.flops_per_token = 0  # set by the run (run/training.py); 0: not counted
        if compile:
            model.compile()  # in place: the state dict, so the checkpoints, keep plain names
        self.lr, self.weight_decay, self.betas, self.fused = lr, weight_decay, tuple(betas), fused
        self.optimizer_name = name
        self.muon = {"muon_lr": muon_lr, "muon_momentum": muon_momentum,
                     "muon_weight_decay": muon_weight_decay, "muon_precision": muon_precision}
        self.min_lr, self.warmup_steps, self.schedule_name = min_lr, warmup_steps, schedule
        # null: over the whole run (trainer.max_steps), fixed when the optimizer is made
        self.decay_steps = decay_steps
        self.steps = steps  # when the run logs (none: training metrics are not logged)
        # what a checkpoint needs to rebuild the model without the config: plain values only
        self.checkpoint_info = checkpoint_info or {}
        self.validated_step = 0  # the last step whose weights were validated
        self.last_metrics: dict[str, float] = {}  # for the progress display
        # lets Lightning's model summary count the FLOPs of one forward pass
        block_size = getattr(model, "block_size", None)
        if block_size:
            self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)
        self._val_sums: dict[int, torch.Tensor] = {}  # per validation loader: (loss, tokens)
        self._last_time: float | None = None
        self._tokens_since = 0
        self._val_started = 0.0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        loss = self.loss(batch)
        self._tokens_since += batch[0].numel()
        step = self.global_step + 1  # the update this step makes
        if self.steps is not None and self.steps.logs(step):
            self._log_training(step, loss, batch[0].numel())
        return loss

    def _log_training(self, step: int, loss: torch.Tensor, batch_tokens: int) -> None:
        # throughput over the logging interval, so the figure is not one noisy step
        now = time.perf_counter()
        world = self.trainer.world_size  # every process trains on batches of its own
        tokens = float(step * batch_tokens * world)
        metrics = {"train/loss": loss.item(), "lr": self.optimizers().param_groups[0]["lr"],
                   "tokens": tokens}
        if self.flops_per_token:  # compute so far, what scaling fits read (models/compute.py)
            metrics["flops"] = tokens * self.flops_per_token
        if self._last_time is not None and now > self._last_time:
            metrics["tokens_per_sec"] = world * self._tokens_since / (now - self._last_time)
        self._last_time, self._tokens_since = now, 0
        self.last_metrics.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        # for the progress bar and callbacks that monitor it; the loggers have it already
        self.log("train/loss", metrics["train/loss"], prog_bar=True, logger=False)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        x, y = batch
        pair = torch.stack(summed_cross_entropy(self.model(x), y))
        sums = self._val_sums
        sums[dataloader_idx] = sums[dataloader_idx] + pair if dataloader_idx in sums else pair

    def on_validation_epoch_end(self) -> None:
        # over every validation token of every process: the loss per token of the fixed
        # blocks, and the bits per character of the fixed validation characters
        none = torch.zeros(2, device=self.device)
        sums = torch.stack([self._val_sums.get(0, none), self._val_sums.get(1, none)])
        (total, count), (bpc_total, _) = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self._val_sums.clear()
        val_loss = total / count
        self.validated_step = self.global_step
        if self.trainer.sanity_checking:
            return
        metrics = {"val/loss": val_loss.item()}
        chars = getattr(self.trainer.datamodule, "bpc_chars", 0)
        if chars:
            metrics["val/bpc"] = bpc_total.item() / chars / math.log(2)
        self.last_metrics.update(metrics)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        # reduced above already; sync_dist says so to Lightning, which would warn otherwise
        self.log("val/loss", val_loss, prog_bar=True, logger=False, sync_dist=True)

    def on_train_start(self) -> None:
        # the throughput clock starts with training, so the first logged step after a start
        # (or a resume) has its figure too
        self._last_time, self._tokens_since = time.perf_counter(), 0

    def on_validation_start(self) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self) -> None:
        # validation is not training time: move the throughput clock forward past it
        if self._last_time is not None:
            self._last_time += time.perf_counter() - self._val_started

    def configure_optimizers(self) -> dict:
        # the fused kernel is the fastest on GPU; on CPU torch's default (foreach) is
        fused = self.fused if self.fused is not None else self.device.type == "cuda"
        optimizer = build_optimizer(self.model, self.optimizer_name, self.lr,
                                    self.weight_decay, self.betas, fused, **self.muon)
        decay_steps = self.decay_steps or self.trainer.max_steps
        schedule = LRSchedule(self.schedule_name, self.lr, self.min_lr, self.warmup_steps,
                              decay_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gptlab"] = {**self.checkpoint_info, "step": self.global_step,
                                "validated_step": self.validated_step}
        # dropout draws from the global generators: a resumed run must continue their streams
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.validated_step = checkpoint.get("gptlab", {}).get("validated_step", 0)
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_random_state(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _as_random_state(state: Any) -> tuple:
    """random.getstate() is nested tuples; a checkpoint may give them back as lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
