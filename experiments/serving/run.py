"""How fast a run's MLflow model answers: `mlflow models serve` on this machine, 100-token
requests, against calling the loaded model in-process.

    python experiments/serving/run.py --run-id <id>            # a run with a logged model
    python experiments/serving/run.py --experiment tokenizers  # its newest such run

Starts the server on 127.0.0.1 (a free port, `--env-manager local`), waits for /ping, sends
`--requests` requests of one prompt and `--tokens` new tokens (KV cache on, the model's
default window), one at a time, and stops the server by its pid. Writes results.md beside
this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import torch

from gptlab.tracking import store

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_with_model(client, experiment: str) -> str:
    exp = store.experiment_id(client, experiment)
    models = client.search_logged_models([exp], order_by=[{"field_name": "creation_timestamp",
                                                           "ascending": False}])
    if not models:
        sys.exit(f"error: experiment {experiment!r} has no run with a logged model")
    return models[0].source_run_id


def timed_requests(port: int, n: int, tokens: int) -> list[float]:
    times = []
    for i in range(n):
        body = json.dumps({"inputs": ["ROMEO:"],
                           "params": {"max_new_tokens": tokens, "seed": i}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        times.append(time.perf_counter() - start)
        assert len(answer["predictions"][0]) >= len("ROMEO:")
    return times


@contextlib.contextmanager
def serving(uri: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """`mlflow models serve` of `uri` on a free port, up (its /ping answered); its port."""
    port = free_port()
    # `mlflow models serve` starts `uvicorn` by name: this environment's bin/ goes first
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               **(env or {}))
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", uri,
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit("error: mlflow models serve did not start")
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def serve(uri: str, tokens: int, n: int) -> list[float]:
    with serving(uri) as port:
        timed_requests(port, 1, tokens)  # the first request pays for warming up
        return timed_requests(port, n, tokens)


def post(port: int, body: dict) -> tuple[int, str, float]:
    """(status, answer's first 120 characters, seconds) of one request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    return code, text[:120], time.perf_counter() - start


def ping(port: int) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=30):
        return time.perf_counter() - start


def bounded(uri: str, seconds: float) -> list[str]:
    """The serve limits at work: a request far past the token limit, and one generation that
    runs into its time budget while /ping and a short request are asked every half second."""
    env = {"GPTLAB_REQUEST_SECONDS": str(seconds), "GPTLAB_MAX_NEW_TOKENS": "1000000"}
    with serving(uri, env) as port:
        code, text, took = post(port, {"inputs": ["ROMEO:"],
                                       "params": {"max_new_tokens": 10**9}})
        rows = [f"| max_new_tokens=10^9 | {code} in {1000 * took:.0f} ms: {text} |"]
        answer: list = []
        long = threading.Thread(target=lambda: answer.append(post(port, {
            "inputs": ["ROMEO:"], "params": {"max_new_tokens": 1_000_000}})))
        long.start()
        pings, shorts = [], []
        while long.is_alive():
            time.sleep(0.5)
            pings.append(ping(port))
            shorts.append(post(port, {"inputs": ["ROMEO:"], "params": {"max_new_tokens": 20}}))
        code, text, took = answer[0]
        rows += [f"| max_new_tokens=10^6 (budget {seconds:g} s) | {code} after {took:.1f} s: "
                 f"{text} |",
                 f"| /ping during it ({len(pings)} times) | {summary(pings)}, max "
                 f"{1000 * max(pings):.0f} ms |",
                 f"| 20-token requests during it ({len(shorts)}) | "
                 f"{sorted({c for c, _, _ in shorts})}, {summary([t for _, _, t in shorts])} |"]
    return rows


def in_process(uri: str, tokens: int, n: int) -> list[float]:
    model = mlflow.pyfunc.load_model(uri)
    model.predict(["ROMEO:"], params={"max_new_tokens": tokens})
    times = []
    for i in range(n):
        start = time.perf_counter()
        model.predict(["ROMEO:"], params={"max_new_tokens": tokens, "seed": i})
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    ms = sorted(1000 * t for t in times)
    return f"{statistics.median(ms):.0f} ms median, {ms[int(0.9 * (len(ms) - 1))]:.0f} ms p90"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-id")
    ap.add_argument("--experiment", default="gptlab")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--budget", type=float, default=30,
                    help="the time budget of the long generation (GPTLAB_REQUEST_SECONDS)")
    args = ap.parse_args(argv)
    uri_store = store.resolve_tracking_uri(None)
    os.environ["MLFLOW_TRACKING_URI"] = uri_store
    mlflow.set_tracking_uri(uri_store)
    client = store.connect(uri_store)
    run_id = args.run_id or newest_with_model(client, args.experiment)
    uri = f"runs:/{run_id}/model"
    params = client.get_run(run_id).data.params
    served = serve(uri, args.tokens, args.requests)
    local = in_process(uri, args.tokens, args.requests)
    limits = bounded(uri, args.budget)
    text = (f"`python experiments/serving/run.py --run-id {run_id}` ({params.get('n_params')} "
            f"parameters, block {params.get('data.block_size')}), {args.requests} requests of "
            f"one prompt and {args.tokens} new tokens, KV cache on; {platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}\n\n"
            f"| path | latency |\n|---|---|\n"
            f"| `mlflow models serve` (HTTP, one request at a time) | {summary(served)} |\n"
            f"| `mlflow.pyfunc.load_model(...).predict` in-process | {summary(local)} |\n\n"
            "The serve limits at work (GPTLAB_MAX_NEW_TOKENS=1000000):\n\n"
            "| request | answer |\n|---|---|\n" + "\n".join(limits) + "\n")
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
