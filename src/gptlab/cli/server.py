"""gptlab-server: the MLflow tracking server a team shares, its runs in PostgreSQL, its
artifacts uploaded through the server (clients need no shared file system), and accounts:
only the team's users read and write it (MLflow's basic-auth app, tracking/accounts.py).

    gptlab-server postgresql://gptlab:secret@dbhost:5432/mlflow --admin-password-file admin.pw
    gptlab-server postgresql://... --host 0.0.0.0 --port 5000 --workers 4
    gptlab-server postgresql://... -- --cors-allowed-origins https://x.org   # more mlflow options
    gptlab-server user add alice --tracking-uri http://teamhost:5000     # signed in as admin
    gptlab-server grant alice gptlab EDIT --tracking-uri http://teamhost:5000

The database is checked first (reachable, password accepted), so that a wrong URL ends in one
line and exit code 2 instead of a server that fails on its first request; then this process
becomes `mlflow server` (exec: the same pid, signals reach MLflow directly).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gptlab import files
from gptlab.errors import GptlabError, exit_on_error, first_line
from gptlab.tracking import accounts

# SQLAlchemy's plain `postgresql://` means psycopg2, which gptlab does not install; psycopg 3
# (a dependency) is SQLAlchemy's `postgresql+psycopg` dialect
DRIVER = "postgresql+psycopg"
CONNECT_TIMEOUT = 5  # seconds for the check: an unreachable host fails soon, not in minutes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow reads its backend store from here as well as from --backend-store-uri: passed this
# way the password stays out of the process list (`ps`) once this process becomes mlflow
URL_ENV = "MLFLOW_BACKEND_STORE_URI"


def sqlalchemy_url(url: str) -> str:
    """The database URL as MLflow's SQLAlchemy store needs it: `postgresql://` (and the
    `postgres://` of many hosting services) become psycopg 3's dialect; a driver the user
    named (`postgresql+pg8000://`) is kept."""
    scheme, sep, rest = url.partition("://")
    base, _, driver = scheme.lower().partition("+")
    if not sep or base not in ("postgresql", "postgres") or not rest:
        raise GptlabError(f"the database URL must be postgresql://USER:PASSWORD@HOST:PORT/"
                          f"DATABASE, not {masked(url)!r}")
    return f"postgresql+{driver}://{rest}" if driver else f"{DRIVER}://{rest}"


def libpq_url(url: str) -> str:
    """The same URL for psycopg (libpq knows no `+driver`)."""
    return "postgresql://" + url.partition("://")[2]


def masked(url: str) -> str:
    """A URL fit to print: its password, if any, as ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:  # not parseable as a URL: say nothing of it that could be a secret
        return url.partition("://")[0] + "://..."


def check_database(url: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect once with psycopg and run a query: the host answers, the password and the
    database are right."""
    import psycopg  # only here: --help needs no database driver

    try:
        with psycopg.connect(libpq_url(url), connect_timeout=max(1, round(timeout))) as conn:
            conn.execute("SELECT 1")
    except (psycopg.Error, ValueError) as e:
        raise GptlabError(f"cannot connect to the database {masked(url)}: "
                          f"{db_reason(e)}") from None


def db_reason(e: BaseException) -> str:
    """libpq's report in one line: its first line names host, port and cause; when several
    addresses were tried (a name with IPv4 and IPv6 addresses) it is a heading, and the last
    attempt's line says more."""
    lines = [ln.strip().lstrip("- ") for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if lines[0].endswith(":") and len(lines) > 1 else first_line(e)
    return line.removeprefix("connection failed: ")


def artifacts_destination(value: str) -> str:
    """A URI (s3://, gs://, ...) as it is; a folder made absolute (the server's working
    directory is nobody's business), created, and checked writable now rather than at the
    first upload."""
    if "://" in value:
        return value
    folder = Path(value).expanduser().resolve()
    files.check_writable(folder, "the artifacts folder")
    return str(folder)


def check_port(host: str, port: int) -> None:
    """Bind the address once, as uvicorn will: a port in use (another server) or a host that
    is not this machine's is one line now rather than MLflow's traceback after its start-up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise GptlabError(f"cannot listen on {host}:{port}: "
                          f"{e.strerror or first_line(e)}") from None


def machine_name() -> str:
    """This machine's name as others reach it: its fully qualified name, unless that is only
    localhost (no domain configured), then its host name."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.startswith("localhost") else fqdn


def client_url(host: str, port: int) -> str:
    """The address clients use: a server on every interface is reached by this machine's
    name."""
    if host in ("0.0.0.0", "::", ""):
        host = machine_name()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def allowed_hosts(host: str) -> str | None:
    """MLflow answers only requests whose Host header is localhost or a private IP (against
    DNS rebinding). A server on a public interface is reached by this machine's name, so that
    name is added to MLflow's defaults; on loopback MLflow's defaults are right."""
    if host in LOOPBACK:
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.gethostname(), socket.getfqdn()}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    ours = [pattern for name in sorted(names) for pattern in (name, f"{name}:*")]
    return ",".join(dict.fromkeys([*get_default_allowed_hosts(), *ours]))  # once each


def mlflow_command(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """`mlflow server` with proxied artifacts and accounts; the database URL goes in URL_ENV."""
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--artifacts-destination", args.artifacts, "--serve-artifacts",
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if not args.no_auth:
        cmd += ["--app-name", "basic-auth"]
    hosts = args.allowed_hosts or (None if "--allowed-hosts" in extra
                                   else allowed_hosts(args.host))
    if hosts:
        cmd += ["--allowed-hosts", hosts]
    return [*cmd, *extra]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gptlab-server", description=__doc__.split("\n\n")[0],
        usage="gptlab-server [DATABASE_URL] [options] [-- MLFLOW_SERVER_OPTIONS...]",
        epilog="Clients send runs there with `gptlab-train logger.tracking_uri=http://HOST:PORT` "
               "(or MLFLOW_TRACKING_URI). Options after -- go to `mlflow server` as they are "
               "(`mlflow server --help`).")
    ap.add_argument("database", nargs="?", default=os.environ.get(URL_ENV),
                    metavar="DATABASE_URL",
                    help="the PostgreSQL database MLflow keeps its runs in, e.g. "
                         "postgresql://user:password@dbhost:5432/mlflow (default: "
                         f"${URL_ENV}, which keeps the password off the command line); the "
                         "database must exist, MLflow creates its tables")
    ap.add_argument("--artifacts", default="mlartifacts", metavar="FOLDER_OR_URI",
                    help="where uploaded artifacts (checkpoints, samples) are kept: a folder "
                         "on the server's machine or an s3:// gs:// ... URI "
                         "(default: ./mlartifacts)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default: 127.0.0.1, this machine only; "
                         "0.0.0.0 for the team)")
    ap.add_argument("--port", type=int, default=5000, help="default: 5000")
    ap.add_argument("--workers", type=int, default=4,
                    help="server processes answering requests (default: 4)")
    ap.add_argument("--allowed-hosts", metavar="HOSTS",
                    help="Host headers MLflow accepts, comma-separated (default: MLflow's "
                         "localhost and private IPs, plus this machine's name when --host is "
                         "not loopback); behind a reverse proxy, the name clients use")
    auth = ap.add_argument_group("accounts (MLflow's basic-auth app; on unless --no-auth)")
    auth.add_argument("--admin-user", default="admin",
                      help="the admin, who adds users and grants experiments (default: admin)")
    auth.add_argument("--admin-password-file", metavar="FILE",
                      help="the admin's password (first line), needed on the first start; "
                           f"or ${accounts.ADMIN_PASSWORD_ENV}")
    auth.add_argument("--default-permission", default="NO_PERMISSIONS",
                      type=str.upper, choices=accounts.PERMISSIONS,
                      help="what a user may do on an experiment nobody granted them "
                           "(default: NO_PERMISSIONS; READ lets every user read every run)")
    auth.add_argument("--config-dir", default="gptlab-server", metavar="FOLDER",
                      help="where MLflow's auth config and the Flask secret key are kept, "
                           "mode 0600 (default: ./gptlab-server); the key may also come from "
                           f"${accounts.SECRET_ENV}")
    auth.add_argument("--no-auth", action="store_true",
                      help="no accounts: anyone who reaches the port reads, changes and "
                           "deletes every run; only on a loopback --host")
    return ap


def admin_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gptlab-server", description="Manage the team server's users, signed in as its "
        "admin (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD).",
        usage="gptlab-server user add|password|remove NAME [--password-file FILE]\n"
              "       gptlab-server grant NAME EXPERIMENT NO_PERMISSIONS|READ|EDIT|MANAGE")
    ap.add_argument("command", choices=("user", "grant"))
    ap.add_argument("words", nargs="+", metavar="ARG")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="the team server (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--password-file", metavar="FILE",
                    help="the user's new password (first line); else typed, or read from "
                         "standard input")
    return ap


def manage(argv: Sequence[str]) -> None:
    """`user add|password|remove NAME` and `grant NAME EXPERIMENT PERMISSION`: one line each."""
    args = admin_parser().parse_args(argv)
    if not args.tracking_uri or not args.tracking_uri.startswith(("http://", "https://")):
        raise GptlabError("give the team server's address: --tracking-uri http://HOST:PORT "
                          "(or MLFLOW_TRACKING_URI)")
    words, uri = args.words, args.tracking_uri
    if args.command == "grant":
        if len(words) != 3:
            raise GptlabError("grant takes NAME EXPERIMENT PERMISSION")
        done = accounts.grant(uri, words[0], words[1], words[2].upper())
    else:
        if len(words) != 2 or words[0] not in ("add", "password", "remove"):
            raise GptlabError("user takes add NAME, password NAME or remove NAME")
        action, name = words
        if action == "remove":
            done = accounts.remove_user(uri, name)
        elif action == "add":
            done = accounts.add_user(uri, name, args.password_file)
        else:
            done = accounts.change_password(uri, name, args.password_file)
    print(f"gptlab-server: {done}")


@exit_on_error
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("user", "grant"):
        return manage(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.database:
        raise GptlabError(f"no database URL: give one (postgresql://USER:PASSWORD@HOST:PORT/"
                          f"DATABASE) or set {URL_ENV}")
    if not 0 < args.port < 65536 or args.workers < 1:
        raise GptlabError("--port must be 1..65535 and --workers at least 1")
    if args.no_auth and args.host not in LOOPBACK:
        raise GptlabError(f"--no-auth is only for a loopback --host (127.0.0.1): on {args.host} "
                          "anyone who reaches the port could read, change and delete every run")
    url = sqlalchemy_url(args.database)
    password = accounts.read_password(args.admin_password_file, accounts.ADMIN_PASSWORD_ENV)
    check_port(args.host, args.port)
    check_database(args.database)
    args.artifacts = artifacts_destination(args.artifacts)
    env = dict(os.environ, **{URL_ENV: url})
    env.pop(accounts.ADMIN_PASSWORD_ENV, None)  # given to MLflow below, only on a first start
    if not args.no_auth:
        env.update(accounts.auth_environment(
            Path(args.config_dir).expanduser().resolve(), url, libpq_url(args.database),
            args.admin_user, password, args.default_permission))
    cmd = mlflow_command(args, extra)
    users = ("no accounts (--no-auth)" if args.no_auth else
             f"accounts on, admin {args.admin_user}, "
             f"default permission {args.default_permission}")
    print(f"gptlab-server: MLflow on {args.host}:{args.port}, runs in {masked(url)}, "
          f"artifacts in {args.artifacts}, {users}\n"
          f"clients: logger.tracking_uri={client_url(args.host, args.port)}", flush=True)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    main()
