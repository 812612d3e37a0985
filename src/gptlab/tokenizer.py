"""Tokenizers: characters (the lecture's) or a byte-level BPE (Hugging Face's `tokenizers`).

A run's tokenizer travels with it as plain text: the characters of a char tokenizer, the
JSON of a BPE one. It is stored in every checkpoint (`vocab`, with `tokenizer` naming the
kind) and logged with the run, so sampling, resuming and evaluating never rebuild it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch

from gptlab import store
from gptlab.errors import GptlabError

KINDS = ("char", "bpe")
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def spec(self) -> str:
        """The tokenizer as text, from which `from_spec` makes it again."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int] | torch.Tensor) -> str: ...


class CharTokenizer:
    """Sorted unique characters of a text; one token per character."""

    kind = "char"

    def __init__(self, chars: str | list[str]):
        self.chars = "".join(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def spec(self) -> str:
        return self.chars

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise GptlabError(
                f"characters not in the vocabulary: {''.join(missing)!r} "
                f"(the vocabulary has {self.vocab_size} characters)"
            )
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


class BPETokenizer:
    """A byte-level BPE: any text encodes (every byte is a token), and decodes back exactly."""

    kind = "bpe"

    def __init__(self, tokenizer):  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[])
        tok.train_from_iterator([text], trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def spec(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)


def from_spec(kind: str, spec: str) -> Tokenizer:
    """The tokenizer a checkpoint or a logged model holds."""
    if kind == "char":
        return CharTokenizer(spec)
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(spec))
        except Exception as e:  # noqa: BLE001 - the library's parse errors, one line
            raise GptlabError(f"the stored BPE tokenizer cannot be read: "
                              f"{str(e).splitlines()[0][:200]}") from None
    raise GptlabError(f"unknown tokenizer {kind!r} (gptlab knows {', '.join(KINDS)})")


def from_checkpoint(info: dict) -> Tokenizer:
    """A checkpoint's tokenizer (checkpoints from before BPE hold characters only), checked
    against the model it was stored with."""
    if not isinstance(info.get("vocab"), str) or not info["vocab"]:
        raise GptlabError("the checkpoint holds no tokenizer")
    tok = from_spec(info.get("tokenizer", "char"), info["vocab"])
    expected = (info.get("model_kwargs") or {}).get("vocab_size")
    if expected is not None and tok.vocab_size != expected:
        raise GptlabError(f"the checkpoint's tokenizer has {tok.vocab_size} tokens but its "
                          f"model {expected}: they do not belong together")
    return tok


def build(kind: str, text: str, train_text: str, vocab_size: int | None,
          cache_dir: Path) -> Tokenizer:
    """The tokenizer of a corpus: its characters, or a BPE trained on the training split
    (cached by the split's checksum and the vocabulary size: training it again gives the
    same merges, but takes seconds)."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind != "bpe":
        raise GptlabError(f"data.tokenizer must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise GptlabError(f"data.tokenizer=bpe needs data.vocab_size, a whole number "
                          f"(e.g. 512), not {vocab_size!r}")
    if vocab_size < BYTE_ALPHABET:
        raise GptlabError(f"data.vocab_size={vocab_size} is smaller than the byte alphabet a "
                          f"byte-level BPE starts from ({BYTE_ALPHABET})")
    digest = hashlib.sha256(train_text.encode("utf-8")).hexdigest()[:16]
    path = cache_dir / "tokenizers" / f"bpe-{digest}-{vocab_size}.json"
    if path.is_file():
        try:
            tok = from_spec("bpe", path.read_text(encoding="utf-8"))
            if tok.vocab_size == vocab_size:
                return tok
        except GptlabError:
            pass  # a damaged cache entry: train again
    tok = BPETokenizer.train(train_text, vocab_size)
    if tok.vocab_size < vocab_size:
        raise GptlabError(f"data.vocab_size={vocab_size} is more than the training split "
                          f"supports: its merges end at {tok.vocab_size} tokens")
    store.write_atomic(path, tok.spec)  # processes may train it at once
    return tok


def describe(tok: Tokenizer) -> dict:
    """What a run logs about its tokenizer: vocab.json for characters, else tokenizer.json."""
    if tok.kind == "char":
        return {"vocab.json": json.dumps({"chars": tok.spec})}
    return {"tokenizer.json": tok.spec}
