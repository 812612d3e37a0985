"""Text in, text out: encode a prompt, sample from a model with a generator of its own, decode."""

from __future__ import annotations

import torch
from torch import nn

from gptlab.data.tokenizer import Tokenizer
from gptlab.errors import GptlabError


def generate_text(model: nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
                  num_samples: int = 1, device: torch.device | str = "cpu",
                  kv_cache: bool = True, window: str = "half") -> list[str]:
    """`num_samples` continuations of `prompt`. The global random state is neither used nor
    changed, so this may run beside training."""
    ids = tok.encode(prompt)
    if not ids:
        raise GptlabError("the prompt is empty")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             kv_cache=kv_cache, window=window, generator=generator)
    finally:
        model.train(was_training)
    return [tok.decode(row) for row in out]
