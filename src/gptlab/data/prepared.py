"""Prepared corpora: a corpus tokenized once into memory-mapped token files on disk.

The first run on a corpus (or `gptlab-prepare`) reads it twice, streamed: a scan (content
digest, characters, the split, a bounded sample to train a BPE on) and an encoding pass that
writes each split's tokens into shards of `uint16` (`uint32` for vocabularies past 65,536)
behind a 64-byte header (magic, version, item size, token count, CRC-32). The shards, the
tokenizer and the validation text land in one folder of the cache, written under a temporary
name and renamed when whole, so a killed prepare leaves nothing a run would take for
finished. Every later run, resumed run, data-parallel rank and sweep job memory-maps the same
files: the page cache holds them once for all processes, and no process holds a copy.

Folders are keyed by what determines the tokens: the corpus's content digest, the split rule
and the tokenizer's spec. An index keyed by the corpus files' sizes and modification times
(as make decides) finds the folder without reading the corpus; a changed file is scanned
again. Processes preparing the same corpus at once take a file lock: one prepares, the
others wait and then read its files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab import files
from gptlab.console import log, on_terminal
from gptlab.data import tokenizer as tokenizers
from gptlab.data.corpus import Source, name_hash
from gptlab.data.tokenizer import CharTokenizer, Tokenizer
from gptlab.errors import GptlabError

FORMAT = 1
MAGIC = b"GPTLABTK"
HEADER = struct.Struct("<8sIIQI")  # magic, version, item size, tokens, crc32
HEADER_BYTES = 64
SHARD_TOKENS = 1 << 28  # 512 MB of uint16 a shard
BATCH_CHARS = 1 << 23  # characters encoded in one batch
CUT_CHARS = 1 << 16  # a long document is encoded in pieces of about this many characters
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Recipe:
    """What makes the tokens besides the corpus: the tokenizer and the split."""

    tokenizer: str = "char"
    vocab_size: int | None = None
    sample_chars: int = 20_000_000  # a BPE is trained on at most this many characters
    train_frac: float = 0.9
    val_docs: int | None = None  # a multi-document corpus: this many documents validate

    def split_rule(self, single_document: bool) -> list:
        if single_document:
            return ["characters", self.train_frac]
        return ["documents", self.val_docs] if self.val_docs else ["documents", self.train_frac]

    def tokenizer_rule(self) -> list:
        if self.tokenizer == "bpe":
            return ["bpe", self.vocab_size, self.sample_chars]
        return [self.tokenizer]


# ---- token files ----------------------------------------------------------------------------

def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """One split's tokens, appended to shards of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype,
                 shard_tokens: int | None = None):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens = shard_tokens or SHARD_TOKENS
        self.shards: list[dict] = []
        self._file = None
        self._count = self._crc = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")
        self._file.write(b"\0" * HEADER_BYTES)
        self.shards.append({"file": name})
        self._count = self._crc = 0

    def _close_shard(self) -> None:
        f = self._file
        f.seek(0)
        f.write(HEADER.pack(MAGIC, FORMAT, self.dtype.itemsize, self._count, self._crc))
        f.close()
        self._file = None
        self.shards[-1].update(tokens=self._count, crc32=self._crc)

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            part, ids = ids[:room], ids[room:]
            data = part.tobytes()
            self._file.write(data)
            self._crc = zlib.crc32(data, self._crc)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict]:
        if self._file is None and not self.shards:
            self._open()  # an empty split still has its (empty) file
        if self._file is not None:
            self._close_shard()
        for shard in self.shards:
            st = (self.folder / shard["file"]).stat()
            shard.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        return self.shards


class Damaged(Exception):
    """A token file that is not what its folder says it is."""


def open_shard(path: Path, shard: dict, verify: bool = False) -> np.ndarray:
    """A shard's tokens, memory-mapped read-only. Its header and size are checked always;
    its CRC where the file's size or modification time moved since it was written, or when
    asked."""
    try:
        st = path.stat()
        with open(path, "rb") as f:
            magic, version, itemsize, count, crc = HEADER.unpack(f.read(HEADER.size))
    except (OSError, struct.error) as e:
        raise Damaged(f"{path.name} cannot be read ({e})") from None
    if magic != MAGIC or version != FORMAT:
        raise Damaged(f"{path.name} is not a gptlab token file of version {FORMAT}")
    if count != shard["tokens"] or st.st_size != HEADER_BYTES + count * itemsize:
        raise Damaged(f"{path.name} holds {(st.st_size - HEADER_BYTES) // max(itemsize, 1)} "
                      f"tokens, not {shard['tokens']}")
    dtype = np.dtype(np.uint16) if itemsize == 2 else np.dtype(np.uint32)
    if count == 0:
        return np.zeros(0, dtype)
    if verify or (st.st_size, st.st_mtime_ns) != (shard.get("size"), shard.get("mtime_ns")):
        got = 0
        with open(path, "rb") as f:  # read, not through the map: see below
            f.seek(HEADER_BYTES)
            while block := f.read(1 << 24):
                got = zlib.crc32(block, got)
        if got != crc or crc != shard["crc32"]:
            raise Damaged(f"{path.name} fails its checksum")
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # training reads a few blocks anywhere: a corpus not in the page cache is read from disk
    # block by block, not with the kernel's read-ahead around each one. (The pages a run
    # touches count in its resident memory as shared page cache, not as its own.)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=HEADER_BYTES)


class Tokens:
    """One split's tokens: its shards, read as one sequence."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = [s for s in shards if len(s)] or [np.zeros(0, np.uint16)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        """The tokens at `index` (any shape), as int64, in one vectorised read per shard."""
        if len(self.shards) == 1:
            return self.shards[0][index].astype(np.int64)
        out = np.empty(index.shape, np.int64)
        shard = np.searchsorted(self.starts, index, side="right") - 1
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.shards[s][index[at] - self.starts[s]]
        return out

    def head(self, n: int) -> np.ndarray:
        return self.take(np.arange(min(n, len(self))))


# ---- the prepared folder --------------------------------------------------------------------

@dataclass
class Prepared:
    folder: Path
    meta: dict
    tokenizer: Tokenizer
    train: Tokens
    val: Tokens

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def eot(self) -> int | None:
        return self.meta["eot"]

    def val_text(self, chars: int | None) -> str:
        """The first `chars` characters of the validation text (None: all of it)."""
        with open(self.folder / "val.txt", encoding="utf-8", newline="") as f:
            return f.read(-1 if chars is None else chars)

    def profile(self) -> dict:
        """What a run's dataset input says of the corpus."""
        m = self.meta
        return {"source": m["source"], "digest": m["digest"], "prepared": self.folder.name,
                "tokenizer": m["tokenizer"]["kind"], "vocab_size": self.tokenizer.vocab_size,
                **{f"{s}_{what}": m[what][s] for what in ("documents", "characters", "tokens")
                   for s in SPLITS},
                **({"skipped_documents": len(m["skipped"])} if m.get("skipped") else {})}


def open_folder(folder: Path, verify: bool = False) -> Prepared:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise Damaged(f"it was prepared by another version of gptlab (format "
                      f"{meta.get('format')})")
    tok = tokenizers.from_spec(meta["tokenizer"]["kind"], meta["tokenizer"]["spec"])
    splits = {s: Tokens([open_shard(folder / sh["file"], sh, verify)
                         for sh in meta["shards"][s]]) for s in SPLITS}
    return Prepared(folder, meta, tok, splits["train"], splits["val"])


def corpora_dir(cache_dir: Path) -> Path:
    return cache_dir / "corpora"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _index_path(cache_dir: Path, fingerprint: str) -> Path:
    return corpora_dir(cache_dir) / "index" / f"{fingerprint[:32]}.json"


def _found(cache_dir: Path, fingerprint: str, given: Tokenizer | None) -> Prepared | None:
    """The folder the index names for these corpus files, if it is whole; a damaged one is
    said, removed, and prepared again."""
    index = _index_path(cache_dir, fingerprint)
    try:
        folder = corpora_dir(cache_dir) / json.loads(index.read_text())["folder"]
    except (OSError, ValueError, KeyError):
        return None
    if not folder.is_dir():
        return None
    try:
        prep = open_folder(folder)
    except (Damaged, OSError, ValueError, KeyError, GptlabError) as e:
        log.warning(f"gptlab: the prepared corpus {folder} is damaged ({e}): preparing it "
                    "again")
        _remove(folder)
        return None
    if given is not None and prep.tokenizer.spec != given.spec:
        return None
    return prep


def _remove(folder: Path) -> None:
    """Out of the way at once (a rename), then deleted: a process that has the files open
    keeps reading them."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    with contextlib.suppress(OSError):
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


def prepare(source: Source, recipe: Recipe, cache_dir: Path,
            given: Tokenizer | None = None,
            check: Callable[[], None] | None = None) -> Prepared:
    """The corpus's prepared tokens: found, or made now (once, whoever asks at once).
    `given` is a tokenizer to use instead of building one (a resumed run's); `check` is
    called as the corpus is read, to stop a prepare by raising (a run's Ctrl-C)."""
    rule = recipe.split_rule(source.single_document)
    stamp = [FORMAT, source.kind, source.text_field, source.on_bad_document, source.stamp(),
             rule]  # the corpus's files stat'ed once: a corpus may have thousands
    tok_rule = ["given", hashlib.sha256(given.spec.encode()).hexdigest()] if given \
        else recipe.tokenizer_rule()
    fingerprint = _hash([*stamp, tok_rule])
    if given is not None:
        # the corpus prepared for the run's own recipe holds the same tokenizer, mostly
        own = _found(cache_dir, _hash([*stamp, recipe.tokenizer_rule()]), given)
        if own is not None:
            return own
    found = _found(cache_dir, fingerprint, given)
    if found is not None:
        return found
    root = corpora_dir(cache_dir)
    files.check_writable(root, "the corpus cache (data.cache_dir)")
    lock = root / "locks" / f"{fingerprint[:32]}.lock"
    with files.file_lock(lock, waiting=lambda: log.info(
            f"gptlab: waiting for another process preparing {source.location()}")):
        found = _found(cache_dir, fingerprint, given)
        if found is not None:
            return found
        prep = _make(source, recipe, rule, root, given, check)
        files.write_atomic(_index_path(cache_dir, fingerprint),
                           json.dumps({"folder": prep.folder.name}))
        return prep


# ---- making one ----------------------------------------------------------------------------

class Meter:
    """Progress through the corpus: a bar with MB/s and time left in a terminal, a plain line
    every `every` seconds elsewhere (a log file, a batch job)."""

    def __init__(self, what: str, total: int | None, every: float = 10.0,
                 check: Callable[[], None] | None = None):
        self.what, self.total, self.every, self.check = what, total, every, check
        self.done, self.start = 0, time.monotonic()
        self.last = self.start
        self.bar = None
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True,
                            unit_divisor=1000, file=sys.stderr, leave=False)

    def add(self, n: int) -> None:
        if self.check is not None:
            self.check()
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / (now - self.start) / 1e6
            left = (f", {(self.total - self.done) / 1e6 / rate:.0f} s left"
                    if self.total and rate > 0 and self.total > self.done else "")
            of = f" of {self.total / 1e6:,.0f}" if self.total else ""
            log.info(f"gptlab: {self.what} {self.done / 1e6:,.0f}{of} MB, {rate:.1f} MB/s{left}")

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.start


@dataclass
class Scan:
    digest: str
    documents: int
    characters: int
    seen: np.ndarray | None  # the code points the corpus uses (char tokenizers)
    sample: list[tuple[float, str]]  # (name hash, text) of documents to train a BPE on
    val_below: float  # a document validates when its name hash is below this


def _total_bytes(source: Source) -> int | None:
    return sum(p.stat().st_size for p in source.files) or None


def _scan(source: Source, recipe: Recipe, need_chars: bool,
          check: Callable[[], None] | None = None) -> Scan:
    digest = hashlib.sha256()
    seen = np.zeros(0x110000, dtype=bool) if need_chars else None
    sample, sample_chars = [], 0
    hashes: list[float] = []
    n_docs = n_chars = 0
    meter = Meter("scanning", _total_bytes(source), check=check)
    for doc in source.documents():
        h = name_hash(doc.name)
        if not source.single_document:
            digest.update(doc.name.encode() + b"\0")
            hashes.append(h)
        kept = []
        for piece in doc.pieces:
            data = piece.encode("utf-8", "surrogatepass")
            digest.update(data)
            meter.add(len(data))
            n_chars += len(piece)
            if seen is not None:
                seen[_code_points(piece)] = True
            if recipe.tokenizer == "bpe" and sample_chars < recipe.sample_chars:
                kept.append(piece[:recipe.sample_chars - sample_chars])
                sample_chars += len(kept[-1])
        if kept:
            sample.append((h, "".join(kept)))
        if not source.single_document:
            digest.update(b"\0")
        n_docs += 1
    meter.close()
    if n_chars == 0:
        raise GptlabError(f"corpus is empty: {source.location()}"
                          + (f" ({len(source.skipped)} bad documents skipped)"
                             if source.skipped else ""))
    val_below = 1.0 - recipe.train_frac
    if not source.single_document and recipe.val_docs:
        if recipe.val_docs >= n_docs:
            raise GptlabError(f"data.val_docs={recipe.val_docs} leaves no training document: "
                              f"the corpus has {n_docs}")
        val_below = float(np.partition(np.array(hashes), recipe.val_docs)[recipe.val_docs])
    return Scan(digest.hexdigest(), n_docs, n_chars, seen, sample, val_below)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _build_tokenizer(source: Source, recipe: Recipe, scan: Scan) -> Tokenizer:
    eot = not source.single_document  # one document needs no separator
    if recipe.tokenizer == "char":
        chars = "".join(chr(c) for c in np.flatnonzero(scan.seen))
        return CharTokenizer.with_end_of_text(chars) if eot else CharTokenizer(chars)
    if source.single_document:
        n_train = int(recipe.train_frac * scan.characters)
        texts = [scan.sample[0][1][:n_train]] if scan.sample else []
    else:
        texts = [t for h, t in scan.sample if h >= scan.val_below]
    if not texts or not any(texts):
        raise GptlabError("the training split is empty: no text to train a BPE on")
    return tokenizers.train_bpe(texts, recipe.vocab_size, end_of_text=eot)


def safe_cut(text: str, limit: int) -> int:
    """Where to cut `text` at or before `limit` so that encoding the two parts apart gives
    the tokens encoding it whole does: after a lone newline between two non-space
    characters, where a byte-level BPE's pre-tokenizer splits whatever follows. `limit`
    where there is none in the second half."""
    at = limit
    while True:
        at = text.rfind("\n", limit // 2, at)
        if at < 1:
            return limit
        if not text[at - 1].isspace() and at + 1 < len(text) and not text[at + 1].isspace():
            return at + 1


class SplitEncoder:
    """Encodes one split's documents in batches and appends the tokens to its shards; each
    document ends with the end-of-text token where the corpus has one."""

    def __init__(self, tok: Tokenizer, writer: ShardWriter, eot: int | None):
        self.tok, self.writer, self.eot = tok, writer, eot
        self.pending: list[str | None] = []  # texts to encode; None: an end-of-text token
        self.pending_chars = 0
        self.carry = ""  # the unencoded end of the current document
        self.characters = self.documents = 0
        if tok.kind == "char":
            codes = np.array([ord(c) for c in tok.spec], dtype=np.int64)
            self.lut = np.zeros(max(codes) + 1, dtype=writer.dtype)
            self.lut[codes] = np.arange(len(codes))

    def feed(self, piece: str) -> None:
        self.characters += len(piece)
        self.carry += piece
        while len(self.carry) > 2 * CUT_CHARS:
            cut = safe_cut(self.carry, CUT_CHARS)
            self._queue(self.carry[:cut])
            self.carry = self.carry[cut:]

    def end_document(self) -> None:
        self._queue(self.carry)
        self.carry = ""
        self.documents += 1
        if self.eot is not None:
            self.pending.append(None)

    def _queue(self, text: str) -> None:
        if text:
            self.pending.append(text)
            self.pending_chars += len(text)
            if self.pending_chars >= BATCH_CHARS:
                self.flush()

    def flush(self) -> None:
        texts = [t for t in self.pending if t is not None]
        if self.tok.kind == "char":
            encoded = [self.lut[_code_points(t)] for t in texts]
        else:  # Hugging Face tokenizers encodes a batch on all cores
            encoded = [np.array(e.ids, dtype=self.writer.dtype)
                       for e in self.tok.tokenizer.encode_batch(texts,
                                                                add_special_tokens=False)]
        eot = np.array([self.eot if self.eot is not None else 0], dtype=self.writer.dtype)
        it = iter(encoded)
        parts = [eot if t is None else next(it) for t in self.pending]
        if parts:
            self.writer.write(np.concatenate(parts))
        self.pending, self.pending_chars = [], 0


def _make(source: Source, recipe: Recipe, rule: list, root: Path,
          given: Tokenizer | None, check: Callable[[], None] | None = None) -> Prepared:
    t0 = time.monotonic()
    log.info(f"gptlab: preparing {source.location()} ({recipe.tokenizer} tokens), once for "
             "every run on it")
    scan = _scan(source, recipe, given is None and recipe.tokenizer == "char", check)
    if given is not None and not source.single_document and given.kind == "char" \
            and not getattr(given, "eot_char", None):
        raise GptlabError("the run's character vocabulary has no end-of-text token to "
                          "separate this corpus's documents")
    tok = given or _build_tokenizer(source, recipe, scan)
    eot = tokenizers.end_of_text_id(tok)
    key = _hash([FORMAT, scan.digest, rule, hashlib.sha256(tok.spec.encode()).hexdigest()])
    folder = root / f"{_safe_name(source.name)}-{key[:16]}"
    if folder.is_dir():
        with contextlib.suppress(Damaged, OSError, ValueError, KeyError, GptlabError):
            return open_folder(folder)  # the same content under other files
        _remove(folder)
    _remove_abandoned(root)
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _encode(source, recipe, scan, tok, eot, tmp, given is not None, check)
        meta["seconds"] = round(time.monotonic() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:  # another process, with other files of the same content, was first
            if not folder.is_dir():
                raise
    except OSError as e:
        raise GptlabError(f"cannot prepare the corpus in {root}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prep = open_folder(folder)
    m = prep.meta
    log.info(f"gptlab: prepared {scan.documents:,} document{'s' * (scan.documents > 1)}, "
             f"{scan.characters:,} characters into {m['tokens']['train']:,} train / "
             f"{m['tokens']['val']:,} val tokens in {m['seconds']:.2f} s: {folder}"
             + (f" ({len(source.skipped)} bad documents skipped)" if source.skipped else ""))
    return prep


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "corpus"


def _remove_abandoned(root: Path) -> None:
    """Temporary folders of prepares whose process is gone (killed, or a machine that
    rebooted)."""
    for tmp in root.glob(".tmp-*-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _encode(source: Source, recipe: Recipe, scan: Scan, tok: Tokenizer, eot: int | None,
            folder: Path, given: bool, check: Callable[[], None] | None = None) -> dict:
    dtype = dtype_for(tok.vocab_size)
    writers = {s: ShardWriter(folder, s, dtype) for s in SPLITS}
    enc = {s: SplitEncoder(tok, writers[s], eot) for s in SPLITS}
    n_train = int(recipe.train_frac * scan.characters) if source.single_document else None
    skipped_before = len(source.skipped)
    meter = Meter("tokenizing", _total_bytes(source), check=check)
    with open(folder / "val.txt", "w", encoding="utf-8", newline="") as val_text:
        separator = tokenizers.end_of_text_text(tok)
        for doc in source.documents():
            if n_train is not None:  # one document, split by characters
                for piece in doc.pieces:
                    meter.add(len(piece))
                    head = max(0, min(len(piece), n_train - enc["train"].characters))
                    if head:
                        enc["train"].feed(piece[:head])
                    if head < len(piece):
                        enc["val"].feed(piece[head:])
                        val_text.write(piece[head:])
                continue
            split = "val" if name_hash(doc.name) < scan.val_below else "train"
            for piece in doc.pieces:
                meter.add(len(piece))
                enc[split].feed(piece)
                if split == "val":
                    val_text.write(piece)
            enc[split].end_document()
            if split == "val":
                val_text.write(separator)
        for e in enc.values():
            if n_train is not None:
                e.end_document()
            e.flush()
    meter.close()
    del source.skipped[skipped_before:]  # the scan counted them already
    shards = {s: writers[s].close() for s in SPLITS}
    return {"format": FORMAT, "source": source.location(), "corpus": source.name,
            "digest": scan.digest,
            "split": recipe.split_rule(source.single_document),
            "documents": {s: enc[s].documents for s in SPLITS},
            "characters": {s: enc[s].characters for s in SPLITS},
            "tokens": {s: sum(sh["tokens"] for sh in shards[s]) for s in SPLITS},
            "skipped": source.skipped[:1000],
            "tokenizer": {"kind": tok.kind, "spec": tok.spec,
                          "from": "the run's checkpoint" if given else "this corpus"},
            "eot": eot, "end_of_text": tokenizers.end_of_text_text(tok),
            "dtype": dtype.name, "shards": shards}


def verify(folder: Path) -> Prepared:
    """Open a prepared folder checking every token file's checksum."""
    try:
        return open_folder(folder, verify=True)
    except Damaged as e:
        raise GptlabError(f"the prepared corpus {folder} is damaged: {e}") from None


def folders(cache_dir: Path) -> Iterator[Path]:
    root = corpora_dir(cache_dir)
    if root.is_dir():
        yield from sorted(p for p in root.iterdir() if (p / "meta.json").is_file())
