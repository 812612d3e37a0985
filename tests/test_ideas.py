"""Today's ideas as switches: rotary positions, RMSNorm, SwiGLU and squared-ReLU MLPs,
QK-norm and the Muon optimizer. Each keeps the model causal and its KV cache exact, trains,
checkpoints, samples and resumes, alone and all together.

The models are tiny and trained on one thread (`one_thread`); a run's store starts as a copy of
an empty one made once (`seeded`): creating an MLflow store costs a second of CPU or more."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, store_uri
from gptlab.cli import sample as sample_cli
from gptlab.cli import train as train_cli
from gptlab.errors import GptlabError
from gptlab.models.gpt import GPT, mlp_hidden
from gptlab.run.optim import MuonWithAdamW, build_optimizer

V, T = 23, 16
SWITCHES = {
    "rope": {"pos_emb": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "swiglu": {"mlp": "swiglu"},
    "relu2": {"mlp": "relu2"},
    "qk_norm": {"qk_norm": True},
    "all": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model(switches: dict, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16, **switches, **kw)


@pytest.mark.parametrize("name", SWITCHES)
def test_the_model_stays_causal(name):
    m = model(SWITCHES[name]).eval()
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    with torch.no_grad():
        a, b = m(idx), m(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-5)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-5)


@pytest.mark.parametrize("window", ["half", "slide"])
@pytest.mark.parametrize("name", SWITCHES)
def test_the_kv_cache_gives_the_same_tokens(name, window):
    m = model(SWITCHES[name]).eval()
    prompt = torch.randint(V, (2, 5))
    out = []
    for kv_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        out.append(m.generate(prompt, 3 * T, kv_cache=kv_cache, window=window, generator=g))
    assert torch.equal(*out)


def test_rope_shift_keeps_the_cache_and_recomputes_as_slide_without_it():
    m = model({"pos_emb": "rope"}).eval()
    prompt = torch.randint(V, (1, 5))

    def gen(kv_cache: bool, window: str) -> torch.Tensor:
        return m.generate(prompt, 3 * T, kv_cache=kv_cache, window=window, top_k=1)

    # inside the block the three agree; past it, shift's cache keeps what left the window
    shifted, slid = gen(True, "shift"), gen(True, "slide")
    assert torch.equal(shifted[:, :T + 1], slid[:, :T + 1])
    assert torch.equal(gen(False, "shift"), slid)  # without the cache: exactly slide
    # every token after the block still sees only the newest block_size tokens' keys
    assert shifted.shape == slid.shape == (1, 5 + 3 * T)


def test_shift_needs_rotary_positions():
    with pytest.raises(GptlabError, match="pos_emb=rope"):
        model({}).generate(torch.zeros(1, 1, dtype=torch.long), 2, window="shift")


def test_swiglu_matches_the_gelu_mlp_in_parameters():
    gelu = sum(p.numel() for p in model({}).parameters())
    swiglu = sum(p.numel() for p in model({"mlp": "swiglu"}).parameters())
    assert abs(swiglu - gelu) / gelu < 0.01
    assert mlp_hidden(128, "swiglu") == 341 and mlp_hidden(128, "gelu") == 512


@pytest.mark.parametrize("switches, words", [
    ({"pos_emb": "alibi"}, "model.pos_emb must be one of learned, rope"),
    ({"norm": "batchnorm"}, "model.norm"),
    ({"mlp": "geglu"}, "model.mlp"),
    ({"qk_norm": "yes"}, "model.qk_norm must be true or false"),
    ({"pos_emb": "rope", "attention": "average"}, "needs model.attention=self"),
    ({"rope_base": 0.5}, "rope_base"),
])
def test_bad_switch_values(switches, words):
    with pytest.raises(GptlabError, match=words):
        model(switches)


def test_muon_steps_hidden_matrices_and_adamw_the_rest():
    m = model({})
    opt = build_optimizer(m, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                          fused=False, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in muon}
    assert names and all(n.startswith("h.") and n.endswith("weight") for n in names)
    assert "wte.weight" not in names and "h.0.ln_1.weight" not in names
    # a schedule scales every group's own lr alike
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 5e-4, 5e-4]
    x = torch.randint(V, (2, T))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.zero_grad()
    m(x).logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())


def test_muon_needs_hidden_matrices():
    from gptlab.models.bigram import BigramLanguageModel

    with pytest.raises(GptlabError, match="optim=muon needs"):
        build_optimizer(BigramLanguageModel(V), "muon", 1e-3, 0.1, (0.9, 0.99), False, 0.02,
                        0.95, 0.0)


RUN = [*TINY_GPT, "model.dropout=0.1", "trainer.max_steps=10", "trainer.val_check_interval=5",
       "optim.decay_steps=20", "trainer.log_every_n_steps=1"]
CLI_SWITCHES = {
    "rope": ["model.pos_emb=rope"], "rmsnorm": ["model.norm=rmsnorm"],
    "swiglu": ["model.mlp=swiglu"], "relu2": ["model.mlp=relu2"],
    "qk_norm": ["model.qk_norm=true"], "muon": ["optim=muon"],
    "all": ["model.pos_emb=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
            "model.qk_norm=true", "optim=muon"],
}


def val_history(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(run_id,
                                                                                "val/loss"))


@pytest.mark.parametrize("name", CLI_SWITCHES)
def test_a_run_with_the_switch_trains_samples_and_resumes_exactly(in_process, capsys,
                                                                    seeded, name):
    switches = CLI_SWITCHES[name]
    client = MlflowClient(store_uri(seeded))

    def run(*args):
        code, out, err = in_process(train_cli.main, [*RUN, *switches, *args], capsys)
        assert code == 0, err[-2000:]
        return out.split("MLflow run id: ")[1].split()[0]

    straight = run("trainer.max_steps=20", "logger.experiment_name=straight")
    half = run("logger.experiment_name=half")
    code, _, err = in_process(train_cli.main, [f"resume={half}", "trainer.max_steps=20",
                                               "logger.experiment_name=half"], capsys)
    assert code == 0, err[-2000:]
    assert val_history(client, half) == val_history(client, straight)
    assert [m.step for m in client.get_metric_history(half, "val/loss")] == [5, 10, 15, 20]
    code, out, err = in_process(sample_cli.main, [f"run_id={half}", "max_new_tokens=40",
                                                  "prompt=ROMEO:"], capsys)
    assert code == 0 and out.startswith("ROMEO:") and len(out.strip()) == 46, err


def test_unknown_switch_values_on_the_command_line(in_process, capsys, seeded):
    bigram = ["model=bigram", "data.block_size=8", "data.batch_size=4", "data.eval_iters=2",
              "trainer.max_steps=10", "trainer.enable_progress_bar=false"]
    for args, words in (([*RUN, "model.pos_emb=alibi"], "model.pos_emb"),
                        ([*RUN, "optim.name=sgd"], "optim.name"),
                        ([*RUN, "optim.muon_lr=nan"], "optim.muon_lr"),
                        ([*bigram, "optim=muon"], "optim=muon needs")):
        code, _, err = in_process(train_cli.main, args, capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and words in lines[0], err
