"""The LightningDataModule: a corpus prepared into memory-mapped tokens (gptlab.data.prepared),
random training blocks gathered from them, the fixed validation blocks, and the validation
characters every run is scored on in bits per character."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gptlab.data import corpus, prepared
from gptlab.data import tokenizer as tokenizers
from gptlab.data.corpus import TINY_SHAKESPEARE_SHA256, default_cache_dir, resolve_corpus
from gptlab.data.prepared import Prepared, Tokens
from gptlab.data.tokenizer import Tokenizer
from gptlab.data.windows import score_windows
from gptlab.errors import GptlabError


def get_batch(
    data: Tokens | torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random blocks and their targets (inputs shifted by one), in one gather
    (from the memory-mapped token files: only the pages the blocks touch are read)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = ix[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    if isinstance(data, Tokens):
        chunk = torch.from_numpy(data.take(offsets.numpy()))  # (B, T+1) int64
    else:
        chunk = data[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


class RandomBlocks(IterableDataset):
    """An endless stream of training batches; batch k is drawn from a generator seeded by
    (seed, k) alone, and by the rank in data-parallel training, where each process draws
    batches of its own.

    Tying each batch to its index, not to a running generator, lets a resumed run draw
    exactly the batches an uninterrupted run would, whatever the loader prefetched.
    """

    def __init__(self, data: Tokens, block_size: int, batch_size: int, seed: int):
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed = seed
        self.start = 0  # index of the next batch to draw: the global step on resume
        self.rank = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator()
        k = self.start
        while True:
            # torch seeds its generator from 32 bits; large odd multipliers keep the streams
            # of nearby seeds (and ranks) apart for the first million steps
            g.manual_seed((self.seed * 1_000_003 + self.rank * 0x9E3779B1 + k) & 0xFFFF_FFFF)
            yield get_batch(self.data, self.block_size, self.batch_size, g)
            k += 1


def _private_generator() -> torch.Generator:
    """Every DataLoader iterator draws a base seed; from the global generator, that draw would
    shift the dropout masks of a resumed run, which opens its iterator at another moment."""
    return torch.Generator().manual_seed(0)


class CorpusDataModule(pl.LightningDataModule):
    """A corpus (gptlab.data.corpus: a text file, a folder or glob, JSON Lines, Parquet, a Hugging
    Face dataset), tokenized once into memory-mapped token files (gptlab.data.prepared) that every
    run on it shares, and random blocks drawn from them.

    A single text file is one document split by characters (the first `train_frac` of them
    train); a corpus of many documents is split by documents, by a hash of each document's
    name, with `val_docs` documents (or 1 - `train_frac` of them) validating.

    The validation set is a fixed draw of `eval_iters * batch_size` blocks from a generator
    seeded by `val_seed` alone, so it is the same at every evaluation and in every run with
    the same data config. Bits per character are scored over the first `bpc_chars` characters
    of the validation text, the same characters whatever the tokenizer.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 12,
        train_frac: float = 0.9,
        eval_iters: int = 20,
        seed: int = 1337,
        val_seed: int = 1337,
        cache_dir: str | None = None,
        pin_memory: bool | None = None,
        tokenizer: str = "char",
        vocab_size: int | None = None,
        bpc_chars: int | None = 32768,
        text_field: str = "text",
        val_docs: int | None = None,
        tokenizer_sample_chars: int = 20_000_000,
        on_bad_document: str = "error",
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
    ):
        super().__init__()
        if bpc_chars is not None and (not isinstance(bpc_chars, int) or bpc_chars < 2):
            raise GptlabError(f"data.bpc_chars must be a whole number >= 2 or null, got "
                              f"{bpc_chars!r}")
        if tokenizer not in tokenizers.KINDS:
            raise GptlabError(f"data.tokenizer must be one of {', '.join(tokenizers.KINDS)}, "
                              f"not {tokenizer!r}")
        if tokenizer == "bpe":
            tokenizers.check_bpe_size(vocab_size)
        self.tokenizer_kind, self.requested_vocab_size = tokenizer, vocab_size
        self.bpc_chars_wanted = bpc_chars
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("eval_iters", eval_iters),
                            ("tokenizer_sample_chars", tokenizer_sample_chars)):
            if value <= 0:
                raise GptlabError(f"data.{name} must be positive, got {value}")
        if not 0.0 < train_frac < 1.0:
            raise GptlabError(f"data.train_frac must be between 0 and 1, got {train_frac}")
        if val_docs is not None and (not isinstance(val_docs, int) or val_docs < 1):
            raise GptlabError(f"data.val_docs must be a whole number >= 1 or null, got "
                              f"{val_docs!r}")
        self.path, self.cache_dir = path, cache_dir
        self.source_options = {"text_field": text_field, "on_bad_document": on_bad_document,
                               "hf_dataset": hf_dataset, "hf_config": hf_config,
                               "hf_split": hf_split}
        self.recipe = prepared.Recipe(tokenizer, vocab_size, tokenizer_sample_chars,
                                      train_frac, val_docs)
        self.block_size, self.batch_size = block_size, batch_size
        self.train_frac, self.eval_iters = train_frac, eval_iters
        # pinned host memory makes host-to-GPU copies asynchronous; null: when a GPU is there
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed, self.val_seed = seed, val_seed
        self.source: corpus.Source | None = None
        self.prepared: Prepared | None = None
        self.tokenizer: Tokenizer | None = None
        self.given_tokenizer: Tokenizer | None = None  # a resumed run's, from its checkpoint
        self.stop_check: Callable[[], None] | None = None  # raises to stop a long prepare
        self.train_data: Tokens | None = None
        self.val_data: Tokens | None = None
        self.bpc_ids: list[int] = []  # the validation characters scored in bits per char
        self.bpc_chars = 0  # how many characters those are (the first token's aside)
        self._train_blocks: RandomBlocks | None = None

    def open_source(self) -> corpus.Source:
        opts = self.source_options
        path = None if opts["hf_dataset"] else resolve_corpus(self.path, self.cache_dir)
        return corpus.open_source(path, **opts)

    def prepare_data(self) -> None:
        self.prepare()

    def prepare(self) -> Prepared:
        """The corpus's prepared tokens, made now if no run made them before."""
        if self.prepared is None:
            self.source = self.open_source()
            cache = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
            self.prepared = prepared.prepare(self.source, self.recipe, cache,
                                             self.given_tokenizer, self.stop_check)
        return self.prepared

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        prep = self.prepare()
        self.tokenizer = prep.tokenizer
        self.train_data, self.val_data = prep.train, prep.val
        unit = "characters" if self.tokenizer.kind == "char" else "tokens"
        for split, part in (("train", self.train_data), ("validation", self.val_data)):
            if len(part) < self.block_size + 1:
                raise GptlabError(
                    f"the {split} split of {self.source.location()} has {len(part)} {unit}, "
                    f"fewer than data.block_size + 1 = {self.block_size + 1}"
                )
        scored = prep.val_text(self.bpc_chars_wanted)
        sep = prep.meta.get("end_of_text") or ""
        self.bpc_ids = self.bpc_tokens(scored, sep, prep.eot)
        # the first token is context only, and the documents' separators are no characters
        # of theirs: neither counts
        self.bpc_chars = (len(scored) - len(self.tokenizer.decode(self.bpc_ids[:1]))
                          - (scored.count(sep) * len(sep) if sep else 0))
        self._train_blocks = RandomBlocks(
            self.train_data, self.block_size, self.batch_size, self.seed
        )

    def bpc_tokens(self, text: str, separator: str, eot: int | None) -> list[int]:
        """The validation text's tokens as training saw its documents: each document's text
        encoded, the separators between them the end-of-text token. (A validation document
        that quotes a BPE's separator text, "<|endoftext|>", is scored as two.)"""
        if not separator:
            return self.tokenizer.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(separator)):
            ids += ([eot] if i else []) + self.tokenizer.encode(part)
        return ids

    @property
    def corpus_sha256(self) -> str:
        return self.prepared.digest if self.prepared else ""

    @property
    def corpus_name(self) -> str:
        if self.corpus_sha256 == TINY_SHAKESPEARE_SHA256:
            return "tinyshakespeare"
        return self.source.name if self.source else "corpus"

    @property
    def vocab_size(self) -> int:
        assert self.tokenizer is not None, "call setup() first"
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self._train_blocks.start = self.trainer.global_step
            self._train_blocks.rank = self.trainer.global_rank
        return DataLoader(self._train_blocks, batch_size=None, pin_memory=self.pin_memory,
                          generator=_private_generator())

    def val_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.val_seed)
        return get_batch(self.val_data, self.block_size, self.eval_iters * self.batch_size, g)

    def val_dataloader(self) -> list[DataLoader]:
        """The validation blocks (val/loss), then the windows over the scored validation
        characters (val/bpc)."""
        loaders = []
        for (x, y), batch_size in ((self.val_blocks(), self.batch_size),
                                   (score_windows(self.bpc_ids, self.block_size,
                                                  self.block_size), 4 * self.batch_size)):
            if self.trainer is not None and self.trainer.world_size > 1:
                # each process validates every world_size-th block; the LightningModule sums
                # the losses over all of them, so the figure is the whole set's
                rank, world = self.trainer.global_rank, self.trainer.world_size
                x, y = x[rank::world], y[rank::world]
            loaders.append(DataLoader(TensorDataset(x, y), batch_size=batch_size,
                                      pin_memory=self.pin_memory,
                                      generator=_private_generator()))
        return loaders
