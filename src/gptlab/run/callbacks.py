"""gptlab's Lightning callbacks: the sample logged at each validation, and the run's
checkpoints (taken by the step schedule and when a stop is asked for).

Why not Lightning's ModelCheckpoint: a checkpoint here must reach the MLflow run only after
the metrics of the steps before it (so a killed and resumed run records every step once), be
pruned inside the run (newest `keep` plus the best), and be written whole or not at all;
ModelCheckpoint saves into a folder and prunes there.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from gptlab import files
from gptlab.data import tokenizer as tokenizers
from gptlab.data.tokenizer import CharTokenizer, Tokenizer
from gptlab.errors import GptlabError, StopRequested, refusal
from gptlab.models import build_model, checkpoints
from gptlab.models.checkpoints import BEST_TAG
from gptlab.models.generation import generate_text
from gptlab.run.schedule import Steps
from gptlab.run.signals import StopSignals
from gptlab.tracking import store
from gptlab.tracking.recorder import Record, Recorder, RunLogger


class SampleText(pl.Callback):
    """Logs a generated sample at every validation (samples/step_NNNNNN.txt), so the UI
    shows the text improving.

    The sample is drawn from a copy of the weights (an uncompiled model, whatever training
    runs) with a generator of its own, so training's random state is untouched, and handed to
    the recorder before the checkpoint that follows it (a resumed run never lacks a sample).
    It is drawn on the training thread: torch ops on a second thread gave that thread an
    OpenMP team of its own, and on a CPU training then ran up to 2.5x slower for the rest of
    the run (experiments/benchmarks). What it needs besides its settings (the run's recorder,
    the model's class and vocabulary) it takes from the trainer when fit starts, so it is
    configured like any Lightning callback."""

    def __init__(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 1337, window: str = "half"):
        self.prompt = prompt
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       seed=seed, window=window)
        self.recorder: Recorder | None = None
        self.tokenizer: Tokenizer | None = None
        self._copy: torch.nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        info = pl_module.checkpoint_info
        self.tokenizer = tokenizers.from_checkpoint(info)
        self.recorder = next((lg.recorder for lg in trainer.loggers
                              if isinstance(lg, RunLogger)), None)
        if self._copy is None and self.recorder is not None:
            # building a model initialises its weights from the global generator: with the
            # generator's state put back, training's stream of random numbers is the same
            # whether samples are drawn or not
            with torch.random.fork_rng(devices=[]):
                self._copy = build_model(info["model_class"], dict(info["model_kwargs"]))

    @pl.utilities.rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.recorder is None:
            return
        self._copy.to(pl_module.device)
        with torch.inference_mode():
            self._copy.load_state_dict(pl_module.model.state_dict())
            text = sample_text(self._copy, self.tokenizer, self.prompt, **self.kw)
        self.recorder.submit("text", text, f"samples/step_{trainer.global_step:06d}.txt")


def sample_text(model: torch.nn.Module, tok: Tokenizer, prompt: str, **kw: Any) -> str:
    """One sample from `model`; a prompt a char vocabulary cannot encode becomes its first
    character (a run's samples must not fail on a corpus without a newline)."""
    if isinstance(tok, CharTokenizer) and (not prompt or tok.unknown(prompt)):
        prompt = tok.chars[0]
    device = next(model.parameters()).device
    return generate_text(model, tok, prompt or "\n", device=device, **kw)[0]




def agreed(trainer: pl.Trainer, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank of a data-parallel training: every rank
    must take the same checkpoints (saving is collective) and stop at the same step."""
    if trainer.world_size == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    return [bool(v > 0) for v in trainer.strategy.reduce(votes, reduce_op="sum")]


class RunCheckpoints(pl.Callback):
    """Takes the run's checkpoints, by its step schedule and when a stop is asked for.

    A checkpoint is taken after each validation, every `checkpoint.every_n_steps` steps, and
    at the end of the step during which SIGINT or SIGTERM arrived (on a validation step, after
    that validation); then training stops. Each is written whole to `dirpath` as
    `step_NNNNNN.ckpt`, then handed to the recorder, which puts it in the run's checkpoints/
    after the metrics before it: moved into a store on this machine (so it is written once),
    uploaded to a remote one. The run keeps the newest `keep` step checkpoints and the best
    by val/loss, named by its `gptlab.best_checkpoint` tag rather than copied. At most one
    checkpoint waits to be stored: the next one waits for it while the store answers, and
    replaces it while the store is away.
    """

    def __init__(self, dirpath: Path, steps: Steps, stop: StopSignals,
                 recorder: Recorder | None = None, logger: RunLogger | None = None,
                 keep: int = 2):
        self.dirpath, self.steps, self.stop = Path(dirpath), steps, stop
        self.recorder, self.logger, self.keep = recorder, logger, keep
        self.may_delete = True  # a team server lets only an experiment's managers delete
        self.best: float | None = None
        self.best_step: int | None = None
        self._saved_step: int | None = None
        self._pending: tuple[Record, Path] | None = None

    @property
    def best_name(self) -> str | None:
        return None if self.best_step is None else checkpoints.step_name(self.best_step)

    # Lightning's own SIGTERM handler is installed when fit or validate starts: see signals
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.install()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self.stop.install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        lost = self.recorder is not None and self.recorder.gave_up
        broken = self.recorder is not None and self.recorder.error is not None
        stop, lost, broken = agreed(trainer, self.stop.requested, lost, broken)
        validates = self.steps.validates(step)  # then saved (and stopped) after validating
        if lost or ((stop or self.steps.checkpoints(step)) and not validates):
            self.save(trainer)  # with the store lost, kept on local disk: resume starts there
        if lost or broken:
            if self.recorder is not None:
                self.recorder.check()  # rank 0 says why
            raise GptlabError("rank 0 stopped: recording the run failed")
        if stop and not validates:
            self._stop()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        self.save(trainer, None if val is None else float(val))
        (stop,) = agreed(trainer, self.stop.requested)
        if stop:
            self._stop()

    def _stop(self) -> None:
        self.stop.check()
        raise StopRequested(signal.SIGTERM)  # a rank asked by another to stop

    def save(self, trainer: pl.Trainer, val_loss: float | None = None) -> Path:
        """Checkpoint the trainer (every rank takes part; rank 0 writes and records)."""
        step = trainer.global_step
        path = self.dirpath / checkpoints.step_name(step)
        improved = val_loss is not None and (self.best is None or val_loss < self.best)
        if improved:
            self.best, self.best_step = val_loss, step
        if self._saved_step == step:
            if improved and self.recorder is not None:
                self.recorder.submit("tag", BEST_TAG, path.name)
            return path
        if self.logger is not None:
            self.logger.flush()  # the metrics before this checkpoint are recorded first
        save_whole(trainer, path)
        self._saved_step = step
        if not trainer.is_global_zero:
            return path
        if self.recorder is not None:
            self._hand_over(path, improved)
        self._prune_local()
        return path

    def _hand_over(self, path: Path, improved: bool) -> None:
        if self._pending is not None:
            record, _ = self._pending
            if not (self.recorder.in_outage and self.recorder.cancel(record)):
                record.done.wait()  # else superseded: the store gets the newest when back
        record = self.recorder.submit("call", self._store, path, improved, self.best_name)
        self._pending = (record, path)

    def _store(self, path: Path, improved: bool, best: str | None) -> None:
        """On the recorder's thread: put a checkpoint in the run, name the best, then drop the
        stored step checkpoints before the newest `keep` (never the best)."""
        client: MlflowClient = self.recorder.client
        run_id = self.recorder.run_id
        run = client.get_run(run_id)
        local = store.local_artifact_dir(run)
        if path.exists():
            if local is not None:
                (local / "checkpoints").mkdir(parents=True, exist_ok=True)
                # a rename on the same disk: the checkpoint is written once
                shutil.move(path, local / "checkpoints" / path.name)
            else:
                client.log_artifact(run_id, str(path), "checkpoints")
        if improved:
            client.set_tag(run_id, BEST_TAG, path.name)
        names = checkpoints.step_names(store.artifact_names(client, run_id, "checkpoints"))
        for name in names[:-self.keep] if self.may_delete else []:
            if name != best:
                try:
                    store.delete_artifact(client, run, f"checkpoints/{name}")
                except Exception as e:
                    # an editor may add to a run, not delete from it: the older checkpoints
                    # stay, which costs space and nothing of the run
                    if not (said := refusal(e)):
                        raise
                    self.may_delete = False
                    print(f"note: older checkpoints are kept in the run: {said}",
                          file=sys.stderr, flush=True)

    def _prune_local(self) -> None:
        """The local copies: the newest `keep` and the best (all the checkpoints of a run
        without MLflow; the fallback of a remote one while its server is away)."""
        names = checkpoints.step_names([p.name for p in self.dirpath.glob("step_*.ckpt")])
        pending = self._pending[1].name if self._pending else None
        for name in names[:-self.keep]:
            if name not in (pending, self.best_name):
                (self.dirpath / name).unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")


def save_whole(trainer: pl.Trainer, path: Path) -> None:
    """Save a checkpoint under a temporary name and rename it, so the file at `path` is
    always complete. Every rank of a data-parallel training calls this (Lightning's save
    waits for all of them); rank 0 alone writes the file."""
    if not trainer.is_global_zero:
        trainer.save_checkpoint(path, weights_only=False)  # written by rank 0 only
        return
    with files.replaced_whole(path) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)
