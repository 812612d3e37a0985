"""gptlab-train: train a model from the composed Hydra config and record it in MLflow.

    gptlab-train                                   # nanoGPT's CPU recipe, a few minutes
    gptlab-train model=bigram                      # any config group choice
    gptlab-train experiment=shakespeare_char_cpu optim.lr=3e-3
    gptlab-train resume=<run_id> trainer.max_steps=4000   # continue a logged run
    gptlab-train -m model=bigram,gpt optim.lr=1e-3,3e-3   # a sweep

Hydra composes the config; each job is trained by gptlab/run/training.py, except a launched
rank > 0 of a data-parallel job (torchrun, SLURM), which follows rank 0 (gptlab/run/rank.py).
Lightning, torch and MLflow are imported once a job starts, so that `--help` answers at once.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gptlab import CONF_DIR, console
from gptlab.errors import GptlabError, exit_on_error, report
from gptlab.run import ddp

if TYPE_CHECKING:
    from gptlab.run.record import Job, Outcome

MULTIRUN = "gptlab.sweeps.multirun"  # imported by Hydra's callback once a sweep starts


def job_from_hydra(cfg: DictConfig) -> Job:
    """What the rest of a job needs from Hydra, read once."""
    from gptlab.run.record import Job, overrides_name
    from gptlab.sweeps import multirun

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    sweep = None
    console.set_sweep(hc.mode == RunMode.MULTIRUN)
    if hc.mode == RunMode.MULTIRUN:
        sweep = multirun.sweep_job(Path(hc.sweep.dir), overrides, hc.job.num)
    choices = hc.runtime.choices
    name = (cfg.logger.get("run_name") or (sweep.name if sweep and sweep.name else None)
            or (None if sweep else overrides_name(overrides))
            or choices.get("experiment") or choices.get("model") or "run")
    return Job(cfg=cfg, overrides=overrides, output_dir=Path(hc.runtime.output_dir),
               command=" ".join(["gptlab-train", *sys.argv[1:]]), run_name=str(name),
               sweep=sweep)


def finish(job: Job, outcome: Outcome) -> None:
    """Tell the user how a single run ended."""
    from gptlab.run.record import FINISHED, KILLED

    if outcome.status == FINISHED:
        print("\n--- sample ---")
        print(outcome.sample)
        print("--------------")
        print(f"best val/loss {outcome.best:.4f}")
        if outcome.run_id:
            print(f"MLflow run id: {outcome.run_id}  "
                  f"(sample again: gptlab-sample run_id={outcome.run_id})")
            print(f"in the MLflow UI: {outcome.url}")
    for note in outcome.notes:
        print(f"gptlab: {note}", file=sys.stderr)
    if outcome.error is not None:
        report(outcome.error, log_file=job.output_dir / "gptlab-train.log")
        if outcome.status == KILLED:
            print("gptlab: stopped" + (f"; continue with: gptlab-train resume={outcome.run_id}"
                                       if outcome.run_id else " before the run started"),
                  file=sys.stderr)


_outcomes: list[Outcome] = []


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _task(cfg: DictConfig) -> float:
    from gptlab.run import rank
    from gptlab.run.record import FINISHED, KILLED, run_job
    from gptlab.run.training import train
    from gptlab.sweeps import multirun

    job = job_from_hydra(cfg)
    launched = ddp.launched_rank()
    if launched:  # torchrun's or SLURM's rank > 0 of a data-parallel job: rank 0 records the run
        plan_path = job.output_dir / ddp.PLAN
        rank.follow(ddp.wait_for_plan(plan_path), plan_path, launched)
        return math.nan
    if job.sweep is not None:
        multirun.report_start(job.sweep)
    with run_job(job) as run:
        run.best, run.sample = train(job, run.record, run.stop)
    outcome = run.outcome
    _outcomes.append(outcome)
    if job.sweep is None:
        finish(job, outcome)
        return outcome.best
    multirun.report_job(job.sweep, outcome)
    if outcome.status == KILLED:
        # a stop signal stops the sweep, not only this job
        multirun.end_parent(job.sweep.parent_run_id, KILLED)
        raise SystemExit(outcome.exit_code)
    return outcome.best if outcome.status == FINISHED else math.nan


def check_launcher(argv: list[str]) -> None:
    """A SLURM launcher needs SLURM's commands: without them submitit fails deep inside the
    launch, after the sweep's run is open (and Hydra only warns about a callback's errors);
    say so before anything starts."""
    slurm = any(a.startswith("hydra/launcher=") and a.endswith("slurm") for a in argv)
    if slurm and shutil.which("sbatch") is None:
        raise GptlabError("hydra/launcher=slurm submits jobs with SLURM's sbatch, which this "
                          "machine lacks: run the sweep on the cluster's login node, or use "
                          "hydra/launcher=submitit_local here")


@exit_on_error
def main() -> int:
    console.line_buffered()
    check_launcher(sys.argv[1:])
    sys.argv += ddp.launched_overrides(sys.argv[1:])  # torchrun's ranks: one output folder
    _outcomes.clear()
    try:
        _task()
    except BaseException as e:
        if MULTIRUN in sys.modules:  # a sweep started: its parent must not stay RUNNING
            sys.modules[MULTIRUN].end_open_parents(e)
        raise
    if MULTIRUN in sys.modules and sys.modules[MULTIRUN].results:
        return sys.modules[MULTIRUN].results[-1].exit_code
    return _outcomes[-1].exit_code if _outcomes else 0


if __name__ == "__main__":
    main()
