"""Accounts on the team server: MLflow's own basic-auth app, set up by `gptlab-server` and
managed with its `user` and `grant` commands. gptlab writes no authentication of its own: the
users, their password hashes and their permissions live in MLflow's auth database, which MLflow
creates and migrates; gptlab chooses where (a database of its own beside the runs' database on
the same PostgreSQL server), keeps the Flask secret key and refuses settings that would leave
the server open.

    gptlab-server postgresql://... --admin-password-file admin.pw     # accounts on (default)
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
        gptlab-server user add alice --tracking-uri http://teamhost:5000
    gptlab-server grant alice gptlab EDIT --tracking-uri http://teamhost:5000
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptlab import files
from gptlab.errors import GptlabError, first_line

# what a user without a grant may do on an experiment: nothing, unless the server says READ
PERMISSIONS = ("NO_PERMISSIONS", "READ", "EDIT", "MANAGE")
# MLflow's former default admin password, which it refuses too; and its shortest password
INSECURE_DEFAULT = "password1234"
SHORTEST = 12
SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
CONFIG_ENV = "MLFLOW_AUTH_CONFIG_PATH"
CONFIG_FILE, SECRET_FILE = "basic_auth.ini", "flask_secret_key"


def auth_database_url(url: str) -> str:
    """The accounts' database beside the runs' one: `<database>_auth` on the same server."""
    head, _, database = url.rpartition("/")
    name, query, rest = database.partition("?")
    return f"{head}/{name}_auth{query}{rest}"


def ensure_database(libpq: str, auth_libpq: str) -> None:
    """Create the accounts' database `auth_libpq` beside the runs' one (`libpq`: psycopg URLs)
    when it does not exist yet; MLflow creates and migrates its tables at start."""
    import psycopg
    from psycopg import sql

    name = auth_libpq.rpartition("/")[2].partition("?")[0]
    try:
        with psycopg.connect(libpq, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone():
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as e:
        raise GptlabError(f"cannot create the accounts database {name!r}: {first_line(e)} "
                          f"(create it once: CREATE DATABASE {name} OWNER <user>; or start "
                          "with --no-auth on a loopback address)") from None


def admin_exists(libpq: str, admin: str) -> bool:
    """Whether MLflow's auth database already holds the admin (a server started before)."""
    import psycopg

    with psycopg.connect(libpq, connect_timeout=5) as conn:
        if conn.execute("SELECT to_regclass('users')").fetchone()[0] is None:
            return False
        return conn.execute("SELECT 1 FROM users WHERE username = %s",
                            (admin,)).fetchone() is not None


def read_password(path: str | None, env: str | None = None) -> str | None:
    """A password from a file (its first line), else from the environment variable `env`."""
    if path:
        text = files.read_text(path)
        password = text.splitlines()[0] if text.strip() else ""
        if not password:
            raise GptlabError(f"the password file {path} is empty")
        return password
    return os.environ.get(env) if env else None


def check_password(password: str, whose: str) -> None:
    if password == INSECURE_DEFAULT:
        raise GptlabError(f"{whose}: {INSECURE_DEFAULT!r} is MLflow's old default password, "
                          "known to everyone: choose another")
    if len(password) < SHORTEST:
        raise GptlabError(f"{whose}: a password needs at least {SHORTEST} characters")


def secret_key(folder: Path) -> str:
    """The Flask secret key (sessions and the sign-up form's CSRF token): the environment's,
    else one generated once and kept in `folder` (mode 0600), so a restarted server keeps it."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    path = folder / SECRET_FILE
    if not path.exists():
        files.write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


def write_config(folder: Path, auth_url: str, admin: str, default_permission: str) -> Path:
    """MLflow's basic-auth config (it reads no other place): mode 0600, since the database URL
    may hold the database's password. Never the admin's password: that goes through the
    environment, once."""
    # ConfigParser's interpolation reads % as its own: a password's % is written %%
    text = ("[mlflow]\n"
            f"default_permission = {default_permission}\n"
            f"database_uri = {auth_url.replace('%', '%%')}\n"
            f"admin_username = {admin}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    path = folder / CONFIG_FILE
    files.write_private(path, text)
    return path


def auth_environment(folder: Path, url: str, libpq: str, admin: str, password: str | None,
                     default_permission: str) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` needs in its environment (`url`: the runs'
    database as SQLAlchemy's URL, `libpq` as psycopg's); checks first what MLflow would refuse
    with a traceback (no admin password on a first start, a weak one)."""
    auth_url, auth_libpq = auth_database_url(url), auth_database_url(libpq)
    ensure_database(libpq, auth_libpq)
    exists = admin_exists(auth_libpq, admin)
    if password is not None:
        check_password(password, f"the admin {admin}'s password")
    elif not exists:
        raise GptlabError(f"the server's first start creates its admin {admin!r}: give its "
                          f"password with --admin-password-file FILE or {ADMIN_PASSWORD_ENV}")
    folder.mkdir(parents=True, exist_ok=True)
    env = {CONFIG_ENV: str(write_config(folder, auth_url, admin, default_permission)),
           SECRET_ENV: secret_key(folder)}
    if password is not None and not exists:
        env[ADMIN_PASSWORD_ENV] = password
    return env


# -- managing users through the server -----------------------------------------------------

def auth_client(tracking_uri: str) -> Any:
    """MLflow's client of the basic-auth app, signed in as MLFLOW_TRACKING_USERNAME."""
    import warnings

    with warnings.catch_warnings():  # MLflow's server modules warn of their own imports
        warnings.simplefilter("ignore")
        import mlflow.server

        return mlflow.server.get_app_client("basic-auth", tracking_uri=tracking_uri)


def new_password(path: str | None, name: str) -> str:
    """A user's new password: from a file, else typed twice (or one line of piped input)."""
    if path:
        password = read_password(path)
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise GptlabError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    assert password is not None
    check_password(password, f"user {name}")
    return password


def refused(e: Exception, name: str) -> GptlabError:
    """MLflow's answer as one line; its report of a user that exists quotes the database's
    error, password hash and all, so that one is said in words of our own."""
    from gptlab.errors import refusal

    code = getattr(e, "error_code", "")
    if said := refusal(e):
        return GptlabError(said)
    if code == "RESOURCE_ALREADY_EXISTS":
        return GptlabError(f"user {name} already exists")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return GptlabError(f"no user {name} on this server")
    return GptlabError(first_line(e).partition("Response body:")[0].strip().rstrip(".")
                       if "Response body" in str(e) else first_line(e))


@contextlib.contextmanager
def answered(name: str) -> Iterator[None]:
    """What the auth server refuses about user `name`, as one line (`refused`)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - MLflow's refusal, said in one line
        raise refused(e, name) from None


def add_user(tracking_uri: str, name: str, password_file: str | None) -> str:
    password = new_password(password_file, name)
    with answered(name):
        auth_client(tracking_uri).create_user(name, password)
    return f"user {name} added"


def change_password(tracking_uri: str, name: str, password_file: str | None) -> str:
    password = new_password(password_file, name)
    with answered(name):
        auth_client(tracking_uri).update_user_password(name, password)
    return f"password of {name} changed"


def remove_user(tracking_uri: str, name: str) -> str:
    with answered(name):
        auth_client(tracking_uri).delete_user(name)
    return f"user {name} removed"


def grant(tracking_uri: str, name: str, experiment: str, permission: str) -> str:
    """`name`'s permission on `experiment` (made if there is none yet, owned by whoever grants),
    replacing any it had."""
    from mlflow.tracking import MlflowClient

    if permission not in PERMISSIONS:
        raise GptlabError(f"permission must be one of {', '.join(PERMISSIONS)}, "
                          f"got {permission!r}")
    client, auth = MlflowClient(tracking_uri), auth_client(tracking_uri)
    with answered(name):
        found = client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found
                         else client.create_experiment(experiment))
        made = "" if found else ", a new experiment"
        try:
            auth.grant_user_permission(name, "experiment", experiment_id, permission)
        except Exception as e:  # noqa: BLE001 - one grant per user and experiment: replace it
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.revoke_user_permission(name, "experiment", experiment_id)
            auth.grant_user_permission(name, "experiment", experiment_id, permission)
    return f"{name}: {permission} on experiment {experiment} (id {experiment_id}{made})"
