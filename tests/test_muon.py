"""gptlab's Muon: torch's Muon with its Newton-Schulz iteration in float32 on the CPU.

torch.optim.Muon has no hook for the orthogonalisation, so gptlab's `Muon.step` mirrors torch's
(torch.optim._muon._single_tensor_muon); the exact tests below fail if torch changes it.

How close float32 and torch's bfloat16 must be is bfloat16's own error, measured against the
same iteration in float64. bfloat16 keeps 8 significant bits (relative rounding 2^-9, about
2e-3), and the quintic's slope at 0 is 3.4445, so 5 iterations amplify the rounding of the
small singular directions about 500-fold. On random Gaussian matrices that leaves bfloat16
1.1e-2 to 1.6e-2 (relative Frobenius) from float64, float32 2e-6: the bound there is 3e-2,
twice bfloat16's worst, and any wrong coefficient, step count, transpose or normalisation is an
O(1) change. A real gradient is far more ill-conditioned (most of its singular values 1e-3 of
its norm on a tiny GPT), and there bfloat16 is 6e-2 to 2e-1 from float64 while float32 stays
within 1e-5: so a step is checked to agree with torch's within bfloat16's own error of that
very step (and float32's with float64's), not within a fixed number."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.optim._muon import _zeropower_via_newtonschulz

from gptlab import CONF_DIR
from gptlab.errors import GptlabError
from gptlab.models.gpt import GPT
from gptlab.run import checks
from gptlab.run.optim import (
    Muon,
    MuonWithAdamW,
    adamw_groups,
    build_optimizer,
    is_hidden_matrix,
    muon_dtype,
    newton_schulz,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_TOLERANCE = 3e-2  # relative Frobenius error on Gaussian matrices; see the docstring
SHAPES = [(64, 64), (32, 96), (96, 32), (33, 40)]  # square, wide, tall, odd
NS = {"ns_coefficients": (3.4445, -4.7750, 2.0315), "ns_steps": 5, "eps": 1e-7}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def torch_ns(G: torch.Tensor) -> torch.Tensor:
    return _zeropower_via_newtonschulz(G, NS["ns_coefficients"], NS["ns_steps"], NS["eps"])


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_newton_schulz_agrees_with_torchs_bfloat16(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(G)
    assert ours.dtype == torch.float32 and ours.shape == G.shape
    assert rel(ours, torch_ns(G)) < BF16_TOLERANCE
    # and float32 is the accurate one: next to the same iteration in float64
    exact = newton_schulz(G.double(), dtype=torch.float64)
    assert rel(ours, exact) < 1e-4 < rel(torch_ns(G), exact)
    # near-orthogonal: most singular values 0.7-1.2 by design (the few smallest of G's are
    # not brought all the way up in 5 steps); and G is kept
    s = torch.linalg.svdvals(ours)
    assert s.median() > 0.6 and s.max() < 1.3
    assert torch.equal(G, torch.randn(shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_newton_schulz_is_torchs_exactly(shape):
    """Fails if torch changes its iteration: newton_schulz mirrors it op for op."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = newton_schulz(G, NS["ns_steps"], NS["eps"], NS["ns_coefficients"], torch.bfloat16)
    assert torch.equal(ours, torch_ns(G))


@pytest.mark.parametrize("kwargs", [
    {},
    {"nesterov": False, "weight_decay": 0.1},
    {"momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"},
])
def test_bfloat16_muon_steps_as_torchs_exactly(kwargs):
    """Fails if torch changes Muon's update: gptlab's `Muon.step` mirrors it."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours_opt = Muon(params, precision="bfloat16", lr=0.02, **kwargs)
    theirs_opt = torch.optim.Muon(theirs, lr=0.02, **kwargs)
    for _ in range(3):  # the momentum buffers count from the second step on
        for p, q in zip(params, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, theirs, strict=True))
    sd, theirs_sd = ours_opt.state_dict(), theirs_opt.state_dict()
    assert sd["param_groups"] == theirs_sd["param_groups"]
    assert all(torch.equal(sd["state"][i]["momentum_buffer"],
                           theirs_sd["state"][i]["momentum_buffer"]) for i in sd["state"])


def test_one_float32_step_of_a_gpt_agrees_with_torchs_muon():
    torch.manual_seed(0)
    ours = GPT(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    theirs = copy.deepcopy(ours)
    opt = build_optimizer(ours, "muon", 1e-3, 0.1, (0.9, 0.99), False, 0.02, 0.95, 0.0,
                          muon_precision="float32")
    assert isinstance(opt, MuonWithAdamW) and opt.muon.precision == "float32"
    named = list(theirs.named_parameters())
    ref = MuonWithAdamW(
        torch.optim.Muon([p for n, p in named if is_hidden_matrix(n, p)], lr=0.02,
                         momentum=0.95, weight_decay=0.0),
        torch.optim.AdamW(adamw_groups([(n, p) for n, p in named
                                        if not is_hidden_matrix(n, p)], 0.1),
                          lr=1e-3, betas=(0.9, 0.99), fused=False))
    x = torch.randint(65, (4, 16))
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for m, o in ((ours, opt), (theirs, ref)):
        o.zero_grad()
        m(x).logsumexp(-1).mean().backward()
        o.step()
    theirs_params = dict(theirs.named_parameters())
    hidden = 0
    for n, p in ours.named_parameters():
        q = theirs_params[n]
        if not is_hidden_matrix(n, p):  # AdamW's parameters: the very same
            assert torch.equal(p, q), n
            continue
        hidden += 1
        # the first step is -lr' NS(g) (the nesterov momentum only scales g, NS normalises)
        lr = 0.02 * max(1, p.size(0) / p.size(1)) ** 0.5
        exact = -lr * newton_schulz(p.grad.double(), dtype=torch.float64)
        step, torch_step = p - before[n], q - before[n]
        assert rel(step, exact) < 1e-4, n
        assert rel(step, torch_step) < 1.05 * rel(torch_step, exact), n
    assert hidden == 8  # 4 matrices in each of the 2 blocks


def test_auto_precision_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert muon_dtype("auto", torch.device("cpu")) == torch.float32
    assert muon_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert muon_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert muon_dtype("float32", torch.device("cuda")) == torch.float32
    torch.manual_seed(0)
    m = GPT(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16)
    assert build_optimizer(m, "muon", 1e-3, 0.1, (0.9, 0.99), False, 0.02, 0.95,
                           0.0).muon.precision == "auto"
    with pytest.raises(GptlabError, match="optim.muon_precision must be one of"):
        build_optimizer(m, "muon", 1e-3, 0.1, (0.9, 0.99), False, 0.02, 0.95, 0.0,
                        muon_precision="float16")


def test_config_has_muon_precision_and_refuses_a_bad_one():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["optim=muon"])
        bad = compose(config_name="train", overrides=["optim=muon",
                                                      "optim.muon_precision=fp16"])
    assert cfg.optim.muon_precision == "auto"
    checks.check_train_config(cfg)
    with pytest.raises(GptlabError, match="optim.muon_precision must be one of"):
        checks.check_train_config(bad)
