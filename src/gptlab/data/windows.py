"""Scoring a text (gptlab-eval, and val/bpc): the windows its tokens are scored in, every token
but the first scored once with as much context as the stride leaves, and the loss summed over
the scored targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError


def score_windows(ids: list[int], block_size: int, stride: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `block_size` tokens over `ids` in which every token but the first is
    scored exactly once: inputs (N, T) and targets (N, T), -1 where a target was scored by an
    earlier window. The first window scores all its targets; each next one moves `stride`
    tokens on and scores only the new ones, with at least block_size - stride tokens of
    context (stride = block_size: windows side by side, the cheapest)."""
    n, T = len(ids), block_size
    if n < 2:
        raise GptlabError("the text is too short to score: it has fewer than two tokens")
    if not 1 <= stride <= T:
        raise GptlabError(f"stride must be between 1 and the block size ({T}), got {stride}")
    data = torch.tensor(ids, dtype=torch.long)
    # window k holds inputs ids[a:a + T] and targets ids[a + 1:a + T + 1]
    scored = min(T + 1, n)  # targets ids[1:scored] are scored by the first window
    pad = T - (scored - 1)  # a text shorter than a window: the first one is padded
    xs = [torch.cat([data[:scored - 1], torch.zeros(pad, dtype=torch.long)])]
    ys = [torch.cat([data[1:scored], torch.full((pad,), -1, dtype=torch.long)])]
    while scored < n:
        end = min(scored + stride, n)
        a = end - 1 - T
        y = data[a + 1:end].clone()
        y[:scored - (a + 1)] = -1  # scored by an earlier window
        xs.append(data[a:end - 1])
        ys.append(y)
        scored = end
    return torch.stack(xs), torch.stack(ys)


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy summed over the targets, and how many there are; a target of -1 is
    not scored (score_windows marks so what an earlier window scored)."""
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=-1, reduction="sum")
    return total, (targets >= 0).sum().to(total.dtype)
