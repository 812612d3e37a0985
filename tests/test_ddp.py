"""Data-parallel training (Lightning's DDP over gloo, 2 processes on this CPU): the same
step as one process on the whole batch, one MLflow run per training, the same validation
figure as one process, exact resume and stop signals across ranks, and bad input.

Where gptlab starts the ranks itself, rank 0 is the gptlab-train process: here it runs in this
process (train_here; rank 0 sets up and puts back the ranks' environment, as for the next job
of a sweep), unless a stop signal sent to it is the point. Ranks 1..N-1, and every rank that
torchrun or SLURM starts, are processes of their own."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    ROOT,
    TINY_GPT,
    call_main,
    cli_env,
    free_port,
    one_line_error,
    only_run,
    record_of,
    run_cli,
    runs_in,
    seed,
    store_uri,
)
from gptlab.cli import train as train_cli
from gptlab.data.datamodule import CorpusDataModule
from gptlab.models.checkpoints import model_from_checkpoint, read_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import ddp_step  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch without gloo")

DDP = [*TINY_GPT, "trainer=ddp", "model.dropout=0.1", "trainer.log_every_n_steps=1",
       "checkpoint.every_n_steps=4", "trainer.max_steps=25"]



@contextlib.contextmanager
def environment_put_back() -> Iterator[None]:
    """os.environ as it was, afterwards: Lightning's DDP sets OMP_NUM_THREADS in rank 0's
    process (and seeding sets PL_GLOBAL_SEED), which the processes that later tests start must
    not inherit from this one."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def train_here(monkeypatch: pytest.MonkeyPatch, tmp: Path, corpus: Path, args: list[str]
               ) -> int:
    """`gptlab-train ARGS` in this process (rank 0 of a data-parallel training; the ranks it
    starts load test callbacks from tests/, as a subprocess's would); its exit code, which no
    sweep ended in this process earlier decides. What rank 0 leaves in this process (a
    sweep's state, the environment) is put back afterwards."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))
    with environment_put_back():
        return call_main(monkeypatch, tmp, corpus, train_cli.main, args)


def test_a_step_on_two_ranks_equals_a_step_on_the_whole_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ddp_step.py"), str(out)],
        env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                 NODE_RANK="0", LOCAL_RANK=str(rank), OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    ddp = torch.load(out)
    whole = ddp_step.step(ddp_step.whole_batch(), devices=1).model.state_dict()
    start = ddp_step.lit().model.state_dict()
    moved = max((whole[k] - start[k]).abs().max().item() for k in whole)
    diff = max((whole[k] - ddp[k]).abs().max().item() for k in whole)
    print(f"largest weight change {moved:.2e}, largest DDP difference {diff:.2e}")
    assert moved > 1e-3  # the step moved the weights ...
    assert diff < 1e-5  # ... and both ways moved them alike


@pytest.fixture(scope="module")
def straight_ddp(tmp_path_factory, small_corpus, empty_store):
    tmp = seed(empty_store, tmp_path_factory.mktemp("ddp"))
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = train_here(m, tmp, small_corpus, [*DDP, "logger.experiment_name=straight"])
    res = subprocess.CompletedProcess(["gptlab-train"], code, out.getvalue(), err.getvalue())
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, res, record_of(MlflowClient(store_uri(tmp)), "straight", tmp)


def test_one_run_per_training_with_the_world_recorded(straight_ddp):
    tmp, res, record = straight_ddp
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "straight")  # the other rank opened no run of its own
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert run.data.params["global_batch_size"] == "8"  # data.batch_size=4 on each of 2
    assert "in 2 processes (DDP)" in res.stdout + res.stderr
    # one output folder for the training; rank 1's log beside rank 0's
    logs = list(tmp.glob("outputs/*/*/gptlab-train.log"))
    assert len(logs) == 1
    assert (logs[0].parent / "ddp" / "rank1.log").is_file()
    # tokens count both ranks' batches
    tokens = client.get_metric_history(run.info.run_id, "tokens")
    last = max(tokens, key=lambda m: m.step)
    assert last.value == last.step * 4 * 16 * 2


def test_validation_is_the_whole_set_as_one_process_scores_it(straight_ddp, small_corpus):
    tmp, _, record = straight_ddp
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "straight")
    path = client.download_artifacts(run.info.run_id, "checkpoints/step_000025.ckpt",
                                     str(tmp / "dl"))
    model = model_from_checkpoint(read_checkpoint(Path(path))).eval()
    dm = CorpusDataModule(path=str(small_corpus), block_size=16, batch_size=4, eval_iters=2)
    dm.setup()
    x, y = dm.val_blocks()
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    recorded = dict(record["val/loss"])[25]
    assert math.isclose(recorded, expected, rel_tol=1e-5), (recorded, expected)


@pytest.mark.slow  # 15 s or more
def test_a_stopped_ddp_run_resumes_to_the_same_record(straight_ddp, small_corpus, monkeypatch,
                                                      capsys):
    tmp, _, expected = straight_ddp
    # the stop signal goes to a gptlab-train process (rank 0); the resume runs rank 0 here
    first = run_cli("gptlab-train", [
        *DDP, "logger.experiment_name=stopped",
        "+callbacks.interrupt._target_=interrupt.SignalAt",
        f"+callbacks.interrupt.marker={tmp / 'stopped.fired'}", "+callbacks.interrupt.step=12"],
        tmp, small_corpus)
    assert first.returncode == 143, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "stopped")
    assert run.info.status == "KILLED"
    code = train_here(monkeypatch, tmp, small_corpus,
                      ["resume=latest", "logger.experiment_name=stopped"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert record_of(client, "stopped", tmp) == expected


def test_resuming_with_another_world_size_is_recorded(straight_ddp, small_corpus, monkeypatch,
                                                      capsys):
    tmp, _, _ = straight_ddp
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "straight")
    code = train_here(monkeypatch, tmp, small_corpus,
                      [f"resume={run.info.run_id}", "trainer=cpu", "trainer.devices=1",
                       "trainer.max_steps=30", "logger.experiment_name=straight"])
    assert code == 0, capsys.readouterr().err[-3000:]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["gptlab.world_size_changed"] == "2 -> 1 processes at step 25"


def test_a_failing_rank_fails_the_run_with_its_reason(tmp_path, empty_store, small_corpus,
                                                      monkeypatch, capsys):
    seed(empty_store, tmp_path)
    capsys.readouterr()
    code = train_here(monkeypatch, tmp_path, small_corpus,
                      [*DDP, "logger.experiment_name=boom",
                       "+callbacks.boom._target_=interrupt.RaiseAt", "+callbacks.boom.step=3",
                       "+callbacks.boom.rank=1"])
    err = capsys.readouterr().err
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the training process of rank 1 failed"), err[-2000:]
    assert "boom at step 3" in last
    run = only_run(MlflowClient(store_uri(tmp_path)), "boom")
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("args, words", [
    (["trainer=ddp", f"trainer.devices={(os.cpu_count() or 1) + 1}"], ["trainer.devices", "cores"]),
    (["trainer=ddp", "trainer.strategy.process_group_backend=nccl"], ["nccl", "not available"]),
    (["resume=auto", "logger=none"], ["resume", "logger"]),
])
def test_bad_parallel_settings_are_refused_in_one_line(in_process, capsys, tmp_path,
                                                       empty_store, args, words):
    if "nccl" in args[1] and torch.distributed.is_nccl_available():
        pytest.skip("this torch has nccl")
    seed(empty_store, tmp_path)
    # refused before any rank starts: in this process
    code, _, err = in_process(train_cli.main, [*TINY_GPT, *args, "logger.experiment_name=bad"],
                              capsys)
    one_line_error(code, err, *words)
    assert runs_in(tmp_path) == []


def test_the_plan_holds_the_resolved_config(straight_ddp):
    tmp, _, _ = straight_ddp
    plan = json.loads(next(tmp.glob("outputs/*/*/ddp/plan.json")).read_text())
    assert plan["world_size"] == 2
    assert plan["cfg"]["trainer"]["devices"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_ddp_over_nccl_on_two_gpus(tmp_path, small_corpus):
    res = run_cli("gptlab-train", [*TINY_GPT, "trainer=gpu", "trainer.devices=2",
                                   "logger.experiment_name=gpus"], tmp_path, small_corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run(MlflowClient(store_uri(tmp_path)), "gpus")
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"


def test_slurm_tasks_train_one_run_as_ranks(tmp_path, empty_store, small_corpus):
    seed(empty_store, tmp_path)
    # SLURM starts every task of a job with the same command: simulated here by SLURM's
    # environment for two tasks on this machine; task 0 opens the run, task 1 follows its plan
    procs = []
    for rank in (1, 0):
        env = dict(cli_env(tmp_path, small_corpus), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                   SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="gptlab")
        procs.append(subprocess.Popen(
            [str(BIN / "gptlab-train"), *TINY_GPT, "trainer=ddp", "logger.experiment_name=slurm",
             f"hydra.run.dir={tmp_path / 'job'}"], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:]
    run = only_run(MlflowClient(store_uri(tmp_path)), "slurm")
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert (tmp_path / "job" / "ddp" / "rank1.4242.0.ready").exists()


# -- ranks started by torchrun ------------------------------------------------------------------

def torchrun(tmp: Path, corpus: Path, launch: list[str], args: list[str]) -> subprocess.Popen:
    """`torchrun LAUNCH... -m gptlab.cli.train ARGS...` in `tmp`, against the store under `tmp`;
    one thread per rank (torchrun sets that only for several processes on a node)."""
    return subprocess.Popen([str(BIN / "torchrun"), *launch, *args], cwd=tmp,
                            env=dict(cli_env(tmp, corpus), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ended(*procs: subprocess.Popen) -> str:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outputs)[-4000:]
    return "\n".join(outputs)


def test_torchrun_ranks_train_one_run_as_trainer_ddp_does(straight_ddp, small_corpus):
    tmp, _, expected = straight_ddp
    # the console script as torchrun's training script; trainer=ddp spawns no ranks of its own
    ended(torchrun(tmp, small_corpus, ["--nproc_per_node=2", str(BIN / "gptlab-train")],
                   [*DDP, "logger.experiment_name=torchrun"]))
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "torchrun")
    assert run.data.params["world_size"] == "2"
    assert record_of(client, "torchrun", tmp) == expected  # the same numbers, step by step
    folder = tmp / "outputs" / "torchrun" / run.data.tags["gptlab.torchelastic_run_id"]
    assert (folder / "ddp" / "plan.json").is_file()
    assert not (folder / "ddp" / "rank1.log").exists()  # rank 1 was torchrun's, not gptlab's


def test_two_torchrun_nodes_train_one_run(tmp_path, empty_store, small_corpus):
    seed(empty_store, tmp_path)
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=two-nodes"]
    # trainer=cpu (one device): the world is torchrun's, over Lightning's DDP on gloo
    args = ["-m", "gptlab.cli.train", *TINY_GPT, "trainer.max_steps=4",
            "trainer.val_check_interval=2", "logger.experiment_name=nodes"]
    ended(*[torchrun(tmp_path, small_corpus, rendezvous, args) for _ in range(2)])
    run = only_run(MlflowClient(store_uri(tmp_path)), "nodes")
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert (tmp_path / "outputs" / "torchrun" / "two-nodes" / "ddp" / "plan.json").is_file()


@pytest.mark.slow  # 15 s or more
def test_an_elastic_restart_resumes_the_same_run(straight_ddp, small_corpus):
    tmp, _, expected = straight_ddp
    # rank 1 is SIGKILLed at step 14 (checkpoints every 4 steps); torchrun restarts both ranks
    marker = tmp / "elastic.killed"
    output = ended(torchrun(tmp, small_corpus, ["--nproc_per_node=2", "--max-restarts=1"], [
        "-m", "gptlab.cli.train", *DDP, "logger.experiment_name=elastic",
        "+callbacks.interrupt._target_=interrupt.SignalAt", f"+callbacks.interrupt.marker={marker}",
        "+callbacks.interrupt.signum=9", "+callbacks.interrupt.rank=1",
        "+callbacks.interrupt.step=14"]))
    assert marker.exists() and "exitcode: -9" in output, output[-3000:]
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "elastic")  # the restart continued the run, opened none
    assert run.data.tags["gptlab.resume.1"].startswith("from step ")
    assert record_of(client, "elastic", tmp) == expected  # FINISHED, exactly as if not killed


def test_torchrun_environment_decides_the_world(monkeypatch):
    from omegaconf import OmegaConf

    from gptlab.errors import GptlabError
    from gptlab.run import ddp

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job 7")
    for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2",
                           GROUP_RANK="0", TORCHELASTIC_RESTART_COUNT="1").items():
        monkeypatch.setenv(key, value)
    assert ddp.launched_rank() == 1
    # a plan of this start is written after this rank started; one of the start before, not
    plan = ddp.Plan(cfg={}, output_dir=".", ckpt_path=None, world_size=4, written=time.time())
    assert ddp.is_current(plan) and not ddp.is_current(replace(plan, written=plan.written - 1e5))
    trainer = OmegaConf.create({"devices": 2, "accelerator": "cpu"})
    OmegaConf.set_struct(trainer, True)
    ddp.use_launched_world(trainer)  # torchrun's 2 processes on each of 2 nodes win
    assert (trainer.devices, trainer.num_nodes) == (2, 2)
    assert ddp.launched_overrides(["seed=1"]) == ["hydra.run.dir=outputs/torchrun/job_7"]
    assert ddp.launched_overrides(["hydra.run.dir=here"]) == []
    with pytest.raises(GptlabError, match="sweep"):
        ddp.launched_overrides(["-m", "seed=1,2"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # a static rendezvous names no job
    with pytest.raises(GptlabError, match="--rdzv_id"):
        ddp.elastic_id()
    monkeypatch.setenv("WORLD_SIZE", "2")  # ... on one node torchrun's own process does
    assert ddp.elastic_id().endswith(f"-{os.getppid()}")
