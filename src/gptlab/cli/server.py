"""gptlab-server: the MLflow tracking server a team shares, its runs in PostgreSQL and its
artifacts uploaded through the server (clients need no shared file system).

    gptlab-server postgresql://gptlab:secret@dbhost:5432/mlflow --artifacts /srv/artifacts
    gptlab-server postgresql://... --host 0.0.0.0 --port 5000 --workers 4
    gptlab-server postgresql://... -- --allowed-hosts mlflow.example.org   # more mlflow options

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
    """`mlflow server` with proxied artifacts; the database URL goes in URL_ENV."""
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--artifacts-destination", args.artifacts, "--serve-artifacts",
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
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
                         "not loopback)")
    return ap


@exit_on_error
def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not args.database:
        raise GptlabError(f"no database URL: give one (postgresql://USER:PASSWORD@HOST:PORT/"
                          f"DATABASE) or set {URL_ENV}")
    if not 0 < args.port < 65536 or args.workers < 1:
        raise GptlabError("--port must be 1..65535 and --workers at least 1")
    url = sqlalchemy_url(args.database)
    check_port(args.host, args.port)
    check_database(args.database)
    args.artifacts = artifacts_destination(args.artifacts)
    cmd = mlflow_command(args, extra)
    print(f"gptlab-server: MLflow on {args.host}:{args.port}, runs in {masked(url)}, "
          f"artifacts in {args.artifacts}\n"
          f"clients: logger.tracking_uri={client_url(args.host, args.port)}", flush=True)
    sys.stderr.flush()
    env = dict(os.environ, **{URL_ENV: url})
    os.execve(sys.executable, cmd, env)


if __name__ == "__main__":
    main()
