"""The recorder: writes in order, a store that goes away is waited for, then given up on with
what was not sent kept in a file that a later run sends."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from mlflow.entities import Metric

from gptlab.errors import GptlabError
from gptlab.tracking.recorder import Recorder, StoreAway


class FakeClient:
    """Records what it is asked to write; `down` makes every write fail as an unreachable
    server does."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self):
        self.points: list[tuple[str, int]] = []
        self.tags: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.down = False
        self.fail_with: Exception | None = None
        self.fail_steps: set[int] = set()

    def _check(self):
        if self.down:
            raise requests.exceptions.ConnectionError("connection refused")
        if self.fail_with is not None:
            raise self.fail_with

    def log_batch(self, run_id, metrics=()):
        self._check()
        if any(m.step in self.fail_steps for m in metrics):
            raise OSError(28, "No space left on device")
        self.points += [(m.key, m.step) for m in metrics]

    def set_tag(self, run_id, key, value):
        self._check()
        self.tags[key] = value

    def log_text(self, run_id, text, path):
        self._check()
        self.texts[path] = text


def metrics(*steps: int) -> list[Metric]:
    return [Metric("train/loss", 1.0, 0, s) for s in steps]


def make(client: FakeClient, timeout: float = 30.0) -> Recorder:
    rec = Recorder(client, outage_timeout=timeout, retry_wait=(0.01, 0.05))
    rec.attach("run")
    return rec


def test_writes_happen_in_the_order_given():
    client = FakeClient()
    rec, order = make(client), []
    for i in range(50):
        rec.metrics(metrics(i))
        rec.submit("call", order.append, i)
    assert rec.close(timeout=10)
    assert client.points == [("train/loss", i) for i in range(50)]
    assert order == list(range(50))


def test_a_store_that_comes_back_loses_nothing():
    client = FakeClient()
    rec = make(client)
    client.down = True
    for i in range(20):
        rec.metrics(metrics(i))
    time.sleep(0.2)
    assert rec.in_outage and client.points == []
    rec.check()  # waiting is not failing
    client.down = False
    assert rec.close(timeout=10)
    assert client.points == [("train/loss", i) for i in range(20)]
    assert not rec.in_outage and rec.error is None


def test_a_store_away_too_long_is_given_up_and_the_rest_spooled(tmp_path):
    client = FakeClient()
    rec = make(client, timeout=0.2)
    rec.metrics(metrics(1, 2))
    rec.submit("tag", "k", "v")
    assert rec.drain(timeout=10)
    client.down = True
    rec.metrics(metrics(3, 4))
    rec.submit("text", "hello", "samples/a.txt")
    deadline = time.time() + 10
    while not rec.gave_up and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreAway, match="has not answered"):
        rec.check()
    assert not rec.close(timeout=1)
    spool = tmp_path / "unsent.jsonl"
    assert rec.spool(spool) == 2
    # a later run (the store back) sends exactly what was kept, in order
    client.down = False
    later = make(client)
    assert later.replay(spool) == 2
    assert later.close(timeout=10)
    assert client.points == [("train/loss", s) for s in (1, 2, 3, 4)]
    assert client.texts == {"samples/a.txt": "hello"}


def test_a_write_that_fails_for_good_is_a_failure_of_the_run():
    client = FakeClient()
    rec = make(client)
    client.fail_steps = {1}
    rec.metrics(metrics(1))
    rec.metrics(metrics(2))
    assert rec.close(timeout=10)
    assert client.points == [("train/loss", 2)]  # later writes still happen
    with pytest.raises(GptlabError, match="No space left on device"):
        rec.check()


def test_cancel_takes_back_a_write_not_started():
    client = FakeClient()
    rec = make(client)
    gate = threading.Event()
    rec.submit("call", gate.wait)
    record = rec.submit("call", lambda: client.points.append(("never", 0)))
    assert rec.cancel(record)
    gate.set()
    assert rec.close(timeout=10)
    assert client.points == []


@pytest.mark.slow  # 15 s or more
def test_a_sqlite_store_locked_by_another_process_is_waited_for(tmp_path):
    """Processes sharing a SQLite store (a sweep's parallel jobs, a shared study) lock it in
    turn; a write that finds it locked for longer than MLflow waits is retried, not a failure
    of the run."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    rec = Recorder(client, outage_timeout=120, retry_wait=(0.2, 1.0))
    rec.attach(run_id)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # as a writer in another process holds it
    rec.metrics(metrics(1, 2))
    # MLflow waits 20 s for a locked SQLite database, then raises
    deadline = time.time() + 60
    while not rec.in_outage and time.time() < deadline:
        time.sleep(0.2)
    assert rec.in_outage and rec.error is None
    other.execute("COMMIT")
    other.close()
    rec.metrics(metrics(3))
    assert rec.close(timeout=60)
    rec.check()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
