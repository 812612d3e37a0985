"""The corpus, its character vocabulary, the train/val split and random block sampling."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from gptlab.errors import GptlabError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV = "GPTLAB_DATA"


class CharTokenizer:
    """Sorted unique characters of a text; one token per character."""

    def __init__(self, chars: str | list[str]):
        self.chars = "".join(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def corpus_name(self) -> str:
        if self.corpus_sha256 == TINY_SHAKESPEARE_SHA256:
            return "tinyshakespeare"
        return self.corpus_path.stem if self.corpus_path else "corpus"

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

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


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptlab"


def resolve_corpus(path: str | None, cache_dir: str | None = None) -> Path:
    """The corpus file: `path`, else $GPTLAB_DATA, else Tiny Shakespeare downloaded once."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise GptlabError(f"corpus file not found: {p} (check data.path)")
        return p
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise GptlabError(f"corpus file not found: {p} (set by ${DATA_ENV})")
        return p
    return download_tiny_shakespeare(Path(cache_dir) if cache_dir else default_cache_dir())


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


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(
            f"corpus is not UTF-8 text: {path} ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise GptlabError(f"cannot read the corpus {path}: {e.strerror}") from None


def get_batch(
    data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random blocks and their targets (inputs shifted by one), in one gather."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = ix[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    chunk = data[offsets].long()  # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]


class RandomBlocks(IterableDataset):
    """An endless stream of training batches; batch k is drawn from a generator seeded by
    (seed, k) alone, and by the rank in data-parallel training, where each process draws
    batches of its own.

    Tying each batch to its index, not to a running generator, lets a resumed run draw
    exactly the batches an uninterrupted run would, whatever the loader prefetched.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int):
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


class CharDataModule(pl.LightningDataModule):
    """Character-level corpus: vocabulary, unshuffled train/val split, random blocks.

    The validation set is a fixed draw of `eval_iters * batch_size` blocks from a generator
    seeded by `val_seed` alone, so it is the same at every evaluation and in every run with
    the same data config.
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
    ):
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("eval_iters", eval_iters)):
            if value <= 0:
                raise GptlabError(f"data.{name} must be positive, got {value}")
        if not 0.0 < train_frac < 1.0:
            raise GptlabError(f"data.train_frac must be between 0 and 1, got {train_frac}")
        self.path, self.cache_dir = path, cache_dir
        self.block_size, self.batch_size = block_size, batch_size
        self.train_frac, self.eval_iters = train_frac, eval_iters
        # pinned host memory makes host-to-GPU copies asynchronous; null: when a GPU is there
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed, self.val_seed = seed, val_seed
        self.corpus_path: Path | None = None
        self.corpus_sha256 = ""
        self.tokenizer: CharTokenizer | None = None
        self.train_data: torch.Tensor | None = None
        self.val_data: torch.Tensor | None = None
        self._train_blocks: RandomBlocks | None = None

    def prepare_data(self) -> None:
        resolve_corpus(self.path, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.corpus_path = resolve_corpus(self.path, self.cache_dir)
        text = read_text(self.corpus_path)
        if not text:
            raise GptlabError(f"corpus is empty: {self.corpus_path}")
        self.corpus_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.tokenizer = CharTokenizer.from_text(text)
        # uint8 would not hold large vocabularies; int16 or int32 keeps the gather cheap
        dtype = torch.int16 if self.tokenizer.vocab_size < 2**15 else torch.int32
        data = torch.tensor(self.tokenizer.encode(text), dtype=dtype)
        n = int(self.train_frac * len(data))
        self.train_data, self.val_data = data[:n], data[n:]
        for split, part in (("train", self.train_data), ("validation", self.val_data)):
            if len(part) < self.block_size + 1:
                raise GptlabError(
                    f"the {split} split of {self.corpus_path} has {len(part)} characters, "
                    f"fewer than data.block_size + 1 = {self.block_size + 1}"
                )
        self._train_blocks = RandomBlocks(
            self.train_data, self.block_size, self.batch_size, self.seed
        )

    @property
    def corpus_name(self) -> str:
        if self.corpus_sha256 == TINY_SHAKESPEARE_SHA256:
            return "tinyshakespeare"
        return self.corpus_path.stem if self.corpus_path else "corpus"

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

    def val_dataloader(self) -> DataLoader:
        x, y = self.val_blocks()
        if self.trainer is not None and self.trainer.world_size > 1:
            # each process validates every world_size-th block; the LightningModule sums the
            # losses over all of them, so the figure is the whole set's
            rank, world = self.trainer.global_rank, self.trainer.world_size
            x, y = x[rank::world], y[rank::world]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size,
                          pin_memory=self.pin_memory, generator=_private_generator())
