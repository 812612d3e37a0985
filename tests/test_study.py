"""Optuna searches that processes share: one study in a database, trials claimed under a lock,
one MLflow parent run per study, a stopped search continued, bad settings refused.

Processes sharing a study, and a search stopped by a signal, run as gptlab-train processes;
a search that one process runs, before or after them, runs in this process (train)."""

import signal
import subprocess

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import (
    BIN,
    TINY_GPT,
    call_main,
    cli_env,
    one_line_error,
    run_cli,
    runs_in,
    seed,
    store_uri,
)
from gptlab.cli import train as train_cli
from gptlab.errors import GptlabError
from gptlab.sweeps import study as studies

SEARCH = ["hparams_search=lr_dropout_optuna", *TINY_GPT, "logger.experiment_name=search"]


def load(tmp):
    return optuna.load_study(study_name="lr_dropout",
                             storage=f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}")



def train(monkeypatch: pytest.MonkeyPatch, tmp, corpus, args: list[str], capsys
          ) -> tuple[int, str, str]:
    """`gptlab-train ARGS` in this process (one process is all a search needs unless processes
    sharing it are the point), in `tmp`: (exit code, stdout, stderr). A sweep's state in this
    process is put back afterwards: a later command here neither takes its exit code from the
    sweeps ended before it nor filters its console as a sweep's job."""
    capsys.readouterr()
    code = call_main(monkeypatch, tmp, corpus, train_cli.main, args)
    out = capsys.readouterr()
    return code, out.out, out.err


def study_runs(tmp):
    """The study's parent run and its children."""
    client = MlflowClient(store_uri(tmp))
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("gptlab.study") == "lr_dropout"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == len(runs) - 1  # nothing outside the one parent
    return parent, kids


def test_two_processes_started_together_share_one_study(tmp_path, small_corpus):
    command = [str(BIN / "gptlab-train"), *SEARCH, "hydra.sweeper.n_trials=6"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=cli_env(tmp_path, small_corpus),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    trials = load(tmp_path).get_trials()
    for t in trials:
        print(f"trial {t.number}: {t.state.name} value={t.value:.4f} params={t.params}")
    # the count is a total, and no trial was run twice
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = [{line.split()[1] for line in out.splitlines() if line.startswith("job ")
            and " finished: " in line} for out in outs]
    assert ran[0] and ran[1] and not ran[0] & ran[1] and len(ran[0] | ran[1]) == 6
    # the two processes' samplers were seeded apart: no two trials proposed the same values
    assert len({tuple(t.params.values()) for t in trials}) == 6
    parent, kids = study_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert sorted((float(r.data.params["optim.lr"]), float(r.data.params["model.dropout"]))
                  for r in kids) == sorted((t.params["optim.lr"], t.params["model.dropout"])
                                           for t in trials)
    assert all(r.info.status == "FINISHED" for r in kids)
    best = min(trials, key=lambda t: t.value)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value, abs=1e-6)


def test_a_stopped_search_started_again_continues_its_study(tmp_path, empty_store,
                                                            small_corpus, monkeypatch, capsys):
    seed(empty_store, tmp_path)
    stop = ["+callbacks.stop._target_=interrupt.SignalAt",
            f"+callbacks.stop.marker={tmp_path / 'fired'}", "+callbacks.stop.step=15",
            f"+callbacks.stop.signum={signal.SIGINT}"]
    command = [*SEARCH, "hydra.sweeper.n_trials=3", *stop]
    # the stop signal goes to a gptlab-train process; the starts after it (the marker says the
    # signal fired: none is sent again) continue the study in this process
    first = run_cli("gptlab-train", command, tmp_path, small_corpus)
    assert first.returncode == 130, first.stderr[-3000:]
    parent, kids = study_runs(tmp_path)
    assert parent.info.status == "KILLED" and [r.info.status for r in kids] == ["KILLED"]
    code, _, err = train(monkeypatch, tmp_path, small_corpus, command, capsys)
    assert code == 0, err[-3000:]
    trials = load(tmp_path).get_trials()
    # the stopped trial is run again as a new one; three trials counted in all
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs[studies.INTERRUPTED_ATTR]
    same_parent, kids = study_runs(tmp_path)
    assert same_parent.info.run_id == parent.info.run_id
    assert same_parent.info.status == "FINISHED"
    assert sorted(r.info.status for r in kids) == ["FINISHED"] * 3 + ["KILLED"]
    # asked for more trials, the study goes on from where it stands
    code, _, err = train(monkeypatch, tmp_path, small_corpus,
                         [*command, "hydra.sweeper.n_trials=4"], capsys)
    assert code == 0, err[-3000:]
    assert len(load(tmp_path).get_trials(states=(TrialState.COMPLETE,))) == 4
    assert len(study_runs(tmp_path)[1]) == 5


@pytest.mark.slow  # 15 s or more
def test_processes_share_a_study_kept_in_postgresql(postgres, tmp_path, small_corpus,
                                                   monkeypatch, capsys):
    url = postgres.create_database(driver=False)  # a plain postgresql:// URL, as users give
    command = [str(BIN / "gptlab-train"), *SEARCH, "hydra.sweeper.n_trials=4",
               f"hydra.sweeper.storage={url}"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=cli_env(tmp_path, small_corpus),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    trials = optuna.load_study(study_name="lr_dropout",
                               storage=url.replace("postgresql://", "postgresql+psycopg://"),
                               ).get_trials()
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(4)]
    parent, kids = study_runs(tmp_path)
    assert parent.info.status == "FINISHED" and len(kids) == 4
    # a wrong password: one line, the password not shown, nothing recorded
    wrong = url.replace(f":{postgres.PASSWORD}@", ":not-the-password@")
    code, _, err = train(monkeypatch, tmp_path, small_corpus,
                         [*SEARCH, f"hydra.sweeper.storage={wrong}"], capsys)
    line = one_line_error(code, err, "cannot open the study storage",
                          "password authentication failed")
    assert "not-the-password" not in line
    assert len(study_runs(tmp_path)[1]) == 4


@pytest.fixture(scope="module")
def one_trial(tmp_path_factory, small_corpus, empty_store):
    tmp = seed(empty_store, tmp_path_factory.mktemp("study"))
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main,
                         [*SEARCH, "hydra.sweeper.n_trials=1"])
    assert code == 0
    return tmp


@pytest.mark.parametrize("override, words", [
    (["optim.lr=interval(0.1,0.2)"], ["searches another space", "study_name"]),
    (["hydra.sweeper.direction=maximize"], ["made to minimize, not to maximize"]),
    (["hydra.sweeper.storage=postgresql://gptlab:wrong@127.0.0.1:9/optuna"],
     ["cannot open the study storage", "***"]),
    (["hydra.sweeper.storage=mysql://x/y"], ["sqlite:///", "postgresql://"]),
    (["hydra.sweeper.n_trials=0"], ["n_trials"]),
])
def test_a_bad_search_is_one_line_and_records_nothing(one_trial, small_corpus, monkeypatch,
                                                     capsys, override, words):
    before = {r.info.run_id: r.info.status for r in runs_in(one_trial)}
    trials = len(load(one_trial).get_trials())
    code, _, err = train(monkeypatch, one_trial, small_corpus,
                         [*SEARCH, "hydra.sweeper.n_trials=2", *override], capsys)
    line = one_line_error(code, err, *words)
    assert "wrong" not in line  # a password is never printed
    assert {r.info.run_id: r.info.status for r in runs_in(one_trial)} == before
    assert len(load(one_trial).get_trials()) == trials


def test_search_space_reads_hydras_sweep_syntax():
    space, fixed = studies.search_space(
        {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "model.dropout": "interval(0, 0.3)",
         "model.n_layer": "range(1, 5)", "model.mlp": "choice(gelu, swiglu)", "seed": "7"},
        ["model.n_head=2,4", "trainer.max_steps=20"])
    assert space == {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
                     "model.dropout": FloatDistribution(0.0, 0.3),
                     "model.n_layer": IntDistribution(1, 4),
                     "model.mlp": CategoricalDistribution(["gelu", "swiglu"]),
                     "model.n_head": CategoricalDistribution([2, 4])}
    assert fixed == ["seed=7", "trainer.max_steps=20"]
    for bad in ("interval(0.3, 0.1)", "tag(log, interval(0, 1))"):
        with pytest.raises(GptlabError, match="optim.lr"):
            studies.distribution("optim.lr", bad)
    with pytest.raises(GptlabError, match="nothing to search"):
        studies.search_space({}, ["seed=1"])
