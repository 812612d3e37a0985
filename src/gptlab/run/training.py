"""A training's phases, for one job that `gptlab-train` (gptlab/cli/train.py) hands over.

A run's life, in the order below: `setup` (check and build everything, nothing recorded yet),
open or reopen the MLflow run, `fit`, `validate` the final weights, `final_sample`; `run_job`
records how it ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from mlflow.entities import Dataset, Metric
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelSummary, ProgressBar

from gptlab.console import log
from gptlab.data import tokenizer as tokenizers
from gptlab.data.datamodule import CorpusDataModule
from gptlab.errors import GptlabError, StopRequested
from gptlab.models import class_path, compute, memory
from gptlab.models.checkpoints import check_matches, model_weights
from gptlab.run import checks, ddp
from gptlab.run.callbacks import RunCheckpoints, sample_text
from gptlab.run.devices import world_size
from gptlab.run.lit_module import LitLM
from gptlab.run.optim import check_optimizer
from gptlab.run.record import FINISHED, Job, RunRecord
from gptlab.run.resume import ELASTIC_TAG, Resume, find_auto, prepare_resume
from gptlab.run.schedule import Steps
from gptlab.run.signals import StopSignals
from gptlab.tracking import store
from gptlab.tracking.recorder import RunLogger

# the `logger` group's own keys; any other entry with a _target_ is a Lightning logger
MLFLOW_SETTINGS = ("tracking_uri", "experiment_name", "run_name", "enabled", "outage_timeout",
                   "log_model", "register_model", "serve_limits", "system_metrics",
                   "system_metrics_interval")

# Lightning's start-up banners ("GPU available", hosted-service tips) are informational
# messages of this logger; gptlab prints its own summary of what it runs on
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
# and each rank's "Initializing distributed" line: gptlab's own summary says how many there are
logging.getLogger("lightning_fabric.utilities.distributed").setLevel(logging.WARNING)
# Lightning 2.6 on torch 2.13 warns, from this module of its own, about its use of a
# deprecated torch API (LeafSpec); nothing for our users to act on
warnings.filterwarnings("ignore", category=FutureWarning,
                        module="pytorch_lightning.utilities._pytree")


def build_model(model_cfg: DictConfig, vocab_size: int, block_size: int,
                fits: Callable[[int], None] | None = None
                ) -> tuple[torch.nn.Module, dict[str, Any], bool]:
    """The model a `model/` config describes, its constructor arguments (what a checkpoint
    records) and whether to compile it; vocab and block size come from the data. `fits` is
    given the parameter count first, before a byte of the model is allocated."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    target = kwargs.pop("_target_")
    compile_model = bool(kwargs.pop("compile", False))  # a training option, not an argument
    kwargs.update(vocab_size=vocab_size, block_size=block_size)

    def build() -> torch.nn.Module:
        return checks.instantiate(OmegaConf.create({"_target_": target}), "model", **kwargs)

    if fits is not None:
        fits(memory.count_parameters(build))
    return build(), kwargs, compile_model


def steps_of(cfg: DictConfig) -> Steps:
    """When the run logs, validates and checkpoints."""
    return Steps(cfg.trainer.max_steps, cfg.trainer.val_check_interval,
                 cfg.trainer.log_every_n_steps, cfg.checkpoint.every_n_steps)


def build_lit(cfg: DictConfig, model: torch.nn.Module, compile_model: bool,
              info: dict[str, Any]) -> LitLM:
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    return checks.build_with(LitLM, "optim", model=model, **optim, compile=compile_model,
                             checkpoint_info=info, steps=steps_of(cfg))


def configured(node: DictConfig, group: str, keep: tuple[str, ...] = ()) -> list[Any]:
    """What a config group lists with a `_target_` (Lightning callbacks or loggers), built;
    an entry that is neither one of gptlab's own settings (`keep`) nor buildable is an error,
    never silently dropped."""
    built = []
    for name, entry in node.items():
        if OmegaConf.is_dict(entry) and "_target_" in entry:
            built.append(checks.instantiate(entry, f"{group}.{name}"))
        elif name not in keep:
            raise GptlabError(f"{group}.{name} names no class to build (give it a _target_)")
    return built


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The `callbacks` group's callbacks; a progress bar or model summary only where the
    trainer's switches ask for one (Lightning refuses them otherwise)."""
    callbacks = configured(cfg.callbacks, "callbacks", keep=("final_sample_tokens",))
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_model_summary", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    return callbacks


@dataclass
class Session:
    """Everything a run trains with, built and checked before the run is recorded."""

    cfg: DictConfig
    dm: CorpusDataModule
    lit: LitLM
    trainer: pl.Trainer
    steps: Steps
    checkpoints: RunCheckpoints
    logger: RunLogger | None
    info: dict[str, Any]
    n_params: int
    resume: Resume | None = None

    def close(self) -> None:
        """Hand over the last metrics."""
        if self.logger is not None:
            self.logger.flush()


def setup(cfg: DictConfig, job: Job, record: RunRecord, stop: StopSignals,
          resume: Resume | None) -> Session:
    """Data, model, optimizer, callbacks and trainer, all checked: whatever fails here fails
    before the run is opened (or reopened)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what autocast leaves fp32
    dm: CorpusDataModule = checks.instantiate(cfg.data, "data")
    if resume is not None and resume.ckpt["gptlab"].get("tokenizer") == "bpe":
        # the run's own BPE, never trained again (characters are read off the corpus, and
        # a corpus that changed is caught below)
        dm.given_tokenizer = tokenizers.from_checkpoint(resume.ckpt["gptlab"])
    dm.stop_check = stop.check  # Ctrl-C stops a first run's prepare, which leaves nothing
    dm.setup()
    model, model_kwargs, compile_model = build_model(
        cfg.model, dm.vocab_size, dm.block_size,
        fits=lambda params: checks.check_memory(cfg, params, dm.vocab_size))
    info = {"model_class": class_path(model), "model_kwargs": model_kwargs,
            "vocab": dm.tokenizer.spec, "tokenizer": dm.tokenizer.kind,
            "code_version": store.git_commit()}
    if resume is not None:
        check_matches(resume.ckpt, model, info["vocab"])
    check_optimizer(model, cfg.optim.get("name", "adamw"))
    lit = build_lit(cfg, model, compile_model, info)
    lit.flops_per_token = compute.flops_per_token(model, model_kwargs)
    steps = lit.steps
    logger = RunLogger(record.recorder) if record.recorder is not None else None
    loggers = [logger] if logger else []
    loggers += configured(cfg.logger, "logger", keep=MLFLOW_SETTINGS)
    ckpts = RunCheckpoints(job.checkpoint_dir, steps, stop, record.recorder, logger,
                           keep=cfg.checkpoint.keep)
    # the run's checkpoints last: a validation's sample is queued before the checkpoint after it
    trainer = checks.instantiate(cfg.trainer, "trainer", logger=loggers or False,
                                 callbacks=[*build_callbacks(cfg), ckpts])
    n_params = sum(p.numel() for p in model.parameters())
    return Session(cfg, dm, lit, trainer, steps, ckpts, logger, info, n_params, resume)


def open_run(s: Session, record: RunRecord) -> None:
    """Open the run with what the session built (or reopen the resumed one)."""
    if record.client is None:
        return
    world = s.trainer.world_size
    if s.resume is not None:
        record.reopen(s.resume, s.cfg, world)
        s.logger.recorded = record.recorded  # a step computed again is not recorded twice
        return
    tags = {"gptlab.model_class": s.info["model_class"]}
    if ddp.elastic_id() is not None:  # a restart of the torchrun job finds the run by it
        tags[ELASTIC_TAG] = ddp.elastic_id()
    if s.info["code_version"]:
        tags["mlflow.source.git.commit"] = s.info["code_version"]
    record.open(s.cfg, tags, {"vocab_size": s.dm.vocab_size, "n_params": s.n_params,
                              "n_params_non_embedding":
                                  compute.non_embedding_parameters(s.lit.model),
                              "flops_per_token": s.lit.flops_per_token,
                              "world_size": world,
                              "global_batch_size": s.cfg.data.batch_size * world},
                tokenizers.artifacts(s.dm.tokenizer), dataset_of(s.dm))


def dataset_of(dm: CorpusDataModule) -> Dataset:
    """The prepared corpus as MLflow shows a run's dataset: its name, the prepared folder's
    key (the same for every run on the same tokens), where the corpus is, its sizes."""
    prep = dm.prepared
    return Dataset(name=dm.corpus_name, digest=prep.folder.name.rsplit("-", 1)[-1],
                   source_type="local", source=json.dumps({"uri": prep.meta["source"]}),
                   profile=json.dumps({**prep.profile(), "sha256": dm.corpus_sha256}))


def fit(s: Session) -> None:
    """Train to `trainer.max_steps`, from the resumed checkpoint if there is one."""
    resume = s.resume
    if resume is not None and resume.step >= s.steps.max_steps:
        # trained already; what remains is the final validation and sample
        s.lit.model.load_state_dict(model_weights(resume.ckpt["state_dict"]))
        s.lit.validated_step = resume.ckpt["gptlab"].get("validated_step", 0)
        s.checkpoints.load_state_dict(
            resume.ckpt.get("callbacks", {}).get(s.checkpoints.state_key, {}))
        return
    s.trainer.fit(s.lit, datamodule=s.dm, ckpt_path=resume.ckpt_path if resume else None,
                  weights_only=True if resume else None)


def validate(s: Session) -> None:
    """Validate (and checkpoint) the final weights, unless their step was validated (the last
    of the run, or the one at which a callback such as EarlyStopping ended training)."""
    if s.lit.validated_step < s.lit.global_step or s.lit.validated_step == 0:
        s.trainer.validate(s.lit, datamodule=s.dm, verbose=False)


def final_sample(s: Session, record: RunRecord) -> str:
    """The sample printed and logged at the end, with the validation sample's settings."""
    settings = OmegaConf.to_container(s.cfg.callbacks.get("sample") or {}, resolve=True)
    settings.pop("_target_", None)
    settings["max_new_tokens"] = s.cfg.callbacks.final_sample_tokens
    text = sample_text(s.lit.model, s.dm.tokenizer, **{"prompt": "\n", **settings})
    if record.recorder is not None:
        record.recorder.submit("text", text, "samples/final.txt")
    return text


def resumed(job: Job, record: RunRecord, scratch: Path) -> Resume | None:
    """The run this job continues (`resume=<id>`, `latest`, `auto`, or under torchrun the
    run of the same torchrun job), checked, with its logged config; None for a new run."""
    cfg = job.cfg
    if cfg.resume and record.client is None:
        raise GptlabError("resume needs the MLflow logger (logger=mlflow)")
    elastic = ddp.elastic_id()
    if cfg.resume == "auto" or (cfg.resume is None and elastic and record.client):
        # under torchrun, the run of this same torchrun job if there is one: its ranks
        # were restarted (an elastic restart), and continue it from its last checkpoint
        run = find_auto(record.client, cfg.logger.experiment_name, job.key,
                        None if cfg.resume == "auto" else elastic)
        cfg.resume = None if run is None else run.info.run_id
    if not cfg.resume:
        return None
    resume = prepare_resume(cfg, record.client, job.overrides, scratch)
    ddp.use_launched_world(resume.cfg.trainer)
    checks.check_train_config(resume.cfg)
    if resume.run.info.status == FINISHED and resume.step >= resume.cfg.trainer.max_steps:
        raise GptlabError(f"run {resume.run_id} is already at step {resume.step}: pass "
                          f"trainer.max_steps=N with N > {resume.step} to extend it")
    return resume


def train(job: Job, record: RunRecord, stop: StopSignals) -> tuple[float, str]:
    """One training job, phase by phase; returns the best val/loss and the final sample."""
    record.connect()  # a store that cannot be reached fails now, before anything is built
    cfg = job.cfg
    ddp.use_launched_world(cfg.trainer)
    checks.check_train_config(cfg)
    with store.scratch() as scratch:
        resume = resumed(job, record, scratch)
        if resume is not None:
            cfg = resume.cfg
        elif cfg.optim.decay_steps is None:
            # fixed once, so that extending max_steps on resume does not bend the schedule
            cfg.optim.decay_steps = cfg.trainer.max_steps
        world = world_size(cfg.trainer)
        with ddp.rank_environment(world) if world > 1 else contextlib.nullcontext():
            s = setup(cfg, job, record, stop, resume)
            stop.check()
            open_run(s, record)
            announce(s, record)
            text = run_phases(s, job, record, stop)
    best = s.checkpoints.best
    if best is not None and record.recorder is not None:
        # one figure per run to sort by in the UI (val/loss itself shows the latest)
        record.recorder.metrics([Metric("best_val_loss", best, int(time.time() * 1000),
                                        s.checkpoints.best_step)])
        if cfg.logger.get("log_model", True):
            log_model(s, record)
    return (math.nan if best is None else best), text


def log_model(s: Session, record: RunRecord) -> None:
    """The run's best weights as its MLflow model (and a registered version, if asked),
    once the recorder has stored the best checkpoint."""
    from gptlab.tracking import logged_model

    recorder = record.recorder
    if not recorder.drain(recorder.outage_timeout):
        recorder.check()
        return
    name = s.checkpoints.best_name
    with store.scratch() as scratch:
        path = store.download(record.client, record.run_id, f"checkpoints/{name}", scratch)
        limits = s.cfg.logger.get("serve_limits")
        info = logged_model.log(record.client.tracking_uri, record.run_id, path,
                                s.checkpoints.best_step, s.cfg.logger.get("register_model"),
                                OmegaConf.to_container(limits) if limits else None)
    version = f", registered as {info.registered_model_version}" \
        if getattr(info, "registered_model_version", None) else ""
    log.info(f"model of step {s.checkpoints.best_step}: runs:/{record.run_id}/"
             f"{logged_model.NAME}{version}")


def run_phases(s: Session, job: Job, record: RunRecord, stop: StopSignals) -> str:
    """Fit, validate the final weights and sample, with the other ranks of a data-parallel
    training started first; returns the final sample."""
    failed, ranks = True, None
    try:
        stop.check()
        if s.trainer.world_size > 1:
            ranks = start_ranks(s, job, stop)
        fit(s)
        stop.check()
        validate(s)
        stop.check()
        text = final_sample(s, record)
        stop.check()
        failed = False
        return text
    except StopRequested:
        raise
    except Exception:
        if ranks is not None:
            ranks.check(grace=5.0)  # a rank's own failure, not the broken collective it left
        raise
    finally:
        s.close()
        if ranks is not None:
            ranks.stop() if failed else ranks.finish()


def start_ranks(s: Session, job: Job, stop: StopSignals) -> ddp.Ranks:
    """Write the plan for ranks 1..N-1 and start them (torchrun and SLURM start their own);
    return once each is about to join the process group."""
    ckpt = s.resume.ckpt_path if s.resume is not None else None
    plan = ddp.write_plan(s.cfg, job.output_dir, ckpt, s.trainer.world_size)
    ranks = ddp.Ranks(job.output_dir / ddp.PLAN, s.trainer.world_size, plan.attempt)
    if ddp.launched_rank() is None:
        ranks.start()
    ranks.wait_ready(lambda: stop.requested)
    return ranks


def announce(s: Session, record: RunRecord) -> None:
    device = "GPU" if s.trainer.accelerator.__class__.__name__.startswith("CUDA") else "CPU"
    log.info(f"gptlab: {s.info['model_class'].rsplit('.', 1)[-1]} with {s.n_params:,} "
             f"parameters, vocabulary of {s.dm.vocab_size}, {len(s.dm.train_data):,} train / "
             f"{len(s.dm.val_data):,} val tokens, {s.steps.max_steps:,} steps on the {device}"
             + (f" in {s.trainer.world_size} processes (DDP)" if s.trainer.world_size > 1 else "")
             + (f", MLflow run {record.run_id}" if record.run_id else "")
             + (f", resumed from step {s.resume.step}" if s.resume else ""))
