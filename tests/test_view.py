"""What a user sees: progress in a log file, a sweep's terminal output, callbacks and loggers
added from the command line, and what a run shows in MLflow. What a real process shows (a log
file as it grows, a sweep's terminal, `--help`'s start-up) runs in a process of its own; the
rest calls the console scripts' main() in this process."""

from __future__ import annotations

import contextlib
import csv
import io
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    TINY_GPT,
    call_main,
    cli_env,
    only_run,
    run_cli,
    store_uri,
    wait_until,
)
from gptlab.cli import sample as sample_cli
from gptlab.cli import train as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def one_thread_env(tmp, corpus) -> dict[str, str]:
    """cli_env, with torch on one thread in the subprocess too: what it prints is the
    subject, and one thread trains the tiny model as fast, far faster on a busy machine."""
    return {**cli_env(tmp, corpus), "OMP_NUM_THREADS": "1"}


def test_a_log_file_grows_during_the_run_one_line_per_validation(tmp_path, small_corpus):
    # a process of its own, its output to a file: what `nohup gptlab-train ... > train.log`
    # shows while it runs (60 steps, paced, so that it still runs when step 30 is logged)
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "gptlab-train"), *TINY_GPT, "trainer.max_steps=60",
             "trainer.val_check_interval=15", "+callbacks.pace._target_=interrupt.Pace",
             "+callbacks.pace.seconds=0.05", "logger.experiment_name=log"],
            cwd=tmp_path, env=one_thread_env(tmp_path, small_corpus), stdout=out,
            stderr=subprocess.STDOUT)
        # while it trains, the lines of the first validations are already there
        wait_until(lambda: "step 30/60" in log.read_text() or proc.poll() is not None, 120,
                   "the progress line of step 30")
        assert proc.poll() is None, log.read_text()[-2000:]
        assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
    lines = log.read_text().splitlines()
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert [ln.split()[1] for ln in progress] == ["15/60", "30/60", "45/60", "60/60"]
    assert all("loss" in ln and "val" in ln and "tok/s" in ln and "left" in ln
               for ln in progress)
    # the same lines, with times, in the run's own log file under outputs/
    (run_log,) = tmp_path.glob("outputs/*/*/gptlab-train.log")
    assert sum(" step 30/60 " in ln for ln in run_log.read_text().splitlines()) == 1


def test_a_sweep_prints_a_line_per_job_and_a_summary(tmp_path, small_corpus):
    res = run_cli("gptlab-train", ["-m", *TINY_GPT, "optim.lr=1e-3,2e-3", "model.n_layer=1,2",
                                   "trainer.enable_progress_bar=true",
                                   "logger.experiment_name=quiet"], tmp_path, small_corpus,
                  env=one_thread_env(tmp_path, small_corpus))
    assert res.returncode == 0, res.stderr[-3000:]
    out = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(out) == 9, out  # 4 jobs started, 4 finished, the summary
    assert sum(ln.endswith("started") for ln in out) == 4
    finished = [ln for ln in out if " finished: best val/loss " in ln]
    assert len(finished) == 4 and all(", run " in ln for ln in finished)
    assert out[-1].startswith("sweep finished: 4 runs under MLflow run ")


@pytest.fixture(scope="module")
def extras(tmp_path_factory, small_corpus):
    """One run with Lightning's EarlyStopping and LearningRateMonitor and a CSV logger
    added from the command line; returns (its folder, what it printed on stdout)."""
    tmp = tmp_path_factory.mktemp("extras")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        code = call_main(m, tmp, small_corpus, train_cli.main, [
            *TINY_GPT, "trainer.max_steps=40", "callbacks=[default,early_stopping,lr_monitor]",
            # stop at the first validation whose loss is below this: the first one
            "+callbacks.early_stopping.stopping_threshold=100.0", "logger=[mlflow,csv]",
            "optim.lr=3e-3", "logger.experiment_name=extras"])
    assert code == 0, stderr.getvalue()[-3000:]
    return tmp, stdout.getvalue()


def test_lightning_callbacks_and_loggers_from_the_command_line(extras):
    tmp, _ = extras
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "extras")
    assert run.info.status == "FINISHED"
    # EarlyStopping ended training at the first validation (step 10 of 40)
    val = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    assert [m.step for m in val] == [10]
    # LearningRateMonitor's metrics (one per parameter group) reached MLflow
    assert [k for k in run.data.metrics if k.startswith("lr-AdamW")] == ["lr-AdamW/pg1",
                                                                         "lr-AdamW/pg2"]
    # the CSV logger holds the same validation loss
    (metrics_csv,) = tmp.glob("outputs/*/*/csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/loss")]
    assert [(int(r["step"]), float(r["val/loss"])) for r in rows] == [
        (10, pytest.approx(val[0].value, abs=1e-6))]


def test_a_run_is_named_from_its_overrides(extras):
    tmp, _ = extras
    run = only_run(MlflowClient(store_uri(tmp)), "extras")
    # what changes training is in the name; where it is recorded, and callbacks, are not
    assert run.info.run_name == "n_layer=1 n_head=2 n_embd=16 block_size=16 batch_size=4 " \
                                "eval_iters=2 max_steps=40 val_check_interval=10 lr=0.003"


def test_a_run_shows_its_creator_dataset_and_the_params_worth_comparing(extras, small_corpus):
    tmp, stdout = extras
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "extras")
    assert run.data.tags["mlflow.user"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "small" and inp.tags[0].value == "training"
    assert '"train_characters": 18000' in inp.dataset.profile
    params = run.data.params
    assert params["model.class"] == "GPT" and params["optim.lr"] == "0.003"
    assert not [k for k in params if k.startswith(("logger.", "hydra", "data.path"))
                or k.endswith("_target_") or k == "resume"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    url = (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
           f"{run.info.run_id}?workflowType=machine_learning")
    assert f"in the MLflow UI: {url}" in stdout


def test_a_callback_entry_that_cannot_be_built_is_one_line(in_process, capsys):
    for extra, words in (
            (["+callbacks.lrmon.logging_interval=step"], "callbacks.lrmon names no class"),
            (["+callbacks.lrmon._target_=pytorch_lightning.callbacks.Nope"],
             "cannot build callbacks.lrmon")):
        code, _, err = in_process(train_cli.main, [*TINY_GPT, *extra], capsys)
        assert code == 2 and "Traceback" not in err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], err


def test_checkpoint_keep_and_best_by_reference(in_process, capsys, tmp_path):
    code, _, err = in_process(train_cli.main, [*TINY_GPT, "trainer.max_steps=50",
                                               "checkpoint.keep=3",
                                               "logger.experiment_name=keep"], capsys)
    assert code == 0, err[-2000:]
    client = MlflowClient(store_uri(tmp_path))
    run = only_run(client, "keep")
    names = sorted(Path(f.path).name
                   for f in client.list_artifacts(run.info.run_id, "checkpoints"))
    best = run.data.tags["gptlab.best_checkpoint"]
    assert names == sorted({"step_000030.ckpt", "step_000040.ckpt", "step_000050.ckpt", best})
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert best == f"step_{min(val, key=val.get):06d}.ckpt"
    code, _, err = in_process(sample_cli.main, [f"run_id={run.info.run_id}",
                                                "max_new_tokens=5"], capsys)
    assert code == 0
    assert f"checkpoints/{best}, step {int(best[5:11])}" in err


def test_sample_help_lists_its_own_keys_only():
    start = time.time()
    res = subprocess.run([str(BIN / "gptlab-sample"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    assert "run_id" in res.stdout and "which" in res.stdout and "kv_cache" in res.stdout
    assert "optim" not in res.stdout and "experiment:" not in res.stdout
    assert time.time() - start < 30  # a bound for a loaded machine: the figure is in README
