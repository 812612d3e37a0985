"""A GPT language model (decoder-only transformer), with switches for the lecture's stages and
for today's ideas.

With the defaults this is GPT-2's architecture at small scale: token + learned position
embeddings, `n_layer` pre-LayerNorm blocks of causal multi-head self-attention and a 4x GELU
MLP with residual connections, a final LayerNorm and a linear head.

The lecture's stages turn parts off: `attention="average"` replaces self-attention by causal
uniform averaging (bag of words), and `ffn`, `residual` and `layernorm` remove those parts.

Today's ideas, each one switch:
- `pos_emb="rope"`: rotary position embeddings (Su et al., RoFormer, 2021) instead of learned
  absolute ones: queries and keys are rotated by their position, so attention sees only
  relative positions.
- `norm="rmsnorm"`: RMSNorm (Zhang & Sennrich, 2019), LayerNorm without centring or bias.
- `mlp="swiglu"`: a SiLU-gated linear unit (Shazeer, 2020); `mlp="relu2"`: squared ReLU
  (So et al., Primer, 2021).
- `qk_norm=True`: queries and keys RMS-normalised per head before attention (Dehghani et al.,
  2023; Wortsman et al., 2023).
"""

from __future__ import annotations

import math
from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import GptlabError
from gptlab.models import check_window, sampled
from gptlab.models.averaging import AGGREGATIONS

POS_EMBS, NORMS, MLPS = ("learned", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu", "relu2")
PARAMETRIZATIONS = ("standard", "mup")


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

    def drop_oldest(self) -> None:
        """Forget the oldest position, making room for one more."""
        for buf in self.buffers:
            buf[..., :self.n - 1, :] = buf[..., 1:self.n, :].clone()
        self.n -= 1


KVCache = list[LayerCache]  # one per block


class Rotary(nn.Module):
    """Rotary position embeddings: channel pair i of a query or key at position p is rotated
    by the angle p * base^(-2i/head_size), so that q_m . k_n depends on m - n only."""

    def __init__(self, head_size: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hs/2,)

    def angles(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = pos[:, None].float() * self.inv_freq[None, :]  # (T, hs/2)
        return theta.cos(), theta.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2) each
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)  # (B, nh, T, hs)


def make_norm(kind: str, n_embd: int, bias: bool) -> nn.Module:
    return nn.LayerNorm(n_embd, bias=bias) if kind == "layernorm" else nn.RMSNorm(n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 qk_norm: bool = False, scale: float | None = None):
        super().__init__()
        self.n_head, self.scale = n_head, scale  # scale None: 1/sqrt(head size)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # key, query, value projections
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        hs = n_embd // n_head
        self.q_norm = nn.RMSNorm(hs) if qk_norm else None
        self.k_norm = nn.RMSNorm(hs) if qk_norm else None
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = Rotary.rotate(q, *rope), Rotary.rotate(k, *rope)
        # generation fills the cache with the prompt (causal), then feeds one token at a
        # time, which sees every cached key: no mask
        is_causal = cache is None or cache.n == 0
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, nh, past + T, hs)
        # softmax(q k^T / sqrt(hs)) v: the scale keeps the affinities at unit variance
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
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

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if cache is None or cache.n == 0:  # training, or the prompt of a generation
            if cache is not None:
                cache.extend(x)
            return self.average(x)
        (seen,) = cache.extend(x)  # (B, past + 1, C)
        return seen.mean(dim=1, keepdim=True)  # one new token: (B, 1, C)


def mlp_hidden(n_embd: int, kind: str) -> int:
    """4 x n_embd; for SwiGLU, whose three matrices would otherwise hold 1.5x the parameters
    of the two of a 4x MLP, 8/3 x n_embd rounded (3 x 8/3 = 2 x 4)."""
    return round(8 * n_embd / 3) if kind == "swiglu" else 4 * n_embd


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, kind: str = "gelu"):
        super().__init__()
        self.kind = kind
        hidden = mlp_hidden(n_embd, kind)
        # SwiGLU's gate and value projections are one matrix, split after it
        self.c_fc = nn.Linear(n_embd, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden), or twice that for SwiGLU
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Communication (attention) then computation (MLP), each on a normalised residual."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, attention: str,
                 aggregation: str, ffn: bool, residual: bool, layernorm: bool,
                 norm: str = "layernorm", mlp: str = "gelu", qk_norm: bool = False,
                 attn_scale: float | None = None):
        super().__init__()
        self.residual = residual
        self.ln_1 = make_norm(norm, n_embd, bias) if layernorm else nn.Identity()
        if attention == "self":
            self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, qk_norm, attn_scale)
        else:
            self.attn = CausalAverage(aggregation)
        self.ln_2 = make_norm(norm, n_embd, bias) if layernorm and ffn else nn.Identity()
        self.mlp = MLP(n_embd, dropout, bias, mlp) if ffn else None

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), cache, rope)
        x = x + a if self.residual else a
        if self.mlp is not None:
            m = self.mlp(self.ln_2(x))
            x = x + m if self.residual else m
        return x


def check_args(args: dict) -> None:
    """Refuse a configuration the model cannot be built from, naming the key."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = args[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GptlabError(f"model.{name} must be a positive integer, got {value!r}")
    for name in ("bias", "ffn", "residual", "layernorm", "tie_weights", "qk_norm"):
        if not isinstance(args[name], bool):
            raise GptlabError(f"model.{name} must be true or false, got {args[name]!r}")
    for name, choices in (("attention", ("self", "average")), ("init", ("gpt2", "torch")),
                          ("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS),
                          ("parametrization", PARAMETRIZATIONS)):
        if args[name] not in choices:
            raise GptlabError(f"model.{name} must be one of {', '.join(choices)}, "
                              f"got {args[name]!r}")
    dropout, base = args["dropout"], args["rope_base"]
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise GptlabError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(base, int | float) or isinstance(base, bool) or not base > 1:
        raise GptlabError(f"model.rope_base must be a number > 1, got {base!r}")
    n_embd, n_head, base = args["n_embd"], args["n_head"], args["mup_base_width"]
    if args["parametrization"] == "mup" and (not isinstance(base, int) or isinstance(base, bool)
                                             or base <= 0 or base % n_head):
        raise GptlabError(f"model.mup_base_width must be a positive integer divisible by "
                          f"model.n_head ({n_head}), got {base!r}")
    if args["attention"] == "self" and n_embd % n_head != 0:
        raise GptlabError(f"model.n_embd ({n_embd}) must be divisible by model.n_head ({n_head})")
    if args["pos_emb"] == "rope":
        if args["attention"] != "self":
            raise GptlabError("model.pos_emb=rope rotates queries and keys: it needs "
                              "model.attention=self")
        if (n_embd // n_head) % 2:
            raise GptlabError(f"model.pos_emb=rope rotates channel pairs: the head size "
                              f"(n_embd / n_head = {n_embd // n_head}) must be even")


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
        pos_emb: str = "learned",
        rope_base: float = 10000.0,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        parametrization: str = "standard",
        mup_base_width: int = 128,
    ):
        super().__init__()
        check_args(dict(locals()))
        self.vocab_size, self.block_size = vocab_size, block_size
        # muP (Yang et al. 2022, "Tensor Programs V"): with the width multiplier m = n_embd /
        # mup_base_width, hidden weights start with variance / m, AdamW steps them with lr / m
        # (run/optim.py), the logits are divided by m and attention scales as 1/d_head (equal
        # to 1/sqrt(d_head) at the base width), so that the best lr found at one width holds at
        # another. At m = 1 it is the standard parametrization but for nothing.
        self.mup = parametrization == "mup"
        self.width_mult = n_embd / mup_base_width if self.mup else 1.0
        hs, base_hs = n_embd // n_head, mup_base_width // n_head
        attn_scale = math.sqrt(base_hs) / hs if self.mup else None
        self.wte = nn.Embedding(vocab_size, n_embd)  # token embeddings
        # position: learned embeddings added to the tokens', or rotations inside attention
        self.wpe = nn.Embedding(block_size, n_embd) if pos_emb == "learned" else None
        self.rotary = Rotary(n_embd // n_head, rope_base) if pos_emb == "rope" else None
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            Block(n_embd, n_head, dropout, bias, attention, aggregation, ffn, residual, layernorm,
                  norm, mlp, qk_norm, attn_scale)
            for _ in range(n_layer)
        )
        self.ln_f = make_norm(norm, n_embd, bias) if layernorm else nn.Identity()
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            # as in GPT-2: the head reads out in the space the tokens embed into
            self.wte.weight = self.lm_head.weight
        if init == "gpt2":
            # N(0, 0.02) everywhere, residual projections scaled down by the depth. Without
            # residual connections this shrinks the signal block after block until nothing
            # trains: the lecture's early stages use PyTorch's default init (init="torch")
            self.apply(self._init_weights)
            hidden = 0.02 / math.sqrt(self.width_mult)  # muP: variance / m inside the blocks
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=hidden / math.sqrt(2 * n_layer))
                elif self.width_mult != 1.0 and name.startswith("h.") and p.dim() == 2:
                    nn.init.normal_(p, mean=0.0, std=hidden)

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
        if self.wpe is not None and pos_offset + T > self.block_size:
            raise ValueError(f"sequence of {pos_offset + T} exceeds block_size {self.block_size}")
        pos = torch.arange(pos_offset, pos_offset + T, device=idx.device)  # (T,)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        rope = None if self.rotary is None else self.rotary.angles(pos)
        for i, block in enumerate(self.h):
            x = block(x, None if kv_cache is None else kv_cache[i], rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits / self.width_mult if self.mup else logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, kv_cache: bool = True, window: str = "half",
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to idx (B, T); `window` and `kv_cache` as
        in `predict`."""
        new = sampled(self, idx, max_new_tokens, temperature, top_k, kv_cache, window, generator)
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def predict(self, idx: torch.Tensor, kv_cache: bool = True,
                window: str = "half") -> Generator[torch.Tensor, torch.Tensor, None]:
        """Yield the logits (B, V) of the token after idx (B, T), then of the token after
        each token (B, 1) sent in: sampling sends what it drew, scoring a text sends its
        next token.

        The model reads at most `block_size` tokens. Past that, `window` says which:
        "slide" keeps the newest `block_size` (the lecture's cropping; every token shifts
        every position, so each step recomputes the whole window), "half" drops the oldest
        tokens down to the newest `block_size // 2` once the window is full, then grows again
        (one recompute per `block_size // 2` tokens). With the KV cache, each step between
        recomputes feeds only the newest token; the logits are the same with or without it.

        "shift" (rotary position embeddings only) keeps the cache as the window slides, one
        token at a time: positions are relative, so the newest `block_size` tokens keep their
        keys and values. That is not the same as recomputing the cropped window (a deeper
        layer's cached keys still carry tokens that have left it), so the text differs from
        "slide"'s; without the cache, "shift" recomputes exactly as "slide" does.
        """
        keep = check_window(window, self.block_size)
        if window == "shift" and self.rotary is None:
            raise GptlabError("window=shift needs a model with rotary positions "
                              "(model.pos_emb=rope); use half or slide")
        ctx = idx[:, -self.block_size:]  # what the model reads; nothing older is kept
        origin = 0  # where positions count from in ctx while the cache is kept (shift)
        cache: KVCache | None = None
        while True:
            T = ctx.size(1)
            if T > self.block_size:
                drop = T - keep
                ctx, T = ctx[:, drop:], keep
                if window == "shift" and cache is not None:
                    origin -= drop
                    for layer in cache:
                        layer.drop_oldest()
                else:
                    origin, cache = 0, None
            if kv_cache and cache is not None:
                logits = self(ctx[:, -1:], kv_cache=cache, pos_offset=T - 1 - origin)
            else:
                cache = [LayerCache(self.block_size) for _ in self.h] if kv_cache else None
                logits = self(ctx, kv_cache=cache)
            ctx = torch.cat((ctx, (yield logits[:, -1, :])), dim=1)
