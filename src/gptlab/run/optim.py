"""The optimizers: AdamW (GPT-2's parameter groups), or Muon for the hidden weight matrices
with AdamW for the rest.

Muon (Jordan et al., 2024; torch.optim.Muon) orthogonalises the momentum of a 2-D weight
matrix before each update. It is meant for the matrices inside the blocks; embeddings, the
head, norms and biases stay with AdamW. Lightning steps one optimizer per training step, so the
two are stepped as one (`MuonWithAdamW`), their parameter groups side by side: the learning
rate schedule multiplies every group's own learning rate alike.

torch's Muon runs its Newton-Schulz iteration in bfloat16, hard-coded: fast on GPUs, slow on a
CPU without bfloat16 matrix units. gptlab's `Muon` is torch's with the iteration in a chosen
precision (`optim.muon_precision`; `auto`: float32 on CPU, bfloat16 on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gptlab.errors import GptlabError

OPTIMIZERS = ("adamw", "muon")
MUON_PRECISIONS = ("auto", "float32", "bfloat16")
# torch.optim.Muon is torch >= 2.9's; with an older torch only optim=adamw can be built
_TorchMuon: Any = getattr(torch.optim, "Muon", torch.optim.Optimizer)


def adamw_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float
                 ) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only, as in GPT-2."""
    return [
        {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def mup_groups(model: nn.Module, params: list[tuple[str, nn.Parameter]], lr: float,
               weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups; under muP (a model with a width multiplier m != 1, models/gpt.py) the
    blocks' matrices step with lr / m, after the others (so the first group's lr, the one a
    run logs, stays the base lr)."""
    width_mult = getattr(model, "width_mult", 1.0)
    if width_mult == 1.0:
        return adamw_groups(params, weight_decay)
    hidden = [(n, p) for n, p in params if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in params if not is_hidden_matrix(n, p)]
    groups = adamw_groups(rest, weight_decay) + [
        {**g, "lr": lr / width_mult} for g in adamw_groups(hidden, weight_decay)]
    return [g for g in groups if g["params"]]


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight inside the transformer blocks (`h.N....`): what Muon is for."""
    return p.dim() == 2 and name.startswith("h.")


def check_optimizer(model: nn.Module, name: str) -> None:
    """Refuse, before training, an optimizer the model has nothing for."""
    if name == "muon" and not any(is_hidden_matrix(n, p) for n, p in model.named_parameters()):
        raise GptlabError(f"optim=muon needs the 2-D weight matrices of transformer blocks, "
                          f"and {type(model).__name__} has none: use optim=adamw")


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonalise the 2-D G (roughly U V^T of its SVD) by `steps` quintic Newton-Schulz
    iterations computed in `dtype`.

    The iteration of torch.optim._muon._zeropower_via_newtonschulz (torch 2.13), op for op:
    in bfloat16 it gives the very same tensor; in float32 the same iteration, rounded less.
    """
    a, b, c = coefficients
    tall = G.size(0) > G.size(1)
    X = G.to(dtype).T if tall else G.to(dtype)  # iterate on the wide way round
    X = X / X.norm().clamp(min=eps)  # spectral norm at most 1; out of place: G is kept
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


def muon_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz iteration; `auto`: bfloat16 on CUDA, float32 elsewhere."""
    if precision not in MUON_PRECISIONS:
        raise GptlabError(f"optim.muon_precision must be one of {', '.join(MUON_PRECISIONS)}, "
                          f"got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, precision)


class Muon(_TorchMuon):
    """torch.optim.Muon, its Newton-Schulz iteration in `precision` (MUON_PRECISIONS).

    torch has no hook for the orthogonalisation, so `step` is torch 2.13's
    torch.optim._muon._single_tensor_muon with `newton_schulz` in place of
    `_zeropower_via_newtonschulz`; tests/test_muon.py checks that with precision=bfloat16 it
    steps exactly as torch's Muon. The state dict is torch's.
    """

    def __init__(self, params: Any, precision: str = "auto", **kwargs: Any):
        muon_dtype(precision, torch.device("cpu"))  # refuse an unknown precision now
        super().__init__(params, **kwargs)
        self.precision = precision

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        from torch.optim._muon import _adjust_lr  # Muon's lr for a matrix of a shape

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, momentum = float(group["lr"]), group["momentum"]
            for p, grad, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"], group["eps"],
                                       group["ns_coefficients"],
                                       muon_dtype(self.precision, p.device))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


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
                    muon_momentum: float, muon_weight_decay: float,
                    muon_precision: str = "auto") -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(mup_groups(model, params, lr, weight_decay), lr=lr,
                                 betas=betas, fused=fused)
    if name != "muon":
        raise GptlabError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    check_optimizer(model, name)
    hidden = [p for n, p in params if is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in params if not is_hidden_matrix(n, p)]
    muon = Muon(hidden, precision=muon_precision, lr=muon_lr, momentum=muon_momentum,
                weight_decay=muon_weight_decay)
    adamw = torch.optim.AdamW(adamw_groups(rest, weight_decay), lr=lr, betas=betas, fused=fused)
    return MuonWithAdamW(muon, adamw)
