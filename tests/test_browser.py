"""The MLflow UI, in a real browser (headless Chromium driven by Playwright), over a store
holding a sweep: the link gptlab prints opens the model-training view, where the sweep is
one row that expands into its children, and a run's sample can be read.

The sweep trains in this process, on one thread, while the UI server starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_GPT, call_main, free_port, store_uri, wait_until
from gptlab.cli import train as train_cli
from gptlab.tracking import store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (make test)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (make test installs it)")


@pytest.fixture(scope="module")
def ui(tmp_path_factory, small_corpus):
    """A sweep of two runs (trained in this process), and `mlflow ui` over its store on
    127.0.0.1, started on the store before the sweep: its start-up overlaps the training."""
    tmp = tmp_path_factory.mktemp("ui")
    threads = torch.get_num_threads()
    store.connect(store_uri(tmp))  # the store made before the server opens it
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", store_uri(tmp), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=tmp, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # tiny models: one thread is as fast, and far faster on a busy machine
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as m:
            code = call_main(m, tmp, small_corpus, train_cli.main,
                             ["-m", *TINY_GPT, "optim.lr=1e-3,2e-3", "logger.experiment_name=ui"])
        assert code == 0
    except BaseException:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        raise
    finally:
        torch.set_num_threads(threads)

    def up() -> bool:
        assert server.poll() is None, "mlflow ui exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 120, "mlflow ui to start", poll=0.5)
        yield tmp, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def page():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def test_the_ui_shows_the_sweep_its_children_and_a_sample(ui, page):
    tmp, base = ui
    client = MlflowClient(store_uri(tmp))
    experiment = client.get_experiment_by_name("ui")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("gptlab.sweep") == "true"]
    children = sorted(r.info.run_name for r in runs if r is not parent)
    assert children == ["lr=0.001", "lr=0.002"]

    # the experiment link as gptlab prints it, on the UI server: the model-training view
    link = store.ui_url(base, experiment.experiment_id)
    page.goto(link)
    page.get_by_text(parent.info.run_name, exact=True).wait_for(timeout=60_000)
    # the runs table, not the GenAI overview MLflow opens by default (traces, Detect Issues)
    assert "workflowType=machine_learning" in page.url and "/overview" not in page.url
    assert page.get_by_text("Detect Issues").count() == 0
    # the sweep is one row; expanding it shows its children
    row = page.get_by_role("row").filter(has_text=parent.info.run_name)
    row.locator("button").first.click()
    for name in children:
        page.get_by_text(name, exact=True).wait_for(timeout=30_000)

    # a child's final sample, read in the run's artifacts
    child = next(r for r in runs if r.info.run_name == "lr=0.002")
    text = Path(client.download_artifacts(child.info.run_id, "samples/final.txt",
                                          str(tmp))).read_text().strip()
    run_link = store.ui_url(base, experiment.experiment_id, child.info.run_id)
    page.goto(run_link.replace("?", "/artifacts/samples/final.txt?"))
    page.get_by_text(text.splitlines()[0][:20]).first.wait_for(timeout=60_000)
