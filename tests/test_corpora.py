"""Corpora as users have them (folders, globs, JSON Lines, Parquet, Hugging Face datasets),
prepared once into memory-mapped token files that every run, rank and job shares, and
refused in one line where they cannot be read."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, one_line_error, only_run, store_uri
from gptlab.cli import prepare as prepare_cli
from gptlab.cli import train as train_cli
from gptlab.data import prepared
from gptlab.data.corpus import open_source
from gptlab.data.datamodule import get_batch
from gptlab.data.prepared import Recipe, Tokens
from gptlab.data.tokenizer import EOT_TEXT
from gptlab.errors import GptlabError, StopRequested

N_DOCS = 40


@pytest.fixture(scope="module")
def texts(small_corpus) -> list[str]:
    """Forty documents of Tiny Shakespeare, of 500 characters each."""
    text = small_corpus.read_text(encoding="utf-8")
    return [text[i * 500:(i + 1) * 500] for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, texts) -> Path:
    """The documents as a folder of text files, some in a subfolder, beside a hidden file
    that is no document."""
    root = tmp_path_factory.mktemp("folder") / "plays"
    for i, t in enumerate(texts):
        path = root / ("acts" if i % 2 else "") / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(t, encoding="utf-8")
    (root / ".notes.txt").write_text("not a document ☃", encoding="utf-8")
    return root


def prepare(path, cache: Path, recipe: Recipe | None = None, **options) -> prepared.Prepared:
    return prepared.prepare(open_source(str(path), **options), recipe or Recipe(), cache)


def tokens(split: Tokens) -> list[int]:
    return split.head(len(split)).tolist()


def test_a_folder_is_split_by_documents_each_ending_with_end_of_text(folder, texts, tmp_path):
    prep = prepare(folder, tmp_path, Recipe(val_docs=4))
    m = prep.meta
    assert m["documents"] == {"train": N_DOCS - 4, "val": 4}
    assert m["characters"]["train"] + m["characters"]["val"] == 500 * N_DOCS
    # the end-of-text id lies outside the corpus's characters, after every document
    tok, eot = prep.tokenizer, prep.eot
    assert eot == tok.vocab_size - 1 and "☃" not in tok.spec
    train = tokens(prep.train)
    assert train.count(eot) == N_DOCS - 4 and train[-1] == eot
    docs = [tok.decode(d) for d in np.split(np.array(train), np.flatnonzero(
        np.array(train) == eot))[:-1]]
    docs = [docs[0]] + [d[1:] for d in docs[1:]]  # each part after the first starts at an eot
    assert set(docs) <= set(texts) and len(set(docs)) == N_DOCS - 4
    # the validation text is the validation documents, separated as the tokens are
    val = prep.val_text(None).split(prep.meta["end_of_text"])[:-1]
    assert sorted(val + docs) == sorted(texts)
    # the same split whatever cache, run or seed: it hangs on the documents' names only
    again = prepare(folder, tmp_path / "other-cache", Recipe(val_docs=4))
    assert tokens(again.val) == tokens(prep.val) and again.digest == prep.digest


def test_a_glob_picks_its_files_and_a_fraction_splits_by_documents(folder, tmp_path):
    prep = prepare(f"{folder}/**/doc1*.txt", tmp_path, Recipe(train_frac=0.5))
    m = prep.meta
    assert m["documents"]["train"] + m["documents"]["val"] == 10  # doc10 .. doc19
    assert 0 < m["documents"]["val"] < 10
    # documents are named from the folder above the first wildcard, as in the folder itself
    source = open_source(f"{folder}/**/doc1*.txt")
    assert source.name == "plays" and sorted(d.name for d in source.documents()) == sorted(
        str(p.relative_to(folder)) for p in folder.rglob("doc1*.txt"))


def test_jsonl_parquet_and_a_local_hugging_face_dataset_read_the_same_documents(texts,
                                                                               tmp_path):
    data = tmp_path / "data"
    (data / "jsonl").mkdir(parents=True)
    (data / "parquet").mkdir()
    for part in range(2):
        chunk = texts[part * 20:(part + 1) * 20]
        with open(data / "jsonl" / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            for t in chunk:
                f.write(json.dumps({"id": 7, "body": t}) + "\n\n")  # blank lines are no records
        table = pa.table({"body": chunk, "id": list(range(20))})
        pq.write_table(table, data / "parquet" / f"part{part}.parquet", row_group_size=7)
    (data / "jsonl" / "README.md").write_text("# what these files are", encoding="utf-8")
    recipe = Recipe(val_docs=5)
    preps = [prepare(data / "jsonl", tmp_path / "c1", recipe, text_field="body"),
             prepare(data / "parquet", tmp_path / "c2", recipe, text_field="body"),
             prepared.prepare(open_source(None, hf_dataset=str(data / "parquet"),
                                          text_field="body"), recipe, tmp_path / "c3")]
    for prep in preps:
        assert prep.meta["documents"] == {"train": 35, "val": 5}
        assert prep.meta["characters"]["train"] + prep.meta["characters"]["val"] == 500 * 40
        # all forty documents, whichever five validate
        everything = prep.val_text(None).split(prep.meta["end_of_text"])[:-1]
        assert len(everything) == 5 and set(everything) <= set(texts)
    # one Parquet file read as a Hugging Face dataset holds the rows pyarrow reads
    assert preps[1].meta["tokens"] == preps[2].meta["tokens"]


def test_one_text_file_is_split_by_characters_as_before(small_corpus, tmp_path):
    text = small_corpus.read_text(encoding="utf-8")
    prep = prepare(small_corpus, tmp_path)
    n = int(0.9 * len(text))
    assert prep.eot is None and prep.tokenizer.spec == "".join(sorted(set(text)))
    assert prep.tokenizer.decode(tokens(prep.train)) == text[:n]
    assert prep.tokenizer.decode(tokens(prep.val)) == text[n:] == prep.val_text(None)


def test_a_long_document_is_encoded_in_pieces_to_the_tokens_it_has_whole(small_corpus,
                                                                        tmp_path, monkeypatch):
    whole = prepare(small_corpus, tmp_path / "whole", Recipe("bpe", 300))
    monkeypatch.setattr(prepared, "CUT_CHARS", 500)
    monkeypatch.setattr(prepared, "BATCH_CHARS", 3000)
    cut = prepare(small_corpus, tmp_path / "cut", Recipe("bpe", 300))
    assert tokens(cut.train) == tokens(whole.train) and len(cut.train) > 1000


def test_blocks_from_the_token_files_are_the_blocks_from_a_tensor(small_corpus, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(prepared, "SHARD_TOKENS", 4096)  # several shards to gather across
    prep = prepare(small_corpus, tmp_path)
    assert len(prep.train.shards) == 5
    tensor = torch.tensor(tokens(prep.train))
    a = get_batch(prep.train, 64, 8, torch.Generator().manual_seed(3))
    b = get_batch(tensor, 64, 8, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_prepared_corpus_is_found_again_without_reading_it(folder, tmp_path, monkeypatch):
    first = prepare(folder, tmp_path)

    def no_reading(self):
        raise AssertionError("the corpus was read again")

    with monkeypatch.context() as m:
        m.setattr("gptlab.data.corpus.Source.documents", no_reading)
        assert prepare(folder, tmp_path).folder == first.folder
    # a changed document: the corpus is read and prepared again, beside the first
    doc = folder / "doc00.txt"
    original = doc.read_text(encoding="utf-8")
    try:
        doc.write_text(original + "EXEUNT.", encoding="utf-8")
        changed = prepare(folder, tmp_path)
    finally:
        doc.write_text(original, encoding="utf-8")
    assert changed.folder != first.folder and changed.digest != first.digest
    # a touched but unchanged corpus is read again, and its tokens found under their key
    assert prepare(folder, tmp_path).folder == first.folder


def _prepare_in_child(folder: str, cache: str, log: str) -> None:
    make = prepared._make

    def counted(*args, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return make(*args, **kw)

    prepared._make = counted
    prepared.prepare(open_source(folder), Recipe("bpe", 300), Path(cache))


def test_processes_that_need_a_corpus_at_once_prepare_it_once(folder, tmp_path):
    log = tmp_path / "made"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(str(folder), str(tmp_path), str(log)))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert len(list(prepared.folders(tmp_path))) == 1


def test_a_damaged_token_file_is_prepared_again_never_trained_on(folder, tmp_path, caplog):
    first = prepare(folder, tmp_path)
    shard = first.folder / "train-0000.bin"
    good = shard.read_bytes()
    caplog.set_level(logging.WARNING, "gptlab")
    for damage in (good[:-6],  # truncated
                   good[:100] + bytes([good[100] ^ 1]) + good[101:]):  # a flipped bit
        shard.write_bytes(damage)
        with pytest.raises(GptlabError, match="damaged"):
            prepared.verify(first.folder)
        caplog.clear()
        again = prepare(folder, tmp_path)
        assert [r.message for r in caplog.records if "damaged" in r.message]
        assert tokens(again.train) == np.frombuffer(good[64:], np.uint16).tolist()
        prepared.verify(again.folder)


def test_a_prepare_that_fails_leaves_nothing_a_run_would_use(folder, tmp_path, monkeypatch):
    def full_disk(self, ids):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(prepared.ShardWriter, "write", full_disk)
        with pytest.raises(GptlabError, match="No space left on device"):
            prepare(folder, tmp_path)
    assert list(prepared.folders(tmp_path)) == []
    assert [p.name for p in (tmp_path / "corpora").iterdir() if p.name.startswith(".")] == []
    assert prepare(folder, tmp_path).meta["documents"]["train"] > 0


def test_a_stop_request_ends_a_prepare_midway_and_leaves_nothing(folder, tmp_path):
    calls = []

    def ctrl_c_while_tokenizing() -> None:  # a run's StopSignals.check after a Ctrl-C
        calls.append(1)
        if len(calls) > N_DOCS + 3:  # the scan is done, the encoding under way
            raise StopRequested(signal.SIGINT)

    with pytest.raises(StopRequested):
        prepared.prepare(open_source(str(folder)), Recipe(), tmp_path,
                         check=ctrl_c_while_tokenizing)
    assert list(prepared.folders(tmp_path)) == []
    assert [p.name for p in (tmp_path / "corpora").iterdir() if p.name.startswith(".")] == []


def test_a_bpe_on_documents_learns_from_a_bounded_sample_and_separates_them(folder, tmp_path):
    prep = prepare(folder, tmp_path, Recipe("bpe", 300, sample_chars=3000, val_docs=4))
    tok = prep.tokenizer
    assert tok.vocab_size == 300 and prep.eot is not None
    assert tok.decode([prep.eot]) == EOT_TEXT
    assert tokens(prep.train).count(prep.eot) == N_DOCS - 4
    # a document that quotes the special token's text is only text: only its end is one
    assert prep.eot not in tok.encode(f"quoted {EOT_TEXT} here")
    assert tok.decode(tok.encode(f"quoted {EOT_TEXT} here")) == f"quoted {EOT_TEXT} here"


# ---- runs on a corpus ---------------------------------------------------------------------

def test_gptlab_prepare_makes_what_runs_then_share_and_show_as_one_dataset(
        in_process, capsys, folder, tmp_path, monkeypatch):
    keys = [f"data.path={folder}", "data.val_docs=4", "data.tokenizer=bpe",
            "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}"]
    code, out, err = in_process(prepare_cli.main, [*keys, "--verify"], capsys)
    assert code == 0, err[-3000:]
    assert "every token file matches its checksum" in out
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["documents"]]
    assert row[1:] == [str(N_DOCS - 4), "4"]
    # the runs read the prepared files, never the corpus
    monkeypatch.setattr("gptlab.data.corpus.Source.documents", lambda self: pytest.fail("read"))
    for name in ("first", "second"):
        code, out, err = in_process(train_cli.main,
                                    [*TINY_GPT, *keys, f"logger.experiment_name={name}"],
                                    capsys)
        assert code == 0, err[-3000:]
    client = MlflowClient(store_uri(tmp_path))
    inputs = [only_run(client, name).inputs.dataset_inputs[0].dataset
              for name in ("first", "second")]
    assert inputs[0].digest == inputs[1].digest and inputs[0].name == "plays"
    profile = json.loads(inputs[0].profile)
    assert (profile["train_documents"], profile["val_documents"]) == (N_DOCS - 4, 4)
    assert profile["tokenizer"] == "bpe" and profile["train_tokens"] > 0
    assert len(list(prepared.folders(tmp_path / "cache"))) == 1
    bpc = only_run(client, "first").data.metrics["val/bpc"]
    assert 0 < bpc < 10


@pytest.fixture
def bad_corpora(tmp_path) -> dict[str, Path]:
    out = {}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(6):
        (mixed / f"good{i}.txt").write_text("To be, or not to be: that is the question.\n" * 20,
                                            encoding="utf-8")
    (mixed / "latin1.txt").write_bytes("Roméo".encode() + b" caf\xe9")
    out["mixed"] = mixed
    jsonl = tmp_path / "lines.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")
    out["jsonl"] = jsonl
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n', encoding="utf-8")
    out["nofield"] = nofield
    parquet = tmp_path / "table.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), parquet)
    out["parquet"] = parquet
    empty = tmp_path / "empty"
    empty.mkdir()
    out["empty"] = empty
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("", encoding="utf-8")
    out["blank"] = blank
    return out


@pytest.mark.parametrize("which, extra, words", [
    ("mixed", [], ["latin1.txt is not UTF-8", "at byte 10", "data.on_bad_document=skip"]),
    ("jsonl", [], ["lines.jsonl line 2 is not JSON"]),
    ("nofield", [], ["nofield.jsonl line 2 has no field 'text'"]),
    ("parquet", [], ["table.parquet has no column 'text'", "content"]),
    ("empty", [], ["no files in the corpus"]),
    ("blank", [], ["corpus is empty"]),
    ("glob", [], ["no files in the corpus"]),
    ("mixed", ["data.on_bad_document=maybe"], ["data.on_bad_document must be one of"]),
    ("mixed", ["data.cache_dir=/proc/version/cache"], ["cannot be written"]),
    ("hub", [], ["cannot load the Hugging Face dataset 'no-such/dataset'"]),
])
def test_a_corpus_that_cannot_be_read_is_refused_in_one_line(
        in_process, capsys, bad_corpora, tmp_path, which, extra, words):
    where = {"glob": [f"data.path={tmp_path}/nothing/**/*.md"],
             "hub": ["data.hf_dataset=no-such/dataset"]}.get(
        which, [f"data.path={bad_corpora.get(which)}"])
    cache = [] if any(e.startswith("data.cache_dir") for e in extra) else [
        f"data.cache_dir={tmp_path / 'cache'}"]
    code, _, err = in_process(train_cli.main, [*TINY_GPT, *where, *cache, *extra], capsys)
    one_line_error(code, err, *words)
    assert not (tmp_path / "mlruns").exists() or not MlflowClient(
        store_uri(tmp_path)).search_runs(
        [e.experiment_id for e in MlflowClient(store_uri(tmp_path)).search_experiments()])
    assert list(prepared.folders(tmp_path / "cache")) == []


def test_bad_documents_can_be_skipped_and_are_counted(in_process, capsys, bad_corpora,
                                                      tmp_path):
    code, _, err = in_process(train_cli.main, [
        *TINY_GPT, f"data.path={bad_corpora['mixed']}", "data.val_docs=1",
        "data.on_bad_document=skip", "logger.experiment_name=skipping",
        f"data.cache_dir={tmp_path / 'cache'}"], capsys)
    assert code == 0, err[-3000:]
    run = only_run(MlflowClient(store_uri(tmp_path)), "skipping")
    profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
    assert profile["skipped_documents"] == 1
    assert profile["train_documents"] + profile["val_documents"] == 6
    (meta,) = [json.loads((f / "meta.json").read_text())
               for f in prepared.folders(tmp_path / "cache")]
    assert meta["skipped"] == ["latin1.txt"]
