"""gptlab-train: train a model from the composed Hydra config and record it in MLflow.

    gptlab-train                                   # nanoGPT's CPU recipe, a few minutes
    gptlab-train model=bigram                      # any config group choice
    gptlab-train experiment=shakespeare_char_cpu optim.lr=3e-3
    gptlab-train resume=<run_id> trainer.max_steps=4000   # continue a logged run
    gptlab-train -m model=bigram,gpt optim.lr=1e-3,3e-3   # a sweep
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gptlab import callbacks, sweeps, tracking
from gptlab.data import CharDataModule
from gptlab.errors import GptlabError, gptlab_cause, report_errors
from gptlab.lit_module import LitLM
from gptlab.models import check_sampling_args, check_window, class_path


class _DropTips(logging.Filter):
    """Lightning advertises hosted services at every start; that is not for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
# Lightning 2.6 on torch 2.13 warns about its own use of a deprecated torch API
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

# what may change when a run is resumed: how long and how often, never what is trained
RESUME_SAFE = ("trainer.max_steps", "trainer.val_check_interval", "trainer.log_every_n_steps",
               "trainer.enable_progress_bar", "trainer.enable_model_summary",
               "trainer.accelerator", "trainer.devices", "checkpoint.", "callbacks.", "logger.")


def task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def run_name(cfg: DictConfig, sweep_name: str | None = None) -> str:
    """`logger.run_name`, else what the sweep varies (`gpt lr=3e-3`), else the experiment
    or model."""
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    if sweep_name:
        return sweep_name
    choices = HydraConfig.get().runtime.choices
    return choices.get("experiment") or choices.get("model") or "run"


def build_model(model_cfg: DictConfig, vocab_size: int, block_size: int
                ) -> tuple[torch.nn.Module, dict[str, Any], bool]:
    """The model a `model/` config describes, its constructor arguments (what a checkpoint
    records) and whether to compile it; vocab and block size come from the data."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    target = kwargs.pop("_target_")
    compile_model = bool(kwargs.pop("compile", False))  # a training option, not an argument
    kwargs.update(vocab_size=vocab_size, block_size=block_size)
    return hydra.utils.instantiate({"_target_": target}, **kwargs), kwargs, compile_model


def build(cfg: DictConfig) -> tuple[CharDataModule, LitLM, dict[str, Any]]:
    """Data, model and LightningModule from the config, checked before anything is recorded."""
    dm: CharDataModule = hydra.utils.instantiate(cfg.data)
    dm.setup()
    model, model_kwargs, compile_model = build_model(cfg.model, dm.vocab_size, dm.block_size)
    info = {
        "model_class": class_path(model),
        "model_kwargs": model_kwargs,
        "vocab": dm.tokenizer.chars,
        "code_version": tracking.git_commit(),
    }
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if optim.get("decay_steps") is None:
        optim["decay_steps"] = cfg.trainer.max_steps
    lit = LitLM(model, **optim, compile=compile_model, checkpoint_info=info)
    return dm, lit, info


def check_run_cfg(cfg: DictConfig) -> None:
    """Refuse, before a run is recorded, what would otherwise fail part-way through it."""
    for key in ("max_steps", "val_check_interval"):
        value = cfg.trainer.get(key)
        if value is None or value <= 0:
            raise GptlabError(f"trainer.{key} must be positive, got {value}")
    sample = cfg.callbacks.sample
    check_sampling_args(sample.temperature, sample.top_k)
    check_window(sample.get("window", "half"), 1)


@dataclass
class Resume:
    """A logged run to continue: its id, the checkpoint to start from, what was changed."""

    run_id: str
    ckpt_path: Path
    step: int
    changed: list[str] = field(default_factory=list)


def find_resumable_run(client: MlflowClient, resume: str, experiment_name: str):
    if resume != "latest":
        return tracking.find_run(client, resume, experiment_name)
    return tracking.newest_run(client, experiment_name, "attributes.status != 'FINISHED'",
                               "unfinished run to resume")


def resumed_config(cfg: DictConfig, logged: DictConfig, run_id: str) -> tuple[DictConfig,
                                                                                list[str]]:
    """The run's logged config with this command's overrides applied, where they are safe."""
    changed, refused = [], []
    for override in task_overrides():
        key = override.lstrip("+~").partition("=")[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        new, old = OmegaConf.select(cfg, key), OmegaConf.select(logged, key)
        if OmegaConf.is_config(new):
            new = OmegaConf.to_container(new, resolve=True)
        if OmegaConf.is_config(old):
            old = OmegaConf.to_container(old, resolve=True)
        if key != "experiment" and new == old:
            continue
        if key.startswith(RESUME_SAFE):
            OmegaConf.update(logged, key, new, force_add=True)
            changed.append(override)
        else:
            refused.append(key)
    if refused:
        raise GptlabError(
            f"cannot change {', '.join(refused)} when resuming run {run_id}: the checkpoint was "
            f"trained with the logged values (only {', '.join(RESUME_SAFE)} may change)"
        )
    logged.resume = cfg.resume
    return logged, changed


def prepare_resume(cfg: DictConfig, client: MlflowClient
                   ) -> tuple[DictConfig, Resume, dict[str, Any]]:
    """The config to continue with, where to start from, and the checkpoint itself."""
    run = find_resumable_run(client, str(cfg.resume), cfg.logger.experiment_name)
    run_id = run.info.run_id
    try:
        text = Path(client.download_artifacts(run_id, "config.yaml",
                                              tracking.scratch_dir())).read_text()
    except Exception:  # noqa: BLE001 - a run without its config cannot be resumed
        raise GptlabError(f"run {run_id} has no logged config.yaml: not a gptlab run") from None
    new_cfg, changed = resumed_config(cfg, OmegaConf.create(text), run_id)
    ckpt_path, ckpt = tracking.newest_checkpoint(client, run_id)
    return new_cfg, Resume(run_id, ckpt_path, ckpt["gptlab"]["step"], changed), ckpt


def check_checkpoint_matches(ckpt: dict, lit: LitLM, info: dict[str, Any]) -> None:
    """A checkpoint from another corpus or model shape would fail deep inside Lightning."""
    logged = ckpt["gptlab"]
    if logged.get("vocab") != info["vocab"]:
        raise GptlabError("the checkpoint's vocabulary does not match the run's corpus")
    expected = {f"model.{k}": tuple(v.shape) for k, v in lit.model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise GptlabError(f"the checkpoint's weights do not match the logged model config "
                          f"(first difference: {diff[0][0]})")


def start_run(cfg: DictConfig, client: MlflowClient, info: dict[str, Any] | None = None,
              derived: dict[str, Any] | None = None) -> str:
    """Open the run: tags, every resolved config value as a param, config and vocabulary."""
    experiment_id = tracking.get_or_create_experiment(client, cfg.logger.experiment_name)
    parent, sweep_name = sweeps.job_sweep_info()
    tags = {
        "mlflow.source.name": "gptlab-train",
        "mlflow.source.type": "LOCAL",
        "gptlab.command": " ".join(["gptlab-train", *sys.argv[1:]]),
    }
    if parent:
        tags["mlflow.parentRunId"] = parent
    commit = info["code_version"] if info else tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if info:
        tags["gptlab.model_class"] = info["model_class"]
    run = client.create_run(experiment_id, run_name=run_name(cfg, sweep_name), tags=tags)
    run_id = run.info.run_id
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = tracking.flatten(resolved)
    params.update(derived or {})
    tracking.log_params(client, run_id, params)
    if info is None:
        return run_id
    client.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")
    client.log_text(run_id, "\n".join(task_overrides()) + "\n", "overrides.txt")
    tracking.log_dict_artifact(client, run_id, {"chars": info["vocab"]}, "vocab.json")
    return run_id


def reopen_run(cfg: DictConfig, client: MlflowClient, resume: Resume) -> None:
    """Mark a resumed run RUNNING again and record what this resumption changed."""
    run = client.get_run(resume.run_id)
    n = 1 + sum(k.startswith("gptlab.resume.") for k in run.data.tags)
    client.set_tag(resume.run_id, f"gptlab.resume.{n}",
                   f"from step {resume.step}: {' '.join(resume.changed) or 'no overrides'}")
    client.log_text(resume.run_id, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)),
                    "config.yaml")
    client.update_run(resume.run_id, status="RUNNING")


def train(cfg: DictConfig) -> float:
    check_run_cfg(cfg)
    client, run_id, resume, ckpt = None, None, None, None
    if cfg.get("resume"):
        if not cfg.logger.enabled:
            raise GptlabError("resume needs the MLflow logger (logger=mlflow)")
        client = tracking.connect(cfg.logger.tracking_uri)
        cfg, resume, ckpt = prepare_resume(cfg, client)
        check_run_cfg(cfg)
    elif cfg.optim.decay_steps is None:
        # fixed once, so that extending max_steps on resume does not bend the schedule
        cfg.optim.decay_steps = cfg.trainer.max_steps

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what autocast leaves fp32
    try:
        dm, lit, info = build(cfg)
    except Exception as e:
        record_failed_job(cfg, e)
        raise
    n_params = sum(p.numel() for p in lit.model.parameters())
    if resume:
        check_checkpoint_matches(ckpt, lit, info)
        if resume.step >= cfg.trainer.max_steps:
            raise GptlabError(f"run {resume.run_id} is already at step {resume.step}: pass "
                              f"trainer.max_steps=N with N > {resume.step} to extend it")

    recorded: dict[str, int] = {}
    if cfg.logger.enabled:
        client = client or tracking.connect(cfg.logger.tracking_uri)
        if resume:
            run_id = resume.run_id
            recorded = tracking.last_recorded_steps(client, run_id)
            reopen_run(cfg, client, resume)
        else:
            run_id = start_run(cfg, client, info,
                               {"vocab_size": dm.vocab_size, "n_params": n_params})

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # recording (MLflow calls, samples, checkpoint files past the newest) goes to one worker
    # thread, in order, off the training path
    background = callbacks.Background()
    logger = (callbacks.MLflowRunLogger(client, run_id, background, recorded=recorded)
              if client else None)
    sampler = callbacks.SampleText(client, run_id, dm.tokenizer.chars, background,
                                   **cfg.callbacks.sample)
    checkpoints = callbacks.CheckpointToRun(
        out_dir / "checkpoints", client, run_id, background, logger,
        cfg.checkpoint.every_n_steps)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=logger or False, callbacks=[sampler, checkpoints]
    )
    if logger:
        logger.trainer = trainer
    print(f"gptlab: {info['model_class'].rsplit('.', 1)[-1]} with {n_params:,} parameters, "
          f"vocabulary of {dm.vocab_size}, {len(dm.train_data):,} train / "
          f"{len(dm.val_data):,} val tokens" + (f", MLflow run {run_id}" if run_id else "")
          + (f", resumed from step {resume.step}" if resume else ""))

    status = "FAILED"
    try:
        trainer.fit(lit, datamodule=dm, ckpt_path=resume.ckpt_path if resume else None,
                    weights_only=True if resume else None)
        if checkpoints.stop_signal is not None:
            status = "KILLED"
        else:
            # the end of training may fall between validations: validate the final weights
            if trainer.global_step % trainer.val_check_batch:
                trainer.validate(lit, datamodule=dm, verbose=False)
                val = trainer.callback_metrics.get("val/loss")
                checkpoints.save(trainer, None if val is None else float(val))
            text = sampler.sample(lit.model, max_new_tokens=cfg.callbacks.final_sample_tokens)
            if client is not None:
                background.submit(client.log_text, run_id, text, "samples/final.txt")
            status = "FINISHED"
    except Exception as e:
        if client is not None:
            background.submit(client.set_tag, run_id, "gptlab.error",
                              str(gptlab_cause(e) or repr(e))[:5000])
        raise
    finally:
        if logger is not None:
            logger.flush()
        try:
            background.close()  # the run ends once everything it produced is recorded
        except Exception:
            status = "FAILED"
            raise
        finally:
            if client is not None:
                client.set_terminated(run_id, status)
    if status == "KILLED":
        print(f"gptlab: stopped at step {trainer.global_step} and checkpointed"
              + (f"; continue with: gptlab-train resume={run_id}" if run_id else ""),
              file=sys.stderr)
        sys.exit(128 + checkpoints.stop_signal)
    best = checkpoints.best if checkpoints.best is not None else math.nan
    print("\n--- sample ---")
    print(text)
    print("--------------")
    print(f"best val/loss {best:.4f}")
    if run_id:
        print(f"MLflow run id: {run_id}  (sample again: gptlab-sample run_id={run_id})")
    return best


def record_failed_job(cfg: DictConfig, error: Exception) -> None:
    """A sweep job that fails before its run opens still leaves a FAILED run in the sweep,
    with the error as a tag, so the sweep shows what happened to every job."""
    if sweeps.job_sweep_info()[0] is None or not cfg.logger.enabled:
        return
    client = tracking.connect(cfg.logger.tracking_uri)
    run_id = start_run(cfg, client)
    client.set_tag(run_id, "gptlab.error", str(gptlab_cause(error) or repr(error))[:5000])
    client.set_terminated(run_id, "FAILED")


@hydra.main(config_path=tracking.CONF_DIR, config_name="train", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> float:
    if sweeps.job_sweep_info()[0] is None:
        return train(cfg)
    # in a sweep, a job's bad input fails that job only: the others go on, and the sweep
    # reports the failures at its end
    try:
        return train(cfg)
    except Exception as e:
        cause = gptlab_cause(e)
        if cause is None:
            raise
        print(f"error: job {HydraConfig.get().job.num}: {cause}", file=sys.stderr)
        return math.nan


if __name__ == "__main__":
    main()
