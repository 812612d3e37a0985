"""Accounts on the team server: `gptlab-server` starts MLflow's basic-auth app over PostgreSQL;
its admin adds users and grants them experiments with `gptlab-server user` and `grant`; an
anonymous caller gets 401, a reader 403 on what it may not do, an editor trains a parallel
sweep and resumes a run; a refused login is one line within seconds, never waited out as an
outage; no password is recorded anywhere. Skipped where PostgreSQL is not installed.

The server and the parallel sweep are processes of their own; the other commands run in this
process (call_main) with the credentials a user's shell would hold."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    TINY_GPT,
    MlflowServer,
    cli,
    cli_env,
    free_port,
    one_line_error,
    run_cli,
)
from gptlab.cli import compare as compare_cli
from gptlab.cli import server as server_cli
from gptlab.cli import train as train_cli

ADMIN_PASSWORD = "admin-Secret-4242"
PASSWORDS = {"alice": "alice-Secret-9191", "bob": "bob-Secret-7373"}


@pytest.fixture(scope="module")
def accounts(tmp_path_factory, postgres):
    """A team server with accounts (the default), as its admin starts it: the admin's password
    from a file; the database user may create the accounts' database."""
    tmp = tmp_path_factory.mktemp("accounts")
    with postgres.admin() as conn:
        conn.execute(f"ALTER ROLE {postgres.USER} CREATEDB")
    (tmp / "admin.pw").write_text(ADMIN_PASSWORD + "\n")
    server = MlflowServer(postgres.create_database(driver=False), tmp / "artifacts", tmp,
                          gptlab=True, workers=2,
                          auth=["--admin-password-file", str(tmp / "admin.pw"),
                                "--config-dir", str(tmp / "config")])
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        server.start()
    try:
        yield server
    finally:
        server.stop()


def signed_in(m: pytest.MonkeyPatch, user: str, password: str | None = None) -> None:
    m.setenv("MLFLOW_TRACKING_USERNAME", user)
    m.setenv("MLFLOW_TRACKING_PASSWORD", password or PASSWORDS.get(user, ADMIN_PASSWORD))


def as_admin(monkeypatch, capsys, tmp: Path, server, args: list[str]) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "admin", ADMIN_PASSWORD)
        return cli(monkeypatch, capsys, tmp, tmp, server_cli.main,
                   [*args, "--tracking-uri", server.uri])


@pytest.fixture(scope="module")
def team(accounts, tmp_path_factory):
    """alice may edit the experiment `team`, bob may read it (users made by the admin)."""
    tmp = tmp_path_factory.mktemp("admin")
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "admin", ADMIN_PASSWORD)
        for name, password in PASSWORDS.items():
            (tmp / f"{name}.pw").write_text(password)
            with pytest.raises(SystemExit) as done:
                server_cli.main(["user", "add", name, "--password-file",
                                 str(tmp / f"{name}.pw"), "--tracking-uri", accounts.uri])
            assert done.value.code == 0
        for name, permission in (("alice", "EDIT"), ("bob", "READ")):
            with pytest.raises(SystemExit) as done:
                server_cli.main(["grant", name, "team", permission, "--tracking-uri",
                                 accounts.uri])
            assert done.value.code == 0
    return accounts


def rest(server, method: str, path: str, body: dict | None = None,
         user: str | None = None) -> int:
    """The HTTP status MLflow's REST API answers, anonymously or as `user`."""
    request = urllib.request.Request(
        f"{server.uri}/api/2.0/mlflow/{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"})
    if user:
        token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_users_and_grants_are_one_line_each(team, monkeypatch, capsys, tmp_path):
    (tmp_path / "carol.pw").write_text("carol-Secret-5555")
    code, out, err = as_admin(monkeypatch, capsys, tmp_path, team, [
        "user", "add", "carol", "--password-file", str(tmp_path / "carol.pw")])
    assert code == 0, err
    assert out.strip() == "gptlab-server: user carol added"
    code, out, err = as_admin(monkeypatch, capsys, tmp_path, team,
                              ["grant", "carol", "team", "READ"])
    assert code == 0, err
    assert out.strip().startswith("gptlab-server: carol: READ on experiment team (id ")
    code, out, _ = as_admin(monkeypatch, capsys, tmp_path, team,
                            ["grant", "carol", "team", "EDIT"])  # replaces READ
    assert code == 0 and "EDIT on experiment team" in out
    (tmp_path / "carol2.pw").write_text("carol-Other-6666")
    code, out, err = as_admin(monkeypatch, capsys, tmp_path, team, [
        "user", "password", "carol", "--password-file", str(tmp_path / "carol2.pw")])
    assert code == 0 and out.strip() == "gptlab-server: password of carol changed", err
    # a user that exists: one line, and not MLflow's report with the password's hash
    code, _, err = as_admin(monkeypatch, capsys, tmp_path, team, [
        "user", "add", "carol", "--password-file", str(tmp_path / "carol.pw")])
    one_line_error(code, err, "user carol already exists")
    assert "pbkdf2" not in err and "Traceback" not in err
    code, out, err = as_admin(monkeypatch, capsys, tmp_path, team, ["user", "remove", "carol"])
    assert code == 0 and out.strip() == "gptlab-server: user carol removed", err
    # only the admin manages users: alice may not add one
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "alice")
        code, _, err = cli(monkeypatch, capsys, tmp_path, tmp_path, server_cli.main, [
            "user", "add", "mallory", "--password-file", str(tmp_path / "carol.pw"),
            "--tracking-uri", team.uri])
    one_line_error(code, err, "refused user alice")
    # a weak password is refused before it is sent
    (tmp_path / "weak.pw").write_text("short")
    code, _, err = as_admin(monkeypatch, capsys, tmp_path, team, [
        "user", "add", "dave", "--password-file", str(tmp_path / "weak.pw")])
    one_line_error(code, err, "at least 12 characters")


def test_anonymous_calls_get_401_and_a_reader_403_on_delete(team):
    for method, path, body in (
            ("POST", "runs/create", {"experiment_id": "0"}),
            ("GET", "experiments/search?max_results=5", None),
            ("POST", "runs/delete", {"run_id": "0" * 32}),
            ("POST", "experiments/delete", {"experiment_id": "0"}),
            ("POST", "users/create", {"username": "eve", "password": "eve-Secret-12345"})):
        assert rest(team, method, path, body) == 401, path
    # bob may read the experiment, not delete it or make runs in it
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "admin", ADMIN_PASSWORD)
        exp = MlflowClient(team.uri).get_experiment_by_name("team").experiment_id
    assert rest(team, "GET", f"experiments/get?experiment_id={exp}", user="bob") == 200
    assert rest(team, "POST", "experiments/delete", {"experiment_id": exp}, user="bob") == 403
    assert rest(team, "POST", "runs/create", {"experiment_id": exp}, user="bob") == 403
    # alice, an editor, may make runs but not delete the experiment
    assert rest(team, "POST", "experiments/delete", {"experiment_id": exp},
                user="alice") == 403


@pytest.fixture(scope="module")
def alices_sweep(team, tmp_path_factory, small_corpus):
    """alice's 2-job parallel sweep on the experiment she may edit, as processes of their own
    with her credentials in their environment."""
    tmp = tmp_path_factory.mktemp("alice")
    env = dict(cli_env(tmp, small_corpus), MLFLOW_TRACKING_USERNAME="alice",
               MLFLOW_TRACKING_PASSWORD=PASSWORDS["alice"], XDG_CACHE_HOME=str(tmp / "cache"))
    res = run_cli("gptlab-train", [
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", *TINY_GPT,
        "logger.experiment_name=team", f"logger.tracking_uri={team.uri}"], tmp, small_corpus,
        env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp


@pytest.mark.slow  # 15 s or more
def test_an_editor_trains_a_parallel_sweep_and_resumes_a_run(team, alices_sweep, monkeypatch,
                                                             capsys, small_corpus):
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "alice")
        client = MlflowClient(team.uri)
        exp = client.get_experiment_by_name("team").experiment_id
        runs = client.search_runs([exp])
        assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3  # the sweep and 2 jobs
        job = next(r for r in runs if r.data.params.get("seed") == "1")
        code, _, err = cli(monkeypatch, capsys, alices_sweep, small_corpus, train_cli.main, [
            f"resume={job.info.run_id}", "trainer.max_steps=30",
            f"logger.tracking_uri={team.uri}"])
        assert code == 0, err[-3000:]
        resumed = client.get_run(job.info.run_id)
        assert resumed.info.status == "FINISHED"
        assert max(m.step for m in client.get_metric_history(job.info.run_id, "val/loss")) == 30
        # bob reads them: the sweep's table
        signed_in(m, "bob")
        code, out, err = cli(monkeypatch, capsys, alices_sweep, small_corpus, compare_cli.main,
                             ["--tracking-uri", team.uri, "--experiment", "team"])
        assert code == 0, err
        assert job.info.run_id[:8] in out or "seed" in out


def test_a_refused_login_or_permission_is_one_line_at_once(team, alices_sweep, monkeypatch,
                                                           capsys, small_corpus):
    for user, password, words in (
            ("alice", "wrong-password-000", ["refused user alice", "wrong password"]),
            ("nobody", "whatever-password", ["refused user nobody"]),
            ("bob", None, ["refused user bob", "no EDIT permission on experiment team"])):
        with pytest.MonkeyPatch.context() as m:
            signed_in(m, user, password)
            start = time.monotonic()
            code, _, err = cli(monkeypatch, capsys, alices_sweep, small_corpus, train_cli.main,
                               [*TINY_GPT, "logger.experiment_name=team",
                                f"logger.tracking_uri={team.uri}"])
            took = time.monotonic() - start
        one_line_error(code, err, *words)
        assert took < 5, took
        assert (password or PASSWORDS[user]) not in err
    # no credentials at all
    code, _, err = cli(monkeypatch, capsys, alices_sweep, small_corpus, train_cli.main,
                       [*TINY_GPT, f"logger.tracking_uri={team.uri}"])
    one_line_error(code, err, "MLFLOW_TRACKING_USERNAME")
    # bob's refusals left no run behind, RUNNING or otherwise
    with pytest.MonkeyPatch.context() as m:
        signed_in(m, "alice")
        client = MlflowClient(team.uri)
        exp = client.get_experiment_by_name("team").experiment_id
        assert all(r.info.status == "FINISHED" for r in client.search_runs([exp]))


def test_no_password_is_recorded_anywhere(team, alices_sweep, postgres):
    dumps = b""
    for database in (team.backend_uri.rpartition("/")[2],
                     team.backend_uri.rpartition("/")[2] + "_auth"):
        dumps += subprocess.run(
            [str(postgres.bindir / "pg_dump"), "-h", str(postgres.folder), "-p",
             str(postgres.port), "-U", postgres.ADMIN, database],
            capture_output=True, check=True, **postgres.as_user).stdout
    assert b"CREATE TABLE" in dumps
    secrets = [*PASSWORDS.values(), ADMIN_PASSWORD]
    for secret in secrets:
        assert secret.encode() not in dumps, secret
    for folder in (alices_sweep, team.artifacts, team.cwd / "config"):
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.name.endswith(".pw"):
                data = path.read_bytes()
                for secret in secrets:
                    assert secret.encode() not in data, (secret, path)
    assert (team.cwd / "config" / "basic_auth.ini").stat().st_mode & 0o077 == 0
    assert (team.cwd / "config" / "flask_secret_key").stat().st_mode & 0o077 == 0


def test_the_server_refuses_to_start_open_or_without_its_admin(postgres, tmp_path):
    with postgres.admin() as conn:
        conn.execute(f"ALTER ROLE {postgres.USER} CREATEDB")
    (tmp_path / "default.pw").write_text("password1234")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    for args, words in (
            (["--host", "0.0.0.0", "--no-auth"], ["--no-auth", "loopback"]),
            (["--admin-password-file", str(tmp_path / "missing.pw")], ["not found"]),
            (["--admin-password-file", str(tmp_path / "default.pw")], ["old default"]),
            ([], ["--admin-password-file", "MLFLOW_AUTH_ADMIN_PASSWORD"])):
        res = subprocess.run([str(BIN / "gptlab-server"), postgres.create_database(False),
                              "--port", str(free_port()), "--config-dir", str(tmp_path),
                              *args], capture_output=True, text=True, env=env, timeout=60)
        one_line_error(res.returncode, res.stderr, *words)
