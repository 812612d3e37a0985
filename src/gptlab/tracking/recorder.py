"""Recording a run without making training wait on the store.

One worker thread makes the run's writes to MLflow (metric batches, tags, texts, checkpoint
files) in the order they were handed over, so a checkpoint is never recorded ahead of the
metrics of the steps before it. MLflow's own asynchronous logging is not used: it drops a
batch once its HTTP retries run out, and gptlab must lose nothing while a tracking server is
briefly away. Here a write that fails because the server cannot be reached is retried, with
growing waits, for `outage_timeout` seconds while training goes on and later records queue
up behind it (at most `max_points` metric points); past that the recorder gives up, training
stops at its next step, and what was not sent is saved to a local file that `resume` sends.
A write that fails for any other reason (a full disk, a store that refuses it) is a failure
of the run.
"""

from __future__ import annotations

import collections
import enum
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from gptlab.errors import GptlabError, first_line

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
SPOOL_NAME = "unsent.jsonl"
# what can wait in a local file until the store is back: plain data, not actions
SPOOLABLE = ("metrics", "tag", "text")


def is_outage(e: BaseException) -> bool:
    """Whether a failed write may succeed later: the server could not be reached, timed out,
    or answered with a server-side error; or SQLite was busy with another writer."""
    if isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    text = str(e)
    # another process's write held a SQLite store for longer than MLflow's busy timeout, or
    # SQLite refused to wait (two writers each holding what the other needs); MLflow wraps
    # it in an MlflowException, so this comes before the checks of MLflow's own errors
    if "database is locked" in text:
        return True
    if isinstance(e, RestException):
        return e.get_http_status_code() >= 500
    if isinstance(e, MlflowException):
        return text.startswith("API request to") and (
            "failed with exception" in text or "timeout" in text
            or "failed with error code 5" in text)
    return False


@dataclass(eq=False)
class Record:
    """One write: `kind` names it, `args` are its data (plain values for spoolable kinds)."""

    kind: str
    args: tuple
    points: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> str:
        kind, args = self.kind, self.args
        if kind == "metrics":
            args = ([[m.key, m.value, m.timestamp, m.step] for m in args[0]],)
        return json.dumps({"kind": kind, "args": list(args)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Record:
        obj = json.loads(line)
        args = tuple(obj["args"])
        if obj["kind"] == "metrics":
            args = ([Metric(*m) for m in args[0]],)
        return cls(obj["kind"], args, points=len(args[0]) if obj["kind"] == "metrics" else 0)


class State(enum.Enum):
    """Where the recorder stands with the store."""

    WRITING = "writing"  # each write is made as soon as the ones before it are
    OUTAGE = "outage"  # the store does not answer: the first write is retried, others queue
    GAVE_UP = "gave up"  # away past outage_timeout, or too much queued: nothing more is sent


class Recorder:
    """The run's writes, made in order by one worker thread: WRITING while the store
    answers, OUTAGE from the first write it leaves unanswered until one succeeds, GAVE_UP
    (for good) once an outage lasts past `outage_timeout` or queues more than `max_points`."""

    def __init__(self, client: MlflowClient, outage_timeout: float = 600.0,
                 max_points: int = 200_000, retry_wait: tuple[float, float] = (0.5, 5.0)):
        self.client, self.run_id = client, None
        self.outage_timeout, self.max_points = outage_timeout, max_points
        # retries of an unanswered write are spaced out, but never so far that the timeout
        # is overshot by much
        self.retry_wait = (retry_wait[0], min(retry_wait[1], max(retry_wait[0],
                                                                  outage_timeout / 5)))
        self.error: BaseException | None = None  # the first write that failed for good
        self.state = State.WRITING
        self.outage_since: float | None = None  # when the outage began
        self._queue: collections.deque[Record] = collections.deque()
        self._points = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def attach(self, run_id: str) -> None:
        self.run_id = run_id

    # -- the training thread's side ------------------------------------------------------------
    def submit(self, kind: str, *args: Any) -> Record:
        """Queue a write; returns its record, whose `done` event is set once it is made."""
        record = Record(kind, args, points=len(args[0]) if kind == "metrics" else 0)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="gptlab-recorder",
                                                daemon=True)
                self._thread.start()
            self._queue.append(record)
            self._points += record.points
            if self._points > self.max_points and self.state is State.OUTAGE:
                self.state = State.GAVE_UP
            self._cond.notify_all()
        return record

    def metrics(self, metrics: list[Metric]) -> None:
        if metrics:
            self.submit("metrics", metrics)

    def cancel(self, record: Record) -> bool:
        """Take a write back if it has not started."""
        with self._cond:
            if record in self._queue and self._queue[0] is not record:
                self._queue.remove(record)
                self._points -= record.points
                return True
        return False

    @property
    def in_outage(self) -> bool:
        """Whether the store has left a write unanswered (and not answered one since)."""
        return self.state is not State.WRITING

    @property
    def gave_up(self) -> bool:
        return self.state is State.GAVE_UP

    def check(self) -> None:
        """Raise what stops the run: a write that failed for good, or a store away too long."""
        if self.error is not None:
            raise GptlabError(f"recording to the MLflow store failed: {first_line(self.error)}"
                              ) from self.error
        if self.gave_up:
            since = self.outage_since or time.monotonic()
            raise StoreAway(self.client.tracking_uri, time.monotonic() - since)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is made (or the recorder gave up); True if all were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue and not self.gave_up:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
            return not self._queue

    def close(self, timeout: float | None = None) -> bool:
        done = self.drain(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        return done

    def spool(self, path: Path) -> int:
        """Save the writes not made that can wait (metrics, tags, texts) to `path`; returns
        how many metric points it holds."""
        with self._cond:
            records = [r for r in self._queue if r.kind in SPOOLABLE]
        # written even when empty: it also marks the local checkpoints as safe to resume from
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(r.to_json() + "\n")
        return sum(r.points for r in records)

    def replay(self, path: Path) -> int:
        """Queue the writes a spool file holds; returns their metric points."""
        records = [Record.from_json(line) for line in path.read_text(encoding="utf-8")
                   .splitlines() if line.strip()]
        for r in records:
            self.submit(r.kind, *r.args)
        return sum(r.points for r in records)

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        wait = self.retry_wait[0]
        while (record := self._next()) is not None:
            try:
                self._write(record)
            except Exception as e:  # noqa: BLE001 - sorted into outage or failure below
                if is_outage(e):
                    if self._unanswered():
                        time.sleep(wait)
                        wait = min(2 * wait, self.retry_wait[1])
                    continue
                if self.error is None:  # a failure of the run; the writes after it go on
                    self.error = e
            wait = self.retry_wait[0]
            self._made(record)

    def _next(self) -> Record | None:
        """The first write in the queue, once there is one to make; None once closed with
        nothing left to make (or given up)."""
        with self._cond:
            while not self._queue or self.state is State.GAVE_UP:
                if self._closing:
                    return None
                self._cond.wait()
            return self._queue[0]

    def _unanswered(self) -> bool:
        """The store left a write unanswered: an outage begins or goes on, and past
        `outage_timeout` the recorder gives up. Whether to try the write again."""
        now = time.monotonic()
        with self._cond:
            if self.state is State.WRITING:
                self.state, self.outage_since = State.OUTAGE, now
            if now - self.outage_since > self.outage_timeout:
                self.state = State.GAVE_UP
                self._cond.notify_all()
                return False
        return True

    def _made(self, record: Record) -> None:
        """A write made (or failed for good): off the queue; an outage, if any, is over."""
        with self._cond:
            if self.state is State.OUTAGE:
                self.state, self.outage_since = State.WRITING, None
            self._queue.popleft()
            self._points -= record.points
            record.done.set()
            self._cond.notify_all()

    def _write(self, record: Record) -> None:
        kind, args = record.kind, record.args
        if kind == "metrics":
            metrics = args[0]
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        elif kind == "tag":
            self.client.set_tag(self.run_id, *args)
        elif kind == "text":
            self.client.log_text(self.run_id, *args)
        elif kind == "call":
            args[0](*args[1:])
        else:
            raise ValueError(f"unknown record kind {kind!r}")


class StoreAway(GptlabError):
    """The tracking store could not be reached for longer than the run may wait."""

    def __init__(self, uri: str, seconds: float):
        super().__init__(f"the MLflow tracking store at {uri} has not answered for "
                         f"{seconds:.0f} s")


class RunLogger(Logger):
    """Lightning logger writing to one MLflow run through its Recorder.

    Metrics are buffered and handed to the recorder in batches: before every checkpoint, every
    `flush_secs` seconds so the UI follows a live run, and at the end. A step never waits on
    the store. On resume, points at or below the last step already recorded for a metric are
    skipped, so a step computed again is not recorded twice.
    """

    def __init__(self, recorder: Recorder, flush_secs: float = 15.0,
                 recorded: Mapping[str, int] | None = None):
        super().__init__()
        self.recorder, self.flush_secs = recorder, flush_secs
        self._buffer: list[Metric] = []
        self._flushed_at = time.monotonic()
        self.recorded = dict(recorded or {})

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str | None:
        return self.recorder.run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        return self.recorder.client

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        pass  # the run's params are chosen and logged when it opens

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts, step = int(time.time() * 1000), step or 0
        for k, v in metrics.items():
            if k == "epoch" or step <= self.recorded.get(k, -1):
                continue
            self._buffer.append(Metric(k, float(v), ts, step))
        if time.monotonic() - self._flushed_at >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        metrics, self._buffer = self._buffer, []
        self.recorder.metrics(metrics)

    @rank_zero_only
    def save(self) -> None:
        pass  # Lightning calls this after every log_metrics: flushing here would undo the batching

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.flush()  # the run's status is gptlab's to set, once everything is recorded

