"""Sweeps from the shell: nested MLflow runs, parallel jobs, Optuna, comparison, the UI server.

A sweep through Hydra's basic launcher runs its jobs in the gptlab-train process: those run
here, in this process (call_main), without a process's start-up; parallel jobs and a stop
signal run in processes of their own, as they do for a user."""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    TINY_GPT,
    call_main,
    cli_env,
    free_port,
    run_cli,
    seed,
    store_uri,
)
from gptlab.cli import compare as compare_cli
from gptlab.cli import train as train_cli
from gptlab.tracking import comparison

SWEEP = [o for o in TINY_GPT if not o.startswith(("model.n_embd", "model.n_head"))]



@pytest.fixture
def train_here(monkeypatch, tmp_path, empty_store, small_corpus, capsys):
    """`gptlab-train ARGS` in this process, in tmp_path (its store made beforehand, see
    empty_store): (exit code, stdout, stderr). A sweep's state in this process is put back
    afterwards: a later command here neither takes its exit code from the sweeps ended
    before it nor filters its console as a sweep's job."""
    seed(empty_store, tmp_path)

    def call(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = call_main(monkeypatch, tmp_path, small_corpus, train_cli.main, args)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def sweep_parent(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.gptlab.sweep = 'true'")
    assert len(parents) == 1
    return parents[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, small_corpus, empty_store):
    """`gptlab-train -m` over 2 x 2 values of a tiny GPT (in this process)."""
    tmp = seed(empty_store, tmp_path_factory.mktemp("sweep"))
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main,
                         ["-m", "model.n_embd=16,32", "optim.lr=1e-3,3e-3", "model.n_head=2",
                          *SWEEP, "logger.experiment_name=sweep"])
    assert code == 0
    return tmp, code


def test_multirun_nests_named_children_under_one_parent(swept):
    tmp, _ = swept
    client = MlflowClient(store_uri(tmp))
    parent = sweep_parent(client, "sweep")
    assert parent.info.status == "FINISHED"
    assert "-m model.n_embd=16,32 optim.lr=1e-3,3e-3" in parent.data.tags["gptlab.command"]
    assert parent.data.params["swept"] == "model.n_embd, optim.lr"
    runs = children(client, parent.info.run_id)
    assert sorted(r.info.run_name for r in runs) == [
        "n_embd=16 lr=0.001", "n_embd=16 lr=0.003", "n_embd=32 lr=0.001", "n_embd=32 lr=0.003"]
    assert {(r.data.params["model.n_embd"], r.data.params["optim.lr"]) for r in runs} == {
        ("16", "0.001"), ("16", "0.003"), ("32", "0.001"), ("32", "0.003")}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(client.get_metric_history(r.info.run_id, "val/loss") for r in runs)


def test_compare_table_and_plot(swept, capsys, tmp_path):
    tmp, _ = swept
    client = MlflowClient(store_uri(tmp))
    parent = sweep_parent(client, "sweep")
    png = tmp_path / "curves.png"
    rows = comparison.compare("sweep", "latest", str(png), store_uri(tmp))["runs"]
    out = capsys.readouterr().out
    assert len(rows) == 4
    best = [r["best val/loss"] for r in rows]
    assert best == sorted(best)
    for r in rows:
        history = client.get_metric_history(
            next(c.info.run_id for c in children(client, parent.info.run_id)
                 if c.info.run_name == r["run"]), "val/loss")
        assert r["best val/loss"] == min(m.value for m in history)
    header = out.splitlines()[1]
    # only the params that differ, not the ones every run shares
    assert "model.n_embd" in header and "optim.lr" in header and "model.n_layer" not in header
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the whole experiment: the same four runs, the sweep's parent left out
    assert len(comparison.compare("sweep", None, None, store_uri(tmp))["runs"]) == 4


@pytest.mark.parametrize("args, words", [
    (["--experiment", "nope"], ["no MLflow experiment named 'nope'"]),
    (["--experiment", "sweep", "--sweep", "feedfacefeedface"], ["feedfacefeedface"]),
    (["--experiment", "sweep", "--plot", "/no/such/folder/c.png"], ["does not exist"]),
])
def test_compare_bad_input(swept, capsys, args, words):
    tmp, _ = swept
    with pytest.raises(SystemExit) as e:
        compare_cli.main([*args, "--tracking-uri", store_uri(tmp)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in err
    assert out == ""  # refused before any table is printed
    assert all(w in err for w in words), err


def test_failing_job_is_recorded_and_others_finish(train_here, tmp_path):
    code, _, err = train_here(["-m", "model.n_head=2,3", "model.n_embd=16", *SWEEP,
                               "logger.experiment_name=failing"])
    assert code == 2
    assert "Traceback" not in err
    assert "divisible" in err and "1 of 2 jobs failed" in err
    client = MlflowClient(store_uri(tmp_path))
    parent = sweep_parent(client, "failing")
    assert parent.info.status == "FAILED"
    runs = {r.info.run_name: r for r in children(client, parent.info.run_id)}
    assert runs["n_head=2"].info.status == "FINISHED"
    assert runs["n_head=3"].info.status == "FAILED"
    assert "divisible" in runs["n_head=3"].data.tags["gptlab.error"]


@pytest.mark.slow  # 15 s or more
def test_parallel_jobs_share_an_empty_store(tmp_path, small_corpus):
    assert not (tmp_path / "mlruns").exists()
    res = run_cli("gptlab-train", ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=4",
                                   "optim.lr=1e-3,2e-3,3e-3,4e-3", *TINY_GPT,
                                   "logger.experiment_name=parallel"], tmp_path, small_corpus,
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    assert [e.name for e in client.search_experiments()
            if e.name != "Default"] == ["parallel"]
    parent = sweep_parent(client, "parallel")
    runs = children(client, parent.info.run_id)
    assert sorted(r.data.params["optim.lr"] for r in runs) == ["0.001", "0.002", "0.003",
                                                                "0.004"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")] == [10, 20]
        names = {Path(f.path).name for f in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert "step_000020.ckpt" in names
        assert r.data.tags["gptlab.best_checkpoint"] in names


def test_optuna_search(train_here, tmp_path):
    code, _, err = train_here(["hparams_search=lr_dropout_optuna", "hydra.sweeper.n_trials=3",
                               *TINY_GPT, "logger.experiment_name=optuna"])
    assert code == 0, err[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    parent = sweep_parent(client, "optuna")
    assert parent.data.params["swept"] == "optim.lr, model.dropout"
    runs = children(client, parent.info.run_id)
    assert len(runs) == 3
    for r in runs:
        assert 1e-4 <= float(r.data.params["optim.lr"]) <= 1e-2
        assert 0.0 <= float(r.data.params["model.dropout"]) <= 0.3
    # the objective Optuna minimised is the best val/loss each run recorded
    results = yaml.safe_load(next(tmp_path.glob("multirun/*/optimization_results.yaml"))
                             .read_text())
    best = min(min(m.value for m in client.get_metric_history(r.info.run_id, "val/loss"))
               for r in runs)
    assert results["best_value"] == pytest.approx(best, abs=1e-6)


def test_unreachable_server_fails_before_training(train_here, tmp_path):
    start = time.time()
    code, _, err = train_here([*TINY_GPT, f"logger.tracking_uri=http://127.0.0.1:{free_port()}"])
    assert code == 2 and "Traceback" not in err
    assert err.count("cannot reach the MLflow tracking store") == 1
    assert not list(tmp_path.rglob("*.ckpt"))
    assert time.time() - start < 60


def api(port: int, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_mlflow_server_shows_the_sweep(swept, tmp_path):
    tmp, _ = swept
    port = free_port()
    env = cli_env(tmp, tmp)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", store_uri(tmp),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        exp = api(port, "experiments/get-by-name?experiment_name=sweep")["experiment"]
        runs = api(port, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags, strict=True) if t.get("gptlab.sweep") == "true"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        kids = [r for r, t in zip(runs, tags, strict=True)
                if t.get("mlflow.parentRunId") == parent_id]
        assert len(kids) == 4
        for kid in kids:
            params = {p["key"]: p["value"] for p in kid["data"]["params"]}
            assert {"model.n_embd", "optim.lr", "n_params"} <= params.keys()
            hist = api(port, f"metrics/get-history?run_id={kid['info']['run_id']}"
                             "&metric_key=val/loss")["metrics"]
            assert sorted(m["step"] for m in hist) == [10, 20]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_every_job_of_a_sweep_ends_recorded_whatever_it_died_of(train_here, tmp_path):
    # job 0: refused by a config check before its run opens; job 1: a bug at step 3;
    # job 2: finishes
    code, _, err = train_here(["-m", "+callbacks.boom._target_=interrupt.RaiseAt",
                               "+callbacks.boom.step=3,1000", *TINY_GPT, "trainer.max_steps=0,20",
                               "logger.experiment_name=mixed"])
    assert code == 2, err[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    parent = sweep_parent(client, "mixed")
    assert parent.info.status == "FAILED"
    runs = {r.info.run_name: r for r in children(client, parent.info.run_id)}
    assert {name: r.info.status for name, r in runs.items()} == {
        "step=3 max_steps=0": "FAILED", "step=3 max_steps=20": "FAILED",
        "step=1000 max_steps=0": "FAILED", "step=1000 max_steps=20": "FINISHED"}
    assert "trainer.max_steps" in runs["step=3 max_steps=0"].data.tags["gptlab.error"]
    assert runs["step=3 max_steps=20"].data.tags["gptlab.error"] == \
        "RuntimeError: boom at step 3"
    assert "3 of 4 jobs failed" in err and "step=3 max_steps=20" in err


def test_a_stop_signal_stops_the_sweep_and_records_it_killed(tmp_path, empty_store,
                                                             small_corpus):
    # a gptlab-train process of its own: the signal goes to it
    seed(empty_store, tmp_path)
    res = run_cli("gptlab-train", ["-m", "optim.lr=1e-3,2e-3", *TINY_GPT,
                                   "+callbacks.stop._target_=interrupt.SignalAt",
                                   f"+callbacks.stop.marker={tmp_path / 'fired'}",
                                   "+callbacks.stop.step=5", "+callbacks.stop.signum=2",
                                   "logger.experiment_name=stopped"], tmp_path, small_corpus)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    client = MlflowClient(store_uri(tmp_path))
    parent = sweep_parent(client, "stopped")
    assert parent.info.status == "KILLED"
    runs = children(client, parent.info.run_id)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("lr=0.001", "KILLED")]


def test_repeated_seeds_are_grouped_with_statistics(train_here, tmp_path, capsys):
    code, _, err = train_here(["-m", *TINY_GPT, "seed=0,1,2", "model.n_layer=1,2",
                               "logger.experiment_name=seeds"])
    assert code == 0, err[-3000:]
    png = tmp_path / "bands.png"
    out = comparison.compare("seeds", "latest", str(png), store_uri(tmp_path),
                             by=["model.n_layer"], baseline="n_layer=1")
    groups = {g["group"]: g for g in out["groups"]}
    assert set(groups) == {"n_layer=1", "n_layer=2"} and all(
        g["runs"] == 3 for g in groups.values())
    client = MlflowClient(store_uri(tmp_path))
    parent = sweep_parent(client, "seeds")
    one = [min(m.value for m in client.get_metric_history(r.info.run_id, "val/loss"))
           for r in children(client, parent.info.run_id) if r.data.params["model.n_layer"] == "1"]
    assert groups["n_layer=1"]["best val/loss"] == pytest.approx(sum(one) / 3)
    assert 0.0 <= groups["n_layer=2"]["p (Welch)"] <= 1.0
    assert png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "groups by model.n_layer" in printed and "p (Welch)" in printed
    # without --by, runs that differ only in seed are the groups: the same two
    assert {g["group"] for g in comparison.compare(
        "seeds", "latest", None, store_uri(tmp_path))["groups"]} == set(groups)
    # the parent run holds the same summary as a table
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "groups.json",
                                                      str(tmp_path))).read_text())
    assert sorted(table["columns"])[:2] == ["95% CI +-", "best std"]
    assert len(table["data"]) == 2
