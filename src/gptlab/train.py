"""gptlab-train: train a model from the composed Hydra config and record it in MLflow.

    gptlab-train                                   # nanoGPT's CPU recipe, a few minutes
    gptlab-train model=bigram                      # any config group choice
    gptlab-train experiment=shakespeare_char_cpu optim.lr=3e-3
    gptlab-train -m model=bigram,gpt optim.lr=1e-3,3e-3   # a sweep
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gptlab import callbacks, tracking
from gptlab.data import CharDataModule
from gptlab.errors import GptlabError, report_errors
from gptlab.lit_module import LitLM
from gptlab.models import class_path


class _DropTips(logging.Filter):
    """Lightning advertises hosted services at every start; that is not for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())
# overrides that say where things live rather than what is trained: not part of a run name
_UNNAMED = ("hydra.", "logger.", "data.path", "trainer.enable_progress_bar", "resume")


def run_name(cfg: DictConfig) -> str:
    """What the command line changed, e.g. `bigram lr=3e-3`, else the experiment or model."""
    if cfg.logger.get("run_name"):
        return str(cfg.logger.run_name)
    hc = HydraConfig.get()
    parts = []
    for override in hc.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(_UNNAMED):
            continue
        parts.append(value if "." not in key else f"{key.rsplit('.', 1)[-1]}={value}")
    if parts:
        return " ".join(parts)
    return hc.runtime.choices.get("experiment") or hc.runtime.choices.get("model") or "run"


def build(cfg: DictConfig) -> tuple[CharDataModule, LitLM, dict[str, Any]]:
    """Data, model and LightningModule from the config, checked before anything is recorded."""
    dm: CharDataModule = hydra.utils.instantiate(cfg.data)
    dm.setup()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    target = model_cfg.pop("_target_")
    model_kwargs = {**model_cfg, "vocab_size": dm.vocab_size, "block_size": dm.block_size}
    model = hydra.utils.instantiate({"_target_": target}, **model_kwargs)
    info = {
        "model_class": class_path(model),
        "model_kwargs": model_kwargs,
        "vocab": dm.tokenizer.chars,
        "code_version": tracking.git_commit(),
    }
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if optim.get("decay_steps") is None:
        optim["decay_steps"] = cfg.trainer.max_steps
    lit = LitLM(model, **optim, checkpoint_info=info)
    return dm, lit, info


def check_trainer_cfg(cfg: DictConfig) -> None:
    for key in ("max_steps", "val_check_interval"):
        value = cfg.trainer.get(key)
        if value is None or value <= 0:
            raise GptlabError(f"trainer.{key} must be positive, got {value}")


def start_run(cfg: DictConfig, client, info: dict[str, Any], n_params: int,
              vocab_size: int) -> str:
    experiment_id = tracking.get_or_create_experiment(client, cfg.logger.experiment_name)
    tags = {
        "mlflow.source.name": "gptlab-train",
        "mlflow.source.type": "LOCAL",
        "gptlab.model_class": info["model_class"],
        "gptlab.command": " ".join(["gptlab-train", *sys.argv[1:]]),
    }
    if info["code_version"]:
        tags["mlflow.source.git.commit"] = info["code_version"]
    run = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags)
    run_id = run.info.run_id
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = tracking.flatten(resolved)
    params.update(vocab_size=vocab_size, n_params=n_params)
    tracking.log_params(client, run_id, params)
    client.log_text(run_id, OmegaConf.to_yaml(resolved), "config.yaml")
    client.log_text(run_id, "\n".join(HydraConfig.get().overrides.task) + "\n",
                    "overrides.txt")
    tracking.log_dict_artifact(client, run_id, {"chars": info["vocab"]}, "vocab.json")
    return run_id


def train(cfg: DictConfig) -> float:
    check_trainer_cfg(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, lit, info = build(cfg)
    n_params = sum(p.numel() for p in lit.model.parameters())

    client, run_id = None, None
    if cfg.logger.enabled:
        client = tracking.connect(cfg.logger.tracking_uri)
        run_id = start_run(cfg, client, info, n_params, dm.vocab_size)

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sampler = callbacks.SampleText(client, run_id, dm.tokenizer.chars, **cfg.callbacks.sample)
    checkpoints = callbacks.CheckpointToRun(out_dir / "checkpoints", client, run_id)
    logger = callbacks.MLflowRunLogger(client, run_id) if client is not None else False
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=logger, callbacks=[sampler, checkpoints]
    )
    if logger:
        logger.trainer = trainer
    print(f"gptlab: {info['model_class'].rsplit('.', 1)[-1]} with {n_params:,} parameters, "
          f"vocabulary of {dm.vocab_size}, {len(dm.train_data):,} train / "
          f"{len(dm.val_data):,} val tokens" + (f", MLflow run {run_id}" if run_id else ""))
    status = "FAILED"
    try:
        trainer.fit(lit, datamodule=dm)
        if trainer.interrupted:
            status = "KILLED"
            raise GptlabError("training interrupted")
        # the end of training may fall between validations: validate the final weights too
        if trainer.global_step % cfg.trainer.val_check_interval:
            trainer.validate(lit, datamodule=dm, verbose=False)
        text = sampler.sample(lit, max_new_tokens=cfg.callbacks.final_sample_tokens)
        if client is not None:
            client.log_text(run_id, text, "samples/final.txt")
        status = "FINISHED"
    finally:
        if client is not None:
            logger.flush()
            client.set_terminated(run_id, status)
    best = checkpoints.best if checkpoints.best is not None else math.nan
    print("\n--- sample ---")
    print(text)
    print("--------------")
    print(f"best val/loss {best:.4f}")
    if run_id:
        print(f"MLflow run id: {run_id}  (sample again: gptlab-sample run_id={run_id})")
    return best


@hydra.main(config_path=tracking.CONF_DIR, config_name="train", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
