"""The one LightningModule: next-token cross-entropy, AdamW and the learning-rate schedule
around any plain `nn.Module` language model."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import GptlabError


class LRSchedule:
    """Multiplier of the base lr at a step: `constant`, or linear warmup then cosine decay
    to `min_lr` at `decay_steps` (nanoGPT's schedule). A plain object so that LambdaLR
    saves its fields in the checkpoint."""

    def __init__(self, schedule: str, lr: float, min_lr: float, warmup_steps: int,
                 decay_steps: int):
        if schedule not in ("constant", "cosine"):
            raise GptlabError(f"optim.schedule must be 'constant' or 'cosine', got {schedule!r}")
        self.schedule, self.lr, self.min_lr = schedule, lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_lr / self.lr
        ratio = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
        return (self.min_lr + coeff * (self.lr - self.min_lr)) / self.lr


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
        compile: bool = False,
        checkpoint_info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if lr <= 0:
            raise GptlabError(f"optim.lr must be positive, got {lr}")
        self.model = model
        if compile:
            model.compile()  # in place: the state dict, so the checkpoints, keep plain names
        self.lr, self.weight_decay, self.betas, self.fused = lr, weight_decay, tuple(betas), fused
        self.schedule = LRSchedule(schedule, lr, min_lr, warmup_steps, decay_steps or 0)
        # what a checkpoint needs to rebuild the model without the config: plain values only
        self.checkpoint_info = checkpoint_info or {}
        self._val_losses: list[torch.Tensor] = []
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
        # only on the steps Lightning hands to the logger: self.log costs a fixed ~0.3 ms,
        # as much as a whole step of a small model
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss, on_step=True, prog_bar=True)
        self._tokens_since += batch[0].numel()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # throughput over the logging interval, so the figure is not one noisy step
        step = self.global_step
        if step % self.trainer.log_every_n_steps:
            return
        now = time.perf_counter()
        metrics = {"lr": self.optimizers().param_groups[0]["lr"],
                   "tokens": float(step * batch[0].numel())}
        if self._last_time is not None and now > self._last_time:
            metrics["tokens_per_sec"] = self._tokens_since / (now - self._last_time)
        self._last_time, self._tokens_since = now, 0
        # plain numbers straight to the loggers: self.log's bookkeeping is for tensors that
        # need reducing, and costs more than a small model's step
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._val_losses.append(self.loss(batch))

    def on_validation_epoch_end(self) -> None:
        val_loss = torch.stack(self._val_losses).mean()
        self._val_losses.clear()
        self.log("val/loss", val_loss, prog_bar=True)
        self.log("val/bpc", val_loss / math.log(2))

    def on_validation_start(self) -> None:
        self._val_started = time.perf_counter()

    def on_validation_end(self) -> None:
        # validation is not training time: move the throughput clock forward past it
        if self._last_time is not None:
            self._last_time += time.perf_counter() - self._val_started

    def configure_optimizers(self) -> dict:
        # weight decay on matrices (linear and embedding weights) only, as in GPT-2
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # the fused kernel is the fastest on GPU; on CPU torch's default (foreach) is
        fused = self.fused if self.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gptlab"] = {**self.checkpoint_info, "step": self.global_step}
        # dropout draws from the global generators: a resumed run must continue their streams
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
