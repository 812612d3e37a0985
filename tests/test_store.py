"""The store's faults are bounded: one trainer per run, processes starting at once, a store
that cannot be written, a full disk, and a tracking server that goes away mid-run (a team's
server: `gptlab-server` over a real PostgreSQL, artifacts uploaded through it)."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    TINY_GPT,
    call_main,
    cli_env,
    copy_run,
    mlflow_server,
    only_run,
    steps_of,
    store_uri,
    wait_until,
)
from gptlab.cli import train as train_cli
from gptlab.tracking import store


def popen_train(tmp: Path, corpus: Path, args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "gptlab-train"), *args], cwd=tmp,
                            env={**cli_env(tmp, corpus), "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_lock_is_held_while_its_process_lives(tmp_path):
    uri = store_uri(tmp_path)
    lock = store.RunLock(uri, "abc")
    assert lock.acquire()
    assert store.run_lock_held(uri, "abc")
    assert not store.RunLock(uri, "abc").acquire()
    lock.release()
    assert not store.run_lock_held(uri, "abc")


def test_a_run_being_trained_cannot_be_resumed_until_its_process_dies(tmp_path, small_corpus,
                                                                      in_process, capsys):
    # the run is trained by a process of its own; the resumes are tried in this process
    proc = popen_train(tmp_path, small_corpus, [
        *TINY_GPT, "trainer.max_steps=100000", "trainer.val_check_interval=20",
        "logger.experiment_name=busy", "+callbacks.pace._target_=interrupt.Pace",
        "+callbacks.pace.seconds=0.01"])
    try:
        wait_until(lambda: list((tmp_path / "mlruns").rglob("checkpoints/step_*.ckpt"))
                   or proc.poll() is not None, 120, "a checkpoint")
        client = MlflowClient(store_uri(tmp_path))
        run = only_run(client, "busy")
        for target in (run.info.run_id, "latest"):
            code, _, err = in_process(train_cli.main, [f"resume={target}",
                                                       "logger.experiment_name=busy"], capsys)
            assert code == 2 and "Traceback" not in err
            assert ("being trained by" in err if target != "latest"
                    else "no unfinished run to resume" in err), err
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    step = max(steps_of(client, run.info.run_id))
    code, _, err = in_process(train_cli.main, ["resume=latest", "logger.experiment_name=busy",
                                               f"trainer.max_steps={step + 5}"], capsys)
    assert code == 0, err[-2000:]
    assert steps_of(client, run.info.run_id) == list(range(10, step + 6, 10))


def test_two_runs_started_at_once_share_a_fresh_store(tmp_path, small_corpus):
    procs = [popen_train(tmp_path, small_corpus, [*TINY_GPT, "logger.experiment_name=twins",
                                                  "trainer.max_steps=5"]) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    client = MlflowClient(store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("twins").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]


def _log_datasets_at_once(uri: str, run_id: str, barrier, errors) -> None:
    from mlflow.entities import Dataset

    client = MlflowClient(uri)
    for digest in DIGESTS:
        dataset = Dataset(name="corpus", digest=digest, source_type="local", source="/c.txt")
        barrier.wait()
        try:
            store.log_dataset(client, run_id, dataset)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.put(str(e)[:300])


DIGESTS = [f"d{i}" for i in range(5)]


def test_processes_logging_a_new_dataset_at_once_all_link_it(tmp_path):
    """Jobs starting together log the same corpus as a new dataset of their experiment at the
    same moment; MLflow adds it in two steps, so all but one collide on its key."""
    import multiprocessing

    uri = store_uri(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment("twins")
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(len(runs)), ctx.Queue()
    procs = [ctx.Process(target=_log_datasets_at_once, args=(uri, r, barrier, errors))
             for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert errors.empty(), errors.get()
    for r in runs:
        linked = client.get_run(r).inputs.dataset_inputs
        assert sorted(d.dataset.digest for d in linked) == DIGESTS


@pytest.fixture
def read_only_store(tmp_path, tiny_run):
    """A store with one run (a copy of the suite's tiny run) on a file system then made
    read-only (tmpfs, as root)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a file system needs root")
    try:
        copy_run(tiny_run, mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_store_that_cannot_be_written_is_one_line_within_seconds(read_only_store, tmp_path,
                                                                   in_process, capsys):
    before = set(tmp_path.rglob("*.ckpt"))
    start = time.time()
    code, _, err = in_process(train_cli.main, [
        *TINY_GPT, f"logger.tracking_uri={store_uri(read_only_store)}"], capsys)
    assert time.time() - start < 30
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: the MLflow store at {read_only_store / 'mlruns'} cannot be "
                     "written: Read-only file system"], err
    assert set(tmp_path.rglob("*.ckpt")) == before  # nothing was trained


def test_a_full_disk_fails_the_run_with_the_reason(tmp_path, small_corpus):
    """Files may not grow past the store's size plus 4 MB: the store's small writes go on,
    the checkpoints of this model (about 20 MB) cannot be written."""
    store.connect(store_uri(tmp_path))  # the store's tables, made before the limit
    limit = (tmp_path / "mlruns" / "mlflow.db").stat().st_size + 4 * 2**20

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [*TINY_GPT, "model.n_layer=2", "model.n_embd=256", "logger.experiment_name=full"]
    res = subprocess.run([str(BIN / "gptlab-train"), *args], cwd=tmp_path,
                         env=cli_env(tmp_path, small_corpus), capture_output=True, text=True,
                         timeout=300, preexec_fn=limit_file_size)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: File too large")
    run = only_run(MlflowClient(store_uri(tmp_path)), "full")
    assert run.info.status == "FAILED"
    assert run.data.tags["gptlab.error"].startswith("File too large")
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written is left


def api(uri: str, path: str) -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}", timeout=10) as r:
        return json.loads(r.read())


def logged_checkpoint(server, experiment: str) -> bool:
    try:
        exp = api(server.uri, f"experiments/get-by-name?experiment_name={experiment}")
        runs = MlflowClient(server.uri).search_runs([exp["experiment"]["experiment_id"]])
        return bool(runs and store.artifact_names(MlflowClient(server.uri),
                                                  runs[0].info.run_id, "checkpoints"))
    except OSError:
        return False


def outage_run(pace: float) -> list[str]:
    """A run of 100 steps, each logged, validated and checkpointed every 20, slowed down to
    `pace` seconds a step so that the server can go away while it trains."""
    return [*TINY_GPT, "trainer.max_steps=100", "trainer.val_check_interval=20",
            "trainer.log_every_n_steps=1", "+callbacks.pace._target_=interrupt.Pace",
            f"+callbacks.pace.seconds={pace}"]


@dataclass
class Outage:
    server: object
    folders: dict[str, Path]
    results: dict[str, tuple[int, str]]  # (exit code, stderr) of each run
    gone_after: float  # seconds from the server's going away to `gone` stopping
    training_went_on: bool  # `outage` was still training once `gone` had stopped


@pytest.fixture(scope="module")
def outage(tmp_path_factory, small_corpus, postgres) -> Iterator[Outage]:
    """A team's server goes away while two runs train through it, and comes back after they
    have logged a checkpoint (PostgreSQL stays up, as a team's database would): `outage`
    waits for it (logger.outage_timeout is 10 minutes), `gone` gives up after 1 s. One
    outage, of the same server process stopped and started again, serves both tests."""
    with pytest.MonkeyPatch.context() as m:
        # MLflow's job runner (GenAI scoring jobs, a process of its own), which runs no part
        # of this, would only slow down every start of the server
        m.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        yield from outage_through(tmp_path_factory, small_corpus, postgres)


def outage_through(tmp_path_factory, small_corpus, postgres) -> Iterator[Outage]:
    with mlflow_server(tmp_path_factory.mktemp("outage-server"), postgres) as server:
        folders = {name: tmp_path_factory.mktemp(name) for name in ("outage", "gone")}
        # `gone` goes slower: it must still be training when it gives up
        runs = {"outage": outage_run(0.1),
                "gone": [*outage_run(0.2), "logger.outage_timeout=1"]}
        procs = {name: popen_train(folders[name], small_corpus, [
            *args, f"logger.tracking_uri={server.uri}", f"logger.experiment_name={name}"],
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="0") for name, args in runs.items()}
        try:
            for name, proc in procs.items():
                wait_until(lambda name=name, proc=proc: logged_checkpoint(server, name)
                           or proc.poll() is not None, 120, f"the first checkpoint of {name}")
            server.stop()
            start = time.time()
            results = {"gone": procs["gone"].communicate(timeout=120)}
            gone_after = time.time() - start
            training_went_on = procs["outage"].poll() is None
            server.start()
            results["outage"] = procs["outage"].communicate(timeout=300)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=60)
        yield Outage(server, folders,
                     {n: (procs[n].returncode, err) for n, (_, err) in results.items()},
                     gone_after, training_went_on)


@pytest.mark.slow  # 15 s or more
def test_a_server_away_for_a_while_loses_nothing(outage):
    code, err = outage.results["outage"]
    assert outage.training_went_on  # while the server was away
    assert code == 0, err[-3000:]
    client = MlflowClient(outage.server.uri)
    run = only_run(client, "outage")
    assert run.info.status == "FINISHED"
    assert steps_of(client, run.info.run_id) == list(range(1, 101))
    assert steps_of(client, run.info.run_id, "val/loss") == [20, 40, 60, 80, 100]
    # checkpoints taken while the server was away gave way to newer ones; the newest is
    # there, and at most `checkpoint.keep` of them
    names = store.artifact_names(client, run.info.run_id, "checkpoints")
    assert names[-1] == "step_000100.ckpt" and len(names) <= 3  # the newest two, the best


def test_a_server_away_too_long_stops_the_run_resumable_later(outage, small_corpus,
                                                              monkeypatch, capsys):
    code, err = outage.results["gone"]
    folder = outage.folders["gone"]
    assert outage.gone_after < 60
    assert code == 2 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "has not answered" in errors[0], err
    assert "resume=" in err
    assert list(folder.glob("outputs/*/*/checkpoints/step_*.ckpt"))
    client = MlflowClient(outage.server.uri)
    run = only_run(client, "gone")
    # resumed in this process, in the same folder, once the server is back
    capsys.readouterr()
    code = call_main(monkeypatch, folder, small_corpus, train_cli.main, [
        f"resume={run.info.run_id}", f"logger.tracking_uri={outage.server.uri}",
        "+callbacks.pace.seconds=0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert steps_of(client, run.info.run_id) == list(range(1, 101))
    # the older checkpoints were pruned through the server (MLflow's artifact repository)
    names = store.artifact_names(client, run.info.run_id, "checkpoints")
    best = client.get_run(run.info.run_id).data.tags["gptlab.best_checkpoint"]
    assert names == sorted({best, "step_000080.ckpt", "step_000100.ckpt"})
