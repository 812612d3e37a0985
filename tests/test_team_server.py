"""A team's tracking server: `gptlab-server` over a real PostgreSQL, artifacts uploaded through
the server, clients that share nothing but its URL. Training, a parallel sweep, resuming a
killed run from another folder, sampling and comparing all work against it unchanged, and
parallel jobs logging every step lose nothing. Skipped where PostgreSQL is not installed.

A run killed by a signal, the sweep and the server are processes of their own; the other
clients (the straight run, the resumption of the killed one) run in this process (call_main)
with the environment a client process of their own would have."""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import socket
from pathlib import Path

import psycopg
import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    TINY_GPT,
    call_main,
    cli_env,
    free_port,
    mlflow_server,
    one_line_error,
    only_run,
    record_of,
    run_cli,
    steps_of,
)
from gptlab.cli import server as server_cli
from gptlab.cli import train as train_cli

# dropout on, every step logged, a checkpoint every 4 steps besides the validations at 10, 20
# and 25: what tests/test_lifecycle.py compares interrupted runs with
RECIPE = [*TINY_GPT, "model.dropout=0.1", "trainer.log_every_n_steps=1",
          "checkpoint.every_n_steps=4", "trainer.max_steps=25"]
LR4 = "optim.lr=1e-3,2e-3,3e-3,4e-3"
LRS = ["0.001", "0.002", "0.003", "0.004"]


@pytest.fixture(scope="module")
def team(tmp_path_factory, postgres):
    """The team's server, shared by this module's tests (each uses its own experiment)."""
    tmp = tmp_path_factory.mktemp("team-server")
    with pytest.MonkeyPatch.context() as m:
        # MLflow's job runner (GenAI scoring jobs, a process of its own), which runs no part
        # of this, would only slow down the server's start
        m.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        with mlflow_server(tmp, postgres, workers=2) as server:
            yield server


def client_folder(tmp_path_factory, name: str, corpus: Path) -> tuple[Path, dict[str, str]]:
    """A client's own folder, as on another machine: its own copy of the corpus, its own
    cache (where gptlab keeps run locks), and a local store it must not use (the runs go to
    the server named by logger.tracking_uri)."""
    tmp = tmp_path_factory.mktemp(name)
    shutil.copy(corpus, tmp / "corpus.txt")
    env = dict(cli_env(tmp, tmp / "corpus.txt"), XDG_CACHE_HOME=str(tmp / "cache"))
    return tmp, env


def train(tmp: Path, env: dict[str, str], server, args: list[str], timeout: float = 300):
    return run_cli("gptlab-train", [*args, f"logger.tracking_uri={server.uri}"], tmp, tmp,
                   timeout=timeout, env=env)


def train_here(tmp: Path, env: dict[str, str], server, args: list[str]
               ) -> tuple[int, str, str]:
    """`train` in this process, with the client folder's environment (its own cache, its
    local store): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        m.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
        code = call_main(m, tmp, tmp / "corpus.txt", train_cli.main,
                         [*args, f"logger.tracking_uri={server.uri}"])
    return code, out.getvalue(), err.getvalue()


def children(client: MlflowClient, experiment: str) -> tuple:
    exp = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([exp], "tags.gptlab.sweep = 'true'")
    assert len(parents) == 1
    return parents[0], client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")


@pytest.fixture(scope="module")
def straight(team, tmp_path_factory, small_corpus):
    """One training through the server, straight through (in this process)."""
    tmp, env = client_folder(tmp_path_factory, "straight", small_corpus)
    code, out, err = train_here(tmp, env, team, [*RECIPE, "logger.experiment_name=straight"])
    assert code == 0, err[-3000:]
    client = MlflowClient(team.uri)
    return tmp, out, record_of(client, "straight", tmp)


@pytest.fixture(scope="module")
def sweep(team, tmp_path_factory, small_corpus):
    """A sweep of 8 jobs (4 learning rates, 2 seeds) run at once by Hydra's joblib launcher,
    each logging every step."""
    tmp, env = client_folder(tmp_path_factory, "sweep", small_corpus)
    res = train(tmp, env, team, ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=8",
                                 LR4, "seed=1,2", *TINY_GPT, "trainer.log_every_n_steps=1",
                                 "logger.experiment_name=teamsweep"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, env


def test_the_server_is_postgresql_backed_with_artifacts_uploaded_through_it(team, straight,
                                                                           postgres):
    tmp, out, record = straight
    client = MlflowClient(team.uri)
    run = only_run(client, "straight")
    assert record["status"] == "FINISHED"
    assert [s for s, _ in record["val/loss"]] == [10, 20, 25]
    assert f"{team.uri}/#/experiments/" in out  # the run's link is the server's UI
    # the run is a row of the team's PostgreSQL database
    with psycopg.connect(team.backend_uri) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s",
                           (run.info.run_id,)).fetchone()
        points = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND "
                              "key = 'train/loss'", (run.info.run_id,)).fetchone()[0]
    assert row == ("FINISHED",) and points == 25
    # artifacts went up through the server into its folder; the client kept no store
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = {p.name for p in team.artifacts.rglob(f"{run.info.run_id}/**/*.ckpt")}
    assert stored == set(record["checkpoints"]) and stored
    assert not (tmp / "mlruns").exists()
    # gptlab-server named the URL clients use, and printed no password
    log = team.log.read_text()
    assert f"clients: logger.tracking_uri={team.uri}" in log
    assert postgres.PASSWORD not in log


@pytest.mark.slow  # 15 s or more
def test_sample_and_compare_read_through_the_server(team, straight, sweep, tmp_path_factory,
                                                    small_corpus):
    tmp, env = client_folder(tmp_path_factory, "reader", small_corpus)
    run_id = only_run(MlflowClient(team.uri), "straight").info.run_id
    res = run_cli("gptlab-sample", [f"run_id={run_id}", f"logger.tracking_uri={team.uri}",
                                    "max_new_tokens=40", "prompt=ROMEO:"], tmp, tmp, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ROMEO:") and len(res.stdout) >= 46
    assert run_id in res.stderr
    res = run_cli("gptlab-compare", ["--tracking-uri", team.uri, "--experiment", "teamsweep",
                                     "--sweep", "latest"], tmp, tmp, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for lr in LRS:
        assert f"lr={lr}" in res.stdout, res.stdout
    assert not (tmp / "mlruns").exists()


def test_a_parallel_sweep_nests_its_jobs_on_the_server(team, sweep):
    tmp, _ = sweep
    client = MlflowClient(team.uri)
    parent, runs = children(client, "teamsweep")
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["optim.lr"] for r in runs) == sorted(LRS * 2)
    for r in runs:
        assert r.info.status == "FINISHED"
        assert steps_of(client, r.info.run_id, "val/loss") == [10, 20]
        names = {Path(f.path).name for f in client.list_artifacts(r.info.run_id, "checkpoints")}
        assert "step_000020.ckpt" in names and r.data.tags["gptlab.best_checkpoint"] in names
    best = parent.data.tags["gptlab.best_run"]  # "name (run id)"
    assert best.rpartition("(")[2].rstrip(")") in {r.info.run_id for r in runs}
    assert not (tmp / "mlruns").exists()


def test_a_killed_run_resumes_from_another_folder(team, straight, tmp_path_factory,
                                                  small_corpus):
    """Killed by SIGKILL in one folder after checkpoints were logged; resumed in another that
    shares nothing with the first but the server's URL; it records what the run that went
    straight through records, each step once."""
    _, _, expected = straight
    first, env = client_folder(tmp_path_factory, "killed-here", small_corpus)
    res = train(first, env, team, [
        *RECIPE, "logger.experiment_name=killed",
        "+callbacks.interrupt._target_=interrupt.SignalAt",
        f"+callbacks.interrupt.marker={first / 'fired'}", "+callbacks.interrupt.step=13",
        f"+callbacks.interrupt.signum={signal.SIGKILL}"])
    assert res.returncode == -9, res.stderr[-3000:]
    client = MlflowClient(team.uri)
    run = only_run(client, "killed")
    assert run.info.status == "RUNNING"
    assert client.list_artifacts(run.info.run_id, "checkpoints")
    second, env = client_folder(tmp_path_factory, "resumed-there", small_corpus)
    code, _, err = train_here(second, env, team, [f"resume={run.info.run_id}"])
    assert code == 0, err[-3000:]
    record = record_of(client, "killed", second)
    assert record["status"] == "FINISHED"
    assert steps_of(client, run.info.run_id) == list(range(1, 26))
    assert record == expected


def test_eight_parallel_jobs_logging_every_step_lose_nothing(team, sweep):
    client = MlflowClient(team.uri)
    parent, runs = children(client, "teamsweep")
    assert len(runs) == 8
    exp = client.get_experiment_by_name("teamsweep").experiment_id
    assert [r.info.status for r in client.search_runs([exp])] == ["FINISHED"] * 9
    for r in runs:
        assert steps_of(client, r.info.run_id) == list(range(1, 21)), r.info.run_name
        assert steps_of(client, r.info.run_id, "lr") == list(range(1, 21))


@pytest.mark.parametrize("what", ["closed port", "wrong password", "no such database"])
def test_a_database_that_cannot_be_used_is_one_line(postgres, tmp_path, small_corpus, what):
    url = {"closed port": f"postgresql://gptlab:pw@127.0.0.1:{free_port()}/mlflow",
           "wrong password": postgres.url(driver=False, password="wrong"),
           "no such database": postgres.url("nosuchdb", driver=False)}[what]
    port = free_port()
    res = run_cli("gptlab-server", [url, "--port", str(port), "--artifacts",
                                    str(tmp_path / "artifacts")], tmp_path, small_corpus,
                  timeout=60)
    line = one_line_error(res.returncode, res.stderr, "cannot connect to the database")
    assert {"closed port": "Connection refused", "wrong password": "password authentication",
            "no such database": '"nosuchdb" does not exist'}[what] in line
    assert "wrong" not in line.replace("wrong password", "")  # the password is not shown
    with socket.socket() as s:  # and no server was started
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("url, words", [
    ("mysql://u:secret@db/mlflow", ["must be postgresql://", "u:***@db"]),
    ("sqlite:///mlflow.db", ["must be postgresql://"]),
    ("postgresql://", ["must be postgresql://"]),
])
def test_a_url_that_is_not_postgresql_is_one_line(capsys, url, words):
    with pytest.raises(SystemExit) as e:
        server_cli.main([url])
    err = capsys.readouterr().err
    one_line_error(e.value.code, err, *words)
    assert "secret" not in err


def test_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            server_cli.main(["postgresql://u:pw@127.0.0.1:1/db", "--port", str(port)])
    one_line_error(e.value.code, capsys.readouterr().err, f"cannot listen on 127.0.0.1:{port}",
                   "in use")


def test_urls_use_psycopg_3_unless_a_driver_is_named():
    assert (server_cli.sqlalchemy_url("postgresql://u:p@h:5432/db")
            == "postgresql+psycopg://u:p@h:5432/db")
    assert server_cli.sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert (server_cli.sqlalchemy_url("postgresql+psycopg2://u@h/db")
            == "postgresql+psycopg2://u@h/db")
    assert server_cli.sqlalchemy_url("postgres+pg8000://u@h/db") == "postgresql+pg8000://u@h/db"
    assert server_cli.masked("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"


def test_a_server_for_the_team_accepts_this_machines_name():
    """MLflow answers only Host headers it allows (localhost and private IPs by default); on
    a public interface the name clients use, this machine's, must be among them."""
    args = server_cli.parser().parse_args(["postgresql://u@h/db", "--host", "0.0.0.0"])
    args.artifacts = "/srv/a"
    cmd = server_cli.mlflow_command(args, [])
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert f"{server_cli.machine_name()}:*" in hosts and "localhost:*" in hosts
    assert f"{socket.gethostname()}:*" in hosts
    assert server_cli.client_url("0.0.0.0", 5000) == f"http://{server_cli.machine_name()}:5000"
    args = server_cli.parser().parse_args(["postgresql://u@h/db"])
    args.artifacts = "/srv/a"
    assert "--allowed-hosts" not in server_cli.mlflow_command(args, [])  # loopback: MLflow's
    assert server_cli.mlflow_command(args, ["--allowed-hosts", "x"])[-2:] == [
        "--allowed-hosts", "x"]
