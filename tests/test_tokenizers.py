"""Tokenizers: a byte-level BPE run end to end, bits per character as the one currency,
gptlab-eval on any text, and bad input."""

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, one_line_error, only_run, run_cli, runs_in, store_uri
from gptlab.data import tokenizer as tokenizers
from gptlab.data.windows import score_windows
from gptlab.errors import GptlabError
from gptlab.tracking.comparison import compare

BPE = ["data.tokenizer=bpe", "data.vocab_size=300"]


def train(tmp, corpus, experiment, *extra):
    res = run_cli("gptlab-train", [*TINY_GPT, f"logger.experiment_name={experiment}", *extra],
                  tmp, corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    return only_run(MlflowClient(store_uri(tmp)), experiment)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus):
    """A char run and a BPE run of the tiny model, in one store."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    return tmp, train(tmp, small_corpus, "char"), train(tmp, small_corpus, "bpe", *BPE)


def test_a_bpe_run_carries_its_tokenizer(runs, small_corpus):
    tmp, _, run = runs
    client = MlflowClient(store_uri(tmp))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "tokenizer.json" in names and "vocab.json" not in names
    assert run.data.params["vocab_size"] == "300" and run.data.params["data.tokenizer"] == "bpe"
    logged = client.download_artifacts(run.info.run_id, "tokenizer.json", str(tmp))
    tok = tokenizers.from_spec("bpe", open(logged, encoding="utf-8").read())
    assert tok.vocab_size == 300
    # sampling needs neither the corpus nor a new BPE, and takes any prompt
    env_without_corpus = {"GPTLAB_DATA": str(tmp / "no-such-corpus.txt")}
    res = run_cli("gptlab-sample", [f"run_id={run.info.run_id}", "prompt='Wherefore ✓ é'",
                                    "max_new_tokens=10"], tmp, small_corpus,
                  env={**_env(tmp, small_corpus), **env_without_corpus})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Wherefore ✓ é")


def _env(tmp, corpus):
    from conftest import cli_env

    return cli_env(tmp, corpus)


def test_bpe_run_resumes_with_its_own_tokenizer(tmp_path, small_corpus):
    run = train(tmp_path, small_corpus, "resumed", *BPE, f"data.cache_dir={tmp_path}")
    assert [json.loads(m.read_text())["tokenizer"]["from"]
            for m in tmp_path.glob("corpora/*/meta.json")] == ["this corpus"]
    # another cache, empty: a resumed run must not train its tokenizer again
    cache = tmp_path / "empty-cache"
    res = run_cli("gptlab-train", [f"resume={run.info.run_id}", "trainer.max_steps=30",
                                   f"data.cache_dir={cache}"], tmp_path, small_corpus)
    assert res.returncode == 0, res.stderr[-3000:]
    metas = [json.loads(m.read_text()) for m in cache.glob("corpora/*/meta.json")]
    assert [m["tokenizer"]["from"] for m in metas] == ["the run's checkpoint"]
    client = MlflowClient(store_uri(tmp_path))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/bpc")]
    assert steps == [10, 20, 30]


def test_val_bpc_is_what_gptlab_eval_gives_on_the_same_characters(runs, small_corpus):
    tmp, char_run, bpe_run = runs
    text = small_corpus.read_text(encoding="utf-8")
    val = text[int(0.9 * len(text)):][:32768]  # data.bpc_chars of the validation split
    held = tmp / "val.txt"
    held.write_text(val, encoding="utf-8")
    client = MlflowClient(store_uri(tmp))
    for run in (char_run, bpe_run):
        res = run_cli("gptlab-eval", [f"run_id={run.info.run_id}", f"text={held}",
                                      "which=newest", "stride=16"], tmp, small_corpus)
        assert res.returncode == 0, res.stderr[-3000:]
        final = client.get_metric_history(run.info.run_id, "val/bpc")[-1]
        (recorded,) = client.get_metric_history(run.info.run_id, "eval/val/bpc")
        # the same windows and weights; only the order of the sums differs (other batches)
        assert recorded.step == 20 and recorded.value == pytest.approx(final.value, abs=1e-5)
        printed = float(res.stdout.split("eval/val/bpc = ")[1].split()[0])
        assert printed == pytest.approx(final.value, abs=1e-4)
    # per token the two losses do not compare; per character they do
    char_bpc = client.get_metric_history(char_run.info.run_id, "val/bpc")[-1].value
    char_loss = client.get_metric_history(char_run.info.run_id, "val/loss")[-1].value
    assert char_bpc == pytest.approx(char_loss / math.log(2), rel=0.1)


def test_compare_ranks_runs_of_different_tokenizers_by_bits_per_character(runs):
    tmp, char_run, _ = runs
    out = {experiment: compare(experiment, tracking_uri=store_uri(tmp))["runs"][0]
           for experiment in ("char", "bpe")}
    assert out["bpe"]["best val/bpc"] > 0 and out["char"]["best val/bpc"] > 0
    client = MlflowClient(store_uri(tmp))
    both = client.search_runs([e.experiment_id for e in client.search_experiments()])
    from gptlab.tracking.comparison import default_metric

    assert default_metric(both) == "val/bpc"
    assert default_metric([char_run]) == "val/loss"


def test_gptlab_eval_names_characters_a_char_model_never_saw(runs, small_corpus):
    tmp, char_run, bpe_run = runs
    odd = tmp / "odd.txt"
    odd.write_text("Wherefore art thou, Roméo? ✓ " * 3, encoding="utf-8")
    res = run_cli("gptlab-eval", [f"run_id={char_run.info.run_id}", f"text={odd}"], tmp,
                  small_corpus)
    one_line_error(res.returncode, res.stderr, "characters not in the vocabulary", "é✓")
    # the byte-level BPE reads any text
    res = run_cli("gptlab-eval", [f"run_id={bpe_run.info.run_id}", f"text={odd}"], tmp,
                  small_corpus)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"\xff\xfe\x00bad", ["not UTF-8"]),
    (b"First", ["shorter than one window"]),
])
def test_gptlab_eval_refuses_a_text_it_cannot_score(runs, small_corpus, content, words):
    tmp, char_run, _ = runs
    bad = tmp / "bad.txt"
    bad.write_bytes(content)
    before = MlflowClient(store_uri(tmp)).get_run(char_run.info.run_id).data.metrics
    res = run_cli("gptlab-eval", [f"run_id={char_run.info.run_id}", f"text={bad}"], tmp,
                  small_corpus)
    one_line_error(res.returncode, res.stderr, *words)
    assert MlflowClient(store_uri(tmp)).get_run(char_run.info.run_id).data.metrics == before


@pytest.mark.parametrize("vocab_size, words", [
    ("100", ["smaller than the byte alphabet"]),
    ("100000", ["more than the training split supports"]),
    ("abc", ["vocab_size"]),
])
def test_a_bad_vocabulary_size_is_one_line_and_records_nothing(tmp_path, small_corpus,
                                                                vocab_size, words):
    res = run_cli("gptlab-train", [*TINY_GPT, "data.tokenizer=bpe",
                                   f"data.vocab_size={vocab_size}"], tmp_path, small_corpus)
    one_line_error(res.returncode, res.stderr, *words)
    assert not runs_in(tmp_path)


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model_is_refused(runs, small_corpus):
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
        res = run_cli("gptlab-sample", [f"checkpoint={bad}", "max_new_tokens=5"], tmp,
                      small_corpus)
        one_line_error(res.returncode, res.stderr, *words)


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
