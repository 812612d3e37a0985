"""Continuing a logged run: which run, with which config, from which checkpoint.

The config is the run's logged `config.yaml` with this command's overrides applied where they
cannot change what is trained (how long and how often, where it is recorded); the checkpoint is
the newest readable one, logged to the run or, on the machine that trained it, left on disk
when the store was away.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import GptlabError
from gptlab.models import checkpoints
from gptlab.tracking import store
from gptlab.tracking.recorder import SPOOL_NAME

# what may change when a run is resumed: how long it trains and where it runs, and what does
# not change what it trains (store.NOT_TRAINING) but its corpus
HOW_LONG_AND_WHERE = ("trainer.max_steps", "trainer.val_check_interval", "trainer.accelerator",
                      "trainer.devices", "trainer.num_nodes", "trainer.strategy")
RESUME_SAFE = (*HOW_LONG_AND_WHERE, *(k for k in store.NOT_TRAINING if k != "data.path"))


def may_change_on_resume(key: str) -> bool:
    return key.startswith(HOW_LONG_AND_WHERE) or (not store.changes_training(key)
                                                  and key != "data.path")
LOCAL_DIR_TAG = "gptlab.local_checkpoints"  # "host:path" of the run's checkpoints on disk
JOB_KEY_TAG = "gptlab.job_key"  # the same for every start of the same job: see find_auto
ELASTIC_TAG = "gptlab.torchelastic_run_id"  # the torchrun job that trains it: ddp.elastic_id


@dataclass
class Resume:
    """A logged run to continue: its config, the checkpoint to start from, what changed."""

    run: Run
    cfg: DictConfig
    ckpt_path: Path
    ckpt: dict[str, Any]
    changed: list[str] = field(default_factory=list)
    spool: Path | None = None  # records that could not be sent when the run stopped

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def step(self) -> int:
        return int(self.ckpt["gptlab"]["step"])


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def resume_overrides(overrides: list[str], cfg: DictConfig, logged: DictConfig
                     ) -> tuple[list[str], list[str]]:
    """Which of this command's overrides change the logged config, split into those that may
    (applied to `logged` in place) and the keys of those that may not."""
    changed, refused = [], []
    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        new, old = _plain(OmegaConf.select(cfg, key)), _plain(OmegaConf.select(logged, key))
        if key != "experiment" and new == old:
            continue
        if isinstance(new, dict) and isinstance(old, dict):
            # a config group (trainer=cpu): judged by the keys whose values it changes
            flat_new, flat_old = store.flatten(new, f"{key}."), store.flatten(old, f"{key}.")
            keys = sorted(k for k in flat_new.keys() | flat_old.keys()
                          if flat_new.get(k) != flat_old.get(k))
        else:
            keys = [key]
        unsafe = [k for k in keys if not may_change_on_resume(k)]
        if unsafe:
            refused.extend(unsafe or [key])
            continue
        OmegaConf.update(logged, key, new, force_add=True, merge=False)
        changed.append(override)
    return changed, refused


def live_owner(client: MlflowClient, run: Run) -> str | None:
    """Who is training `run` now, if anyone: a process on this machine holding its lock."""
    if run.info.status != store.RUNNING:
        return None
    if store.run_lock_held(client.tracking_uri, run.info.run_id):
        return run.data.tags.get("gptlab.owner", "another process")
    return None


def run_to_resume(client: MlflowClient, resume: str, experiment_name: str) -> Run:
    """`resume=<run id>`, or `latest`: the newest unfinished run of the experiment that has
    a checkpoint and that no process is training."""
    if resume != "latest":
        run = store.get_run(client, resume)
        owner = live_owner(client, run)
        if owner:
            raise GptlabError(f"run {resume} is being trained by {owner}: stop it first "
                              "(or wait for it to finish)")
        return run
    unfinished = f"attributes.status != '{store.FINISHED}'"
    for run in store.search_runs(client, experiment_name, unfinished):
        if run.data.tags.get("gptlab.sweep") == "true" or live_owner(client, run):
            continue
        if (checkpoints.step_names(store.artifact_names(client, run.info.run_id, "checkpoints"))
                or _local_dir(run)):
            return run
    raise GptlabError(f"experiment {experiment_name!r} has no unfinished run to resume (one "
                      "with a checkpoint that no process is training)")


def job_key(experiment_name: str, overrides: list[str], parent_run_id: str | None) -> str:
    """What names a job across its starts: its experiment, its sweep's parent run and its
    overrides (resume= aside, as Hydra gives them: a requeued job is the same command)."""
    same = [o for o in overrides if o.lstrip("+~").partition("=")[0] != "resume"]
    text = json.dumps([experiment_name, parent_run_id or "", same])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def find_auto(client: MlflowClient, experiment_name: str, key: str,
              elastic_id: str | None = None) -> Run | None:
    """`resume=auto`: the newest unfinished run of this same job that has a checkpoint, or
    None to start a new run; with `elastic_id`, only a run of that torchrun job (its start
    before an elastic restart). A run of the job that died before its first checkpoint (left
    RUNNING by a SIGKILL) has nothing to continue and is ended KILLED on the way."""
    query = f"tags.`{JOB_KEY_TAG}` = '{key}' and attributes.status != '{store.FINISHED}'"
    if elastic_id is not None:
        query += f" and tags.`{ELASTIC_TAG}` = '{elastic_id}'"
    try:
        runs = store.search_runs(client, experiment_name, query)
    except GptlabError:
        return None  # the experiment does not exist yet
    for run in runs:
        owner = live_owner(client, run)
        if owner:
            raise GptlabError(f"this job's run {run.info.run_id} is being trained by {owner}: "
                              "stop it first (or wait for it to finish)")
        if (checkpoints.step_names(store.artifact_names(client, run.info.run_id, "checkpoints"))
                or _local_dir(run)):
            return run
        if run.info.status == store.RUNNING:
            client.set_terminated(run.info.run_id, store.KILLED)
    return None


def _local_dir(run: Run) -> Path | None:
    """The run's checkpoints folder on this machine, if it stopped there because the store
    was away: then the metrics not yet recorded were kept beside them (SPOOL_NAME), and the
    checkpoints there are safe to resume from. After any other stop (a kill, say) a local
    checkpoint may be newer than the recorded metrics, and only the logged ones are used."""
    host, _, path = run.data.tags.get(LOCAL_DIR_TAG, "").partition(":")
    if host != socket.gethostname() or not path or not (Path(path) / SPOOL_NAME).is_file():
        return None
    return Path(path)


def newest_checkpoint(client: MlflowClient, run: Run, scratch: Path
                      ) -> tuple[Path, dict[str, Any]]:
    """The run's newest readable step checkpoint, logged or left on this machine's disk: one
    cut short by a kill while it was written or logged is passed over."""
    run_id = run.info.run_id
    candidates: list[tuple[int, str, Path | None]] = []
    for name in checkpoints.step_names(store.artifact_names(client, run_id, "checkpoints")):
        candidates.append((checkpoints.step_of(name), name, None))
    local = _local_dir(run)
    if local is not None:
        for name in checkpoints.step_names([p.name for p in local.glob("step_*.ckpt")]):
            candidates.append((checkpoints.step_of(name), name, local / name))
    if not candidates:
        raise GptlabError(f"run {run_id} has no checkpoint to resume from")
    errors = []
    # newest first; for the same step, the logged copy before the local one
    for _, name, path in sorted(candidates, key=lambda c: (-c[0], c[2] is not None)):
        if path is None:
            path = store.download(client, run_id, f"checkpoints/{name}", scratch)
        try:
            return path, checkpoints.read_checkpoint(path)
        except GptlabError as e:
            errors.append(str(e))
    raise GptlabError(errors[0] if len(errors) == 1 else
                      f"none of the run's {len(errors)} checkpoints is readable: {errors[0]}")


def prepare_resume(cfg: DictConfig, client: MlflowClient, overrides: list[str], scratch: Path
                   ) -> Resume:
    """The run to continue, the config to continue it with, and its newest checkpoint."""
    run = run_to_resume(client, str(cfg.resume), cfg.logger.experiment_name)
    run_id = run.info.run_id
    try:
        text = store.download(client, run_id, "config.yaml", scratch).read_text()
    except Exception:  # noqa: BLE001 - a run without its config cannot be resumed
        raise GptlabError(f"run {run_id} has no logged config.yaml: not a gptlab run") from None
    logged = OmegaConf.create(text)
    changed, refused = resume_overrides(overrides, cfg, logged)
    if refused:
        raise GptlabError(
            f"cannot change {', '.join(refused)} when resuming run {run_id}: the checkpoint was "
            f"trained with the logged values (only {', '.join(RESUME_SAFE)} may change)")
    logged.resume = cfg.resume
    ckpt_path, ckpt = newest_checkpoint(client, run, scratch)
    local = _local_dir(run)
    return Resume(run, logged, ckpt_path, ckpt, changed,
                  None if local is None else local / SPOOL_NAME)


def last_recorded_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step recorded for each metric of a run."""
    run = client.get_run(run_id)
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}
