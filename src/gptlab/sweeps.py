"""Hydra multirun sweeps as MLflow parent runs: one parent per sweep, each job a nested child.

`SweepRun` is a Hydra callback (see `hydra.callbacks` in conf/train.yaml). Before any job
starts it checks the tracking store, creates the schema and the experiment once (parallel jobs
that each tried would race), and opens the parent run; it writes what jobs need to join it
into the sweep directory, which every job, in any process, can read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from gptlab import tracking
from gptlab.errors import report_errors

SWEEP_FILE = ".gptlab_sweep.json"


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line sweeps (`a=1,2`, `range(...)`) and the
    search space of a sweeper such as Optuna (`hydra.sweeper.params`)."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    keys += [k for k in params if k not in keys]
    return keys


def short(key: str, value: str) -> str:
    """`model=gpt` -> `gpt`, `optim.lr=3e-3` -> `lr=3e-3`."""
    return value if "." not in key else f"{key.rsplit('.', 1)[-1]}={value}"


@report_errors
def open_store(config: DictConfig) -> tuple[MlflowClient, str]:
    """The store and experiment, checked and created once, before any job starts."""
    client = tracking.connect(config.logger.tracking_uri)
    return client, tracking.get_or_create_experiment(client, config.logger.experiment_name)


class SweepRun(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.logger.enabled:
            return
        client, experiment_id = open_store(config)
        keys = varied_keys(config)
        choices = config.hydra.runtime.choices
        label = choices.get("hparams_search") or choices.get("experiment") or "sweep"
        name = f"{label}: {', '.join(keys)}" if keys else label
        task = list(config.hydra.overrides.task)
        run = client.create_run(experiment_id, run_name=name, tags={
            "gptlab.sweep": "true",
            "gptlab.command": " ".join(["gptlab-train", *sys.argv[1:]]),
            "mlflow.source.name": "gptlab-train",
        })
        client.log_text(run.info.run_id, "\n".join(task) + "\n", "overrides.txt")
        if keys:
            client.log_param(run.info.run_id, "swept", ", ".join(keys))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(
            {"parent_run_id": run.info.run_id, "varied": keys,
             "tracking_uri": client.tracking_uri}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        info = read_sweep(Path(config.hydra.sweep.dir))
        if info is None:
            return
        client = tracking.connect(info["tracking_uri"])
        parent = info["parent_run_id"]
        children = client.search_runs(
            [client.get_run(parent).info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'")
        failed = [r for r in children if r.info.status == "FAILED"]
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        if failed:
            names = ", ".join(r.info.run_name for r in failed)
            print(f"error: {len(failed)} of {len(children)} jobs failed ({names}); "
                  f"the others finished: gptlab-compare --sweep {parent}", file=sys.stderr)
            sys.exit(2)
        print(f"sweep finished: {len(children)} runs under MLflow run {parent} "
              f"(compare: gptlab-compare --sweep {parent})")


def read_sweep(sweep_dir: Path) -> dict | None:
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def job_sweep_info() -> tuple[str | None, str | None]:
    """(parent run id, run name from the varied values) for a job of a sweep, else Nones."""
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None, None
    info = read_sweep(Path(hc.sweep.dir))
    if info is None:
        return None, None
    values = {}
    for override in hc.overrides.task:
        key, _, value = override.lstrip("+~").partition("=")
        values[key] = value
    name = " ".join(short(k, values[k]) for k in info["varied"] if k in values)
    return info["parent_run_id"], name or None
