"""Data-parallel training: the processes (ranks) of one training, started by gptlab.

`trainer.devices=N` with N > 1 (`trainer=ddp` on CPU, `trainer=gpu trainer.devices=N`) trains
one run on N processes with Lightning's DDP strategy. Lightning would start the other ranks by
running the command line again; under Hydra that re-runs the whole sweep inside each job of a
sweep, and each copy would open a run of its own. gptlab starts them itself, as torchrun
would: rank 0 is the `gptlab-train` process, which checks the config, opens the MLflow run and
writes a plan (the resolved config and the checkpoint to start from) into the job's output
folder; ranks 1..N-1 are `python -m gptlab.run.rank PLAN` processes that build the same trainer
from the plan, train and validate in step with rank 0, and never touch the store. Lightning
finds the ranks in the environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, NODE_RANK,
LOCAL_RANK) and launches nothing.

Under SLURM (`srun`, or Hydra's submitit launcher with tasks_per_node=N) the ranks are SLURM's
tasks and every task runs the job: the task with SLURM_PROCID 0 acts as rank 0 does here,
the others wait for its plan in the job's output folder (on the cluster's shared disk).

Under torchrun (TorchElastic's environment: RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
TORCHELASTIC_RUN_ID, ...) it is the same: every rank runs the job, rank 0 (RANK=0) opens the
run and writes the plan, the others follow it. The ranks torchrun started win over the config:
`trainer.devices` and `trainer.num_nodes` are taken from torchrun, and gptlab starts no ranks
of its own. The job's output folder is named by torchrun's rendezvous id, so that the ranks,
and their next start after an elastic restart, find the same plan; rank 0 finds the job's
MLflow run again by that id (see `elastic_id`) and continues it from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from omegaconf import DictConfig, OmegaConf, open_dict

from gptlab import files
from gptlab.console import log
from gptlab.errors import GptlabError
from gptlab.run.devices import world_size

if TYPE_CHECKING:
    from lightning_fabric.plugins.environments import TorchElasticEnvironment

PLAN = "ddp/plan.json"  # in the job's output folder
RANK_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK",
            "TORCHELASTIC_USE_AGENT_STORE")
READY_TIMEOUT = 300.0  # seconds for the other ranks to start (imports, data, model)
PLAN_TIMEOUT = 600.0  # seconds a launched rank (torchrun, SLURM) waits for rank 0's plan


def torchrun() -> TorchElasticEnvironment | None:
    """Lightning's view of the ranks when torchrun started this process, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None  # torchrun sets it for every rank: no need to import Lightning to know
    from lightning_fabric.plugins.environments import TorchElasticEnvironment

    return TorchElasticEnvironment() if TorchElasticEnvironment.detect() else None


def launched_rank() -> int | None:
    """This process's rank when a launcher started the training's processes (torchrun, or
    SLURM's tasks), else None: gptlab starts the ranks itself. torchrun first, as Lightning
    picks its environment (torchrun can run inside a SLURM allocation)."""
    elastic = torchrun()
    if elastic is not None:
        return elastic.global_rank() if elastic.world_size() > 1 else None
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return None
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return int(os.environ["SLURM_PROCID"])
    return None


def elastic_id() -> str | None:
    """What names a torchrun job across its ranks, its nodes and its elastic restarts (None
    outside torchrun): the rendezvous id, TORCHELASTIC_RUN_ID, the one name they all share
    (a restart has a new Hydra folder time, new processes, and its rank 0 may be on another
    node). The job's output folder is named by it, and its MLflow run tagged with it
    (ELASTIC_TAG): rank 0 of a restart finds the run with the search `resume=auto` makes, in
    the store it records to anyway, wherever it runs. torchrun on one node draws a fresh uuid
    for it; left at torchrun's "none" (a static rendezvous: --master_port, or --node_rank on
    several nodes) it names no job: on one node torchrun's own process (the ranks' parent,
    alive across restarts) names it instead, on several nodes --rdzv_id is asked for."""
    if torchrun() is None:
        return None
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if run_id == "none":
        if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
            raise GptlabError("torchrun on several nodes needs --rdzv_id=ID, one id for the "
                              "job, the same on every node: gptlab names the job's folder and "
                              "finds its run again after a restart by it")
        run_id = f"{socket.gethostname()}-{os.getppid()}"
    return re.sub(r"[^\w.-]", "_", run_id)  # a folder name and a Hydra override value


def launched_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for a process torchrun started: the job's output folder named by the
    rendezvous id (Hydra's default is named by the second the process started in, which the
    ranks need not share, and a restart would not). A sweep is refused: every rank would run
    all of its jobs and open a sweep of its own."""
    eid = elastic_id()
    if eid is None:
        return []
    if any(a in ("-m", "--multirun") for a in argv):
        raise GptlabError("a sweep (-m) cannot run under torchrun: torchrun starts the ranks "
                          "of one training; run each job of the sweep with torchrun")
    if any(a.startswith("hydra.run.dir=") for a in argv):
        return []
    return [f"hydra.run.dir=outputs/torchrun/{eid}"]


def use_launched_world(trainer_cfg: DictConfig) -> None:
    """Under torchrun the world is the one torchrun started: `trainer.devices` becomes its
    processes per node and `trainer.num_nodes` its nodes (what Lightning checks against
    WORLD_SIZE), so that the logged config tells what ran."""
    if torchrun() is None:
        return
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = max(1, int(os.environ["WORLD_SIZE"]) // per_node)
    asked = world_size(trainer_cfg)
    if asked > 1 and asked != per_node * nodes:
        log.info(f"gptlab: torchrun started {per_node * nodes} processes: they train, not "
                 f"the {asked} that trainer.devices asks for")
    with open_dict(trainer_cfg):
        trainer_cfg.devices = per_node
        if nodes != 1 or "num_nodes" in trainer_cfg:
            trainer_cfg.num_nodes = nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_store_environment(port: int) -> None:
    """Under torchrun: the training's process group on a store of its own, which rank 0
    serves on `port` (as without torchrun), not on the store torchrun shares with its ranks.
    torch 2.13's torchrun keeps that store across an elastic restart, keys of the start
    before included (pytorch#135712), and the restarted ranks' gloo read a dead rank's
    address from it and fail or hang."""
    os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")


@contextlib.contextmanager
def rank_environment(world: int) -> Iterator[None]:
    """Rank 0's environment for the training (Lightning reads it when the trainer is built),
    put back afterwards: the next job of a sweep in this process gets a port of its own."""
    import torch  # here: `gptlab-train --help` and a torchrun check need no torch

    saved = {k: os.environ.get(k) for k in RANK_ENV}
    threads = torch.get_num_threads()
    if launched_rank() is None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                          WORLD_SIZE=str(world), NODE_RANK="0", LOCAL_RANK="0", RANK="0")
        torch.set_num_threads(threads_per_rank(world))
    elif torchrun() is not None:
        own_store_environment(free_port())  # the others read the port in the plan
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Plan:
    """What the other ranks need to build rank 0's trainer."""

    cfg: dict[str, Any]
    output_dir: str
    ckpt_path: str | None
    world_size: int
    attempt: str = ""
    written: float = 0.0  # time.time() when rank 0 wrote it
    master_port: int | None = None  # under torchrun, the process group's (own_store_environment)

    def write(self, path: Path) -> None:
        # a waiting rank never reads half a plan
        files.write_atomic(path, json.dumps(self.__dict__, indent=1))

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls(**json.loads(Path(path).read_text()))


def attempt() -> str:
    """Which start of the job this is, as every rank names it: a requeued SLURM job runs
    again in the same output folder, and its tasks must not read the plan of the start
    before. torchrun gives no such name (each node counts its own restarts, pytorch#108158):
    rank 0 draws one for its plan, and the others take the plan written after they started
    (see `is_current`)."""
    if torchrun() is not None:
        return uuid.uuid4().hex[:12]
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def is_current(plan: Plan) -> bool:
    """Whether a launched rank > 0 may follow `plan`: rank 0's plan of this start of the job.
    Under torchrun, every process of a start is created after every process of the start
    before has ended (torchrun stops all ranks, on every node, before it starts them again),
    and rank 0 writes its plan after its own setup, seconds after the ranks were created
    (far more than the nodes' clocks differ by)."""
    if torchrun() is not None:
        return plan.written >= psutil.Process().create_time()
    return plan.attempt == attempt()


def threads_per_rank(procs_per_node: int) -> int:
    """CPU threads for each rank of a training: the machine's cores shared out (what
    Lightning's own launcher sets), unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" in os.environ:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // procs_per_node)


def exit_with_parent() -> None:
    """In a rank started by rank 0: end when rank 0 is gone, however it ended (SIGKILL
    included), rather than wait in a collective for a peer that will never come."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="gptlab-parent-watch", daemon=True).start()


class Ranks:
    """Ranks 1..N-1 of a training on this machine, as child processes of rank 0."""

    def __init__(self, plan_path: Path, world: int, attempt: str = ""):
        self.plan_path, self.world, self.attempt = plan_path, world, attempt
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    def start(self) -> None:
        import torch

        for rank in range(1, self.world):
            log = self.plan_path.parent / f"rank{rank}.log"
            env = dict(os.environ, LOCAL_RANK=str(rank), RANK=str(rank),
                       OMP_NUM_THREADS=str(torch.get_num_threads()))
            with open(log, "w") as out:
                self.procs[rank] = subprocess.Popen(
                    [sys.executable, "-m", "gptlab.run.rank", str(self.plan_path)], env=env,
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.logs[rank] = log

    def wait_ready(self, stop_requested: Any = lambda: False) -> None:
        """Wait until every rank is about to join the process group (so that a rank that fails
        while starting is reported, not waited for in the group's rendezvous)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(ready_file(self.plan_path, r, self.attempt).exists()
                      for r in range(1, self.world)):
            self.check()
            if stop_requested() or time.monotonic() > deadline:
                raise GptlabError("the other training processes did not start in time"
                                  if not stop_requested() else "stopped while starting")
            time.sleep(0.05)

    def check(self, grace: float = 0.0) -> None:
        """Raise the failure of a rank that ended with an error, waiting up to `grace`
        seconds for one to end."""
        if not self.procs:  # a launcher's ranks: the launcher reports them
            return
        deadline = time.monotonic() + grace
        while True:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code not in (None, 0):
                    raise GptlabError(f"the training process of rank {rank} failed (exit "
                                      f"{code}): {last_line(self.logs[rank])}")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for the ranks to end (they end with rank 0); stop the ones that do not, and
        say which of them failed."""
        deadline = time.monotonic() + timeout
        for rank, proc in self.procs.items():
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    code = proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
            if code != 0:
                log.warning(f"gptlab: rank {rank} ended with exit {code}: "
                            f"{last_line(self.logs[rank])}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()


def last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def ready_file(plan_path: Path, rank: int, attempt: str) -> Path:
    return plan_path.parent / f"rank{rank}{'.' + attempt if attempt else ''}.ready"


def mark_ready(plan_path: Path, rank: int, attempt: str) -> None:
    ready_file(plan_path, rank, attempt).touch()


def write_plan(cfg: DictConfig, output_dir: Path, ckpt_path: Path | None, world: int) -> Plan:
    """Rank 0's plan for the others, in a fresh `ddp/` folder of the job's output folder; a
    checkpoint to start from is copied beside it when other machines' tasks read it."""
    folder = output_dir / Path(PLAN).parent
    if launched_rank() is None:
        shutil.rmtree(folder, ignore_errors=True)  # no rank started yet: nothing reads it
    folder.mkdir(parents=True, exist_ok=True)
    if ckpt_path is not None and launched_rank() is not None:
        shutil.copy(ckpt_path, folder / "resume.ckpt")
        ckpt_path = folder / "resume.ckpt"
    plan = Plan(OmegaConf.to_container(cfg, resolve=True), str(output_dir),
                None if ckpt_path is None else str(ckpt_path), world, attempt(), time.time(),
                int(os.environ["MASTER_PORT"]) if torchrun() is not None else None)
    plan.write(output_dir / PLAN)
    return plan


def wait_for_plan(path: Path, timeout: float = PLAN_TIMEOUT) -> Plan:
    """A launched rank > 0 (torchrun, SLURM): rank 0's plan for this start of the job, once
    written."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            plan = Plan.read(path)
            if is_current(plan):
                return plan
        if time.monotonic() > deadline:
            raise GptlabError(f"rank 0 wrote no plan at {path} within {timeout:.0f} s")
        time.sleep(0.5)
