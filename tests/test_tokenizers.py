"""Tokenizers: a byte-level BPE run end to end, bits per character as the one currency,
gptlab-eval on any text, and bad input. The console scripts run in this process (their
main(), as conftest's call_main runs it): what is tested is what they do, not how a process
starts."""

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import (
    TINY_GPT,
    call_main,
    cli,
    copy_run,
    one_line_error,
    only_run,
    runs_in,
    store_uri,
)
from gptlab.cli import evaluate as eval_cli
from gptlab.cli import sample as sample_cli
from gptlab.cli import train as train_cli
from gptlab.data import tokenizer as tokenizers
from gptlab.data.windows import score_windows
from gptlab.errors import GptlabError
from gptlab.tracking.comparison import compare

BPE = ["data.tokenizer=bpe", "data.vocab_size=300"]
CHAR = "tiny"  # the char run's experiment: conftest's tiny_run (TINY_GPT), copied


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus, tiny_run):
    """A char run and a BPE run of the tiny model, in one store: the char run is a copy of
    tiny_run (TINY_GPT, experiment `tiny`), the BPE run is trained beside it."""
    tmp, char_id = copy_run(tiny_run, tmp_path_factory.mktemp("tokenizers"))
    with pytest.MonkeyPatch.context() as m:
        code = call_main(m, tmp, small_corpus, train_cli.main,
                         [*TINY_GPT, "logger.experiment_name=bpe", *BPE])
    assert code == 0
    client = MlflowClient(store_uri(tmp))
    return tmp, client.get_run(char_id), only_run(client, "bpe")


def test_a_bpe_run_carries_its_tokenizer(runs, small_corpus, monkeypatch, capsys):
    tmp, _, run = runs
    client = MlflowClient(store_uri(tmp))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "tokenizer.json" in names and "vocab.json" not in names
    assert run.data.params["vocab_size"] == "300" and run.data.params["data.tokenizer"] == "bpe"
    logged = client.download_artifacts(run.info.run_id, "tokenizer.json", str(tmp))
    tok = tokenizers.from_spec("bpe", open(logged, encoding="utf-8").read())
    assert tok.vocab_size == 300
    # sampling needs neither the corpus nor a new BPE, and takes any prompt exactly as the
    # shell hands it (no Hydra syntax: commas, quotes and brackets are text)
    prompt = 'Hello ☃ world, "quoted" [x] ${x} é'
    code, out, err = cli(monkeypatch, capsys, tmp, tmp / "no-such-corpus.txt", sample_cli.main,
                         [f"run_id={run.info.run_id}", f"prompt={prompt}",
                          "max_new_tokens=10"])
    assert code == 0, err
    assert out.startswith(prompt)


def test_bpe_run_resumes_with_its_own_tokenizer(in_process, capsys, tmp_path):
    code, _, err = in_process(train_cli.main, [*TINY_GPT, "logger.experiment_name=resumed",
                                               *BPE, f"data.cache_dir={tmp_path}"], capsys)
    assert code == 0, err[-3000:]
    run = only_run(MlflowClient(store_uri(tmp_path)), "resumed")
    assert [json.loads(m.read_text())["tokenizer"]["from"]
            for m in tmp_path.glob("corpora/*/meta.json")] == ["this corpus"]
    # another cache, empty: a resumed run must not train its tokenizer again
    cache = tmp_path / "empty-cache"
    code, _, err = in_process(train_cli.main, [f"resume={run.info.run_id}",
                                               "trainer.max_steps=30",
                                               f"data.cache_dir={cache}"], capsys)
    assert code == 0, err[-3000:]
    metas = [json.loads(m.read_text()) for m in cache.glob("corpora/*/meta.json")]
    assert [m["tokenizer"]["from"] for m in metas] == ["the run's checkpoint"]
    client = MlflowClient(store_uri(tmp_path))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/bpc")]
    assert steps == [10, 20, 30]


def test_val_bpc_is_what_gptlab_eval_gives_on_the_same_characters(runs, small_corpus,
                                                                  monkeypatch, capsys):
    tmp, char_run, bpe_run = runs
    text = small_corpus.read_text(encoding="utf-8")
    val = text[int(0.9 * len(text)):][:32768]  # data.bpc_chars of the validation split
    held = tmp / "val.txt"
    held.write_text(val, encoding="utf-8")
    client = MlflowClient(store_uri(tmp))
    for run in (char_run, bpe_run):
        code, out, err = cli(monkeypatch, capsys, tmp, small_corpus, eval_cli.main,
                             [f"run_id={run.info.run_id}", f"text={held}", "which=newest",
                              "stride=16"])
        assert code == 0, err[-3000:]
        final = client.get_metric_history(run.info.run_id, "val/bpc")[-1]
        (recorded,) = client.get_metric_history(run.info.run_id, "eval/val/bpc")
        # the same windows and weights; only the order of the sums differs (other batches)
        assert recorded.step == 20 and recorded.value == pytest.approx(final.value, abs=1e-5)
        printed = float(out.split("eval/val/bpc = ")[1].split()[0])
        assert printed == pytest.approx(final.value, abs=1e-4)
    # per token the two losses do not compare; per character they do
    char_bpc = client.get_metric_history(char_run.info.run_id, "val/bpc")[-1].value
    char_loss = client.get_metric_history(char_run.info.run_id, "val/loss")[-1].value
    assert char_bpc == pytest.approx(char_loss / math.log(2), rel=0.1)


def test_compare_ranks_runs_of_different_tokenizers_by_bits_per_character(runs):
    tmp, char_run, _ = runs
    out = {experiment: compare(experiment, tracking_uri=store_uri(tmp))["runs"][0]
           for experiment in (CHAR, "bpe")}
    assert out["bpe"]["best val/bpc"] > 0 and out[CHAR]["best val/bpc"] > 0
    client = MlflowClient(store_uri(tmp))
    both = client.search_runs([e.experiment_id for e in client.search_experiments()])
    from gptlab.tracking.comparison import default_metric

    assert default_metric(both) == "val/bpc"
    assert default_metric([char_run]) == "val/loss"
    # a failed char job records its whole config, a null vocab_size among it: still chars
    failed = client.create_run(client.create_experiment("failed_char")).info.run_id
    client.log_param(failed, "data.tokenizer", "char")
    client.log_param(failed, "data.vocab_size", None)
    client.set_terminated(failed, "FAILED")
    assert default_metric([char_run, client.get_run(failed)]) == "val/loss"


def test_gptlab_eval_names_characters_a_char_model_never_saw(runs, small_corpus, monkeypatch,
                                                             capsys):
    tmp, char_run, bpe_run = runs
    odd = tmp / "odd.txt"
    odd.write_text("Wherefore art thou, Roméo? ✓ " * 3, encoding="utf-8")
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, eval_cli.main,
                       [f"run_id={char_run.info.run_id}", f"text={odd}"])
    one_line_error(code, err, "characters not in the vocabulary", "é✓")
    # the byte-level BPE reads any text
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, eval_cli.main,
                       [f"run_id={bpe_run.info.run_id}", f"text={odd}"])
    assert code == 0, err


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"\xff\xfe\x00bad", ["not UTF-8"]),
    (b"First", ["shorter than one window"]),
])
def test_gptlab_eval_refuses_a_text_it_cannot_score(runs, small_corpus, monkeypatch, capsys,
                                                     content, words):
    tmp, char_run, _ = runs
    bad = tmp / "bad.txt"
    bad.write_bytes(content)
    before = MlflowClient(store_uri(tmp)).get_run(char_run.info.run_id).data.metrics
    code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, eval_cli.main,
                       [f"run_id={char_run.info.run_id}", f"text={bad}"])
    one_line_error(code, err, *words)
    assert MlflowClient(store_uri(tmp)).get_run(char_run.info.run_id).data.metrics == before


@pytest.mark.parametrize("vocab_size, words", [
    ("100", ["smaller than the byte alphabet"]),
    ("100000", ["more than the training split supports"]),
    ("abc", ["vocab_size"]),
])
def test_a_bad_vocabulary_size_is_one_line_and_records_nothing(in_process, capsys, tmp_path,
                                                                vocab_size, words):
    code, _, err = in_process(train_cli.main, [*TINY_GPT, "data.tokenizer=bpe",
                                               f"data.vocab_size={vocab_size}"], capsys)
    one_line_error(code, err, *words)
    assert not runs_in(tmp_path)


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model_is_refused(runs, small_corpus,
                                                                        monkeypatch, capsys):
    tmp, _, bpe_run = runs
    client = MlflowClient(store_uri(tmp))
    name = bpe_run.data.tags["gptlab.best_checkpoint"]
    path = client.download_artifacts(bpe_run.info.run_id, f"checkpoints/{name}", str(tmp))
    ckpt = torch.load(path, weights_only=True)
    for broken, words in (({"vocab": "{not json"}, ["BPE tokenizer cannot be read"]),
                          ({"tokenizer": "char"}, ["do not belong together"]),
                          ({"tokenizer": "wordpiece"}, ["unknown tokenizer"])):
        ckpt2 = {**ckpt, "gptlab": {**ckpt["gptlab"], **broken}}
        bad = tmp / "broken.ckpt"
        torch.save(ckpt2, bad)
        code, _, err = cli(monkeypatch, capsys, tmp, small_corpus, sample_cli.main,
                           [f"checkpoint={bad}", "max_new_tokens=5"])
        one_line_error(code, err, *words)


def test_score_windows_scores_every_token_but_the_first_once():
    for n, block, stride in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 4, 4), (500, 16, 5)]:
        x, y = score_windows(list(range(n)), block, stride)
        assert sorted(y[y >= 0].tolist()) == list(range(1, n))
        scored = y >= 0
        assert torch.equal(x[scored], y[scored] - 1)  # each scored target follows its input
        if n > block + 1:
            # every scored token sees at least block - stride tokens before it
            positions = scored.nonzero()[:, 1]
            assert positions[x.shape[1]:].min() >= block - stride  # after the first window
    with pytest.raises(GptlabError, match="stride"):
        score_windows(list(range(10)), 4, 5)
