"""Tokenizers: characters (the lecture's) or a byte-level BPE (Hugging Face's `tokenizers`).

A run's tokenizer travels with it as plain text: the characters of a char tokenizer, the
JSON of a BPE one. It is stored in every checkpoint (`vocab`, with `tokenizer` naming the
kind) and logged with the run, so sampling, resuming and evaluating never rebuild it.
"""

from __future__ import annotations

import json
from typing import Protocol

import torch

from gptlab.errors import GptlabError

KINDS = ("char", "bpe")
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte
# what separates the documents of a corpus: a special token of a BPE; for characters, a
# control character the corpus lacks (appended to the sorted characters, so out of order)
EOT_TEXT = "<|endoftext|>"
EOT_CHARS = [chr(c) for c in (3, *range(1, 3), *range(4, 9), *range(14, 32))]


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
        # the end-of-text character: the last one, where it breaks the sorted order
        last = self.chars[-2:]
        self.eot_char = last[1] if len(last) == 2 and last[1] < last[0] else None

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @classmethod
    def with_end_of_text(cls, chars: str) -> CharTokenizer:
        """The sorted characters `chars` and an end-of-text character they lack."""
        free = [c for c in EOT_CHARS if c not in chars and c < chars[-1]]
        if not free:
            raise GptlabError("the corpus uses every control character: no character is "
                              "left to mark the end of a document")
        return cls(chars + free[0])

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
        # a document's text is only text: one that quotes "<|endoftext|>" (a tokenizer's
        # source code) does not end there; only the documents' separators are that token
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, end_of_text: bool = False
              ) -> BPETokenizer:
        """Trained on `texts` (documents, or one text whole), with the end-of-text special
        token where documents need separating."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[EOT_TEXT] if end_of_text else [])
        tok.train_from_iterator(texts, trainer=trainer)
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
        return self.tokenizer.decode(ids, skip_special_tokens=False)


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


def check_bpe_size(vocab_size: object) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise GptlabError(f"data.tokenizer=bpe needs data.vocab_size, a whole number "
                          f"(e.g. 512), not {vocab_size!r}")
    if vocab_size < BYTE_ALPHABET:
        raise GptlabError(f"data.vocab_size={vocab_size} is smaller than the byte alphabet a "
                          f"byte-level BPE starts from ({BYTE_ALPHABET})")


def train_bpe(texts: list[str], vocab_size: int, end_of_text: bool = False) -> BPETokenizer:
    """A BPE of exactly `vocab_size` tokens trained on `texts`."""
    check_bpe_size(vocab_size)
    tok = BPETokenizer.train(texts, vocab_size, end_of_text)
    if tok.vocab_size < vocab_size:
        raise GptlabError(f"data.vocab_size={vocab_size} is more than the training split "
                          f"supports: its merges end at {tok.vocab_size} tokens")
    return tok


def end_of_text_id(tok: Tokenizer) -> int | None:
    """The id of the token that ends a document, where the tokenizer has one."""
    if tok.kind == "char":
        return tok.stoi[tok.eot_char] if tok.eot_char else None
    return tok.tokenizer.token_to_id(EOT_TEXT)


def end_of_text_text(tok: Tokenizer) -> str:
    """What the end-of-text token reads as ("" where there is none)."""
    if end_of_text_id(tok) is None:
        return ""
    return tok.eot_char if tok.kind == "char" else EOT_TEXT


def artifacts(tok: Tokenizer) -> dict:
    """What a run logs about its tokenizer: vocab.json for characters, else tokenizer.json."""
    if tok.kind == "char":
        return {"vocab.json": json.dumps({"chars": tok.spec})}
    return {"tokenizer.json": tok.spec}
