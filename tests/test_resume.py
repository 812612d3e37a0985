"""Resuming runs from the checkpoints they logged: exactly, and after interruptions.

A run stopped by a signal or killed is a gptlab-train process of its own, sent the signal from
this process; those processes all start at once as the module begins (`started`), so that their
start-ups overlap one another and the test that runs in this process meanwhile. The resumes run
in this process (call_main). A
new store starts as a copy of an empty one made once (`empty_store`): creating an MLflow store
costs a second of CPU or more, copying one a few milliseconds. Every run trains on one thread
(`one_thread`), here and in the processes alike."""

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, TINY_GPT, call_main, cli_env, copy_run, only_run, seed, store_uri
from gptlab.cli import train as train_cli

# dropout on, so the resumed run must also continue the global random streams
EXACT = [*TINY_GPT, "model.dropout=0.1", "optim.decay_steps=20", "trainer.val_check_interval=5",
         "trainer.log_every_n_steps=1", "logger.experiment_name=resume"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_id_of(stdout: str) -> str:
    return stdout.split("MLflow run id: ")[1].split()[0]


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                               key=lambda m: m.step)]


def final_weights(client, run_id, tmp):
    names = sorted(Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")
                   if Path(f.path).name.startswith("step_"))
    path = client.download_artifacts(run_id, f"checkpoints/{names[-1]}", str(tmp))
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_is_exact(in_process, capsys, tmp_path, empty_store):
    seed(empty_store, tmp_path)

    def train(*args: str) -> str:
        code, out, err = in_process(train_cli.main, list(args), capsys)
        assert code == 0, err[-2000:]
        return run_id_of(out)

    a = train(*EXACT, "trainer.max_steps=20")
    b = train(*EXACT, "trainer.max_steps=10")
    assert train(f"resume={b}", "trainer.max_steps=20") == b

    client = MlflowClient(store_uri(tmp_path))
    assert client.get_run(b).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 2
    va, vb = history(client, a, "val/loss"), history(client, b, "val/loss")
    assert [s for s, _ in va] == [s for s, _ in vb] == [5, 10, 15, 20]
    assert all(abs(x - y) < 1e-6 for (_, x), (_, y) in zip(va, vb, strict=True))
    # one point per step, none twice, none missing
    assert [s for s, _ in history(client, b, "train/loss")] == list(range(1, 21))
    wa, wb = final_weights(client, a, tmp_path / "a"), final_weights(client, b, tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    sample = [Path(client.download_artifacts(r, "samples/final.txt", str(tmp_path / r)))
              .read_text() for r in (a, b)]
    assert sample[0] == sample[1]
    assert "trainer.max_steps=20" in client.get_run(b).data.tags["gptlab.resume.1"]


def start_training(tmp: Path, corpus: Path, extra: list[str]) -> subprocess.Popen:
    env = dict(cli_env(tmp, corpus), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # one_thread
    args = [*TINY_GPT, "trainer.max_steps=100000", "trainer.val_check_interval=20",
            "trainer.log_every_n_steps=1", "logger.experiment_name=signals", *extra]
    # its output to files: a pipe nobody reads while it trains would fill and stall it
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        return subprocess.Popen([str(BIN / "gptlab-train"), *args], cwd=tmp, env=env,
                                stdout=out, stderr=err, text=True)


def wait_for_checkpoint(tmp: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((tmp / "mlruns").rglob("checkpoints/step_*.ckpt")):
            return
        assert proc.poll() is None, (tmp / "stderr").read_text()[-2000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


# the signal sent to a training process once it logged a checkpoint: its extra overrides,
# how long after the checkpoint it is sent, how long the process may take to end then
STOPS = {signal.SIGINT: ([], 0.0, 60), signal.SIGTERM: ([], 0.0, 60),
         signal.SIGKILL: (["checkpoint.every_n_steps=7"], 1.0, 30)}


@dataclass
class Stopped:
    folder: Path
    returncode: int
    seconds: float  # from the signal to the end of the process
    stderr: str


def train_and_stop(tmp: Path, corpus: Path, sig: signal.Signals) -> Stopped:
    """A training process, sent `sig` from here once it logged a checkpoint."""
    extra, pause, timeout = STOPS[sig]
    proc = start_training(tmp, corpus, extra)
    try:
        wait_for_checkpoint(tmp, proc)
        time.sleep(pause)
        proc.send_signal(sig)
        start = time.time()
        proc.wait(timeout=timeout)
        return Stopped(tmp, proc.returncode, time.time() - start,
                       (tmp / "stderr").read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def signal_of(item: pytest.Item) -> signal.Signals | None:
    if item.originalname == "test_sigkill_then_resume_latest":
        return signal.SIGKILL
    callspec = getattr(item, "callspec", None)
    if item.originalname == "test_stop_signal_checkpoints_then_resume_completes" and callspec:
        return callspec.params["sig"]
    return None


@pytest.fixture(scope="module", autouse=True)
def started(request, tmp_path_factory, one_thread):
    """The training processes the module's selected signal tests stop, all started as the
    module begins, each in a folder (a store) of its own, and each stopped by a thread of
    this process: by signal, a future of its Stopped."""
    sigs = {signal_of(i) for i in request.session.items
            if getattr(i, "module", None) is request.module} - {None}
    if not sigs:
        yield {}
        return
    corpus = request.getfixturevalue("small_corpus")
    empty = request.getfixturevalue("empty_store")
    with ThreadPoolExecutor(max_workers=len(sigs)) as pool:
        yield {sig: pool.submit(train_and_stop, seed(empty, tmp_path_factory.mktemp("signals")),
                                corpus, sig)
               for sig in sorted(sigs)}


def resume_to_finish(monkeypatch, capsys, tmp, corpus, client, run_id, extra_steps=10,
                     resume=None):
    step = tracking_step(client, run_id)
    capsys.readouterr()
    code = call_main(monkeypatch, tmp, corpus, train_cli.main, [
        f"resume={resume or run_id}", "logger.experiment_name=signals",
        f"trainer.max_steps={step + extra_steps}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, step + extra_steps + 1))


def tracking_step(client, run_id) -> int:
    return max(s for s, _ in history(client, run_id, "train/loss"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_checkpoints_then_resume_completes(started, monkeypatch, capsys,
                                                       small_corpus, sig, code):
    ended = started[sig].result()
    assert ended.seconds < 30
    tmp, err = ended.folder, ended.stderr
    assert ended.returncode == code, err[-2000:]
    assert "resume=" in err and "Traceback" not in err
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "signals")
    assert run.info.status == "KILLED"
    # the stop wrote a checkpoint at the step it stopped at
    stopped = tracking_step(client, run.info.run_id)
    names = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert f"step_{stopped:06d}.ckpt" in names
    resume_to_finish(monkeypatch, capsys, tmp, small_corpus, client, run.info.run_id)


def test_sigkill_then_resume_latest(started, monkeypatch, capsys, small_corpus):
    tmp = started[signal.SIGKILL].result().folder
    client = MlflowClient(store_uri(tmp))
    run = only_run(client, "signals")
    assert run.info.status == "RUNNING"
    resume_to_finish(monkeypatch, capsys, tmp, small_corpus, client, run.info.run_id,
                     resume="latest")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_run):
    """A copy of the suite's finished tiny run (experiment `tiny`), for resumes that fail."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("resume-bad"))


def snapshot(client, run_id):
    run = client.get_run(run_id)
    return (run.info.status, dict(run.data.tags),
            len(client.get_metric_history(run_id, "train/loss")))


def resume_fails(in_process, capsys, tmp, run_id, args, *words):
    client = MlflowClient(store_uri(tmp))
    before = snapshot(client, run_id)
    code, _, err = in_process(train_cli.main, [*args, f"logger.tracking_uri={store_uri(tmp)}"],
                              capsys)
    assert code == 2 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1, err
    for w in words:
        assert w in line[0], (w, line[0])
    assert snapshot(client, run_id) == before


def artifact_dir(tmp: Path, run_id: str) -> Path:
    return next((tmp / "mlruns" / "artifacts").glob(f"*/{run_id}/artifacts"))


def test_refused_override(in_process, capsys, finished_run):
    tmp, run_id = finished_run
    resume_fails(in_process, capsys, tmp, run_id,
                 [f"resume={run_id}", "model.n_layer=3", "data.block_size=8",
                  "trainer.max_steps=40"], "model.n_layer", "data.block_size")


def test_unknown_run(in_process, capsys, finished_run):
    tmp, run_id = finished_run
    resume_fails(in_process, capsys, tmp, run_id, ["resume=feedface"], "feedface")


def test_run_without_checkpoint(in_process, capsys, finished_run, tmp_path):
    tmp, _ = finished_run
    client = MlflowClient(store_uri(tmp))
    bare = client.create_run(client.get_experiment_by_name("tiny").experiment_id).info.run_id
    config = client.download_artifacts(_, "config.yaml", str(tmp_path))
    client.log_artifact(bare, config)
    resume_fails(in_process, capsys, tmp, bare, [f"resume={bare}"], "no checkpoint")


def with_damaged_checkpoints(tmp, run_id, damage):
    """Apply `damage` to every step checkpoint of a run; returns a function undoing it."""
    paths = sorted((artifact_dir(tmp, run_id) / "checkpoints").glob("step_*.ckpt"))
    saved = {p: p.read_bytes() for p in paths}
    for p in paths:
        damage(p)

    def restore():
        for p, data in saved.items():
            p.write_bytes(data)

    return restore


def test_truncated_checkpoint(in_process, capsys, finished_run):
    tmp, run_id = finished_run
    restore = with_damaged_checkpoints(
        tmp, run_id, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    try:
        resume_fails(in_process, capsys, tmp, run_id,
                     [f"resume={run_id}", "trainer.max_steps=40"], "cannot read checkpoint")
    finally:
        restore()


@pytest.mark.parametrize("what, words", [
    ("vocab", ["vocabulary"]),
    ("shape", ["weights do not match"]),
])
def test_mismatched_checkpoint(in_process, capsys, finished_run, what, words):
    tmp, run_id = finished_run

    def damage(p):
        ckpt = torch.load(p, weights_only=True)
        if what == "vocab":
            ckpt["gptlab"]["vocab"] = ckpt["gptlab"]["vocab"][::-1]
        else:
            key = next(k for k in ckpt["state_dict"] if k.endswith("c_fc.weight"))
            ckpt["state_dict"][key] = torch.zeros(3, 3)
        torch.save(ckpt, p)

    restore = with_damaged_checkpoints(tmp, run_id, damage)
    try:
        resume_fails(in_process, capsys, tmp, run_id,
                     [f"resume={run_id}", "trainer.max_steps=40"], *words)
    finally:
        restore()


def test_extend_finished_run(in_process, capsys, tmp_path, tiny_run):
    _, run_id = copy_run(tiny_run, tmp_path)
    code, _, err = in_process(train_cli.main, [f"resume={run_id}", "trainer.max_steps=30"],
                              capsys)
    assert code == 0, err[-2000:]
    client = MlflowClient(store_uri(tmp_path))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in history(client, run_id, "val/loss")] == [10, 20, 30]
