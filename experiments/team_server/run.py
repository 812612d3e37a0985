"""A team's tracking server under load: `gptlab-server` over a real PostgreSQL, artifacts
uploaded through the server.

(a) Throughput: N processes logging every step at once, with MLflow's client as fast as they
    can (gptlab's four per-step metrics, one request per step, then 50 steps per request as
    gptlab's recorder batches them), and N gptlab-train jobs of a parallel sweep logging every
    step; points sent, points found afterwards, points per second over the wall time of the
    logging.
(b) gptlab's step time (ms/step of the CPU recipe's model, every step logged) with the server
    and with the embedded SQLite store, in alternating rounds.

The script starts its own PostgreSQL (Debian's binaries, as the `postgres` user under root,
on 127.0.0.1 and a free port, in a temporary folder) and the server, and stops both by pid.

    python experiments/team_server/run.py                       # 8 jobs, 500 steps, 3 rounds
    python experiments/team_server/run.py --jobs 16 --steps 1000 --rounds 5

Writes results.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CORPUS = HERE.parents[2] / "shared/data/tinyshakespeare/input.txt"
METRICS = ("train/loss", "lr", "tokens", "tokens_per_sec")  # what gptlab logs at a step
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.block_size=16",
        "data.batch_size=4", "data.eval_iters=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.sample.max_new_tokens=20",
        "callbacks.final_sample_tokens=0"]
RECIPE = ["experiment=shakespeare_char_cpu", "trainer.enable_progress_bar=false",
          "callbacks.final_sample_tokens=0", "trainer.log_every_n_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what} did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen, sig: int, group: bool = False) -> None:
    """By pid (or its process group: mlflow's workers are its children)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait(timeout=60)


@contextlib.contextmanager
def postgres(folder: Path):
    """A PostgreSQL of its own with PostgreSQL's default durability settings (fsync on); its
    database's URL (a plain postgresql:// URL, as a team would give gptlab-server)."""
    import psycopg

    bindir = Path(max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default="")).parent
    if not (bindir / "initdb").exists():
        raise SystemExit("PostgreSQL is not installed (make postgres)")
    as_user: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
    init = subprocess.run([str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "admin",
                           "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                           "--locale=C.UTF-8"], capture_output=True, text=True, **as_user)
    if init.returncode != 0:
        raise SystemExit(f"initdb failed:\n{init.stderr}")
    port, log = free_port(), folder / "postgres.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(folder / "data"), "-p",
                                 str(port), "-c", "listen_addresses=127.0.0.1", "-c",
                                 f"unix_socket_directories={folder}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                **as_user)

    def admin():
        return psycopg.connect(host=str(folder), port=port, user="admin", dbname="postgres",
                               autocommit=True, connect_timeout=2)

    def up() -> bool:
        try:
            admin().close()
            return True
        except psycopg.OperationalError:
            return False

    try:
        wait_for(up, proc, log, "PostgreSQL")
        with admin() as conn:
            # CREATEDB: a server with accounts makes their database (mlflow_auth) at its start
            conn.execute("CREATE ROLE gptlab LOGIN CREATEDB PASSWORD 'team-secret'")
            conn.execute("CREATE DATABASE mlflow OWNER gptlab")
        yield f"postgresql://gptlab:team-secret@127.0.0.1:{port}/mlflow"
    finally:
        stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown


@contextlib.contextmanager
def server(db_url: str, folder: Path, workers: int, args: tuple[str, ...] = ("--no-auth",),
           env: dict[str, str] | None = None):
    """`gptlab-server`, the command a team runs (on loopback, without accounts unless `args`
    says otherwise); its URL."""
    port, log = free_port(), folder / "server.log"
    env = {k: v for k, v in (env or os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BIN / "gptlab-server"), db_url, "--artifacts",
                                 str(folder / "artifacts"), "--port", str(port),
                                 "--workers", str(workers), *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, proc, log, "gptlab-server")
        yield uri
    finally:
        stop(proc, signal.SIGTERM, group=True)


# -- (a) throughput ----------------------------------------------------------------------------

def log_job(uri: str, experiment: str, steps: int, per_request: int) -> None:
    """One job (a process of its own): a run that logs METRICS at every step, `per_request`
    steps to a request; prints its run id, the time span of its logging and its requests'
    latencies as JSON."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(exp.experiment_id)
    run_id, latencies, sent = run.info.run_id, [], 0
    t0 = time.time()
    for first in range(1, steps + 1, per_request):
        now = int(time.time() * 1000)
        batch = [Metric(key, 1.0 / step, now, step) for step in
                 range(first, min(first + per_request, steps + 1)) for key in METRICS]
        start = time.perf_counter()
        try:
            client.log_batch(run_id, metrics=batch)
            sent += len(batch)
        except Exception as e:  # noqa: BLE001 - a lost batch is what this measures
            print(f"lost {len(batch)} points: {e}", file=sys.stderr)
        latencies.append(time.perf_counter() - start)
    t1 = time.time()
    client.set_terminated(run_id, "FINISHED")
    print(json.dumps({"run_id": run_id, "t0": t0, "t1": t1, "sent": sent,
                      "attempted": steps * len(METRICS), "latencies": latencies}))


def count_points(client, run_ids: list[str]) -> int:  # noqa: ANN001
    return sum(len(client.get_metric_history(r, key)) for r in run_ids for key in METRICS)


def client_load(uri: str, jobs: int, steps: int, per_request: int) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = f"load_{per_request}"
    client.create_experiment(experiment)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", uri, experiment,
                               str(steps), str(per_request)], stdout=subprocess.PIPE, text=True)
             for _ in range(jobs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    latencies = sorted(x for o in outs for x in o["latencies"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {"setting": f"MLflow client, {per_request} step(s) per request",
            "jobs": jobs, "steps": steps,
            "attempted": sum(o["attempted"] for o in outs), "sent": sum(o["sent"] for o in outs),
            "found": count_points(client, [o["run_id"] for o in outs]), "wall_s": wall,
            "requests": len(latencies),
            "median_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "running": sum(r.info.status == "RUNNING" for r in runs)}


def gptlab_load(uri: str, jobs: int, steps: int, folder: Path) -> dict:
    """A parallel sweep of `jobs` tiny gptlab-train jobs, every step logged."""
    from mlflow.tracking import MlflowClient

    seeds = ",".join(str(i) for i in range(1, jobs + 1))
    start = time.time()
    subprocess.run([str(BIN / "gptlab-train"), "-m", "hydra/launcher=joblib",
                    f"hydra.launcher.n_jobs={jobs}", f"seed={seeds}", *TINY,
                    f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                    "trainer.log_every_n_steps=1", f"logger.tracking_uri={uri}",
                    "logger.experiment_name=gptlab_jobs"], cwd=folder, check=True,
                   capture_output=True)
    command_s = time.time() - start
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gptlab_jobs").experiment_id
    runs = [r for r in client.search_runs([exp]) if r.data.tags.get("gptlab.sweep") != "true"]
    wall = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return {"setting": "gptlab-train sweep (joblib), tiny GPT", "jobs": jobs, "steps": steps,
            "attempted": len(runs) * steps * len(METRICS),
            "sent": len(runs) * steps * len(METRICS),
            "found": count_points(client, [r.info.run_id for r in runs]), "wall_s": wall,
            "command_s": command_s, "running": sum(r.info.status == "RUNNING" for r in
                                                   client.search_runs([exp]))}


# -- (b) step time -----------------------------------------------------------------------------

def step_time(uri: str, steps: int, folder: Path) -> dict:
    """One run of the CPU recipe's model: its median ms/step (from its logged tokens/s, which
    leaves validations out) and the run's wall time (validations, samples and checkpoint
    uploads in)."""
    from mlflow.tracking import MlflowClient

    out = subprocess.run([str(BIN / "gptlab-train"), *RECIPE, f"trainer.max_steps={steps}",
                          f"trainer.val_check_interval={steps // 2}",
                          f"logger.tracking_uri={uri}", "logger.experiment_name=step_time"],
                         cwd=folder, check=True, capture_output=True, text=True).stdout
    run_id = out.split("MLflow run id: ")[1].split()[0]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = sorted(client.get_metric_history(run_id, "tokens_per_sec"), key=lambda m: m.step)
    tokens = int(run.data.params["data.batch_size"]) * int(run.data.params["data.block_size"])
    ms = sorted(1000 * tokens / m.value for m in history[10:])  # past the warm-up steps
    return {"ms_per_step": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "wall_s": (run.info.end_time - run.info.start_time) / 1000,
            "load": os.getloadavg()[0]}


def table_a(rows: list[dict]) -> list[str]:
    lines = ["| setting | jobs x steps | points sent | found | wall s | points/s | requests/s "
             "| median / p95 ms per request | left RUNNING |", "|---|---|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    for r in rows:
        rps = f"{r['requests'] / r['wall_s']:,.0f}" if "requests" in r else "-"
        lat = f"{r['median_ms']:.1f} / {r['p95_ms']:.1f}" if "median_ms" in r else "-"
        lines.append(f"| {r['setting']} | {r['jobs']} x {r['steps']} | {r['sent']:,} | "
                     f"{r['found']:,} | {r['wall_s']:.1f} | {r['found'] / r['wall_s']:,.0f} | "
                     f"{rps} | {lat} | {r['running']} |")
    return lines


def table_b(rounds: dict[str, list[dict]]) -> list[str]:
    lines = ["| store | ms/step (median of the rounds' medians) | each round: median / p90 "
             "ms/step, wall s, load average after | run wall time, s (median) |",
             "|---|---:|---|---:|"]
    for store, values in rounds.items():
        each = "; ".join(f"{v['ms_per_step']:.0f} / {v['p90_ms']:.0f}, {v['wall_s']:.0f} s, "
                         f"{v['load']:.1f}" for v in values)
        lines.append(f"| {store} | {statistics.median(v['ms_per_step'] for v in values):.1f} | "
                     f"{each} | {statistics.median(v['wall_s'] for v in values):.1f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500, help="steps each load job logs")
    ap.add_argument("--train-steps", type=int, default=200, help="steps of each timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="gptlab-server --workers")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        uri, experiment, steps, per_request = args.worker
        log_job(uri, experiment, int(steps), int(per_request))
        return
    if "GPTLAB_DATA" not in os.environ and CORPUS.is_file():
        os.environ["GPTLAB_DATA"] = str(CORPUS)
    import torch

    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="gptlab-team-server-"))
        # a folder of its own in /tmp, not inside `work` (private, 0700): PostgreSQL may run
        # as the postgres user
        pg = Path(tempfile.mkdtemp(prefix="gptlab-team-pg-"))
        for folder in (work, pg):
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        db_url = stack.enter_context(postgres(pg))
        uri = stack.enter_context(server(db_url, work, args.workers))
        print(f"server {uri}, runs in PostgreSQL", flush=True)
        load = []
        for per_request in (1, 50):
            load.append(client_load(uri, args.jobs, args.steps, per_request))
            print(table_a(load)[-1], flush=True)
        load.append(gptlab_load(uri, args.jobs, args.steps, work))
        print(table_a(load)[-1], flush=True)
        rounds: dict[str, list[dict]] = {"gptlab-server (PostgreSQL)": [],
                                         "embedded SQLite": []}
        sqlite = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
        for r in range(args.rounds):
            order = [("gptlab-server (PostgreSQL)", uri), ("embedded SQLite", sqlite)]
            for name, target in order if r % 2 else order[::-1]:
                rounds[name].append(step_time(target, args.train_steps, work))
                print(f"round {r + 1}: {name}: {rounds[name][-1]['ms_per_step']:.1f} ms/step",
                      flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"torch {torch.__version__}, gptlab-server --workers {args.workers}")
    text = "\n".join(["(a) throughput", "", *table_a(load), "",
                      f"(b) step time, CPU recipe's model, {args.train_steps} steps, every step "
                      f"logged, {args.rounds} rounds", "", *table_b(rounds), "",
                      f"Machine: {machine}."]) + "\n"
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(
        {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "worker"},
         "throughput": [{k: v for k, v in r.items()} for r in load], "step_time": rounds},
        indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
