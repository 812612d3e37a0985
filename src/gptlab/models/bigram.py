"""The bigram language model: each token's logits for the next are one row of a table."""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import nn

from gptlab.models import check_window, sampled


class BigramLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, block_size: int = 8):
        super().__init__()
        self.vocab_size, self.block_size = vocab_size, block_size
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # small logits at init: the untrained model predicts nearly uniformly, loss ~ ln(V)
        nn.init.normal_(self.token_embedding_table.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_table(idx)  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, kv_cache: bool = True, window: str = "half",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T). `kv_cache` and `window` are
        accepted for a common interface; a bigram reads only the last token."""
        new = sampled(self, idx, max_new_tokens, temperature, top_k, kv_cache, window, generator)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def predict(self, idx: torch.Tensor, kv_cache: bool = True, window: str = "half"
                ) -> Generator[torch.Tensor, torch.Tensor, None]:
        """Yield the logits (B, V) of the token after idx (B, T), then after each token sent."""
        check_window(window, 1)
        while True:
            # the next token depends on the last one only, so the context is one token
            idx = yield self(idx[:, -1:])[:, -1, :]  # (B, V)
