"""A training job's MLflow run, from opening to a status that tells the truth.

`run_job` is the one place where a job's outcome is recorded, whatever ends it: success, a
stop signal, bad input found late, a bug, a store that stopped answering. The run it opened
ends FINISHED, KILLED (resumable) or FAILED with the reason in its `gptlab.error` tag, after
everything the job handed to the recorder is written; a sweep job that failed before its run
opened still leaves a FAILED (or KILLED) child in the sweep, so the sweep shows every job.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import GptlabError, StopRequested, describe, exit_code
from gptlab.run.resume import JOB_KEY_TAG, LOCAL_DIR_TAG, Resume, job_key, last_recorded_steps
from gptlab.run.signals import StopSignals
from gptlab.tracking import store
from gptlab.tracking.recorder import SPOOL_NAME, Recorder

FINISHED, KILLED, FAILED = store.FINISHED, store.KILLED, store.FAILED

# what every run records as params, beside the overrides it was given: what it trains
PARAM_KEYS = ("model.", "optim.", "data.block_size", "data.batch_size", "data.train_frac",
              "data.eval_iters", "data.val_seed", "trainer.max_steps",
              "trainer.val_check_interval", "trainer.gradient_clip_val", "trainer.precision",
              "trainer.accelerator", "trainer.devices", "seed")


def short_value(value: str) -> str:
    """A number at 3 significant digits (`0.0004385317` -> `0.000439`), else as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and "." not in value and "e" not in value.lower():
        return value
    return f"{number:.3g}"


def short(key: str, value: str) -> str:
    """`model=gpt` -> `gpt`, `optim.lr=3e-3` -> `lr=0.003`."""
    return value if "." not in key else f"{key.rsplit('.', 1)[-1]}={short_value(value)}"


def overrides_name(overrides: list[str], keys: list[str] | None = None) -> str | None:
    """A run's name from its overrides: the values of `keys` (a sweep's varied keys), else of
    every override that changes what is trained: `bigram lr=0.003 n_layer=2`."""
    values: dict[str, str] = {}  # a key given twice takes its last value, as Hydra does
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if (key in keys) if keys is not None else store.changes_training(key):
            values[key] = value
    order = keys if keys is not None else list(values)
    return " ".join(short(k, values[k]) for k in order if k in values) or None


def run_params(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The params a run records: what it trains, including every such value its command line
    set. The whole resolved config is the run's config.yaml artifact."""
    flat = store.flatten(OmegaConf.to_container(cfg, resolve=True))
    given = dict(o.lstrip("+~").partition("=")[::2] for o in overrides)
    params = {k: v for k, v in flat.items()
              if (k.startswith(PARAM_KEYS) or (k in given and store.changes_training(k)))
              and not k.endswith("_target_")}
    # config group choices made on the command line (experiment=..., ideas=..., optim=...)
    params.update({k: v for k, v in given.items()
                   if "." not in k and k not in flat and store.changes_training(k)})
    if "model._target_" in flat:
        params["model.class"] = str(flat["model._target_"]).rsplit(".", 1)[-1]
    return params


@dataclass
class SweepJob:
    """A job of a sweep: the sweep's parent run, this job's name from its swept values."""

    parent_run_id: str
    name: str | None
    num: int


@dataclass
class Job:
    """What the entry point resolved once from Hydra; nothing below it asks Hydra again."""

    cfg: DictConfig
    overrides: list[str]
    output_dir: Path
    command: str
    run_name: str
    sweep: SweepJob | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def key(self) -> str:
        """The same for every start of this job (resume=auto finds its runs by it)."""
        return job_key(self.cfg.logger.experiment_name, self.overrides,
                       self.sweep.parent_run_id if self.sweep else None)


@dataclass
class Outcome:
    status: str
    run_id: str | None = None
    best: float = math.nan
    sample: str = ""
    error: BaseException | None = None
    notes: list[str] = field(default_factory=list)
    url: str | None = None  # the run's page in the MLflow UI

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else exit_code(self.error)


class RunRecord:
    """The store side of one job: its client, its run once opened, the recorder writing it."""

    def __init__(self, job: Job):
        self.job = job
        self.client: MlflowClient | None = None
        self.recorder: Recorder | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.recorded: dict[str, int] = {}  # on resume: the last step of each metric
        self._lock: store.RunLock | None = None
        self._system_metrics: Any = None  # MLflow's SystemMetricsMonitor, while the run runs

    def connect(self) -> None:
        logger = self.job.cfg.logger
        if logger.enabled:
            self.client = store.connect(logger.tracking_uri)
            self.recorder = Recorder(self.client, outage_timeout=logger.outage_timeout)

    def _lock_run(self, run_id: str) -> None:
        lock = store.RunLock(self.client.tracking_uri, run_id)
        if not lock.acquire():
            raise GptlabError(f"run {run_id} is being trained by another process: stop it "
                              "first (or wait for it to finish)")
        self._lock = lock

    def _owner_tags(self) -> dict[str, str]:
        host = socket.gethostname()
        return {"gptlab.owner": f"pid {os.getpid()} on {host}",
                LOCAL_DIR_TAG: f"{host}:{self.job.checkpoint_dir.resolve()}"}

    def open(self, cfg: DictConfig, tags: dict[str, str], params: dict[str, Any],
             tokenizer_files: dict[str, str], dataset: Dataset | None = None) -> str:
        """Create the run with its tags, params, config, tokenizer and dataset."""
        client, job = self.client, self.job
        tags = {**self._base_tags(), **tags, **self._owner_tags()}
        run = store.create_run(client, cfg.logger.experiment_name, job.run_name, tags)
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self._lock_run(self.run_id)
        self.recorder.attach(self.run_id)
        self._watch_system(resumed=False)
        store.log_params(client, self.run_id, {**run_params(cfg, job.overrides), **params})
        resolved = OmegaConf.to_container(cfg, resolve=True)
        client.log_text(self.run_id, OmegaConf.to_yaml(resolved), "config.yaml")
        client.log_text(self.run_id, "\n".join(job.overrides) + "\n", "overrides.txt")
        for name, text in tokenizer_files.items():  # vocab.json or tokenizer.json
            client.log_text(self.run_id, text, name)
        if dataset is not None:
            store.log_dataset(client, self.run_id, dataset)
        return self.run_id

    def reopen(self, resume: Resume, cfg: DictConfig, world: int) -> None:
        """Continue a logged run: lock it, send what it could not send when it stopped,
        record what this resumption changes (and a change of the number of processes), and
        mark it RUNNING again."""
        client, run_id = self.client, resume.run_id
        self._lock_run(run_id)
        self.run_id, self.experiment_id = run_id, resume.run.info.experiment_id
        self.recorder.attach(run_id)
        if resume.spool is not None:
            self.recorder.replay(resume.spool)
            if not self.recorder.drain(self.recorder.outage_timeout):
                self.recorder.check()
            resume.spool.unlink()
        self.recorded = last_recorded_steps(client, run_id)
        n = 1 + sum(k.startswith("gptlab.resume.") for k in resume.run.data.tags)
        client.set_tag(run_id, f"gptlab.resume.{n}",
                       f"from step {resume.step}: {' '.join(resume.changed) or 'no overrides'}")
        for key, value in self._owner_tags().items():
            client.set_tag(run_id, key, value)
        if "gptlab.error" in resume.run.data.tags:  # the reason of an earlier failure
            client.delete_tag(run_id, "gptlab.error")
        before = resume.run.data.params.get("world_size", "1")
        if before != str(world):
            # allowed, but each rank draws its own batches: the stream of batches changes
            client.set_tag(run_id, "gptlab.world_size_changed",
                           f"{before} -> {world} processes at step {resume.step}")
        client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)),
                        "config.yaml")
        client.update_run(run_id, status=store.RUNNING)
        self._watch_system(resumed=True)

    def _watch_system(self, resumed: bool) -> None:
        """System metrics (system/cpu_utilization_percentage, memory, disk, network, GPU
        where one is), sampled by MLflow's own monitor on a thread of its own while the run
        runs. SystemMetricsMonitor is what mlflow.start_run(log_system_metrics=True) starts;
        gptlab opens its runs with a client, so it starts the monitor itself
        (tests/test_served_model.py checks that the metrics arrive)."""
        logger = self.job.cfg.logger
        if not logger.get("system_metrics", True):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id, sampling_interval=logger.get("system_metrics_interval", 10),
            resume_logging=resumed, tracking_uri=self.client.tracking_uri)
        self._system_metrics.start()

    def _base_tags(self) -> dict[str, str]:
        job = self.job
        tags = {"mlflow.source.name": "gptlab-train", "mlflow.source.type": "LOCAL",
                "mlflow.user": user(), "gptlab.command": job.command,
                JOB_KEY_TAG: job.key}
        if job.sweep is not None:
            tags["mlflow.parentRunId"] = job.sweep.parent_run_id
        return tags

    def end(self, status: str, error: BaseException | None = None) -> tuple[str, list[str]]:
        """Write what is left, then the status (and the reason): the run's last record.
        Returns the status recorded and notes for the user."""
        try:
            if self.client is None:
                return status, []
            if self.run_id is None:
                if self.job.sweep is not None:
                    self._record_unopened(status, error)
                return status, []
            status, error = self._drain(status, error)
            if self.recorder.in_outage:
                return status, [self._spool()]
            return status, self._set_status(status, error)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _drain(self, status: str, error: BaseException | None
               ) -> tuple[str, BaseException | None]:
        """The system metrics' last samples and every write queued, before the status; a
        write that failed for good makes a finished run FAILED."""
        if self._system_metrics is not None:
            self._system_metrics.finish()
        recorder = self.recorder
        try:
            recorder.close(timeout=recorder.outage_timeout)
        except KeyboardInterrupt:
            pass  # asked twice to stop: record the status without waiting
        if recorder.error is not None and status == FINISHED:
            return FAILED, recorder.error
        return status, error

    def _spool(self) -> str:
        """The store is away: what it did not take goes to a file beside the checkpoints,
        which `resume` sends; the run stays RUNNING. Returns the note that says so."""
        spool = self.job.checkpoint_dir / SPOOL_NAME
        points = self.recorder.spool(spool)
        return (f"the run's checkpoints are in {self.job.checkpoint_dir} and the {points} "
                f"metric points not yet recorded in {spool}; once the store is back, "
                f"gptlab-train resume={self.run_id} sends them and continues")

    def _set_status(self, status: str, error: BaseException | None) -> list[str]:
        """The reason of a failure, then the status; a note if the store failed at that."""
        try:
            if error is not None and status != KILLED:
                self.client.set_tag(self.run_id, "gptlab.error", describe(error)[:5000])
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - the store failed at the last write
            return [f"the run's status ({status}) could not be recorded: {describe(e)}"]
        return []

    def _record_unopened(self, status: str, error: BaseException | None) -> None:
        """A sweep job that ended before its run opened: a child run with the reason."""
        cfg = self.job.cfg
        run = store.create_run(self.client, cfg.logger.experiment_name, self.job.run_name,
                               self._base_tags())
        if error is not None:
            self.client.set_tag(run.info.run_id, "gptlab.error", describe(error)[:5000])
        try:
            resolved = OmegaConf.to_container(cfg, resolve=True)
            store.log_params(self.client, run.info.run_id, store.flatten(resolved))
        except Exception:  # noqa: BLE001 - a config too broken to resolve still gets its run
            pass
        self.client.set_terminated(run.info.run_id, status)
        self.run_id = run.info.run_id


def user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return str(os.getuid())


@dataclass
class JobRun:
    """What a job's block trains with (its record, its stop signals), what it returns
    (`best`, `sample`), and, once the block has ended, how the job ended (`outcome`)."""

    record: RunRecord
    stop: StopSignals
    best: float = math.nan
    sample: str = ""
    outcome: Outcome | None = None


@contextlib.contextmanager
def run_job(job: Job) -> Iterator[JobRun]:
    """The one place where a job's ending is recorded, whatever ends the block: it ends
    FINISHED, KILLED on a stop signal or Ctrl-C, FAILED on any other exception, which is not
    raised again but kept in `outcome` for the caller to report.

        with run_job(job) as run:
            run.best, run.sample = train(job, run.record, run.stop)
        report(run.outcome)
    """
    record = RunRecord(job)
    with StopSignals() as stop:
        run = JobRun(record, stop)
        try:
            yield run
        except BaseException as e:  # noqa: BLE001 - every ending is recorded, then reported
            status = KILLED if isinstance(e, StopRequested | KeyboardInterrupt) else FAILED
            if isinstance(e, KeyboardInterrupt):
                e = StopRequested(stop.signum or 2)
            status, notes = record.end(status, e)
            run.outcome = Outcome(status, record.run_id, error=e, notes=notes)
            return
        status, notes = record.end(FINISHED)
        error = None if status == FINISHED else GptlabError(
            f"recording the run failed: {describe(record.recorder.error)}")
        url = None if record.client is None or record.run_id is None else store.ui_url(
            record.client.tracking_uri, record.experiment_id, record.run_id)
        run.outcome = Outcome(status, record.run_id, run.best, run.sample, error, notes, url)
