"""Corpora as users have them, read as a stream of documents.

`data.path` names one text file (one document, split by characters as the lecture does), a
folder or a glob (each file a document), JSON Lines or Parquet files or folders of them (each
record's `data.text_field` a document); `data.hf_dataset` names a Hugging Face dataset. Every
document is read in pieces of at most `PIECE_CHARS` characters, so no document, and no
corpus, ever needs to fit in memory.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError

PIECE_CHARS = 1 << 22  # characters read at once from a text file
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
ON_BAD = ("error", "skip")


TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV = "GPTLAB_DATA"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptlab"


def resolve_corpus(path: str | None, cache_dir: str | None = None) -> str:
    """The corpus: `path` (a file, folder or glob), else $GPTLAB_DATA, else Tiny
    Shakespeare downloaded once."""
    if path:
        return str(path)
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise GptlabError(f"corpus not found: {p} (set by ${DATA_ENV})")
        return str(p)
    return str(download_tiny_shakespeare(Path(cache_dir) if cache_dir else default_cache_dir()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_tiny_shakespeare(cache_dir: Path) -> Path:
    target = cache_dir / "tinyshakespeare" / "input.txt"
    if target.is_file() and _sha256(target) == TINY_SHAKESPEARE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as r:
            tmp.write_bytes(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GptlabError(
            f"could not download Tiny Shakespeare from {TINY_SHAKESPEARE_URL} ({e}); "
            f"download it by hand and pass data.path=FILE or set ${DATA_ENV}=FILE"
        ) from None
    if _sha256(tmp) != TINY_SHAKESPEARE_SHA256:
        tmp.unlink()
        raise GptlabError(f"checksum mismatch for the file downloaded from {TINY_SHAKESPEARE_URL}")
    tmp.replace(target)
    return target


@dataclass(frozen=True)
class Document:
    name: str  # where it is: a file's path under the corpus root, with a line or row number
    pieces: Iterator[str] = field(repr=False)


@dataclass
class Source:
    """A corpus: its files (sorted, so documents come in one order everywhere) and how to
    read them."""

    kind: str  # "text" (one file, one document), "files", "jsonl", "parquet" or "hf"
    root: Path | None
    files: list[Path]
    text_field: str = "text"
    hf: tuple[str, str | None, str] | None = None  # name, config, split
    on_bad_document: str = "error"
    skipped: list[str] = field(default_factory=list)  # bad documents skipped, by name

    @property
    def single_document(self) -> bool:
        return self.kind == "text"

    @property
    def name(self) -> str:
        if self.hf is not None:
            return self.hf[0].rstrip("/").rsplit("/", 1)[-1]
        base = self.files[0] if self.single_document else self.root
        return base.stem if base.is_file() else base.name

    def location(self) -> str:
        if self.hf is not None:
            return f"Hugging Face dataset {self.hf[0]}"
        return str(self.files[0] if self.single_document else self.root)

    def stamp(self) -> list:
        """What a change of the corpus would change, read without opening a file (sizes
        and modification times, as make decides)."""
        if self.hf is not None and not self.files:
            return [list(self.hf)]
        return [[str(p), s.st_size, s.st_mtime_ns] for p in self.files
                for s in (p.stat(),)] + ([list(self.hf)] if self.hf else [])

    def documents(self) -> Iterator[Document]:
        readers = {"text": _text_documents, "files": _text_documents,
                   "jsonl": _jsonl_documents, "parquet": _parquet_documents,
                   "hf": _hf_documents}
        yield from readers[self.kind](self)


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "files"


def open_source(path: str | None, hf_dataset: str | None = None, hf_config: str | None = None,
                hf_split: str = "train", text_field: str = "text",
                on_bad_document: str = "error") -> Source:
    """The corpus `data.path` (a file, folder or glob) or `data.hf_dataset` names."""
    if on_bad_document not in ON_BAD:
        raise GptlabError(f"data.on_bad_document must be one of {', '.join(ON_BAD)}, not "
                          f"{on_bad_document!r}")
    common = {"text_field": text_field, "on_bad_document": on_bad_document}
    if hf_dataset:
        local = Path(str(hf_dataset)).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return Source("hf", local if files else None, files,
                      hf=(str(hf_dataset), hf_config, hf_split), **common)
    assert path, "resolve the default corpus first"
    p = Path(path).expanduser()
    if p.is_file():
        kind = _kind_of(p)
        return Source("text" if kind == "files" else kind, p.parent, [p], **common)
    if p.is_dir():
        root, files = p, sorted(f for f in p.rglob("*") if f.is_file() and not
                                any(part.startswith(".") for part in f.relative_to(p).parts))
    elif glob.has_magic(str(path)):
        pattern = str(p)
        # the folder above the first wildcard: documents are named from there
        head = pattern.split("*")[0].split("?")[0].split("[")[0]
        root = Path(head) if head.endswith("/") else Path(head).parent
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    else:
        raise GptlabError(f"corpus not found: {p} (check data.path)")
    if not files:
        raise GptlabError(f"no files in the corpus {path} (check data.path)")
    kinds = {_kind_of(f) for f in files}
    if len(kinds) > 1:
        kinds -= {"files"}  # a folder of data files may hold a README beside them
        files = [f for f in files if _kind_of(f) in kinds]
    if len(kinds) > 1:
        raise GptlabError(f"the corpus {path} mixes JSON Lines and Parquet files: point "
                          "data.path at one kind")
    return Source(kinds.pop(), root, files, **common)


def _relative(source: Source, path: Path) -> str:
    try:
        return str(path.relative_to(source.root))
    except ValueError:
        return str(path)


def _bad(source: Source, name: str, message: str) -> None:
    """A document that cannot be read: fatal, or skipped and counted."""
    if source.on_bad_document == "skip":
        source.skipped.append(name)
        return
    raise GptlabError(f"{message} (data.on_bad_document=skip skips such documents)")


def first_bad_byte(path: Path) -> tuple[int, str]:
    """Where a file stops being UTF-8: its byte offset and the decoder's reason."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return offset + e.start, e.reason
            offset += len(block)
    pending = len(decoder.getstate()[0])  # the bytes of a character the file cuts short
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return offset - pending + e.start, e.reason
    return offset, "unknown"


def _file_pieces(path: Path) -> Iterator[str]:
    """A text file in pieces, newlines translated as Python's text mode does."""
    with open(path, encoding="utf-8") as f:
        while piece := f.read(PIECE_CHARS):
            yield piece


def _checked_pieces(source: Source, path: Path, name: str) -> Iterator[str] | None:
    """The file's pieces, or None where it is not UTF-8 and may be skipped: checked whole
    first, so a bad file is found before any of it is used."""
    try:
        ok = _utf8_ok(path)
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror}") from None
    if not ok:
        offset, reason = first_bad_byte(path)
        _bad(source, name, f"{path} is not UTF-8 text ({reason} at byte {offset})")
        return None
    return _file_pieces(path)


def _utf8_ok(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _text_documents(source: Source) -> Iterator[Document]:
    for path in source.files:
        name = _relative(source, path)
        pieces = _checked_pieces(source, path, name)
        if pieces is not None:
            yield Document(name, pieces)


def _record_text(source: Source, record, where: str) -> str | None:
    if not isinstance(record, dict) or source.text_field not in record:
        _bad(source, where, f"{where} has no field {source.text_field!r} "
                            "(set data.text_field)")
        return None
    text = record[source.text_field]
    if not isinstance(text, str):
        _bad(source, where, f"{where}: field {source.text_field!r} is "
                            f"{type(text).__name__}, not text")
        return None
    return text


def _jsonl_documents(source: Source) -> Iterator[Document]:
    for path in source.files:
        rel = _relative(source, path)
        if not _utf8_ok(path):
            offset, reason = first_bad_byte(path)
            _bad(source, rel, f"{path} is not UTF-8 text ({reason} at byte {offset})")
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad(source, where, f"{where} is not JSON ({e.msg})")
                    continue
                text = _record_text(source, record, where)
                if text is not None:
                    yield Document(f"{rel}:{lineno}", iter((text,)))


def _parquet_documents(source: Source) -> Iterator[Document]:
    import pyarrow.parquet as pq

    for path in source.files:
        rel = _relative(source, path)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's own errors, in one line
            raise GptlabError(f"{path} is not a Parquet file: {str(e).splitlines()[0]}"
                              ) from None
        if source.text_field not in pf.schema_arrow.names:
            raise GptlabError(f"{path} has no column {source.text_field!r} (its columns: "
                              f"{', '.join(pf.schema_arrow.names)}; set data.text_field)")
        row = 0
        # record batches of one row group at a time: the file is never read whole
        for batch in pf.iter_batches(batch_size=1024, columns=[source.text_field]):
            for text in batch.column(0).to_pylist():
                where = f"{path} row {row}"
                if isinstance(text, str):
                    yield Document(f"{rel}:{row}", iter((text,)))
                elif text is not None:
                    _bad(source, where, f"{where}: column {source.text_field!r} is not text")
                row += 1


def _hf_documents(source: Source) -> Iterator[Document]:
    name, config, split = source.hf
    try:
        import datasets
    except ImportError:
        raise GptlabError("data.hf_dataset needs the `datasets` library: pip install datasets"
                          ) from None
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - network, hub and format errors alike, one line
        raise GptlabError(f"cannot load the Hugging Face dataset {name!r}"
                          + (f" ({config})" if config else "") + f", split {split!r}: "
                          f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}") from None
    if first is None:
        return
    if source.text_field not in first:
        raise GptlabError(f"the Hugging Face dataset {name!r} has no column "
                          f"{source.text_field!r} (its columns: {', '.join(first)}; set "
                          "data.text_field)")
    for i, record in enumerate(_chain(first, rows)):
        text = _record_text(source, record, f"{name} {split} row {i}")
        if text is not None:
            yield Document(f"{split}:{i}", iter((text,)))


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def name_hash(name: str) -> float:
    """Where a document's name falls in [0, 1): the same for every run, seed and machine."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
