from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# prepared corpora of the suite's runs, in-process and in subprocesses, shared by the suite
# and kept out of the user's own cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gptlab-test-cache-")
# the suite never reaches the Hugging Face hub (tests read local files): a dataset that is
# not there fails at once instead of after a minute of retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def find_corpus() -> Path | None:
    for candidate in (os.environ.get("GPTLAB_DATA"),
                      ROOT.parent / "shared/data/tinyshakespeare/input.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def corpus() -> Path:
    path = find_corpus()
    if path is None:
        if os.environ.get("CI"):  # CI has the corpus beside the checkout: skipping would hide
            pytest.fail("Tiny Shakespeare not found beside the checkout nor in GPTLAB_DATA")
        pytest.skip("Tiny Shakespeare not found: set GPTLAB_DATA")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus) -> Path:
    """The first 20,000 characters of Tiny Shakespeare: every character class, fast to train."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


TINY_GPT = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
    "data.block_size=16", "data.batch_size=4", "data.eval_iters=2",
    "trainer.max_steps=20", "trainer.val_check_interval=10",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.sample.max_new_tokens=20", "callbacks.final_sample_tokens=30",
]


def store_uri(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"


def cli_env(tmp: Path, corpus: Path) -> dict[str, str]:
    # tests/ on the path: test-only callbacks (interrupt.SignalAt) load in the subprocess
    env = dict(os.environ, GPTLAB_DATA=str(corpus), MLFLOW_TRACKING_URI=store_uri(tmp),
               PYTHONPATH=str(ROOT / "tests"))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(tool: str, args: list[str], tmp: Path, corpus: Path, timeout: float = 300,
            env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a console script in a subprocess, in `tmp`, against the store under `tmp`."""
    return subprocess.run([str(BIN / tool), *args], cwd=tmp,
                          env=env if env is not None else cli_env(tmp, corpus),
                          capture_output=True, text=True, timeout=timeout, **kw)


def call_main(monkeypatch: pytest.MonkeyPatch, tmp: Path, corpus: Path, main, args: list[str]
              ) -> int:
    """A console script's main() in this process, in `tmp`, against the store under `tmp`
    (what run_cli does in a subprocess, without its start-up); returns the exit code."""
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("GPTLAB_DATA", str(corpus))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp))
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    # a sweep ended in this process earlier neither decides this exit code nor filters
    # this console as a sweep job's
    from gptlab import console
    from gptlab.sweeps import multirun
    monkeypatch.setattr(multirun, "results", [])
    monkeypatch.setattr(console, "_sweep", False)
    GlobalHydra.instance().clear()
    # Hydra configures logging for its job (logging.config.dictConfig, which disables every
    # logger that exists, `gptlab` among them, and adds its handlers to the root): put it
    # back, or the records of later tests in this process would go nowhere
    loggers = logging.Logger.manager.loggerDict
    disabled = {name: lg.disabled for name, lg in loggers.items()
                if isinstance(lg, logging.Logger)}
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        for name, lg in list(loggers.items()):
            if isinstance(lg, logging.Logger):
                lg.disabled = disabled.get(name, False)
        for handler in set(root.handlers) - set(root_handlers):
            handler.close()  # the job's log file
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
    return 0


def cli(monkeypatch: pytest.MonkeyPatch, capsys, tmp: Path, corpus: Path, main,
        args: list[str]) -> tuple[int, str, str]:
    """call_main, with what it printed: (exit code, stdout, stderr)."""
    code = call_main(monkeypatch, tmp, corpus, main, args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def in_process(monkeypatch, tmp_path, small_corpus):
    """Run a console script's main() in this process (no start-up cost); returns
    (exit code, stdout, stderr)."""

    def call(main, args: list[str], capsys) -> tuple[int, str, str]:
        return cli(monkeypatch, capsys, tmp_path, small_corpus, main, args)

    return call


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_corpus) -> tuple[Path, str]:
    """One finished tiny run (TINY_GPT, experiment `tiny`), trained in this process once for
    the whole suite, for tests that only read what a run records, sample or evaluate it:
    (its folder, whose mlruns/ holds the store; its run id). Tests must not change it: one
    that resumes or extends a run copies the folder (copy_run) or trains its own."""
    from gptlab.cli import train as train_cli

    tmp = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main,
                         [*TINY_GPT, "logger.experiment_name=tiny"])
    assert code == 0
    return tmp, only_run(MlflowClient(store_uri(tmp)), "tiny").info.run_id


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread while a module's tests run (`pytestmark =
    pytest.mark.usefixtures("one_thread")`): their models are tiny, so one thread is as fast,
    and far faster on a busy machine, where each step would wait for threads no core is free
    for."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A folder holding an empty MLflow store, made once, to copy (`seed`): making one costs
    seconds of MLflow's migrations, copying it hundredths."""
    from gptlab.tracking import store

    tmp = tmp_path_factory.mktemp("empty-store")
    store.connect(store_uri(tmp))
    return tmp


def seed(empty_store: Path, folder: Path) -> Path:
    """`folder` (made if need be) with a copy of the empty store: what a run's first
    connection would have made there."""
    return copy_run((empty_store, ""), folder)[0]


@pytest.fixture
def seeded(tmp_path, empty_store) -> Path:
    """tmp_path, where in_process runs, holding a copy of the empty store."""
    return seed(empty_store, tmp_path)


def copy_run(run: tuple[Path, str], to: Path) -> tuple[Path, str]:
    """A copy of a finished run's folder (its store, artifacts and outputs) to change freely:
    the store's absolute paths name the old folder, so they are rewritten."""
    src, run_id = run
    shutil.copytree(src, to, dirs_exist_ok=True)
    rewrite_paths(to / "mlruns" / "mlflow.db", [(str(src), str(to))])
    return to, run_id


def rewrite_paths(db: Path, places: list[tuple[str, str]]) -> None:
    """Replace each (old, new) path in every text column of an MLflow SQLite store: what a
    store moved to another folder or machine needs (artifact locations, tags)."""
    con = sqlite3.connect(db)
    with con:
        for (table,) in con.execute("select name from sqlite_master where type = 'table'"):
            for column in [c[1] for c in con.execute(f"pragma table_info({table})")
                           if c[2].upper().startswith(("VARCHAR", "TEXT"))]:
                for old, new in places:
                    con.execute(f"update {table} set {column} = replace({column}, ?, ?)",
                                (old, new))
    con.close()


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps_of(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def record_of(client: MlflowClient, experiment: str, tmp: Path) -> dict:
    """Everything a run recorded that must not depend on interruptions."""
    run = only_run(client, experiment)
    run_id = run.info.run_id
    out: dict = {"status": run.info.status}
    for key in sorted(run.data.metrics):
        if key.startswith("system/"):  # the machine's CPU, memory, ... sampled by the clock
            continue
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        # throughput is a timing: only its steps must match
        out[key] = [m.step if key == "tokens_per_sec" else (m.step, round(m.value, 6))
                    for m in history]
    out["samples"] = {Path(f.path).name: Path(client.download_artifacts(
        run_id, f.path, str(tmp / run_id))).read_text()
        for f in client.list_artifacts(run_id, "samples")}
    out["checkpoints"] = sorted(Path(f.path).name
                                for f in client.list_artifacts(run_id, "checkpoints"))
    return out


def one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def runs_in(tmp: Path) -> list:
    client = MlflowClient(store_uri(tmp))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, with artifacts uploaded through it; it can be
    stopped and started again on the same port, and is stopped by its pid (its process
    group: mlflow runs its workers as children). With `gptlab=True` it is started through
    `gptlab-server`, the command a team runs, which becomes `mlflow server` in the same
    process. Its output goes to a file (a pipe nobody reads would fill and stall it)."""

    def __init__(self, backend_uri: str, artifacts: Path, cwd: Path, port: int | None = None,
                 gptlab: bool = False, workers: int = 1, auth: list[str] | None = None):
        self.backend_uri, self.artifacts, self.cwd = backend_uri, artifacts, cwd
        # gptlab-server's accounts options; None: without accounts, as on a loopback address
        # a team's server need not have them
        self.auth = ["--no-auth"] if auth is None else auth
        self.port = port or free_port()
        self.gptlab, self.workers = gptlab, workers
        self.log = cwd / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        where = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        if self.gptlab:
            return [str(BIN / "gptlab-server"), self.backend_uri, "--artifacts",
                    str(self.artifacts), *where, *self.auth]
        return [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), *where]

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(healthy, timeout, "mlflow server to start", poll=0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def mlflow_server(tmp: Path, postgres: Postgres, workers: int = 1) -> Iterator[MlflowServer]:
    """A team's server as `gptlab-server` starts it: a fresh PostgreSQL database of its own
    (given as a plain postgresql:// URL, which gptlab-server turns into psycopg 3's dialect)
    and proxied artifacts in tmp/server/artifacts."""
    (tmp / "server").mkdir(parents=True, exist_ok=True)
    server = MlflowServer(postgres.create_database(driver=False), tmp / "server" / "artifacts",
                          tmp, gptlab=True, workers=workers)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- a real PostgreSQL ---------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin/ (Debian's layout), or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
               default=None)


class Postgres:
    """A PostgreSQL server of its own in a temporary folder, on 127.0.0.1 and a free port,
    its unix socket in that folder: nothing of the machine's own PostgreSQL is touched. A
    superuser reaches it over the socket without a password; clients reach it over TCP as
    USER with PASSWORD (scram-sha-256, as a team's server would ask). PostgreSQL refuses to
    run as root, so under root it runs as the `postgres` user, in a folder that user owns."""

    ADMIN, USER, PASSWORD, DATABASE = "admin", "gptlab", "gptlab-secret", "gptlab"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._databases = 0
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("PostgreSQL refuses to run as root and there is no postgres user")
        # not under pytest's tmp folder: that one is private to root (0700), and the server
        # may run as another user
        self.folder = Path(tempfile.mkdtemp(prefix="gptlab-pg-"))
        self.as_user: dict = {}
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self.as_user = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])

    def start(self, timeout: float = 60) -> None:
        log = self.folder / "postgres.log"
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.folder / "data"),
                        "-U", self.ADMIN, "--auth-local=trust", "--auth-host=scram-sha-256",
                        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                       check=True, capture_output=True, **self.as_user)
        with open(log, "ab") as out:
            # fsync off: a test database need not survive a power cut, and commits are faster
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.folder / "data"),
                 "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self.folder}", "-c", "fsync=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **self.as_user)

        def up() -> bool:
            assert self.proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                self.admin().close()
                return True
            except psycopg.OperationalError:
                return False

        wait_until(up, timeout, "PostgreSQL to start", poll=0.1)
        with self.admin() as conn:
            conn.execute(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.PASSWORD}'")
            conn.execute(f"CREATE DATABASE {self.DATABASE} OWNER {self.USER}")

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(host=str(self.folder), port=self.port, user=self.ADMIN,
                               dbname="postgres", autocommit=True, connect_timeout=2)

    def url(self, database: str = DATABASE, driver: bool = True, password: str | None = None
            ) -> str:
        """postgresql+psycopg://USER:PASSWORD@127.0.0.1:port/database (the shared database
        by default); driver=False gives the plain postgresql:// a user would type."""
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return (f"{scheme}://{self.USER}:{password or self.PASSWORD}@127.0.0.1:{self.port}/"
                f"{database}")

    def create_database(self, driver: bool = True) -> str:
        """A new, empty database owned by USER (a clean MLflow store per test); its URL."""
        self._databases += 1
        name = f"mlflow_{self._databases}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {self.USER}")
        return self.url(name, driver)

    def stop(self) -> None:
        """Stopped by its pid: SIGINT is PostgreSQL's fast shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (no /usr/lib/postgresql/*/bin/initdb; "
                    "`make postgres` installs it)")
    server = Postgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
