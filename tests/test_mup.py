"""model.parametrization=mup: the standard parametrization is untouched, muP at its base width
is the standard model exactly, and at other widths it scales init, AdamW's lr, attention and
the logits as muP prescribes."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.models import build_model
from gptlab.run.optim import build_optimizer

KW = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 65, "block_size": 16}


def gpt(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("gptlab.models.gpt.GPT", {**KW, **kw})


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.99), False, 0.02, 0.95, 0.0)


def test_mup_at_its_base_width_is_the_standard_model():
    x = torch.randint(0, 65, (2, 16))
    standard, mup = gpt(), gpt(parametrization="mup", mup_base_width=64)
    for (n, p), (_, q) in zip(standard.named_parameters(), mup.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(standard(x), mup(x))
    assert [g["lr"] for g in adamw(standard).param_groups] == \
        [g["lr"] for g in adamw(mup).param_groups]


def test_mup_scales_init_lr_and_logits_with_width():
    m = 4  # n_embd 256 over a base of 64
    model = gpt(n_embd=256, parametrization="mup", mup_base_width=64)
    params = dict(model.named_parameters())
    for name in ("h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"):
        assert params[name].std().item() == pytest.approx(0.02 / math.sqrt(m), rel=0.05)
    residual = [p for n, p in params.items() if n.endswith("c_proj.weight")]
    for p in residual:  # also scaled down by the depth, as in GPT-2
        assert p.std().item() == pytest.approx(0.02 / math.sqrt(m) / math.sqrt(4), rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # not a hidden weight
    groups = adamw(model).param_groups
    assert groups[0]["lr"] == 1e-3  # the first group's lr is the one a run logs
    hidden_ids = {id(p) for n, p in model.named_parameters() if n.startswith("h.") and p.dim() == 2}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= hidden_ids or not ids & hidden_ids
        assert g["lr"] == (1e-3 / m if ids <= hidden_ids else 1e-3)
    # the logits are the head's divided by m; attention scales as 1/d_head
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        h = model.ln_f(model.h[1](model.h[0](model.wte(x) + model.wpe(torch.arange(16)))))
        assert torch.allclose(model(x), model.lm_head(h) / m)
    assert model.h[0].attn.scale == pytest.approx(math.sqrt(64 / 4) / (256 / 4))


def test_a_bad_parametrization_is_refused_by_name():
    with pytest.raises(GptlabError, match="model.parametrization must be one of standard, mup"):
        gpt(parametrization="ntk")
    with pytest.raises(GptlabError, match="model.mup_base_width"):
        gpt(parametrization="mup", mup_base_width=30)  # not divisible by 4 heads
