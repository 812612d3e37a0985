"""Plain `nn.Module` language models: `forward(idx) -> logits (B, T, V)` and `generate`."""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import GptlabError


def pick_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from the logits of the last position. (B, V) -> (B, 1)"""
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def sampled(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
            top_k: int | None = None, kv_cache: bool = True, window: str = "half",
            generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """The tokens (B, 1) sampled after idx (B, T), one at a time as they are made (what a
    stream prints at once, and a time budget can stop). The model's `predict` keeps only the
    context it reads, so memory stays flat however many tokens are asked for."""
    check_sampling_args(temperature, top_k)
    if max_new_tokens <= 0:
        return
    stream = model.predict(idx, kv_cache, window)
    logits = next(stream)
    for i in range(max_new_tokens):
        idx_next = pick_next(logits, temperature, top_k, generator)
        yield idx_next
        if i + 1 < max_new_tokens:
            logits = stream.send(idx_next)


def check_sampling_args(temperature: float, top_k: int | None) -> None:
    if (not isinstance(temperature, int | float) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature <= 0):
        raise GptlabError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or top_k <= 0):
        raise GptlabError(f"top_k must be a positive integer or null, got {top_k!r}")


WINDOWS = ("half", "slide", "shift")


def check_window(window: str, block_size: int) -> int:
    """How many tokens a full context keeps under `window` (see GPT.generate)."""
    if window not in WINDOWS:
        raise GptlabError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    return max(1, block_size // 2) if window == "half" else block_size


def class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def build_model(target: str, kwargs: dict) -> nn.Module:
    """Rebuild a model recorded in a checkpoint; only gptlab's own model classes load."""
    module_name, _, cls_name = target.rpartition(".")
    if not module_name.startswith("gptlab.models."):
        raise GptlabError(f"checkpoint names a model class outside gptlab.models: {target}")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise GptlabError(f"checkpoint names an unknown model class: {target}") from None
    return cls(**kwargs)
