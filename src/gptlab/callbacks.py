"""Lightning's side of tracking: the MLflow logger, the sample and the checkpoint callbacks."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from mlflow.entities import Metric
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from gptlab.tracking import generate_text

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


class Background:
    """One worker thread for a run's records: training hands over the MLflow calls (metrics,
    samples, checkpoints) and goes on. The work is done in the order it was given, so a
    checkpoint is never logged ahead of the metrics before it. `drain` waits for all of it
    and raises the first error."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptlab-records")
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        # finished work is forgotten unless it failed: drain reports that
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        """Drain, then let the worker thread go."""
        try:
            self.drain()
        finally:
            self._pool.shutdown()


class MLflowRunLogger(Logger):
    """Lightning logger writing to one existing MLflow run.

    Metrics are buffered and sent in batches by the run's background worker: before every
    checkpoint (so at each validation), every `flush_secs` seconds so the UI follows a live
    run, and at the end; a training step never waits on the store. Every metric is recorded
    at the trainer's global step, the number of optimizer updates made so far, whether it
    comes from training or validation (Lightning's own step count lags by one).
    """

    def __init__(self, client: MlflowClient, run_id: str, background: Background,
                 flush_every: int = 1000, flush_secs: float = 15.0,
                 recorded: Mapping[str, int] | None = None):
        super().__init__()
        self.client, self.run_id, self.background = client, run_id, background
        self.flush_every, self.flush_secs = flush_every, flush_secs
        self._buffer: list[Metric] = []
        self._flushed_at = time.monotonic()
        # on resume: the last step already recorded per metric, so a step computed again
        # after restarting from an older checkpoint is not recorded twice
        self.recorded = dict(recorded or {})
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
        step = step or 0
        for k, v in metrics.items():
            if k == "epoch" or step <= self.recorded.get(k, -1):
                continue
            self._buffer.append(Metric(k, float(v), ts, step))
        if (len(self._buffer) >= self.flush_every
                or time.monotonic() - self._flushed_at >= self.flush_secs):
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        metrics, self._buffer = self._buffer, []
        if metrics:
            self.background.submit(self._send, metrics)

    def _send(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    @rank_zero_only
    def save(self) -> None:
        pass  # Lightning calls this after every log_metrics: flushing here would undo the batching

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()


class SampleText(pl.Callback):
    """Logs a generated sample at every validation, so the UI shows the text improving.

    The sample is drawn by the background worker from a copy of the weights taken at the
    validation: training goes on meanwhile, and its random state is not touched."""

    def __init__(self, client: MlflowClient | None, run_id: str | None, chars: str,
                 background: Background, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
                 window: str = "half"):
        self.client, self.run_id, self.chars = client, run_id, chars
        self.background = background
        self.prompt = prompt if all(ch in chars for ch in prompt) and prompt else chars[0]
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       seed=seed, window=window)
        self._copy: torch.nn.Module | None = None  # the worker's model, built once

    def sample(self, model: torch.nn.Module, max_new_tokens: int | None = None) -> str:
        kw = dict(self.kw)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        device = next(model.parameters()).device
        return generate_text(model, self.chars, self.prompt, device=device, **kw)[0]

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.client is None:
            return
        name = f"samples/step_{trainer.global_step:06d}.txt"
        if self._copy is None:
            self._copy = copy.deepcopy(pl_module.model)
            self._copy._compiled_call_impl = None  # a compiled copy would call the original
        weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.background.submit(self._sample_and_log, weights, name)

    def _sample_and_log(self, weights: dict[str, torch.Tensor], name: str) -> None:
        # the copy was made inside validation's inference mode, which is per thread
        with torch.inference_mode():
            self._copy.load_state_dict(weights)
            text = self.sample(self._copy)
        self.client.log_text(self.run_id, text, name)


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """Write to a temporary name and rename, so the file at `path` is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    os.replace(tmp, path)


def step_checkpoint_name(step: int) -> str:
    return f"step_{step:06d}.ckpt"


class CheckpointToRun(pl.Callback):
    """Checkpoints at each validation, every `every_n_steps` steps, and when SIGINT or SIGTERM
    asks training to stop; then training stops at that step.

    Each checkpoint is written atomically as `step_NNNNNN.ckpt`, then the background worker
    logs it to the run under checkpoints/, where the newest `keep` are kept (an older one
    survives a kill in the middle of logging the newest), plus `best.ckpt` by val/loss.
    Buffered metrics are handed over first, so the run's records never lag behind its
    newest logged checkpoint.
    """

    def __init__(self, dirpath: Path, client: MlflowClient | None, run_id: str | None,
                 background: Background, logger: MLflowRunLogger | None = None,
                 every_n_steps: int | None = None, keep: int = 2):
        self.dirpath, self.client, self.run_id = Path(dirpath), client, run_id
        self.logger, self.every_n_steps, self.keep = logger, every_n_steps, keep
        self.background = background
        self.best: float | None = None
        self.stop_signal: int | None = None
        self._saved_step: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._artifacts = None  # the run's artifact repository, opened at the first prune

    # -- stop signals ------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\ngptlab: {signal.Signals(signum).name} received, checkpointing and stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed here, after Lightning's own SIGTERM handler, so ours decides what happens
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    # -- saving ------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, val_loss: float | None = None) -> None:
        step = trainer.global_step
        improved = val_loss is not None and (self.best is None or val_loss < self.best)
        if improved:
            self.best = val_loss
        if self._saved_step == step and not improved:
            return
        if self.logger is not None:
            self.logger.flush()
        path = self.dirpath / step_checkpoint_name(step)
        save_checkpoint_atomic(trainer, path)  # now: the state is this step's
        self._saved_step = step
        self.background.submit(self._record, path, improved)

    def _record(self, path: Path, improved: bool) -> None:
        """Log a written checkpoint (and best.ckpt), then drop the ones before the newest
        `keep`; files written after `path` are not touched, their logging is still to come."""
        self._log(path)
        if improved:
            best = self.dirpath / "best.ckpt"
            tmp = best.with_name(".best.ckpt.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, best)
            self._log(best)
        for old in sorted(p for p in self.dirpath.glob("step_*.ckpt")
                          if p.name <= path.name)[:-self.keep]:
            old.unlink(missing_ok=True)
        if self.client is not None:
            if self._artifacts is None:
                self._artifacts = get_artifact_repository(
                    self.client.get_run(self.run_id).info.artifact_uri)
            logged = sorted(Path(f.path).name for f in self.client.list_artifacts(
                self.run_id, "checkpoints") if Path(f.path).name.startswith("step_"))
            for name in logged[:-self.keep]:
                self._artifacts.delete_artifacts(f"checkpoints/{name}")

    def _log(self, path: Path) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), "checkpoints")

    @rank_zero_only
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # the periodic checkpoint of step N is taken here, as step N+1 begins, because
        # Lightning hands step N's metrics to the logger only after on_train_batch_end: saved
        # any earlier, a kill could leave a checkpoint ahead of the recorded metrics
        step = trainer.global_step
        if (self.every_n_steps and step and step % self.every_n_steps == 0
                and step % trainer.val_check_batch != 0):  # validation steps save after val
            self.save(trainer)

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.stop_signal is not None:
            # a graceful stop: the loop ends after this step and the run's final flush
            # records its metrics, so the checkpoint can be taken now
            self.save(trainer)
            trainer.should_stop = True

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        val = trainer.callback_metrics.get("val/loss")
        self.save(trainer, None if val is None else float(val))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
