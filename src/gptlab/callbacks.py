"""Lightning's side of tracking: the MLflow logger, the sample and the checkpoint callbacks."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from gptlab.tracking import generate_text

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


class MLflowRunLogger(Logger):
    """Lightning logger writing to one existing MLflow run.

    Metrics are buffered and sent in batches at each validation and at the end, so a
    training step never waits on the store. Every metric is recorded at the trainer's
    global step, the number of optimizer updates made so far, whether it comes from
    training or validation (Lightning's own step count lags by one).
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 500):
        super().__init__()
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._buffer: list[Metric] = []
        self.trainer: pl.Trainer | None = None  # set by the caller once the trainer exists

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self.run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        return self.client

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        pass  # the full resolved config is logged as params when the run starts

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        if self.trainer is not None:
            step = self.trainer.global_step
        for k, v in metrics.items():
            if k == "epoch":
                continue
            self._buffer.append(Metric(k, float(v), ts, step or 0))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._buffer[:MAX_METRICS_PER_BATCH]

    @rank_zero_only
    def save(self) -> None:
        self.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()


class SampleText(pl.Callback):
    """Logs a generated sample at every validation, so the UI shows the text improving."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, chars: str,
                 prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 1337):
        self.client, self.run_id, self.chars = client, run_id, chars
        self.prompt = prompt if all(ch in chars for ch in prompt) and prompt else chars[0]
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       seed=seed)

    def sample(self, pl_module: pl.LightningModule, max_new_tokens: int | None = None) -> str:
        kw = dict(self.kw)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        return generate_text(pl_module.model, self.chars, self.prompt, device=pl_module.device,
                             **kw)[0]

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.client is None:
            return
        text = self.sample(pl_module)
        self.client.log_text(self.run_id, text, f"samples/step_{trainer.global_step:06d}.txt")


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """Write to a temporary name and rename, so the file at `path` is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    os.replace(tmp, path)


class CheckpointToRun(pl.Callback):
    """Saves last.ckpt (and best.ckpt by val/loss) at each validation and at the end, and
    logs both to the run's artifacts under checkpoints/."""

    def __init__(self, dirpath: Path, client: MlflowClient | None, run_id: str | None):
        self.dirpath, self.client, self.run_id = Path(dirpath), client, run_id
        self.best: float | None = None

    def _log(self, path: Path) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        last = self.dirpath / "last.ckpt"
        val = trainer.callback_metrics.get("val/loss")
        improved = val is not None and (self.best is None or float(val) < self.best)
        if improved:
            self.best = float(val)
        save_checkpoint_atomic(trainer, last)
        self._log(last)
        if improved:
            best = self.dirpath / "best.ckpt"
            shutil.copyfile(last, best)
            self._log(best)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
