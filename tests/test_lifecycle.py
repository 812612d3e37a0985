"""How runs end: an interrupted and resumed run records what an uninterrupted one does, every
failure leaves a truthful status and one line, bad input records nothing.

A run ended by a signal or a kill is a gptlab-train process of its own; those processes all
start at once as the module begins (`started`), so that their start-ups, seconds each, overlap
one another and the tests that run in this process meanwhile. What follows an interruption (a
resume, a start again) and the uninterrupted reference run in this process (call_main). Each
store starts as a copy of an empty one made once (`empty_store`): creating an MLflow store
costs a second of CPU or more, copying one a few milliseconds. Every run trains on one thread
(`one_thread`), here and in the processes alike."""

from __future__ import annotations

import signal
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    TINY_GPT,
    call_main,
    cli_env,
    copy_run,
    one_line_error,
    only_run,
    record_of,
    run_cli,
    runs_in,
    seed,
    store_uri,
)
from gptlab.cli import train as train_cli

# dropout on, so a resumed run must also continue the global random streams; every step
# logged; a checkpoint every 4 steps besides the validations at 10, 20 and the last step, 25
RECIPE = [*TINY_GPT, "model.dropout=0.1", "trainer.log_every_n_steps=1",
          "checkpoint.every_n_steps=4", "trainer.max_steps=25"]

# where a run is interrupted, and the exit code of its process
INTERRUPTIONS = {
    "sigterm-mid-interval": (["step=12", f"signum={signal.SIGTERM}"], 143),
    "sigterm-on-validation-step": (["step=10", f"signum={signal.SIGTERM}"], 143),
    "sigkill-after-periodic-checkpoint": (["step=13", f"signum={signal.SIGKILL}"], -9),
    "sigkill-during-validation": (["when=validation", "step=20", f"signum={signal.SIGKILL}"],
                                  -9),
    "ctrl-c-during-final-validation": (["when=final_validation", f"signum={signal.SIGINT}"],
                                       130),
    "ctrl-c-before-final-sample": (["when=before_final_sample", f"signum={signal.SIGINT}"],
                                   130),
}


def signal_at(name: str, marker: Path, *where: str) -> list[str]:
    """A signal to the run's own process (tests/interrupt.py), once: `marker` remembers it."""
    return [f"+callbacks.{name}._target_=interrupt.SignalAt", f"+callbacks.{name}.marker={marker}",
            *(f"+callbacks.{name}.{w}" for w in where)]


@dataclass
class Job:
    """`starts` gptlab-train processes, one after the other, of one command in `folder` (its
    own store); `done` gives their results once they ended."""

    folder: Path
    command: list[str]
    starts: int = 1
    done: Future | None = None

    def results(self) -> list[subprocess.CompletedProcess]:
        assert self.done is not None
        return self.done.result()

    def fired(self) -> None:
        """Every signal of the command was sent: run here again, the command sends none to
        this process (pytest's)."""
        markers = [Path(a.partition("=")[2]) for a in self.command if ".marker=" in a]
        assert markers and all(m.exists() for m in markers), markers


EARLY = "test_a_signal_just_after_the_run_opens_ends_it_killed"
KILLED_EARLY = "test_auto_resume_ends_a_run_killed_before_its_first_checkpoint"
REQUEUED = "test_a_job_killed_and_started_again_twice_ends_as_one_run"
INTERRUPTED_TEST = "test_interrupted_run_records_what_an_uninterrupted_one_does"


def jobs(root: Path) -> dict[str, Job]:
    """The processes of each test, by the test's name (the interruption's, for the test of
    each interruption)."""
    out = {name: Job(root / name, [*RECIPE, f"logger.experiment_name={name}",
                                   *signal_at("interrupt", root / name / "fired", *where)])
           for name, (where, _) in INTERRUPTIONS.items()}
    # before the first step: the run stops at the end of step 1, checkpointed
    folder = root / "early"
    out[EARLY] = Job(folder, [
        *TINY_GPT, "logger.experiment_name=early",
        *signal_at("stop", folder / "fired", "when=setup")])
    # a preempted cluster job is started again with the same command: killed twice (at steps
    # 9 and 15), its third start is the test's. Checkpoints are stored on a background thread,
    # and each one waits for the one before to be stored: killed at step 9, the run surely
    # holds step 4's (the checkpoint of step 8 waited for it), so the next start has something
    # to continue
    folder = root / "requeued"
    command = [*RECIPE, "logger.experiment_name=requeued", "resume=auto"]
    for i, step in enumerate((9, 15)):
        command += signal_at(f"kill{i}", folder / f"fired-{i}", f"step={step}", "signum=9")
    out[REQUEUED] = Job(folder, command, 2)
    folder = root / "killed-early"
    out[KILLED_EARLY] = Job(folder, [
        *TINY_GPT, "logger.experiment_name=early", "resume=auto",
        *signal_at("kill", folder / "fired", "when=setup", "signum=9")])
    return out


def job_of(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and item.originalname == INTERRUPTED_TEST:
        return callspec.params["name"]
    return item.originalname


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def started(request, tmp_path_factory, one_thread):
    """The processes of this module's selected tests, all started as the module begins."""
    selected = {job_of(i) for i in request.session.items
                if getattr(i, "module", None) is request.module}
    todo = {}
    if selected & set(jobs(Path())):
        corpus = request.getfixturevalue("small_corpus")
        todo = {k: j for k, j in jobs(tmp_path_factory.mktemp("lifecycle")).items()
                if k in selected}
    if not todo:
        yield {}
        return

    def run(job: Job) -> list[subprocess.CompletedProcess]:
        env = dict(cli_env(job.folder, corpus), OMP_NUM_THREADS="1")  # as one_thread here
        return [run_cli("gptlab-train", job.command, job.folder, corpus, timeout=600, env=env)
                for _ in range(job.starts)]

    empty = request.getfixturevalue("empty_store")
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        for job in todo.values():
            seed(empty, job.folder)
            job.done = pool.submit(run, job)
        if set(todo) - {EARLY, KILLED_EARLY}:  # their reference, trained meanwhile
            request.getfixturevalue("straight")
        yield todo


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus, empty_store):
    """The uninterrupted run, in this process."""
    tmp = seed(empty_store, tmp_path_factory.mktemp("straight"))
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main,
                         [*RECIPE, "logger.experiment_name=straight"])
    assert code == 0
    return record_of(MlflowClient(store_uri(tmp)), "straight", tmp)


def train_here(monkeypatch, capsys, folder: Path, corpus: Path, args: list[str]) -> None:
    """`gptlab-train ARGS` in this process, in `folder`: it must succeed."""
    capsys.readouterr()
    code = call_main(monkeypatch, folder, corpus, train_cli.main, args)
    assert code == 0, capsys.readouterr().err[-3000:]


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
def test_bad_training_input_is_one_line_and_records_nothing(in_process, capsys, seeded,
                                                              overrides, words):
    # seeded: a store that exists, to show nothing was added to it
    code, _, err = in_process(train_cli.main, [*TINY_GPT, *overrides], capsys)
    one_line_error(code, err, *words)
    assert runs_in(seeded) == []


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe not utf-8 \xff", "not UTF-8"),
    (b"", "empty"),
    (None, "no files in the corpus"),  # an empty folder
])
def test_unusable_corpus(in_process, capsys, seeded, tmp_path, content, words):
    corpus = tmp_path / "corpus"
    if content is None:
        corpus.mkdir()
    else:
        corpus.write_bytes(content)
    code, _, err = in_process(train_cli.main, [*TINY_GPT, f"data.path={corpus}"], capsys)
    one_line_error(code, err, words)


def test_signal_handlers_are_restored_after_a_run(in_process, capsys, seeded):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    code, _, err = in_process(train_cli.main, [*TINY_GPT, "trainer.max_steps=2"], capsys)
    assert code == 0, err
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_an_unexpected_failure_ends_the_run_failed_with_its_reason(in_process, capsys,
                                                                    seeded):
    code, _, err = in_process(train_cli.main, [
        *TINY_GPT, "logger.experiment_name=boom", "+callbacks.boom._target_=interrupt.RaiseAt",
        "+callbacks.boom.step=3"], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: RuntimeError: boom at step 3"
    run = only_run(MlflowClient(store_uri(seeded)), "boom")
    assert run.info.status == "FAILED"
    assert run.data.tags["gptlab.error"] == "RuntimeError: boom at step 3"


def test_a_failed_resume_leaves_the_finished_run_as_it_was(in_process, capsys, tmp_path,
                                                            tiny_run):
    _, run_id = copy_run(tiny_run, tmp_path)
    client = MlflowClient(store_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    config = Path(client.download_artifacts(run_id, "config.yaml",
                                            str(tmp_path / "a"))).read_text()
    # an override resume accepts, that then fails while the trainer is built
    code, _, err = in_process(train_cli.main, [f"resume={run_id}", "trainer.max_steps=40",
                                               "trainer.accelerator=gpu"], capsys)
    one_line_error(code, err, "needs a CUDA GPU")
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags == run.data.tags
    assert Path(client.download_artifacts(run_id, "config.yaml",
                                          str(tmp_path / "b"))).read_text() == config


def test_a_signal_just_after_the_run_opens_ends_it_killed(started):
    job = started[EARLY]
    (res,) = job.results()
    assert res.returncode == 143, res.stderr[-2000:]
    client = MlflowClient(store_uri(job.folder))
    run = only_run(client, "early")
    assert run.info.status == "KILLED"
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert names == ["step_000001.ckpt"]


def test_auto_resume_ends_a_run_killed_before_its_first_checkpoint(started, monkeypatch,
                                                                     capsys, small_corpus):
    job = started[KILLED_EARLY]
    assert [r.returncode for r in job.results()] == [-9]
    job.fired()
    train_here(monkeypatch, capsys, job.folder, small_corpus, job.command)  # started again
    client = MlflowClient(store_uri(job.folder))
    runs = client.search_runs([client.get_experiment_by_name("early").experiment_id])
    # nothing to continue: a new run, and the orphan no longer says RUNNING
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_a_job_killed_and_started_again_twice_ends_as_one_run(started, straight, monkeypatch,
                                                              capsys, small_corpus):
    # a preempted cluster job is started again with the same command; resume=auto continues
    # its run from the last checkpoint, however often that happens
    job = started[REQUEUED]
    assert [r.returncode for r in job.results()] == [-9, -9]
    job.fired()
    train_here(monkeypatch, capsys, job.folder, small_corpus, job.command)  # the third start
    client = MlflowClient(store_uri(job.folder))
    run = only_run(client, "requeued")  # one run, however many starts
    assert len([k for k in run.data.tags if k.startswith("gptlab.resume.")]) == 2
    assert record_of(client, "requeued", job.folder) == straight


@pytest.mark.parametrize("name", INTERRUPTIONS)
def test_interrupted_run_records_what_an_uninterrupted_one_does(started, straight, monkeypatch,
                                                                 capsys, small_corpus, name):
    job, code = started[name], INTERRUPTIONS[name][1]
    (first,) = job.results()
    assert first.returncode == code, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    client = MlflowClient(store_uri(job.folder))
    run = only_run(client, name)
    # a signal it could catch ends the run KILLED; SIGKILL leaves it RUNNING, resumable
    assert run.info.status == ("RUNNING" if code == -9 else "KILLED")
    if code != -9:
        assert f"resume={run.info.run_id}" in first.stderr
    job.fired()
    train_here(monkeypatch, capsys, job.folder, small_corpus,
               ["resume=latest", f"logger.experiment_name={name}"])
    assert record_of(client, name, job.folder) == straight
