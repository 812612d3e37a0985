import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.models.bigram import BigramLanguageModel
from gptlab.models.gpt import GPT

V, T = 65, 16


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16, **kw)


@pytest.fixture(params=["bigram", "gpt"])
def model(request):
    torch.manual_seed(0)
    m = BigramLanguageModel(V, T) if request.param == "bigram" else tiny_gpt()
    return m.eval()


def test_logits_shape(model):
    idx = torch.randint(V, (3, T))
    assert model(idx).shape == (3, T, V)


def test_causal(model):
    idx = torch.randint(V, (2, T))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % V
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_untrained_bigram_loss_is_near_uniform():
    torch.manual_seed(0)
    m = BigramLanguageModel(V)
    idx = torch.randint(V, (8, 32))
    loss = F.cross_entropy(m(idx).view(-1, V), torch.randint(V, (8 * 32,)))
    assert abs(loss.item() - math.log(V)) < 0.05


def test_generate_length_and_seeded_determinism(model):
    prompt = torch.zeros(2, 3, dtype=torch.long)
    torch.manual_seed(7)
    a = model.generate(prompt, 40)  # longer than block_size: the context is cropped
    torch.manual_seed(7)
    b = model.generate(prompt, 40)
    torch.manual_seed(8)
    c = model.generate(prompt, 40)
    assert a.shape == (2, 43)
    assert torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(model):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    out = model.generate(prompt, 5, top_k=1)
    for t in range(5):
        ctx = out[:, max(0, t + 1 - T): t + 1]
        assert out[0, t + 1] == model(ctx)[0, -1].argmax()


def test_temperature_must_be_positive(model):
    with pytest.raises(GptlabError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=0)


@pytest.mark.parametrize("window", ["half", "slide"])
def test_kv_cache_gives_the_same_tokens(window):
    m = tiny_gpt().eval()
    prompt = torch.randint(V, (2, 5))
    torch.manual_seed(3)
    cached = m.generate(prompt, 40, kv_cache=True, window=window)  # past block_size twice
    torch.manual_seed(3)
    plain = m.generate(prompt, 40, kv_cache=False, window=window)
    assert torch.equal(cached, plain)


def context_starts(window: str, prompt_len: int, new_tokens: int) -> list[int]:
    """Where the context of each generation step begins, as GPT.generate documents it."""
    keep = T if window == "slide" else T // 2
    start, starts = max(0, prompt_len - T), []
    for n in range(prompt_len, prompt_len + new_tokens):
        if n - start > T:
            start = n - keep
        starts.append(start)
    return starts


@pytest.mark.parametrize("window", ["half", "slide"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_generation_reads_the_documented_window(window, kv_cache):
    m = tiny_gpt().eval()
    prompt = torch.randint(V, (1, T + 3))  # longer than the block: cropped from the start
    out = m.generate(prompt, 2 * T, top_k=1, kv_cache=kv_cache, window=window)
    for i, start in enumerate(context_starts(window, prompt.size(1), 2 * T)):
        n = prompt.size(1) + i  # tokens before the one generated at this step
        assert n - start <= T
        assert out[0, n] == m(out[:, start:n])[0, -1].argmax()


@pytest.mark.parametrize("window", ["half", "slide"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_scoring_a_text_reads_the_window_sampling_reads(window, kv_cache):
    # teacher-forcing a text through predict() is how a window's cost in bits per character
    # is measured: each logit must be the model's over the documented context
    m = tiny_gpt().eval()
    text = torch.randint(V, (2, 3 * T))
    stream = m.predict(text[:, :4], kv_cache, window)
    logits = next(stream)
    for i, start in enumerate(context_starts(window, 4, text.size(1) - 4)):
        n = 4 + i
        assert torch.allclose(logits, m(text[:, start:n])[:, -1], atol=1e-5)
        if n < text.size(1):
            logits = stream.send(text[:, n:n + 1])


def test_unknown_window_is_refused(model):
    with pytest.raises(GptlabError, match="window"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, window="rolling")


def test_heads_must_divide_embedding():
    with pytest.raises(GptlabError, match="divisible"):
        GPT(vocab_size=V, block_size=T, n_embd=30, n_head=4)


def test_gpt2_init_scales_residual_projections():
    m = GPT(vocab_size=V, block_size=T, n_layer=8, n_head=4, n_embd=64)
    std = m.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
