"""The MLflow tracking store: where it is, reaching it, and reading and writing what runs hold.

Everything gptlab reads from or writes to MLflow goes through MLflow's client API, so a
remote tracking server works as well as the embedded SQLite store under mlruns/.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from filelock import FileLock
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from gptlab import project_root
from gptlab.errors import GptlabError, first_line, refusal, tracking_user
from gptlab.files import check_writable, file_lock, try_lock

# MLflow's own progress bars for downloads are noise in a training log; a user's setting wins
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow speaks at INFO (creating tables, ...); gptlab tells its users what matters itself
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

T = TypeVar("T")
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else the SQLite store in mlruns/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go in artifacts/ beside the database file."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").as_uri()


def git_commit() -> str | None:
    """The checkout's commit, recorded with each run and checkpoint."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(),
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# the statuses gptlab sets and searches for, as MLflow spells them
FINISHED, FAILED, KILLED, RUNNING = (RunStatus.to_string(s) for s in (
    RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED, RunStatus.RUNNING))

# config keys that say where or how a run is recorded, shown or kept, not what it trains:
# left out of run names and of the params runs are compared by, and (but for the corpus's
# path: another corpus is another training) free to change when a run is resumed
NOT_TRAINING = ("logger", "hydra", "callbacks", "checkpoint", "resume", "trainer.enable_",
                "trainer.log_every_n_steps", "data.path", "data.cache_dir", "data.pin_memory")


def changes_training(key: str) -> bool:
    return not any(key == k or key.startswith(f"{k}.") or (k.endswith("_") and key.startswith(k))
                   for k in NOT_TRAINING)


def use_quick_http_defaults() -> None:
    """MLflow retries a failing request for minutes by default (7 retries, growing waits);
    gptlab's own recorder retries a store that went away, so one request may fail sooner.
    A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _lock_dir(uri: str) -> Path:
    db = sqlite_path(uri)
    if db is not None:
        return db.parent / "locks"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "gptlab" / "locks" / hashlib.sha1(uri.encode()).hexdigest()[:12]


class RunLock:
    """Held by the process training a run, for as long as it lives: a second process cannot
    train the same run, and a process that died (even by SIGKILL) holds it no more."""

    def __init__(self, uri: str, run_id: str):
        self.path = _lock_dir(uri) / f"{run_id}.lock"
        self._lock: FileLock | None = None

    def acquire(self) -> bool:
        self._lock = try_lock(self.path)
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def run_lock_held(uri: str, run_id: str) -> bool:
    """Whether a process on this machine holds the run's lock now."""
    lock = RunLock(uri, run_id)
    if not lock.path.exists():
        return False
    if lock.acquire():
        lock.release()
        return False
    return True


def connect(uri: str | None = None) -> MlflowClient:
    """A client for the tracking store, checked once so that a bad store fails in seconds,
    before anything is trained or recorded."""
    uri = resolve_tracking_uri(uri)
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES and not Path(uri).is_absolute():
        raise GptlabError(f"unknown tracking URI scheme {scheme!r} in {uri} "
                          f"(use sqlite:///FILE, http://HOST:PORT or a folder)")
    use_quick_http_defaults()
    db = sqlite_path(uri)
    if db is None:
        client = MlflowClient(tracking_uri=uri)
        _first_look(client, uri)
        return client
    check_writable(db.parent, "the MLflow store at")
    check_writable(db.parent / "artifacts", "the MLflow store at")
    # a client of a new database creates its tables as it is made; two processes starting at
    # once would both try, and one would fail
    with file_lock(db.with_name(db.name + ".lock")):
        client = MlflowClient(tracking_uri=uri)
        _first_look(client, uri)
    return client


def _first_look(client: MlflowClient, uri: str) -> None:
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # an unreachable server fails at once
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        if said := refusal(e):
            raise GptlabError(said) from None
        raise GptlabError(f"cannot reach the MLflow tracking store at {uri}: "
                          f"{first_line(e)[:300]}") from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    location = None if root is None else f"{root}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
    try:
        # the UI then treats it as model training, and asks nobody which kind it is
        return client.create_experiment(name, artifact_location=location, tags={
            "mlflow.experimentKind": "custom_model_development"})
    except MlflowException:  # created meanwhile by a parallel job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def create_run(client: MlflowClient, experiment: str, run_name: str | None,
               tags: Mapping[str, str]) -> Run:
    """A new run in the experiment named `experiment` (made if there is none). On a team server
    making runs in another's experiment needs its EDIT permission: a refusal says so."""
    experiment_id = get_or_create_experiment(client, experiment)
    try:
        return client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except MlflowException as e:
        if getattr(e, "error_code", None) != "PERMISSION_DENIED":
            raise
        user = tracking_user()
        raise GptlabError(f"the tracking server refused user {user}: no EDIT permission on "
                          f"experiment {experiment} (its owner or an admin grants it: "
                          f"gptlab-server grant {user} {experiment} EDIT)") from None


UI_DEFAULT = "http://127.0.0.1:5000"  # where `make ui` serves a local store


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """A run's (or an experiment's) page in the MLflow UI, in its model-training view (the
    UI opens experiments in its GenAI view unless the address asks for this one)."""
    base = tracking_uri.rstrip("/") if is_remote(tracking_uri) else UI_DEFAULT
    path = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}{path}?workflowType=machine_learning" + (
        "" if is_remote(tracking_uri) else "  (make ui)")


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise GptlabError(f"no MLflow experiment named {name!r} (experiments: {known})")
    return exp.experiment_id


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise GptlabError(f"no MLflow run with id {run_id!r} in {client.tracking_uri}") from None


def search_runs(client: MlflowClient, experiment_name: str, filter_string: str = "",
                ) -> list[Run]:
    """The experiment's runs passing `filter_string`, newest first."""
    return client.search_runs([experiment_id(client, experiment_name)], filter_string,
                              order_by=["attributes.start_time DESC"], max_results=1000)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def again_on_collision(write: Callable[[], T]) -> T:
    """Make a write that another process may make at the same moment: MLflow adds a new tag,
    or a new dataset of an experiment, by looking it up and then inserting it, so the slower
    of two processes fails on the table's key. By then the row is there and a second try
    updates or links it; a real fault fails again and is raised."""
    try:
        return write()
    except MlflowException:
        return write()


def log_dataset(client: MlflowClient, run_id: str, dataset: Dataset,
                context: str = "training") -> None:
    """Link a dataset to the run (jobs starting together log the same new corpus at once)."""
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
    again_on_collision(lambda: client.log_inputs(run_id, datasets=inputs))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted.key: value}; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# -- artifacts ---------------------------------------------------------------------------------

@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary folder for downloaded artifacts, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="gptlab-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def artifact_names(client: MlflowClient, run_id: str, folder: str) -> list[str]:
    try:
        return sorted(Path(f.path).name for f in client.list_artifacts(run_id, folder))
    except Exception:  # noqa: BLE001 - an unreadable artifact store holds nothing for us
        return []


def local_artifact_dir(run: Run) -> Path | None:
    """Where a run's artifacts lie on this machine's disk, for a store on this machine."""
    uri = run.info.artifact_uri
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return None if "://" in uri or ":" in uri.split("/")[0] else Path(uri)


def delete_artifact(client: MlflowClient, run: Run, path: str) -> None:
    """Remove one artifact of a run. MLflow's client has no call for this: on this machine's
    disk the file is removed directly; elsewhere MLflow's artifact-repository registry (not in
    MLflow's documented API) gives the repository that can. tests/test_store.py fails if
    either stops working."""
    local = local_artifact_dir(run)
    if local is not None:
        (local / path).unlink(missing_ok=True)
        return
    get_artifact_repository(run.info.artifact_uri,
                            tracking_uri=client.tracking_uri).delete_artifacts(path)
