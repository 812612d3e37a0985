"""Checkpoint files: their names, reading them safely, and rebuilding the
model a checkpoint describes.

A gptlab checkpoint is a Lightning checkpoint with a `gptlab` entry of plain values: the model
class and its arguments, the vocabulary, the step and the last validated step. It loads with
`torch.load(..., weights_only=True)`: no pickled code is ever run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.errors import GptlabError, first_line
from gptlab.models import build_model, memory

STEP_NAME = re.compile(r"^step_(\d{6,})\.ckpt$")
REQUIRED = ("model_class", "model_kwargs", "vocab", "step")
BEST_TAG = "gptlab.best_checkpoint"  # a run's tag: the name of its best step checkpoint


def step_name(step: int) -> str:
    return f"step_{step:06d}.ckpt"


def step_of(name: str) -> int | None:
    m = STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def step_names(names: list[str]) -> list[str]:
    """The step checkpoints among `names`, oldest first."""
    return sorted((n for n in names if step_of(n) is not None), key=step_of)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain values only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # torch.save writes a zip archive
            raise GptlabError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file")
    try:
        # mapped, not read: a model too big for memory is refused before its weights load
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupted or unsafe files all land here
        raise GptlabError(f"cannot read checkpoint {path}: {_load_problem(e)}") from None
    info = ckpt.get("gptlab") if isinstance(ckpt, dict) else None
    if (not isinstance(info, Mapping) or "state_dict" not in ckpt
            or any(k not in info for k in REQUIRED)):
        raise GptlabError(f"{path} is not a gptlab checkpoint (it lacks the model class, its "
                          "arguments, the vocabulary or the step that gptlab records)")
    return ckpt


def _load_problem(e: Exception) -> str:
    text = str(e)
    if "Weights only load failed" in text:
        # torch's message goes on to suggest loading unsafely: gptlab never does
        return "it holds Python objects besides tensors and plain values, which gptlab does " \
               "not load"
    if "central directory" in text or "failed reading zip archive" in text:
        return "the file is incomplete or damaged"
    if isinstance(e, EOFError) or "invalid load key" in text or "magic number" in text:
        return "not a PyTorch checkpoint file"
    return first_line(e)[:200]


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model a checkpoint describes, with its weights."""
    info = ckpt["gptlab"]
    kwargs = dict(info["model_kwargs"])
    # refused before it is built where this machine cannot hold it (the weights themselves
    # are still on disk: read_checkpoint maps the file)
    memory.check_fits(memory.weights(memory.count_parameters(
        lambda: build_model(info["model_class"], kwargs))))
    model = build_model(info["model_class"], kwargs)
    try:
        model.load_state_dict(model_weights(ckpt["state_dict"]))
    except RuntimeError as e:
        raise GptlabError(f"checkpoint weights do not match its model config: "
                          f"{first_line(e)}") from None
    return model


def model_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LightningModule holds the model as `model`: its keys carry that prefix."""
    return {k.removeprefix("model."): v for k, v in state_dict.items()}


def check_matches(ckpt: Mapping[str, Any], model: nn.Module, vocab: str) -> None:
    """A checkpoint from another corpus or model shape would fail deep inside Lightning."""
    if ckpt["gptlab"].get("vocab") != vocab:
        raise GptlabError("the checkpoint's vocabulary does not match the run's corpus")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model_weights(ckpt["state_dict"]).items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise GptlabError(f"the checkpoint's weights do not match the logged model config "
                          f"(first difference: {diff[0][0]})")
