"""Sweeps beyond one process: jobs through Hydra's submitit launcher (its local executor:
real submitit, a process per job), data-parallel jobs inside a sweep, and the SLURM
launcher's config. The submitit sweep runs as a gptlab-train process; the data-parallel sweep
(its ranks 1.. are processes of their own) and refused settings run in this process."""

from __future__ import annotations

import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, one_line_error, run_cli, runs_in, seed, store_uri
from gptlab.cli import compare as compare_cli
from gptlab.cli import train as train_cli


def sweep_tree(client: MlflowClient, experiment: str) -> tuple:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


@pytest.mark.slow  # 15 s or more
def test_a_submitit_sweep_nests_its_jobs_under_one_parent(tmp_path, empty_store,
                                                          small_corpus, capsys):
    seed(empty_store, tmp_path)
    res = run_cli("gptlab-train", ["-m", "hydra/launcher=submitit_local", *TINY_GPT, "seed=1,2",
                                   "logger.experiment_name=cluster"], tmp_path, small_corpus,
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    parent, children = sweep_tree(client, "cluster")
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["1", "2"]  # their seeds
    assert {r.info.status for r in children} == {"FINISHED"}
    # each job ran in a process of its own, started by submitit
    assert len({r.data.tags["gptlab.owner"] for r in children}) == 2
    # gptlab-compare (in this process) shows them as any sweep's runs
    capsys.readouterr()
    with pytest.raises(SystemExit) as compare:
        compare_cli.main(["-e", "cluster", "--sweep", "latest", "--tracking-uri",
                          store_uri(tmp_path)])
    out, err = capsys.readouterr()
    assert compare.value.code == 0, err
    assert len([ln for ln in out.splitlines() if "FINISHED" in ln]) == 2, out


def test_data_parallel_jobs_inside_a_sweep(in_process, capsys, tmp_path, empty_store,
                                           monkeypatch):
    seed(empty_store, tmp_path)
    # each job starts its own ranks and ends its process group: the second job of the sweep
    # (in the same process, here this one: rank 0 of each job) trains as the first did, on a
    # port of its own. The sweep's state here is put back afterwards (its exit code is its
    # own, not one a sweep before it left; no later command filters its console as a job's)
    # Lightning's DDP sets OMP_NUM_THREADS in rank 0's process: later tests' processes must
    # not inherit it from this one
    saved = dict(os.environ)
    try:
        code, _, err = in_process(train_cli.main, ["-m", "trainer=ddp", *TINY_GPT, "seed=1,2",
                                                   "logger.experiment_name=ddp_sweep"], capsys)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0, err[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    parent, children = sweep_tree(client, "ddp_sweep")
    assert len(children) == 2
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.params["world_size"] for r in children} == {"2"}
    assert len(list(tmp_path.glob("multirun/*/*/*/ddp/rank1.log"))) == 2


@pytest.mark.parametrize("launcher, word", [
    (["hydra/launcher=submitit_local", "hydra.launcher.no_such_option=1"], "no_such_option"),
    (["hydra/launcher=slurm"], "sbatch"),
])
def test_bad_launcher_settings_are_refused_in_one_line(in_process, capsys, tmp_path,
                                                       empty_store, launcher, word):
    if word == "sbatch" and shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    seed(empty_store, tmp_path)
    code, _, err = in_process(train_cli.main, ["-m", *launcher, *TINY_GPT, "seed=1,2",
                                               "logger.experiment_name=bad"], capsys)
    one_line_error(code, err, word)
    assert runs_in(tmp_path) == []
