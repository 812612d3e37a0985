"""From run to model: the run's logged MLflow model loads anywhere and generates what
gptlab-sample does, serves over HTTP, is registered and promoted by alias; system metrics.
gptlab-train and gptlab-sample run in this process (their main()); a fresh interpreter and
`mlflow models serve` are processes of their own."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    BIN,
    TINY_GPT,
    call_main,
    cli,
    cli_env,
    free_port,
    one_line_error,
    only_run,
    store_uri,
    wait_until,
)
from gptlab.cli import sample as sample_cli
from gptlab.cli import train as train_cli
from gptlab.tracking.logged_model import load

NAME = "tiny-shakespeare"
PROMPT_PARAMS = {"max_new_tokens": 40, "seed": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """A finished run, registered, that ran long enough for system metrics to be sampled."""
    tmp = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main, [
            *TINY_GPT, "logger.experiment_name=served", f"logger.register_model={NAME}",
            "logger.system_metrics_interval=1", "+callbacks.pace._target_=interrupt.Pace",
            "+callbacks.pace.seconds=0.15"])
    assert code == 0
    return tmp, only_run(MlflowClient(store_uri(tmp)), "served")


def sample(monkeypatch, capsys, tmp, corpus, *args) -> str:
    code, out, err = cli(monkeypatch, capsys, tmp, corpus, sample_cli.main,
                         ["prompt=ROMEO:", "max_new_tokens=40", "seed=1", *args])
    assert code == 0, err[-3000:]
    return out.removesuffix("\n")


def test_the_logged_model_predicts_in_a_fresh_process_what_gptlab_sample_prints(
        trained, small_corpus, tmp_path, monkeypatch, capsys):
    tmp, run = trained
    expected = sample(monkeypatch, capsys, tmp, small_corpus, f"run_id={run.info.run_id}")
    # a fresh interpreter elsewhere, with the installed package only: no checkout on the
    # path, no corpus, no config
    code = (f"import json, mlflow; m = mlflow.pyfunc.load_model('runs:/{run.info.run_id}/"
            f"model'); print(json.dumps(m.predict(['ROMEO:', 'JULIET:'], "
            f"params={PROMPT_PARAMS!r})))")
    env = {k: v for k, v in cli_env(tmp, small_corpus).items() if k != "PYTHONPATH"}
    env["GPTLAB_DATA"] = str(tmp_path / "no-corpus-here.txt")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    texts = json.loads(res.stdout.strip().splitlines()[-1])
    assert texts[0] == expected and texts[1].startswith("JULIET:")


def test_the_model_declares_what_loading_it_needs(trained):
    tmp, run = trained
    client = MlflowClient(store_uri(tmp))
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    mlflow.set_tracking_uri(store_uri(tmp))
    local = mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                dst_path=str(tmp / "model"))
    requirements = open(os.path.join(local, "requirements.txt")).read()
    assert "gptlab==" in requirements and "torch==" in requirements
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"max_new_tokens": 500, "temperature": 1.0, "top_k": 0, "seed": 1337}


def test_a_registered_version_samples_by_alias_and_by_number(trained, small_corpus,
                                                             monkeypatch, capsys):
    tmp, run = trained
    client = MlflowClient(store_uri(tmp))
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert version.run_id == run.info.run_id
    client.set_registered_model_alias(NAME, "champion", version.version)

    def sample_(*args) -> str:
        return sample(monkeypatch, capsys, tmp, small_corpus, *args)

    expected = sample_(f"run_id={run.info.run_id}")
    assert sample_(f"model=models:/{NAME}@champion") == expected
    assert sample_(f"model=models:/{NAME}/{version.version}") == expected
    for uri, words in ((f"models:/{NAME}@nope", ["cannot load model", "alias nope"]),
                       ("models:/no-such-model/1", ["cannot load model", "no-such-model"])):
        code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, sample_cli.main,
                           [f"model={uri}"])
        one_line_error(code, err, *words)
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, sample_cli.main,
                       [f"model=models:/{NAME}@champion", "prompt='Roméo'"])
    one_line_error(code, err, "not in the vocabulary", "é")


def post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_with_generated_text(trained, small_corpus, monkeypatch,
                                                         capsys):
    tmp, run = trained
    port = free_port()
    # `mlflow models serve` starts `uvicorn` by name: the environment's bin/ must be on PATH,
    # as it is in an activated venv
    env = cli_env(tmp, small_corpus)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"runs:/{run.info.run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        # what gptlab-sample prints, while the server starts
        expected = sample(monkeypatch, capsys, tmp, small_corpus, f"run_id={run.info.run_id}")

        def up() -> bool:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(up, 180, "mlflow models serve to start", poll=0.5)
        code, answer = post(port, {"inputs": ["ROMEO:", "JULIET:"], "params": PROMPT_PARAMS})
        assert code == 200, answer
        assert answer["predictions"][0] == expected
        assert answer["predictions"][1].startswith("JULIET:")
        # bad requests: a 4xx with the reason in one line, and the server goes on serving
        for body, words in (({"inputs": []}, "no prompts"),
                            ({"inputs": ["a"], "params": {"temperature": -1}}, "temperature"),
                            ({"inputs": ["a"], "params": {"max_new_tokens": "many"}},
                             "max_new_tokens")):
            code, answer = post(port, body)
            assert 400 <= code < 500, (body, code, answer)
            assert words in answer.get("message", ""), answer
        code, answer = post(port, {"inputs": ["ROMEO:"], "params": PROMPT_PARAMS})
        assert code == 200 and answer["predictions"] == [expected]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_runs_record_system_metrics_through_mlflow(trained):
    tmp, run = trained
    cpu = MlflowClient(store_uri(tmp)).get_metric_history(
        run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 for m in cpu)
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_a_resumed_run_logs_its_new_best_and_switches_are_off_by_one_key(
        trained, small_corpus, monkeypatch, capsys):
    tmp, run = trained
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, train_cli.main,
                       [f"resume={run.info.run_id}", "trainer.max_steps=30"])
    assert code == 0, err[-3000:]
    client = MlflowClient(store_uri(tmp))
    models = client.search_logged_models([run.info.experiment_id],
                                         order_by=[{"field_name": "creation_timestamp"}])
    assert [m.source_run_id for m in models] == [run.info.run_id] * 2
    best = client.get_run(run.info.run_id).data.tags["gptlab.best_checkpoint"]
    mlflow.set_tracking_uri(store_uri(tmp))
    assert f"step_{load(f'runs:/{run.info.run_id}/model').info['step']:06d}.ckpt" == best
    # the registered version is a new one only when asked: the resumed run registered again
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, train_cli.main,
                       [*TINY_GPT, "logger.experiment_name=plain", "logger.log_model=false",
                        "logger.system_metrics=false"])
    assert code == 0, err[-3000:]
    plain = only_run(client, "plain")
    assert not client.search_logged_models([plain.info.experiment_id])
    assert not [k for k in plain.data.metrics if k.startswith("system/")]
