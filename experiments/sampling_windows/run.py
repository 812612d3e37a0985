"""What each sampling window costs and buys past block_size: speed, and bits per character on
held-out text.

A model reads at most `block_size` tokens; past that, `gptlab-sample`'s `window=` decides which
(see `GPT.predict`): `slide` recomputes the newest `block_size` tokens at every step (exact, the
reference), `half` drops to the newest half once the window is full and keeps the KV cache in
between, `shift` (rotary positions only) keeps the cache as the window slides one token at a
time, so deeper layers' cached keys still carry tokens that have left the window.

Each policy scores the same held-out text (sequences from the validation split, the last 10%
of the corpus), teacher-forced through `GPT.predict`, on every token past the first
`block_size` (before that all policies see the same context). Speed is sampling speed,
tokens per second at batch 1, the median of three rounds.

    python experiments/sampling_windows/run.py                     # best rope run of modern_ideas
    python experiments/sampling_windows/run.py --run RUN_ID --tokens 2048

Writes results.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.cli.sample import checkpoint_name
from gptlab.data.corpus import resolve_corpus
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.checkpoints import model_from_checkpoint, read_checkpoint
from gptlab.tracking import store

HERE = Path(__file__).resolve().parent
POLICIES = [("slide", False), ("half", True), ("shift", True)]  # (window, kv_cache)


def best_rope_run(client, experiment: str):  # noqa: ANN001, ANN201 - MLflow types
    runs = store.search_runs(client, experiment, "params.`model.pos_emb` = 'rope' and "
                             "attributes.status = 'FINISHED'")
    runs = [r for r in runs if "best_val_loss" in r.data.metrics]
    if not runs:
        raise SystemExit(f"error: experiment {experiment!r} has no finished run with "
                         "model.pos_emb=rope (run experiments/modern_ideas first, or pass --run)")
    return min(runs, key=lambda r: r.data.metrics["best_val_loss"])


def held_out(corpus: Path, tok: CharTokenizer, sequences: int, length: int) -> torch.Tensor:
    """`sequences` stretches of `length` tokens, evenly spaced over the validation split."""
    data = torch.tensor(tok.encode(corpus.read_text(encoding="utf-8")))
    val = data[int(0.9 * len(data)):]
    if len(val) < sequences * length:
        raise SystemExit(f"error: the validation split holds {len(val)} tokens, fewer than "
                         f"{sequences} x {length}")
    stride = len(val) // sequences
    return torch.stack([val[i * stride:i * stride + length] for i in range(sequences)])


@torch.no_grad()
def bits_per_char(model: torch.nn.Module, text: torch.Tensor, window: str, kv_cache: bool
                  ) -> float:
    """Mean -log2 p(next token) over every position past block_size, the context chosen by
    `window` as when sampling."""
    first = model.block_size
    stream = model.predict(text[:, :first], kv_cache, window)
    logits, nats = next(stream), 0.0
    for t in range(first, text.size(1)):
        nats += F.cross_entropy(logits, text[:, t], reduction="sum").item()
        if t + 1 < text.size(1):
            logits = stream.send(text[:, t:t + 1])
    return nats / (text.size(0) * (text.size(1) - first)) / math.log(2)


def tokens_per_sec(model: torch.nn.Module, prompt: torch.Tensor, new: int, window: str,
                   kv_cache: bool, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.generate(prompt, new, kv_cache=kv_cache, window=window,
                       generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - start)
    return new / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="MLflow run id of a rope model (default: the "
                    "best finished rope run of --experiment)")
    ap.add_argument("--experiment", default="modern_ideas")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024, help="length of each sequence")
    ap.add_argument("--new-tokens", type=int, default=500, help="sampled for the speed figure")
    ap.add_argument("--tracking-uri", default=None, help="default: the project's mlruns/")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    client = store.connect(store.resolve_tracking_uri(args.tracking_uri))
    run = store.get_run(client, args.run) if args.run else best_rope_run(client, args.experiment)
    with store.scratch() as scratch:
        name = checkpoint_name(client, run, "best")
        ckpt = read_checkpoint(store.download(client, run.info.run_id, f"checkpoints/{name}",
                                              scratch))
    model = model_from_checkpoint(ckpt).eval()
    tok = CharTokenizer(ckpt["gptlab"]["vocab"])
    text = held_out(resolve_corpus(None), tok, args.sequences, args.tokens)
    rows = []
    for window, kv in POLICIES:
        bpc = bits_per_char(model, text, window, kv)
        speed = tokens_per_sec(model, text[:1, :model.block_size], args.new_tokens, window, kv)
        rows.append({"window": window, "kv_cache": kv, "bpc": bpc, "tokens_per_sec": speed})
        print(f"{window:5s} cache={kv!s:5s} {bpc:.4f} bpc {speed:7.1f} tok/s", flush=True)
    ref = rows[0]
    results = {
        "run": run.info.run_id, "run_name": run.info.run_name, "checkpoint": name,
        "block_size": model.block_size, "sequences": args.sequences, "tokens": args.tokens,
        "scored_per_sequence": args.tokens - model.block_size, "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Model: run `{run.info.run_name}` ({run.info.run_id}), {name}, block_size "
             f"{model.block_size}. Held-out text: {args.sequences} sequences of {args.tokens} "
             f"characters from the validation split, each scored on its last "
             f"{args.tokens - model.block_size}.", "",
             "| window | KV cache | bits/char | vs slide | sampling tok/s (batch 1) | speed-up |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['window']} | {'yes' if r['kv_cache'] else 'no'} | {r['bpc']:.4f} | "
                     f"{r['bpc'] - ref['bpc']:+.4f} | {r['tokens_per_sec']:.0f} | "
                     f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x |")
    lines += ["", f"Machine: {results['machine']}."]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
