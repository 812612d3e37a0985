"""How runs end: an interrupted and resumed run records what an uninterrupted one does, every
failure leaves a truthful status and one line, bad input records nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    TINY_GPT,
    one_line_error,
    only_run,
    record_of,
    run_cli,
    runs_in,
    store_uri,
)
from gptlab.cli import train as train_cli
from gptlab.tracking import store

# dropout on, so a resumed run must also continue the global random streams; every step
# logged; a checkpoint every 4 steps besides the validations at 10, 20 and the last step, 25
RECIPE = [*TINY_GPT, "model.dropout=0.1", "trainer.log_every_n_steps=1",
          "checkpoint.every_n_steps=4", "trainer.max_steps=25"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("lifecycle")
    res = run_cli("gptlab-train", [*RECIPE, "logger.experiment_name=straight"], tmp,
                  small_corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, record_of(MlflowClient(store_uri(tmp)), "straight", tmp)


@pytest.mark.parametrize("name, where, code", [
    ("sigterm-mid-interval", ["step=12", f"signum={signal.SIGTERM}"], 143),
    ("sigterm-on-validation-step", ["step=10", f"signum={signal.SIGTERM}"], 143),
    ("sigkill-after-periodic-checkpoint", ["step=13", f"signum={signal.SIGKILL}"], -9),
    ("sigkill-during-validation", ["when=validation", "step=20", f"signum={signal.SIGKILL}"],
     -9),
    ("ctrl-c-during-final-validation", ["when=final_validation", f"signum={signal.SIGINT}"],
     130),
    ("ctrl-c-before-final-sample", ["when=before_final_sample", f"signum={signal.SIGINT}"],
     130),
])
def test_interrupted_run_records_what_an_uninterrupted_one_does(straight, small_corpus, name,
                                                                 where, code):
    tmp, expected = straight
    first = run_cli("gptlab-train", [
        *RECIPE, f"logger.experiment_name={name}",
        "+callbacks.interrupt._target_=interrupt.SignalAt",
        f"+callbacks.interrupt.marker={tmp / name}.fired",
        *(f"+callbacks.interrupt.{w}" for w in where)], tmp, small_corpus)
    assert first.returncode == code, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, name)
    # a signal it could catch ends the run KILLED; SIGKILL leaves it RUNNING, resumable
    assert run.info.status == ("RUNNING" if code == -9 else "KILLED")
    if code != -9:
        assert f"resume={run.info.run_id}" in first.stderr
    resumed = run_cli("gptlab-train", ["resume=latest", f"logger.experiment_name={name}"],
                      tmp, small_corpus)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert record_of(client, name, tmp) == expected


def test_an_unexpected_failure_ends_the_run_failed_with_its_reason(tmp_path, small_corpus):
    res = run_cli("gptlab-train", [*TINY_GPT, "logger.experiment_name=boom",
                                   "+callbacks.boom._target_=interrupt.RaiseAt",
                                   "+callbacks.boom.step=3"], tmp_path, small_corpus)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == "error: RuntimeError: boom at step 3"
    run = only_run(MlflowClient(store_uri(tmp_path)), "boom")
    assert run.info.status == "FAILED"
    assert run.data.tags["gptlab.error"] == "RuntimeError: boom at step 3"


def test_a_signal_just_after_the_run_opens_ends_it_killed(tmp_path, small_corpus):
    # before the first step: the run stops at the end of step 1, checkpointed
    res = run_cli("gptlab-train", [*TINY_GPT, "logger.experiment_name=early",
                                   "+callbacks.stop._target_=interrupt.SignalAt",
                                   f"+callbacks.stop.marker={tmp_path / 'fired'}",
                                   "+callbacks.stop.when=setup"], tmp_path, small_corpus)
    assert res.returncode == 143, res.stderr[-2000:]
    client = MlflowClient(store_uri(tmp_path))
    run = only_run(client, "early")
    assert run.info.status == "KILLED"
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert names == ["step_000001.ckpt"]


@pytest.mark.parametrize("overrides, words", [
    (["trainer=gpu"], ["needs a CUDA GPU", "trainer=cpu"]),
    (["experiment=shakespeare_char"], ["needs a CUDA GPU"]),
    (["+trainer.foo=1"], ["unknown key trainer.foo"]),
    (["+optim.lrr=1"], ["unknown key optim.lrr"]),
    (["+model.foo=1"], ["unknown key model.foo"]),
    (["optim.lrr=1"], ["optim.lrr", "+optim.lrr=1"]),
    (["model=nope"], ["model/nope", "bigram"]),
    (["experiment=nope"], ["experiment/nope"]),
    (["model.n_layer=[1"], ["[1"]),
    (["model.n_layer=abc"], ["model.n_layer must be a positive integer"]),
    (["optim.lr=nan"], ["optim.lr"]),
    (["optim.lr="], ["optim.lr"]),
    (["seed=abc"], ["seed"]),
    (["trainer.val_check_interval=0.5"], ["trainer.val_check_interval"]),
    (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps"]),
    (["model.n_embd=30", "model.n_head=4"], ["n_embd", "divisible"]),
    (["data.path=/no/such/corpus.txt"], ["/no/such/corpus.txt"]),
    (["data.block_size=100000"], ["fewer than data.block_size"]),
    (["callbacks.sample.window=rolling"], ["window", "rolling"]),
    (["logger.tracking_uri=ftp2://x"], ["scheme"]),
])
def test_bad_training_input_is_one_line_and_records_nothing(in_process, capsys, tmp_path,
                                                              overrides, words):
    store.connect(store_uri(tmp_path))  # a store that exists, to show nothing was added to it
    code, _, err = in_process(train_cli.main, [*TINY_GPT, *overrides], capsys)
    one_line_error(code, err, *words)
    assert runs_in(tmp_path) == []


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe not utf-8 \xff", "not UTF-8"),
    (b"", "empty"),
    (None, "no files in the corpus"),  # an empty folder
])
def test_unusable_corpus(in_process, capsys, tmp_path, content, words):
    corpus = tmp_path / "corpus"
    if content is None:
        corpus.mkdir()
    else:
        corpus.write_bytes(content)
    code, _, err = in_process(train_cli.main, [*TINY_GPT, f"data.path={corpus}"], capsys)
    one_line_error(code, err, words)


def test_signal_handlers_are_restored_after_a_run(in_process, capsys):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    code, _, err = in_process(train_cli.main, [*TINY_GPT, "trainer.max_steps=2"], capsys)
    assert code == 0, err
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_failed_resume_leaves_the_finished_run_as_it_was(tmp_path, small_corpus):
    res = run_cli("gptlab-train", [*TINY_GPT, "logger.experiment_name=done"], tmp_path,
                  small_corpus)
    assert res.returncode == 0, res.stderr[-2000:]
    client = MlflowClient(store_uri(tmp_path))
    run = only_run(client, "done")
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml",
                                            str(tmp_path / "a"))).read_text()
    # an override resume accepts, that then fails while the trainer is built
    bad = run_cli("gptlab-train", [f"resume={run.info.run_id}", "trainer.max_steps=40",
                                   "trainer.accelerator=gpu"], tmp_path, small_corpus)
    one_line_error(bad.returncode, bad.stderr, "needs a CUDA GPU")
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags == run.data.tags
    assert Path(client.download_artifacts(run.info.run_id, "config.yaml",
                                          str(tmp_path / "b"))).read_text() == config


def test_a_job_killed_and_started_again_twice_ends_as_one_run(straight, small_corpus):
    # a preempted cluster job is started again with the same command; resume=auto continues
    # its run from the last checkpoint, however often that happens
    tmp, expected = straight
    command = [*RECIPE, "logger.experiment_name=requeued", "resume=auto"]
    # checkpoints are stored on a background thread, and each one waits for the one before
    # to be stored: killed at step 9, the run surely holds step 4's (the checkpoint of step
    # 8 waited for it), so the next start has something to continue
    for i, step in enumerate((9, 15)):
        command += [f"+callbacks.kill{i}._target_=interrupt.SignalAt",
                    f"+callbacks.kill{i}.marker={tmp / f'requeued-{i}.fired'}",
                    f"+callbacks.kill{i}.step={step}", f"+callbacks.kill{i}.signum=9"]
    codes = [run_cli("gptlab-train", command, tmp, small_corpus).returncode for _ in range(3)]
    assert codes == [-9, -9, 0]
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "requeued")  # one run, however many starts
    assert len([k for k in run.data.tags if k.startswith("gptlab.resume.")]) == 2
    assert record_of(client, "requeued", tmp) == expected


def test_auto_resume_ends_a_run_killed_before_its_first_checkpoint(tmp_path, small_corpus):
    command = [*TINY_GPT, "logger.experiment_name=early", "resume=auto",
               "+callbacks.kill._target_=interrupt.SignalAt",
               f"+callbacks.kill.marker={tmp_path / 'fired'}", "+callbacks.kill.when=setup",
               "+callbacks.kill.signum=9"]
    assert run_cli("gptlab-train", command, tmp_path, small_corpus).returncode == -9
    assert run_cli("gptlab-train", command, tmp_path, small_corpus).returncode == 0
    client = MlflowClient(store_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    # nothing to continue: a new run, and the orphan no longer says RUNNING
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
