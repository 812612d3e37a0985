"""The real entry points, end to end, on a tiny GPT and a temporary MLflow store: one run
through `gptlab-train` and one `gptlab-sample` in processes of their own; what else samples
the run calls the same main() in this process."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, call_main, cli_env, one_line_error, run_cli, store_uri
from gptlab.cli import sample as sample_cli
from gptlab.data.tokenizer import CharTokenizer, from_checkpoint
from gptlab.models.checkpoints import model_from_checkpoint, read_checkpoint
from gptlab.models.generation import generate_text
from gptlab.models.gpt import GPT


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """One tiny training run through `gptlab-train`; returns (tmp dir, run id, stdout)."""
    tmp = tmp_path_factory.mktemp("train")
    # torch on one thread: the model is tiny, and one thread trains it as fast, far faster
    # on a busy machine (what it samples does not depend on the thread count)
    res = run_cli("gptlab-train", [*TINY_GPT, "logger.experiment_name=e2e"], tmp, small_corpus,
                  env={**cli_env(tmp, small_corpus), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = res.stdout.split("MLflow run id: ")[1].split()[0]
    return tmp, run_id, res.stdout


def test_run_records_params_metrics_samples_checkpoints(trained, small_corpus):
    tmp, run_id, stdout = trained
    vocab_size = len(set(small_corpus.read_text(encoding="utf-8")))
    client = MlflowClient(store_uri(tmp))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.n_layer"] == "1" and p["data.block_size"] == "16"
    assert p["optim.lr"] == "0.001" and p["vocab_size"] == str(vocab_size)
    assert int(p["n_params"]) > 0
    assert run.data.tags["gptlab.model_class"] == "gptlab.models.gpt.GPT"
    assert "mlflow.source.git.commit" in run.data.tags
    train_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    val = client.get_metric_history(run_id, "val/loss")
    assert [m.step for m in val] == [10, 20]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20
    for key in ("val/bpc", "lr", "tokens", "tokens_per_sec"):
        assert client.get_metric_history(run_id, key), key
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "vocab.json", "samples", "checkpoints"} <= artifacts
    samples = {Path(f.path).name for f in client.list_artifacts(run_id, "samples")}
    assert {"step_000010.txt", "step_000020.txt", "final.txt"} <= samples
    ckpts = {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")}
    assert ckpts == {"step_000010.ckpt", "step_000020.ckpt"}
    # the best by val/loss is named, not copied; the store is on this machine, so each
    # checkpoint was written once, into the run, and none is left under outputs/
    assert run.data.tags["gptlab.best_checkpoint"] in ckpts
    assert not list(tmp.glob("outputs/**/*.ckpt"))
    # the run ends by printing the sample it logged
    final = Path(client.download_artifacts(run_id, "samples/final.txt", str(tmp)))
    assert final.read_text() in stdout


def test_validation_sample_is_drawn_from_that_steps_weights(trained, small_corpus):
    # samples are drawn off the training thread, from a copy of the weights taken at the
    # validation: the text must be what the step's checkpoint gives
    tmp, run_id, _ = trained
    client = MlflowClient(store_uri(tmp))
    ckpt = read_checkpoint(Path(client.download_artifacts(
        run_id, "checkpoints/step_000010.ckpt", str(tmp / "dl"))))
    model = model_from_checkpoint(ckpt)
    expected = generate_text(model, from_checkpoint(ckpt["gptlab"]), "\n", 20, 1.0, None,
                             seed=1337)[0]
    logged = Path(client.download_artifacts(run_id, "samples/step_000010.txt", str(tmp / "dl")))
    assert logged.read_text() == expected


def test_sampling_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    model = GPT(vocab_size=3, block_size=8, n_layer=1, n_head=1, n_embd=8)
    before = torch.get_rng_state()
    a = generate_text(model, CharTokenizer("abc"), "a", 30, 1.0, None, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate_text(model, CharTokenizer("abc"), "a", 30, 1.0, None, seed=5) == a


def test_checkpoint_is_self_describing_and_safe_to_load(trained, small_corpus):
    tmp, run_id, _ = trained
    client = MlflowClient(store_uri(tmp))
    path = client.download_artifacts(run_id, "checkpoints/step_000020.ckpt", str(tmp))
    ckpt = torch.load(path, weights_only=True)
    info = ckpt["gptlab"]
    assert info["model_class"] == "gptlab.models.gpt.GPT"
    assert info["vocab"] == "".join(sorted(set(small_corpus.read_text(encoding="utf-8"))))
    assert info["model_kwargs"]["vocab_size"] == len(info["vocab"])
    assert info["step"] == 20


SAMPLE_ARGS = ["prompt=ROMEO:", "max_new_tokens=50", "num_samples=2", "seed=1", "top_k=10",
               "temperature=0.8"]


@pytest.fixture(scope="module")
def sampled(trained, small_corpus, tmp_path_factory):
    """`gptlab-sample` from the trained run, in a process of its own whose TMPDIR is an empty
    folder of its own; returns (its result, that folder)."""
    tmp, run_id, _ = trained
    scratch = tmp_path_factory.mktemp("scratch")
    res = run_cli("gptlab-sample", [f"run_id={run_id}", *SAMPLE_ARGS], tmp, small_corpus,
                  env={**cli_env(tmp, small_corpus), "TMPDIR": str(scratch)})
    return res, scratch


def test_sample_from_run(trained, sampled, small_corpus, monkeypatch, capsys):
    tmp, run_id, _ = trained
    res, _ = sampled
    assert res.returncode == 0, res.stderr
    texts = [t for t in res.stdout.split("\n--- sample ") if t]
    assert len(texts) == 2 and all("ROMEO:" in t for t in texts)
    # same seed, same text: again, from main() in this process
    code = call_main(monkeypatch, tmp, small_corpus, sample_cli.main,
                     [f"run_id={run_id}", *SAMPLE_ARGS])
    again = capsys.readouterr()
    assert code == 0, again.err
    assert again.out == res.stdout
    # the newest finished run of the experiment is this one: the same text for the same args
    code = call_main(monkeypatch, tmp, small_corpus, sample_cli.main,
                     ["run_id=latest", "logger.experiment_name=e2e", *SAMPLE_ARGS])
    latest = capsys.readouterr()
    assert code == 0 and latest.out == res.stdout


def test_sampling_leaves_no_temporary_files(sampled):
    res, scratch = sampled
    assert res.returncode == 0, res.stderr
    assert list(scratch.iterdir()) == []


def test_bad_sampling_input(in_process, capsys, trained, monkeypatch):
    tmp, run_id, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp))
    client = MlflowClient(store_uri(tmp))
    bare = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id
    before = len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id]))
    not_a_checkpoint = tmp / "notes.ckpt"
    not_a_checkpoint.write_text("not a checkpoint")
    no_fields = tmp / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, no_fields)
    cases = [
        ([f"run_id={run_id}", "prompt=ROMEO€"], ["€"]),
        ([f"run_id={run_id}", "temperature=0"], ["temperature"]),
        ([f"run_id={run_id}", "temperature=nan"], ["temperature"]),
        ([f"run_id={run_id}", "max_new_tokens=abc"], ["max_new_tokens"]),
        ([f"run_id={run_id}", "num_samples=0"], ["num_samples"]),
        ([f"run_id={run_id}", "device=cuda"], ["device=cuda", "no CUDA device"]),
        ([f"run_id={run_id}", "device=tpu9"], ["device"]),
        ([f"run_id={run_id}", "which=nope.ckpt"], ["nope.ckpt", "step_000020.ckpt"]),
        ([f"run_id={run_id}", "nope=1"], ["nope"]),
        ([f"checkpoint={not_a_checkpoint}"], ["not a PyTorch checkpoint"]),
        ([f"checkpoint={no_fields}"], ["not a gptlab checkpoint"]),
        ([f"run_id={run_id}", "window=rolling"], ["window", "half", "slide"]),
        (["run_id=0123456789abcdef"], ["0123456789abcdef"]),
        ([f"run_id={bare}"], ["no checkpoint"]),
        (["checkpoint=/no/such.ckpt"], ["not found"]),
    ]
    for args, words in cases:
        # in_process points the store at its own tmp dir: point it back at the trained one
        code, _, err = in_process(sample_cli.main,
                                  [*args, f"logger.tracking_uri={store_uri(tmp)}"], capsys)
        one_line_error(code, err, *words)
    assert len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id])) == before
