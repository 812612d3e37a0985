import hashlib
import urllib.request
from pathlib import Path

import pytest
import torch

from gptlab.data import corpus as corpus_module
from gptlab.data.datamodule import CorpusDataModule, get_batch
from gptlab.data.tokenizer import CharTokenizer
from gptlab.errors import GptlabError


def test_tokenizer_round_trip(corpus):
    text = corpus.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.chars == "".join(sorted(set(text)))
    sample = text[1000:3000]
    assert tok.decode(tok.encode(sample)) == sample


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(GptlabError, match="'xz'"):
        tok.encode("axbz")


def test_real_corpus_checksum_and_split_sizes(corpus):
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() == corpus_module.TINY_SHAKESPEARE_SHA256
    dm = CorpusDataModule(path=str(corpus), block_size=8, batch_size=4)
    dm.setup()
    assert dm.vocab_size == 65
    assert (len(dm.train_data), len(dm.val_data)) == (1_003_854, 111_540)
    # unshuffled: train is the head of the corpus, val its tail
    text = corpus.read_text(encoding="utf-8")
    assert dm.tokenizer.decode(dm.val_data.head(50).tolist()) == text[1_003_854:1_003_904]


def test_batch_targets_are_inputs_shifted_by_one():
    d = torch.arange(1000, dtype=torch.int16)
    x, y = get_batch(d, block_size=16, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)


def test_training_batches_are_seeded_and_resumable(small_corpus):
    def batches(seed, start=0, n=3):
        dm = CorpusDataModule(path=str(small_corpus), block_size=8, batch_size=4, seed=seed)
        dm.setup()
        dm._train_blocks.start = start
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(n)]

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    # starting at batch 1 draws exactly what an uninterrupted stream drew second
    assert torch.equal(batches(1, start=1, n=1)[0][0], a[1][0])


def test_validation_set_is_fixed(small_corpus):
    dm = CorpusDataModule(path=str(small_corpus), block_size=8, batch_size=4, eval_iters=3, seed=1)
    dm.setup()
    dm2 = CorpusDataModule(path=str(small_corpus), block_size=8, batch_size=4, eval_iters=3, seed=2)
    dm2.setup()
    x1, _ = dm.val_blocks()
    assert x1.shape == (12, 8)
    assert torch.equal(x1, dm.val_blocks()[0])
    assert torch.equal(x1, dm2.val_blocks()[0])  # the training seed does not move it


@pytest.mark.parametrize("text", ["", "short text"])
def test_corpus_too_small(tmp_path, text):
    path = tmp_path / "c.txt"
    path.write_text(text)
    dm = CorpusDataModule(path=str(path), block_size=64)
    with pytest.raises(GptlabError, match="empty|fewer than"):
        dm.setup()


def test_missing_corpus(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        CorpusDataModule(path=str(tmp_path / "nope.txt")).setup()


def test_offline_without_file_names_url_and_options(tmp_path, monkeypatch):
    monkeypatch.delenv(corpus_module.DATA_ENV, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GptlabError) as e:
        corpus_module.resolve_corpus(None, cache_dir=str(tmp_path))
    assert corpus_module.TINY_SHAKESPEARE_URL in str(e.value)
    assert "data.path" in str(e.value) and "GPTLAB_DATA" in str(e.value)
    assert not list(tmp_path.rglob("*.part"))


def test_download_is_verified_and_cached(tmp_path, monkeypatch, corpus):
    monkeypatch.delenv(corpus_module.DATA_ENV, raising=False)
    calls = []

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return corpus.read_bytes()

    def fake_urlopen(url, timeout):
        calls.append(url)
        return Response()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    p1 = corpus_module.resolve_corpus(None, cache_dir=str(tmp_path))
    p2 = corpus_module.resolve_corpus(None, cache_dir=str(tmp_path))
    assert p1 == p2 and Path(p1).read_bytes() == corpus.read_bytes()
    assert calls == [corpus_module.TINY_SHAKESPEARE_URL]


@pytest.mark.parametrize("kw", [{"block_size": 0}, {"batch_size": -1}, {"train_frac": 1.5}])
def test_bad_data_config(kw):
    with pytest.raises(GptlabError, match=next(iter(kw))):
        CorpusDataModule(**kw)
