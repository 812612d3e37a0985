"""Corpora, tokenizers, prepared token files and the LightningDataModule that reads them.

`gptlab.data.CharDataModule` is the name every run's `config.yaml` recorded before the
data module was named for what it is (`CorpusDataModule`): `resume=` instantiates that path
again. It is resolved on first use, so that importing a tokenizer does not import Lightning.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("CorpusDataModule", "CharDataModule"):
        from gptlab.data.datamodule import CorpusDataModule

        return CorpusDataModule
    raise AttributeError(f"module 'gptlab.data' has no attribute {name!r}")
