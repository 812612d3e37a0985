"""A GPT language model (decoder-only transformer), with switches for the lecture's stages.

With every switch on (the default) this is GPT-2's architecture at small scale:
token + position embeddings, `n_layer` pre-LayerNorm blocks of causal multi-head
self-attention and a 4x GELU MLP with residual connections, a final LayerNorm and a
linear head. Turning switches off gives the stages of the "Let's build GPT" lecture:
`attention="average"` replaces self-attention by causal uniform averaging (bag of words),
and `ffn`, `residual` and `layernorm` remove those parts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import GptlabError
from gptlab.models import check_sampling_args, check_window, pick_next
from gptlab.models.averaging import AGGREGATIONS


class LayerCache:
    """What one layer keeps of the tokens it has seen (keys and values) during generation,
    in buffers of `capacity` positions: writing in place is cheaper than concatenating a
    longer tensor at every step."""

    def __init__(self, capacity: int):
        self.capacity, self.n = capacity, 0
        self.buffers: list[torch.Tensor] = []

    def extend(self, *new: torch.Tensor) -> list[torch.Tensor]:
        """Append the positions of each new tensor (dim -2) to its buffer; return views of
        every position so far."""
        T = new[0].size(-2)
        if not self.buffers:
            self.buffers = [t.new_empty((*t.shape[:-2], self.capacity, t.size(-1))) for t in new]
        for buf, t in zip(self.buffers, new, strict=True):
            buf[..., self.n:self.n + T, :] = t
        self.n += T
        return [buf[..., :self.n, :] for buf in self.buffers]


KVCache = list[LayerCache]  # one per block


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # key, query, value projections
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        # generation fills the cache with the prompt (causal), then feeds one token at a
        # time, which sees every cached key: no mask
        is_causal = cache is None or cache.n == 0
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, nh, past + T, hs)
        # softmax(q k^T / sqrt(hs)) v: the scale keeps the affinities at unit variance
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class CausalAverage(nn.Module):
    """Each position becomes the mean of itself and its past: attention with equal weights."""

    def __init__(self, aggregation: str = "matmul"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise GptlabError(
                f"model.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}"
            )
        self.average = AGGREGATIONS[aggregation]

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None or cache.n == 0:  # training, or the prompt of a generation
            if cache is not None:
                cache.extend(x)
            return self.average(x)
        (seen,) = cache.extend(x)  # (B, past + 1, C)
        return seen.mean(dim=1, keepdim=True)  # one new token: (B, 1, C)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a LayerNorm-ed residual."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, attention: str,
                 aggregation: str, ffn: bool, residual: bool, layernorm: bool):
        super().__init__()
        self.residual = residual
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias) if layernorm else nn.Identity()
        if attention == "self":
            self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        else:
            self.attn = CausalAverage(aggregation)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias) if layernorm and ffn else nn.Identity()
        self.mlp = MLP(n_embd, dropout, bias) if ffn else None

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), cache)
        x = x + a if self.residual else a
        if self.mlp is not None:
            m = self.mlp(self.ln_2(x))
            x = x + m if self.residual else m
        return x


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        attention: str = "self",
        aggregation: str = "matmul",
        ffn: bool = True,
        residual: bool = True,
        layernorm: bool = True,
        tie_weights: bool = True,
        init: str = "gpt2",
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size),
                            ("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GptlabError(f"model.{name} must be a positive integer, got {value!r}")
        for name, value in (("bias", bias), ("ffn", ffn), ("residual", residual),
                            ("layernorm", layernorm), ("tie_weights", tie_weights)):
            if not isinstance(value, bool):
                raise GptlabError(f"model.{name} must be true or false, got {value!r}")
        if attention not in ("self", "average"):
            raise GptlabError(f"model.attention must be 'self' or 'average', got {attention!r}")
        if attention == "self" and n_embd % n_head != 0:
            raise GptlabError(
                f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})"
            )
        if init not in ("gpt2", "torch"):
            raise GptlabError(f"model.init must be 'gpt2' or 'torch', got {init!r}")
        if (not isinstance(dropout, int | float) or isinstance(dropout, bool)
                or not 0.0 <= dropout < 1.0):
            raise GptlabError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # token embeddings
        self.wpe = nn.Embedding(block_size, n_embd)  # position embeddings
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            Block(n_embd, n_head, dropout, bias, attention, aggregation, ffn, residual, layernorm)
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias) if layernorm else nn.Identity()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            # as in GPT-2: the head reads out in the space the tokens embed into
            self.wte.weight = self.lm_head.weight
        if init == "gpt2":
            # N(0, 0.02) everywhere, residual projections scaled down by the depth. Without
            # residual connections this shrinks the signal block after block until nothing
            # trains: the lecture's early stages use PyTorch's default init (init="torch")
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                pos_offset: int = 0) -> torch.Tensor:
        B, T = idx.size()
        if pos_offset + T > self.block_size:
            raise ValueError(f"sequence of {pos_offset + T} exceeds block_size {self.block_size}")
        pos = torch.arange(pos_offset, pos_offset + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, None if kv_cache is None else kv_cache[i])
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, kv_cache: bool = True, window: str = "half",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T).

        The model reads at most `block_size` tokens. Past that, `window` says which:
        "slide" keeps the newest `block_size` (the lecture's cropping; every token shifts
        every position, so each step recomputes the whole window), "half" drops the oldest
        tokens down to the newest `block_size // 2` once the window is full, then grows again
        (one recompute per `block_size // 2` tokens). With the KV cache, each step between
        recomputes feeds only the newest token; the tokens are the same with or without it.
        """
        check_sampling_args(temperature, top_k)
        keep = check_window(window, self.block_size)
        start = max(0, idx.size(1) - self.block_size)  # first token of the context
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            T = idx.size(1)
            if T - start > self.block_size:
                start = T - keep
                cache = None
            if kv_cache and cache is not None:
                logits = self(idx[:, -1:], kv_cache=cache, pos_offset=T - start - 1)
            else:
                cache = [LayerCache(self.block_size) for _ in self.h] if kv_cache else None
                logits = self(idx[:, start:], kv_cache=cache)
            idx_next = pick_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
