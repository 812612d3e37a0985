"""What a model's training costs in compute, in the terms scaling laws use.

N, the non-embedding parameters (Kaplan et al., 2020): every parameter but the token and
position embedding tables and an output head tied to them, since those scale with the
vocabulary and the context, not with what the model computes per token. Training FLOPs per
token, as PaLM's appendix B counts them (Chowdhery et al., 2022):

    6 N  +  12 n_layer n_embd T

6N for the matrix multiplications of the forward (2N) and backward (4N) passes, and 12 L d T
for attention's scores and weighted sums over a context of T = block_size tokens, forward and
backward (counted over the full T x T square, as PaLM does, although a causal mask uses half).
A run's compute is this times the tokens it trained on: C = FLOPs per token x D.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def non_embedding_parameters(model: nn.Module) -> int:
    """N: the parameters outside embedding tables (a head tied to one is the table itself)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def flops_per_token(model: nn.Module, model_kwargs: Mapping[str, Any]) -> int:
    """Training FLOPs per token: 6 N + 12 n_layer n_embd block_size (0 for attention in a
    model without layers, such as the bigram)."""
    attention = 12 * (int(model_kwargs.get("n_layer", 0)) * int(model_kwargs.get("n_embd", 0))
                      * int(model_kwargs.get("block_size", 0)))
    return 6 * non_embedding_parameters(model) + attention
