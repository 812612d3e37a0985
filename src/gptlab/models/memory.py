"""What a model needs in memory, known before it is built, and a refusal in one line when the
process cannot have it.

A model too big for the machine would otherwise be built parameter by parameter until the
kernel's out-of-memory killer ends the process, minutes later and without a word. The model is
built first on PyTorch's `meta` device (shapes without storage: the exact parameter count of
any model class, in milliseconds). The bytes counted are a floor (float32 weights, gradients,
the optimizer's state, one batch's logits), so a model refused here could never have fitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.errors import GptlabError

FLOAT32 = 4  # bytes; mixed precision keeps float32 weights, gradients and optimizer state too


def count_parameters(build: Callable[[], nn.Module]) -> int:
    """The number of parameters of the model `build` makes, made without memory."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


@dataclass
class Need:
    params: int
    bytes: int
    what: str  # what the bytes hold


def weights(params: int) -> Need:
    return Need(params, params * FLOAT32, "its weights")


def training(params: int, optimizer: str, batch_size: int, block_size: int,
             vocab_size: int) -> Need:
    # AdamW keeps two moments per weight; Muon keeps one momentum (and AdamW's two for the
    # embeddings and head): one is the floor
    moments = 2 if optimizer == "adamw" else 1
    logits = batch_size * block_size * vocab_size * FLOAT32 * 2  # the logits and their gradient
    name = {"adamw": "AdamW", "muon": "Muon"}.get(optimizer, optimizer)
    return Need(params, params * FLOAT32 * (2 + moments) + logits,
                f"weights, gradients, {name}'s state and one batch's logits")


def available(device: str | torch.device = "cpu") -> int:
    """Bytes this process can still have on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_fits(need: Need, device: str | torch.device = "cpu", processes: int = 1,
               advice: str = "") -> None:
    """Refuse `need` (in each of `processes` processes sharing `device`'s memory) where the
    memory available is less."""
    have = available(device)
    if need.bytes * processes <= have:
        return
    each = f" in each of {processes} processes" if processes > 1 else ""
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory"
    raise GptlabError(
        f"the model needs at least {gigabytes(need.bytes)}{each} ({count(need.params)} "
        f"parameters: {need.what}), more than the {gigabytes(have)} of {where} available"
        + (f"; {advice}" if advice else ""))


def gigabytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def count(n: int) -> str:
    """51,539,607,552 -> '51.5 billion'."""
    for size, name in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million")):
        if n >= size:
            return f"{n / size:,.1f} {name}"
    return f"{n:,}"
