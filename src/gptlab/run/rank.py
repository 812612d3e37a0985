"""A rank > 0 of a data-parallel training: rank 0's trainer, trained and validated in step.

Rank 0 starts the others as `python -m gptlab.run.rank PLAN` (torchrun and SLURM start
`gptlab-train` itself, which comes here). Nothing is recorded here: rank 0 records the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.errors import describe, exit_code
from gptlab.models.checkpoints import read_checkpoint
from gptlab.run import ddp
from gptlab.run.record import Job, RunRecord
from gptlab.run.resume import Resume
from gptlab.run.signals import StopSignals
from gptlab.run.training import fit, setup, validate


def follow(plan: ddp.Plan, plan_path: Path, rank: int) -> None:
    """A rank > 0 of a data-parallel training: rank 0's trainer, trained and validated in
    step with it. Nothing is recorded here: rank 0 records the run."""
    cfg = OmegaConf.create(plan.cfg)
    job = Job(cfg=cfg, overrides=[], output_dir=Path(plan.output_dir), command="",
              run_name="")
    resume = None
    if plan.ckpt_path is not None:
        path = Path(plan.ckpt_path)
        resume = Resume(run=None, cfg=cfg, ckpt_path=path, ckpt=read_checkpoint(path))
    if plan.master_port is not None:
        ddp.own_store_environment(plan.master_port)
    with StopSignals(quiet=True) as stop:
        s = setup(cfg, job, RunRecord(job), stop, resume)
        ddp.mark_ready(plan_path, rank, plan.attempt)
        fit(s)
        validate(s)


def main(argv: list[str] | None = None) -> int:
    """`python -m gptlab.run.rank PLAN`: one rank > 0 of a training that rank 0 started."""
    argv = sys.argv[1:] if argv is None else argv
    plan_path = Path(argv[0])
    ddp.exit_with_parent()
    try:
        follow(ddp.Plan.read(plan_path), plan_path, int(os.environ["RANK"]))
    except BaseException as e:  # noqa: BLE001 - rank 0 reports it; one line in this rank's log
        print(f"error: {describe(e)}", flush=True)
        return exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
