"""The lecture's "mathematical trick": three ways to average each position with its past.

All take x (B, T, C) and return out (B, T, C) with out[:, t] = mean(x[:, :t+1]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_average_loop(x: torch.Tensor) -> torch.Tensor:
    """Version 1: loops over batch and time. For teaching, not for speed."""
    B, T, C = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            out[b, t] = x[b, : t + 1].mean(dim=0)
    return out


def causal_average_matmul(x: torch.Tensor) -> torch.Tensor:
    """Version 2: a row-normalised lower-triangular matrix times x."""
    T = x.size(1)
    wei = torch.tril(torch.ones(T, T, dtype=x.dtype, device=x.device))
    wei = wei / wei.sum(dim=1, keepdim=True)  # (T, T)
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def causal_average_softmax(x: torch.Tensor) -> torch.Tensor:
    """Version 3: a softmax over zero affinities with the future masked to -inf."""
    T = x.size(1)
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    wei = torch.zeros(T, T, dtype=x.dtype, device=x.device)
    wei = wei.masked_fill(~tril, float("-inf"))
    wei = F.softmax(wei, dim=-1)  # (T, T)
    return wei @ x


AGGREGATIONS = {
    "loop": causal_average_loop,
    "matmul": causal_average_matmul,
    "softmax": causal_average_softmax,
}
