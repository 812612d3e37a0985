"""Sweeps beyond one process: jobs through Hydra's submitit launcher (its local executor:
real submitit, a process per job), data-parallel jobs inside a sweep, and the SLURM
launcher's config."""

from __future__ import annotations

import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, one_line_error, run_cli, runs_in, store_uri


def sweep_tree(client: MlflowClient, experiment: str) -> tuple:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def test_a_submitit_sweep_nests_its_jobs_under_one_parent(tmp_path, small_corpus):
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
    compare = run_cli("gptlab-compare", ["-e", "cluster", "--sweep", "latest"], tmp_path,
                      small_corpus)
    assert compare.returncode == 0, compare.stderr
    assert len([ln for ln in compare.stdout.splitlines() if "FINISHED" in ln]) == 2, compare.stdout


def test_data_parallel_jobs_inside_a_sweep(tmp_path, small_corpus):
    # each job starts its own ranks and ends its process group: the second job of the sweep
    # (in the same process) trains as the first did, on a port of its own
    res = run_cli("gptlab-train", ["-m", "trainer=ddp", *TINY_GPT, "seed=1,2",
                                   "logger.experiment_name=ddp_sweep"], tmp_path, small_corpus,
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
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
def test_bad_launcher_settings_are_refused_in_one_line(tmp_path, small_corpus, launcher, word):
    if word == "sbatch" and shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    res = run_cli("gptlab-train", ["-m", *launcher, *TINY_GPT, "seed=1,2",
                                   "logger.experiment_name=bad"], tmp_path, small_corpus)
    one_line_error(res.returncode, res.stderr, word)
    assert runs_in(tmp_path) == []
