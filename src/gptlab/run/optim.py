"""The optimizers: AdamW (GPT-2's parameter groups), or Muon for the hidden weight matrices
with AdamW for the rest.

Muon (Jordan et al., 2024; torch.optim.Muon) orthogonalises the momentum of a 2-D weight
matrix before each update. It is meant for the matrices inside the blocks; embeddings, the
head, norms and biases stay with AdamW. Lightning steps one optimizer per training step, so the
two are stepped as one (`MuonWithAdamW`), their parameter groups side by side: the learning
rate schedule multiplies every group's own learning rate alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gptlab.errors import GptlabError

OPTIMIZERS = ("adamw", "muon")


def adamw_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float
                 ) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, as in GPT-2."""
    return [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight inside the transformer blocks (`h.N....`): what Muon is for."""
    return p.dim() == 2 and name.startswith("h.")


def check_optimizer(model: nn.Module, name: str) -> None:
    """Refuse, before training, an optimizer the model has nothing for."""
    if name == "muon" and not any(is_hidden_matrix(n, p) for n, p in model.named_parameters()):
        raise GptlabError(f"optim=muon needs the 2-D weight matrices of transformer blocks, "
                          f"and {type(model).__name__} has none: use optim=adamw")


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        super().__init__([p for g in muon.param_groups + adamw.param_groups
                          for p in g["params"]], {})
        # the very group dicts of the two, so that a scheduler's changes reach them
        self.param_groups = muon.param_groups + adamw.param_groups

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float], fused: bool, muon_lr: float,
                    muon_momentum: float, muon_weight_decay: float) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(adamw_groups(params, weight_decay), lr=lr, betas=betas,
                                 fused=fused)
    if name != "muon":
        raise GptlabError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    check_optimizer(model, name)
    hidden = [p for n, p in params if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in params if not is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(hidden, lr=muon_lr, momentum=muon_momentum,
                            weight_decay=muon_weight_decay)
    adamw = torch.optim.AdamW(adamw_groups(rest, weight_decay), lr=lr, betas=betas, fused=fused)
    return MuonWithAdamW(muon, adamw)
