"""Text in, text out: encode a prompt, sample from a model with a generator of its own, decode.
`stream_text` gives the text as it is made (what gptlab-sample prints at once, and what a
served model's time budget stops); `generate_text` gives it whole."""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from torch import nn

from gptlab.data.tokenizer import Tokenizer, end_of_text_id
from gptlab.models import sampled


def stream_text(model: nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int,
                temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
                num_samples: int = 1, device: torch.device | str = "cpu",
                kv_cache: bool = True, window: str = "half") -> Iterator[list[str]]:
    """`num_samples` continuations of `prompt`, piece by piece: first the prompt as the model
    reads it, then for every new token the text it adds to each sample ("" while a token ends
    inside a character). Only the model's context is kept, never the text. The global random
    state is neither used nor changed, so this may run beside training."""
    ids = tok.encode(prompt)
    start = [] if ids else [start_id(tok)]  # not part of the text: not decoded
    idx = torch.tensor([ids or start] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    yield [tok.decode(ids)] * num_samples
    decoders = [Decoder(tok) for _ in range(num_samples)]
    was_training = model.training
    model.eval()
    try:
        for new in sampled(model, idx, max_new_tokens, temperature, top_k, kv_cache, window,
                           generator):
            yield [d.add(t) for d, t in zip(decoders, new[:, 0].tolist(), strict=True)]
    finally:
        model.train(was_training)
    yield [d.flush() for d in decoders]


def generate_text(model: nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, seed: int = 1337,
                  num_samples: int = 1, device: torch.device | str = "cpu",
                  kv_cache: bool = True, window: str = "half") -> list[str]:
    """`num_samples` continuations of `prompt`, whole (see stream_text)."""
    texts = [io.StringIO() for _ in range(num_samples)]
    for pieces in stream_text(model, tok, prompt, max_new_tokens, temperature, top_k, seed,
                              num_samples, device, kv_cache, window):
        for text, piece in zip(texts, pieces, strict=True):
            text.write(piece)
    return [text.getvalue() for text in texts]


class Decoder:
    """Token ids in, text out as soon as it is whole: a byte-level BPE token can end inside a
    character, which decodes as U+FFFD until the bytes that complete it arrive (at most 4)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.pending = tok, []

    def add(self, token: int) -> str:
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def start_id(tok: Tokenizer) -> int:
    """What an empty prompt starts from: the end of a previous document where the tokenizer
    marks one, else a newline (the start of a line of a play), else the first token."""
    eot = end_of_text_id(tok)
    if eot is not None:
        return eot
    ids = tok.encode("\n") if tok.kind != "char" or "\n" in tok.stoi else []
    return ids[0] if len(ids) == 1 else 0
