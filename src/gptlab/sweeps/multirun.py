"""Hydra multirun sweeps as MLflow parent runs: one parent per sweep, each job a nested child.

`SweepRun` is a Hydra callback (see `hydra.callbacks` in conf/train.yaml). Before any job
starts it checks the tracking store, creates the schema and the experiment once (parallel jobs
that each tried would race), and opens the parent run; it writes what jobs need to join it
into the sweep directory, which every job, in any process, can read. When the sweep ends the
parent ends FINISHED, or FAILED if a job failed; a stop signal ends it KILLED.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptlab import files
from gptlab.console import log
from gptlab.errors import BAD_INPUT, StopRequested, describe
from gptlab.run.record import Outcome, SweepJob, overrides_name
from gptlab.tracking import comparison, store

SWEEP_FILE = ".gptlab_sweep.json"
SWEEPER_TARGET = "hydra_plugins.gptlab_study_sweeper.StudySweeper"


def is_study(config: Any) -> bool:
    """Whether a multirun is an Optuna study run by gptlab's sweeper."""
    return str(config.hydra.sweeper.get("_target_", "")) == SWEEPER_TARGET


@dataclass
class SweepResult:
    parent_run_id: str
    runs: int
    failed: list[str]

    @property
    def exit_code(self) -> int:
        return BAD_INPUT if self.failed else 0


results: list[SweepResult] = []  # sweeps ended in this process, for the exit code
_open_parents: dict[str, str] = {}  # parent run id -> tracking URI, until the sweep ends
# a study's parent run, shared with other processes: whether any of them still runs trials
# (then a stop here leaves the parent to the last one)
_shared_parents: dict[str, Callable[[], bool]] = {}


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line sweeps (`a=1,2`, `range(...)`) and the
    search space of a sweeper such as Optuna (`hydra.sweeper.params`)."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys += [k for k in params if k not in keys]
    return keys


def child_name(varied: list[str], overrides: list[str]) -> str | None:
    """A job's run name from its values of the swept keys: `n_embd=16 lr=0.001`."""
    return overrides_name(overrides, varied)


def record_best(client, parent_id: str, children: list, varied: list[str],
                ongoing: bool = False) -> None:
    """The sweep's best child on its parent run: the value, the child, its swept values
    (as tags for an ongoing study, whose best changes: MLflow's params are set once)."""
    scored = [r for r in children if "best_val_loss" in r.data.metrics]
    if not scored:
        return
    best = min(scored, key=lambda r: r.data.metrics["best_val_loss"])
    client.log_metric(parent_id, "best_val_loss", best.data.metrics["best_val_loss"])
    client.set_tag(parent_id, "gptlab.best_run", f"{best.info.run_name} ({best.info.run_id})")
    params = {f"best.{k}": best.data.params[k] for k in varied if k in best.data.params}
    if ongoing:
        for key, value in params.items():
            client.set_tag(parent_id, key, value)
    else:
        store.log_params(client, parent_id, params)


GROUP_COLUMNS = ("group", "runs", "best val/loss", "best std", "95% CI +-", "final val/loss",
                 "final std", "tokens/s", "ms/step")


def record_groups(client, parent_id: str, finished: list) -> None:
    """The statistics gptlab-compare shows, as a table on the parent run (groups.json), so
    the UI shows repeated runs summed up next to the children."""
    if not finished:
        return
    rows = [comparison.summarize(client, r, []) for r in finished]
    table = comparison.groups(rows, comparison.group_keys(finished, None))
    client.log_table(parent_id, data={c: [g[c] for g in table] for c in GROUP_COLUMNS},
                     artifact_file="groups.json")


def read_sweep(sweep_dir: Path) -> dict | None:
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def sweep_job(sweep_dir: Path, overrides: list[str], num: int) -> SweepJob | None:
    """The sweep a multirun job belongs to (None without MLflow)."""
    info = read_sweep(sweep_dir)
    if info is None:
        return None
    return SweepJob(info["parent_run_id"], child_name(info["varied"], overrides), num)


def report_start(sweep: SweepJob) -> None:
    log.info(f"job {sweep.num} ({sweep.name or 'no name'}) started", extra={"sweep": True})


def report_job(sweep: SweepJob, outcome: Outcome) -> None:
    """One line per job as it ends: its best val/loss and run, or why it failed."""
    name = f"job {sweep.num} ({sweep.name or 'no name'})"
    if outcome.error is not None:
        print(f"error: {name}: {describe(outcome.error)}", file=sys.stderr, flush=True)
    else:
        log.info(f"{name} finished: best val/loss {outcome.best:.4f}, run {outcome.run_id}",
                 extra={"sweep": True})


def end_parent(parent_run_id: str, status: str) -> None:
    uri = _open_parents.pop(parent_run_id, None)
    others_go_on = _shared_parents.pop(parent_run_id, None)
    if uri is None or (others_go_on is not None and others_go_on()):
        return
    client = store.connect(uri)
    if client.get_run(parent_run_id).info.status == store.RUNNING:
        client.set_terminated(parent_run_id, status)


def end_open_parents(error: BaseException) -> None:
    """A sweep cut short in this process (a stop signal, a job Hydra could not compose):
    its parent run must not stay RUNNING."""
    status = store.KILLED if isinstance(error, KeyboardInterrupt | StopRequested | SystemExit) \
        else store.FAILED
    for parent in list(_open_parents):
        try:
            end_parent(parent, status)
        except Exception:  # noqa: BLE001 - the store itself may be what failed
            pass


def open_parent(config: DictConfig, study: str | None = None, run_id: str | None = None
                ) -> tuple[str, str] | None:
    """The sweep's parent run and its tracking URI (None without MLflow), the id written
    into the sweep folder for the jobs. A study's processes and starts share the parent run
    the study names (`run_id`), so that all its trials are children of one run."""
    if not config.logger.enabled:
        return None
    client = store.connect(config.logger.tracking_uri)
    keys = varied_keys(config)
    if run_id is not None and _live(client, run_id):
        client.update_run(run_id, status=store.RUNNING)
    else:
        choices = config.hydra.runtime.choices
        label = study or choices.get("hparams_search") or choices.get("experiment") or "sweep"
        name = f"{label}: {', '.join(keys)}" if keys else label
        tags = {"gptlab.sweep": "true",
                "gptlab.command": " ".join(["gptlab-train", *sys.argv[1:]]),
                "mlflow.source.name": "gptlab-train"}
        if study:
            tags["gptlab.study"] = study
        run_id = store.create_run(client, config.logger.experiment_name, name,
                                  tags).info.run_id
        task = list(config.hydra.overrides.task)
        client.log_text(run_id, "\n".join(task) + "\n", "overrides.txt")
        if keys:
            client.log_param(run_id, "swept", ", ".join(keys))
    _open_parents[run_id] = client.tracking_uri
    # processes sharing a study share the folder: a job of one may read the file while
    # another process writes it
    files.write_atomic(Path(config.hydra.sweep.dir) / SWEEP_FILE, json.dumps(
        {"parent_run_id": run_id, "varied": keys, "tracking_uri": client.tracking_uri,
         "study": study}))
    return run_id, client.tracking_uri


def _live(client, run_id: str) -> bool:
    """Whether a run is still there (not deleted, nor in another store)."""
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - MLflow says "not found" with various exceptions
        return False


def share_parent(parent_run_id: str, others_go_on: Callable[[], bool]) -> None:
    """A study's parent is shared: this process ends it only if no other still runs."""
    _shared_parents[parent_run_id] = others_go_on


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_study(config):  # a study's sweeper finds or opens its parent
            open_parent(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep(Path(config.hydra.sweep.dir))
        if info is None:
            return
        client = store.connect(info["tracking_uri"])
        parent = info["parent_run_id"]
        children = client.search_runs(
            [client.get_run(parent).info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'", max_results=10_000)
        # a study's children may be running in other processes, and a trial stopped by a
        # signal (KILLED) is run again as a new trial: neither is a failure
        ok = (store.FINISHED, store.RUNNING, store.KILLED) if info.get("study") \
            else (store.FINISHED,)
        failed = sorted((r for r in children if r.info.status not in ok),
                        key=lambda r: r.info.run_name or "")
        # a study's processes may end at the same moment, each writing the parent's best
        store.again_on_collision(lambda: record_best(client, parent, children, info["varied"],
                                                     ongoing=bool(info.get("study"))))
        record_groups(client, parent, [r for r in children if r.info.status == store.FINISHED])
        _open_parents.pop(parent, None)
        others_go_on = _shared_parents.pop(parent, None)
        ongoing = others_go_on is not None and others_go_on()
        if not ongoing:
            client.set_terminated(parent, store.FAILED if failed else store.FINISHED)
        result = SweepResult(parent, len(children), [r.info.run_name for r in failed])
        results.append(result)
        if ongoing and not failed:
            print(f"this process's trials are done; study {info['study']} goes on in another "
                  f"process, which ends MLflow run {parent} ({len(children)} runs so far)")
        elif failed:
            rest = (f"; the others finished: gptlab-compare --sweep {parent}"
                    if len(failed) < len(children) else "")
            print(f"error: {len(failed)} of {len(children)} jobs failed "
                  f"({', '.join(result.failed)}){rest}", file=sys.stderr)
        else:
            print(f"sweep finished: {len(children)} runs under MLflow run {parent} "
                  f"(compare: gptlab-compare --sweep {parent})")

