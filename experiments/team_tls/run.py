"""The team recipe end to end on one machine, behind TLS: PostgreSQL, `gptlab-server` with
accounts on loopback, nginx in front of it with a self-signed certificate, the admin adding a
user and granting an experiment over HTTPS, and that user's run uploading its checkpoints
through the proxy.

nginx passes the Host header `mlflow.test` (standing in for the DNS name a team would use), so
the server must be started with `--allowed-hosts mlflow.test`; the script shows what MLflow
answers without it. PostgreSQL, the server and nginx are started here (PostgreSQL and the
server as in experiments/team_server) and stopped by pid.

    python experiments/team_tls/run.py          # needs nginx (apt-get install nginx-light)

Writes results.md beside this file.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
NAME = "mlflow.test"  # the Host nginx passes on: the name clients would use
ADMIN_PASSWORD, ALICE_PASSWORD = "admin-Secret-2026", "alice-Secret-2026"
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.block_size=16",
        "data.batch_size=4", "data.eval_iters=2", "trainer.max_steps=20",
        "trainer.val_check_interval=10", "trainer.enable_progress_bar=false",
        "callbacks.final_sample_tokens=0"]


def team_server_module():
    """experiments/team_server/run.py, for its PostgreSQL and server helpers."""
    spec = importlib.util.spec_from_file_location("team_server", HERE.parent / "team_server"
                                                  / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and mlflow.test."""
    crt, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={NAME}", "-addext", f"subjectAltName=DNS:{NAME},IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def nginx(folder: Path, port: int, upstream: str, crt: Path, key: Path) -> subprocess.Popen:
    """nginx in the foreground with a config of its own (the README's, on a free port)."""
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx_bin).exists():
        raise SystemExit("nginx is not installed (apt-get install nginx-light)")
    (folder / "nginx").mkdir()
    conf = folder / "nginx" / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {folder}/nginx/nginx.pid;
error_log {folder}/nginx/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {folder}/nginx/access.log;
    client_body_temp_path {folder}/nginx/body;
    proxy_temp_path {folder}/nginx/proxy;
    fastcgi_temp_path {folder}/nginx/fastcgi;
    uwsgi_temp_path {folder}/nginx/uwsgi;
    scgi_temp_path {folder}/nginx/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {NAME};
        ssl_certificate     {crt};
        ssl_certificate_key {key};
        client_max_body_size 2g;
        location / {{
            proxy_pass {upstream};
            proxy_set_header Host {NAME};
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
    return subprocess.Popen([nginx_bin, "-c", str(conf), "-p", str(folder / "nginx")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def status(url: str, crt: Path, user: tuple[str, str] | None = None,
           method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    if user:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(":".join(user).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10,
                                    context=ssl.create_default_context(cafile=crt)) as r:
            return r.status, r.read(200).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(200).decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(getattr(e, "reason", e))


def gptlab(tool: str, args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    start = time.monotonic()
    res = subprocess.run([str(BIN / tool), *args], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    return res.returncode, (res.stdout + res.stderr).strip(), time.monotonic() - start


def main() -> None:
    team = team_server_module()
    folder = Path(tempfile.mkdtemp(prefix="gptlab-tls-"))
    os.chmod(folder, 0o755)  # PostgreSQL runs as its own user in a folder below
    rows: list[tuple[str, str]] = []
    try:
        crt, key = certificate(folder)
        (folder / "admin.pw").write_text(ADMIN_PASSWORD + "\n")
        (folder / "alice.pw").write_text(ALICE_PASSWORD + "\n")
        (folder / "pg").mkdir()
        with team.postgres(folder / "pg") as db_url:
            auth = ("--admin-password-file", str(folder / "admin.pw"), "--config-dir",
                    str(folder / "config"), "--allowed-hosts", NAME)
            with team.server(db_url, folder, 2, auth) as upstream:
                port = team.free_port()
                proxy = nginx(folder, port, upstream, crt, key)
                try:
                    rows += run_checks(folder, f"https://127.0.0.1:{port}", upstream, crt)
                finally:
                    team.stop(proxy, signal.SIGQUIT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(rows)


def run_checks(folder: Path, uri: str, upstream: str, crt: Path) -> list[tuple[str, str]]:
    rows = []
    team_server = team_server_module()
    deadline = time.monotonic() + 30
    while status(f"{uri}/health", crt)[0] != 200:
        if time.monotonic() > deadline:
            raise SystemExit("nginx did not start: "
                             + (folder / "nginx" / "error.log").read_text()[-2000:])
        time.sleep(0.3)
    rows.append(("HTTPS /health through nginx", str(status(f"{uri}/health", crt)[0])))
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    rows.append(("anonymous GET experiments/search over HTTPS", str(status(api, crt)[0])))
    code, body = status(api.replace(uri, upstream), crt)
    rows.append(("to the server directly, Host 127.0.0.1:PORT (not in --allowed-hosts)",
                 f"{code} {body[:60]}"))
    request = urllib.request.Request(f"{upstream}/api/2.0/mlflow/experiments/search",
                                     headers={"Host": "elsewhere.example"})
    try:
        urllib.request.urlopen(request, timeout=10)
        other = "200"
    except urllib.error.HTTPError as e:
        other = f"{e.code} {e.read(80).decode(errors='replace')}"
    rows.append(("Host elsewhere.example (not in --allowed-hosts)", other))
    plain = f"http://127.0.0.1:{uri.rpartition(':')[2]}/health"
    rows.append(("plain HTTP to the TLS port", str(status(plain, crt)[0]) + " (nginx's 400)"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_SERVER_CERT_PATH=str(crt),
               GPTLAB_DATA=str(team_server.CORPUS))
    admin = dict(env, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    for args in (["user", "add", "alice", "--password-file", str(folder / "alice.pw")],
                 ["grant", "alice", "shakespeare", "EDIT"]):
        code, out, took = gptlab("gptlab-server", args, admin, folder)
        rows.append((f"admin: gptlab-server {' '.join(args[:3])}", f"exit {code}: {out}"))
    alice = dict(env, MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ALICE_PASSWORD)
    (folder / "alice").mkdir()
    code, out, took = gptlab("gptlab-train", [*TINY, "logger.experiment_name=shakespeare"],
                             alice, folder / "alice")
    run_line = next((ln for ln in out.splitlines() if "run" in ln.lower() and "id" in ln), "")
    rows.append(("alice: a tiny gptlab-train over HTTPS", f"exit {code} in {took:.1f} s"
                 + (f" ({run_line.strip()[:80]})" if code == 0 else f": {out[-300:]}")))
    from mlflow.tracking import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ALICE_PASSWORD,
                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(crt))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shakespeare")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if runs:
        names = [a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoints")]
        rows.append(("alice's run as the server has it",
                     f"{runs[0].info.status}, checkpoints {', '.join(names)}"))
    wrong = dict(alice, MLFLOW_TRACKING_PASSWORD="not-her-password")
    code, out, took = gptlab("gptlab-train", [*TINY], wrong, folder / "alice")
    rows.append(("a wrong password", f"exit {code} in {took:.1f} s: {out.splitlines()[-1]}"))
    return rows


def write(rows: list[tuple[str, str]]) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = ["# Team server behind TLS: results", "",
             f"`python experiments/team_tls/run.py` on {machine}, {time.strftime('%Y-%m-%d')}.",
             "", "| check | answer |", "|---|---|"]
    lines += [f"| {what} | {answer.replace('|', '/')} |" for what, answer in rows]
    text = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
