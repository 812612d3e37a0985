"""The lecture's progression: the averaging trick, scaled attention, and every stage's
config (conf/experiment/lecture/<stage>.yaml) building a causal model that learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from gptlab import CONF_DIR
from gptlab.cli import train as train_cli
from gptlab.errors import GptlabError, gptlab_cause
from gptlab.models.averaging import AGGREGATIONS, causal_average_matmul
from gptlab.models.bigram import BigramLanguageModel
from gptlab.models.gpt import GPT, CausalSelfAttention
from gptlab.run import training

V = 65  # Tiny Shakespeare's vocabulary
SMALL_STAGES = ["bigram", "bow", "attention_head", "multihead", "multihead_ffn", "blocks",
                "blocks_residual", "blocks_residual_ln"]
STAGES = [*SMALL_STAGES, "gpt"]


pytestmark = pytest.mark.usefixtures("one_thread")


def stage_cfg(stage: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train",
                       overrides=[f"experiment=lecture/{stage}", *overrides])


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """As gptlab-train builds it: vocab_size and block_size come from the data."""
    try:
        return training.build_model(cfg.model, V, cfg.data.block_size)[0]
    except Exception as e:
        # Hydra wraps what the constructor raised; the test wants the constructor's error
        raise (gptlab_cause(e) or e) from None


# --- the averaging trick ------------------------------------------------------------------

def test_three_averaging_versions_agree():
    torch.manual_seed(1337)
    x = torch.randn(4, 8, 2)
    expected = x.cumsum(dim=1) / torch.arange(1, 9).view(1, 8, 1)
    for name, average in AGGREGATIONS.items():
        assert torch.allclose(average(x), expected, atol=1e-6), name


@pytest.mark.parametrize("name", list(AGGREGATIONS))
def test_averaging_is_causal(name):
    torch.manual_seed(0)
    x = torch.randn(2, 10, 3)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, 3)
    a, b = AGGREGATIONS[name](x), AGGREGATIONS[name](changed)
    assert torch.equal(a[:, :6], b[:, :6])  # the past never sees the future
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_matmul_average_is_a_row_normalised_lower_triangle():
    wei = causal_average_matmul(torch.eye(5).unsqueeze(0))[0]  # x = identity shows the weights
    assert torch.allclose(wei, torch.tril(torch.ones(5, 5)) / torch.arange(1, 6).view(5, 1))


# --- scaled attention ---------------------------------------------------------------------

def test_attention_scales_affinities_by_one_over_sqrt_head_size():
    """gptlab's attention is softmax(q k^T / sqrt(head_size)) v over the past: the scale keeps
    the affinities of unit-variance queries and keys at unit variance, so that softmax starts
    diffuse instead of nearly one-hot."""
    torch.manual_seed(1337)
    T, C = 32, 16
    attn = CausalSelfAttention(n_embd=C, n_head=1, dropout=0.0, bias=False).eval()
    x = torch.randn(4, T, C)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    past = torch.tril(torch.ones(T, T, dtype=torch.bool))

    def attend(scale: float) -> torch.Tensor:
        wei = (q @ k.transpose(-2, -1) * scale).masked_fill(~past, float("-inf"))
        return attn.c_proj(F.softmax(wei, dim=-1) @ v)

    with torch.no_grad():
        out = attn(x)
        assert torch.allclose(out, attend(C ** -0.5), atol=1e-5)
        assert not torch.allclose(out, attend(1.0), atol=1e-3)


# --- every stage --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=STAGES)
def stage(request) -> tuple[str, DictConfig]:
    return request.param, stage_cfg(request.param)


def test_stage_settings_are_the_lecture_ones(stage):
    name, cfg = stage
    assert cfg.optim.schedule == "constant" and list(cfg.optim.betas) == [0.9, 0.999]
    assert cfg.trainer.gradient_clip_val is None
    assert cfg.trainer.val_check_interval == 500 and cfg.data.eval_iters == 200
    if name == "gpt":
        assert (cfg.data.block_size, cfg.data.batch_size, cfg.optim.lr) == (256, 64, 3e-4)
        assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (6, 6, 384)
        assert cfg.model.dropout == 0.2 and cfg.trainer.max_steps == 5000
        return
    assert (cfg.data.block_size, cfg.data.batch_size) == (8, 32)
    if name == "bigram":
        assert (cfg.optim.lr, cfg.trainer.max_steps) == (1e-2, 3000)
        return
    assert (cfg.optim.lr, cfg.trainer.max_steps) == (1e-3, 5000)
    assert cfg.model.n_embd == 32 and cfg.model.dropout == 0.0
    if name.startswith(("multihead", "blocks")):
        assert cfg.model.n_embd // cfg.model.n_head == 8  # four heads of size 8
    assert cfg.model.n_layer == (3 if name.startswith("blocks") else 1)


def test_stage_builds_a_causal_model(stage):
    name, cfg = stage
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model, BigramLanguageModel if name == "bigram" else GPT)
    T = min(cfg.data.block_size, 16)
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    changed[:, T // 2:] = (changed[:, T // 2:] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, T, V)
    # relative to the logits' scale: at init some stages' logits are tiny (see blocks below)
    a, b = a / a.abs().max(), b / a.abs().max()
    assert torch.allclose(a[:, : T // 2], b[:, : T // 2], atol=1e-5)
    assert not torch.allclose(a[:, T // 2:], b[:, T // 2:], atol=1e-5)


def test_stage_learns(stage):
    """30 AdamW steps on one fixed batch lower the loss: gradients reach the parameters."""
    name, cfg = stage
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, y = torch.randint(V, (4, 8)), torch.randint(V, (4, 8))
    # one lr for all: a fixed random batch is memorised, a fair check at any stage's scale
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if cfg.model.get("init", "gpt2") == "gpt2":
        assert abs(losses[0] - math.log(V)) < 0.1  # GPT-2's small init starts near uniform
    assert losses[-1] < losses[0] - 0.1, losses


def test_gpt_stage_is_the_lectures_size():
    model = build_model(stage_cfg("gpt"))
    n = sum(p.numel() for p in model.parameters())
    assert 10.5e6 < n < 11e6  # the lecture's model has about 10.8M


def test_bag_of_words_learns_only_embeddings_and_head():
    model = build_model(stage_cfg("bow"))
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert names == {"wte", "wpe", "lm_head"}


def test_aggregation_switch_gives_the_same_model():
    idx = torch.randint(V, (3, 8))
    outs = []
    for aggregation in AGGREGATIONS:
        torch.manual_seed(0)
        model = build_model(stage_cfg("bow", f"model.aggregation={aggregation}")).eval()
        with torch.no_grad():
            outs.append(model(idx))
    assert all(torch.allclose(outs[0], o, atol=1e-6) for o in outs[1:])


def test_unknown_aggregation_is_refused():
    with pytest.raises(GptlabError, match="aggregation"):
        build_model(stage_cfg("bow", "model.aggregation=fast"))


def test_heads_must_divide_the_embedding():
    with pytest.raises(GptlabError, match=r"n_embd \(30\) must be divisible by model.n_head"):
        build_model(stage_cfg("multihead", "model.n_embd=30"))


def test_heads_must_divide_the_embedding_on_the_command_line(in_process, capsys):
    code, _, err = in_process(train_cli.main, ["experiment=lecture/multihead",
                                               "model.n_embd=30"], capsys)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert errors == ["error: model.n_embd (30) must be divisible by model.n_head (4)"], err
