"""Optuna studies that many processes share: the search space, the storage, claiming trials.

A search (`hparams_search=...`) is an Optuna study kept in a database: a SQLite file by
default, the team's PostgreSQL when `hydra.sweeper.storage=postgresql://...`. Any number of
`gptlab-train` processes, on any machines that reach the storage, started at any time with the
same study name, work on the one study: each claims trials under a lock held across processes
(a file lock beside a SQLite file, an advisory lock in PostgreSQL), so that no trial is run
twice and `n_trials` is a total. A search stopped by a signal tells Optuna its trials were
interrupted, and a later start runs them again; one started again continues the study.

The sweeper that drives this from Hydra is in hydra_plugins/gptlab_study_sweeper.py (Hydra
loads plugins only from that namespace); this module holds what it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from gptlab import files, project_root
from gptlab.errors import GptlabError
from gptlab.sweeps import multirun
from gptlab.tracking import store

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

SPACE_ATTR = "gptlab.search_space"  # the study's search space, to refuse a different one
PROCESSES_ATTR = "gptlab.processes"  # how many processes joined: each seeds its sampler apart
INTERRUPTED_ATTR = "gptlab.interrupted"  # a trial stopped by a signal: to be run again
PARENT_ATTR = "gptlab.mlflow_parent"  # the study's parent run, per tracking store


def distribution(key: str, value: str) -> BaseDistribution | None:
    """An Optuna distribution from Hydra's sweep syntax, or None for a fixed value:
    `interval(a, b)` (a float; `tag(log, ...)` on a log scale, `tag(int, ...)` an integer),
    `range(a, b[, step])` (integers a..b-1), `choice(x, y)` or `x,y` (categorical)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    try:
        (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
    except Exception as e:  # noqa: BLE001 - Hydra's parser errors name the bad text
        raise GptlabError(f"search space: cannot read {key}={value}: {e}") from None
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    log = "log" in sweep.tags
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise GptlabError(f"search space: {key}: interval needs low < high, got {value}")
        if log and low <= 0:
            raise GptlabError(f"search space: {key}: a log scale needs low > 0, got {value}")
        if "int" in sweep.tags:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values) and len(values) > 1:
            return IntDistribution(values[0], values[-1], step=values[1] - values[0], log=log)
        return CategoricalDistribution(values)
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    raise GptlabError(f"search space: {key}={value} is not a sweep Optuna can sample")


def search_space(params: dict[str, str], arguments: list[str]
                 ) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The distributions to sample (`hydra.sweeper.params`, and sweeps given on the command
    line) and the overrides every trial shares."""
    space: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for key, value in (params or {}).items():
        dist = distribution(key, str(value))
        if dist is None:
            fixed.append(f"{key}={value}")
        else:
            space[key] = dist
    for arg in arguments:
        key, _, value = arg.partition("=")
        dist = distribution(key, value) if "=" in arg else None
        if dist is None:
            fixed.append(arg)
        else:
            space[key] = dist
    if not space:
        raise GptlabError("the search has nothing to search: give hydra.sweeper.params "
                          "(e.g. optim.lr: tag(log, interval(1e-4, 1e-2)))")
    return space, fixed


def storage_url(storage: str | None, tracking_uri: str | None = None) -> str:
    """The study storage's SQLAlchemy URL: by default optuna.db beside the MLflow store
    (SQLite) or in mlruns/; else a SQLite file (its folder made), or PostgreSQL through
    psycopg 3 (`postgresql://` alone would ask SQLAlchemy for psycopg2)."""
    if storage is None:
        db = store.sqlite_path(store.resolve_tracking_uri(tracking_uri))
        folder = db.parent if db is not None else project_root() / "mlruns"
        storage = f"sqlite:///{folder / 'optuna.db'}"
    url = storage
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return url
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if scheme.startswith("postgresql+"):
        return url
    raise GptlabError(f"study storage {url!r}: use sqlite:///<file> or "
                      "postgresql://user:password@host:port/database")


def _shown(url: str) -> str:
    """A storage URL without its password, for messages."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def open_study(name: str, storage: str, direction: str,
               space: dict[str, BaseDistribution]) -> optuna.Study:
    """The study of this name in the storage, created if new. One that exists must search
    the same space in the same direction: trials of two searches would not compare."""
    import optuna
    import sqlalchemy.exc
    from optuna.distributions import distribution_to_json

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if direction not in ("minimize", "maximize"):
        raise GptlabError(f"hydra.sweeper.direction must be minimize or maximize, "
                          f"not {direction!r}")
    try:
        # under the lock: processes opening a new storage at once would each create its
        # tables, and all but one fail
        with lock(name, storage):
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage))
            study = optuna.create_study(study_name=name, storage=rdb, direction=direction,
                                        load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise GptlabError(f"cannot open the study storage {_shown(storage)}: {reason}"
                          ) from None
    wanted = {k: json.loads(distribution_to_json(d)) for k, d in space.items()}
    existing = study.user_attrs.get(SPACE_ATTR)
    if existing is None:
        study.set_user_attr(SPACE_ATTR, wanted)
    elif existing != wanted:
        raise GptlabError(f"study {name!r} in {_shown(storage)} searches another space "
                          f"({_space_text(existing)}), not {_space_text(wanted)}: choose "
                          "another hydra.sweeper.study_name")
    if study.direction.name.lower() != direction:
        raise GptlabError(f"study {name!r} in {_shown(storage)} was made to "
                          f"{study.direction.name.lower()}, not to {direction}: choose another "
                          "hydra.sweeper.study_name")
    return study


def _engine_kwargs(storage: str) -> dict[str, Any]:
    # a database that does not answer must fail in seconds, not hang the search
    if storage.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}}
    return {"connect_args": {"timeout": 60}}  # SQLite: wait for another process's write


def _space_text(space: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v['name']}{v['attributes']}" for k, v in sorted(space.items()))


@contextlib.contextmanager
def lock(name: str, storage: str) -> Iterator[None]:
    """Held while a process claims trials or decides that the study is done, across every
    process that shares the study: a file lock beside a SQLite file, an advisory lock (keyed
    by the study's name) in PostgreSQL."""
    if storage.startswith("sqlite"):
        with files.file_lock(Path(storage.removeprefix("sqlite:///") + ".lock")):
            yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big",
                         signed=True)
    engine = sqlalchemy.create_engine(storage, **_engine_kwargs(storage))
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def open_parent(study: optuna.Study, config: Any) -> str | None:
    """The study's MLflow parent run: the one it names for this tracking store, else a new
    one it will name (call under `lock`, so that processes starting together share one)."""
    parents = dict(study.user_attrs.get(PARENT_ATTR, {}))
    uri = store.resolve_tracking_uri(config.logger.tracking_uri)
    opened = multirun.open_parent(config, study=study.study_name, run_id=parents.get(uri))
    if opened is None:
        return None
    run_id, _ = opened
    if parents.get(uri) != run_id:
        study.set_user_attr(PARENT_ATTR, {**parents, uri: run_id})
    return run_id


def counted(study: optuna.Study) -> int:
    """Trials that count towards `n_trials`: all but those interrupted by a signal (those
    are run again). A trial that failed counts: a search whose every trial fails ends."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR)))


def running(study: optuna.Study, besides: set[int] = frozenset()) -> int:
    """Trials running now, those numbered `besides` (this process's own) aside."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.number not in besides)


def claim(study: optuna.Study, space: dict[str, BaseDistribution], n_trials: int,
          n_jobs: int) -> list[optuna.Trial]:
    """The next trials for this process, at most n_jobs, so that the study holds at most
    n_trials (call under `lock`: then their numbers follow each other)."""
    n = min(n_jobs, n_trials - counted(study))
    return [study.ask(space) for _ in range(max(n, 0))]


def join(study: optuna.Study) -> int:
    """This process's place among those that joined the study (call under `lock`): each
    seeds its sampler with seed + place, so two processes do not propose the same values."""
    place = int(study.user_attrs.get(PROCESSES_ATTR, 0))
    study.set_user_attr(PROCESSES_ATTR, place + 1)
    return place


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None,
         interrupted: bool = False) -> None:
    """A trial's result: its value, or failed (a job that failed or was stopped)."""
    from optuna.trial import TrialState

    if interrupted:
        trial.set_user_attr(INTERRUPTED_ATTR, True)
    if value is not None and math.isfinite(value):
        study.tell(trial, value)
    else:
        study.tell(trial, state=TrialState.FAIL)
