"""The coordinate check of muP (Yang et al. 2022): how large each layer's activations are, across
widths, over the first steps of training, under the standard parametrization and under
`model.parametrization=mup`. Under muP every curve is flat in width; under the standard one
the logits (and soon the blocks) grow with width once training moves the weights.

    python experiments/mup/coord_check.py                       # widths 64..512, 3 seeds
    python experiments/mup/coord_check.py --lr 3e-3 --steps 20

The GPT of nanoGPT's CPU recipe at 2 layers and 4 heads, AdamW as gptlab builds it (muP's lr
scaling included), batches of Tiny Shakespeare. Writes results.md and coord_check.png here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gptlab.models import build_model
from gptlab.run.optim import build_optimizer

HERE = Path(__file__).resolve().parent
CORPUS = Path(os.environ.get("GPTLAB_DATA",
                             HERE.parents[2] / "shared/data/tinyshakespeare/input.txt"))
LAYERS = ("embedding", "block 1", "block 2", "logits")


def batches(text: str, block: int, batch: int, seed: int):
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(len(data) - block - 1, (batch,), generator=g)
        yield (torch.stack([data[j:j + block] for j in i]),
               torch.stack([data[j + 1:j + 1 + block] for j in i]), len(chars))


def activations(width: int, parametrization: str, seed: int, lr: float, steps: int,
                text: str) -> list[dict[str, float]]:
    """Mean |x| of each layer's output at the forward pass of each step."""
    data = batches(text, 64, 16, seed)
    x, y, vocab = next(data)
    torch.manual_seed(seed)
    model = build_model("gptlab.models.gpt.GPT", {
        "vocab_size": vocab, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": width,
        "parametrization": parametrization, "mup_base_width": 64})
    opt = build_optimizer(model, "adamw", lr, 0.1, (0.9, 0.99), False, 0.02, 0.95, 0.0)
    seen: dict[str, float] = {}
    hooks = [model.wte.register_forward_hook(
        lambda m, i, o: seen.__setitem__("embedding", o.abs().mean().item()))]
    for n, block in enumerate(model.h, 1):
        hooks.append(block.register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(f"block {n}", o.abs().mean().item())))
    out = []
    for _ in range(steps):
        logits = model(x)
        seen["logits"] = logits.abs().mean().item()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(dict(seen))
        x, y, _ = next(data)
    for h in hooks:
        h.remove()
    return out


def plot(results: dict, widths: list[int], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted({1, 2, steps // 2, steps})
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(14, 6), sharex=True)
    for row, parametrization in enumerate(("standard", "mup")):
        for col, layer in enumerate(LAYERS):
            ax = axes[row][col]
            for t in shown:
                ax.plot(widths, [results[parametrization, w][t - 1][layer] for w in widths],
                        marker="o", label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrization}: {layer}", fontsize=9)
            if row == 1:
                ax.set_xlabel("width (n_embd)")
            if col == 0:
                ax.set_ylabel("mean |x| over 3 seeds")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    text = CORPUS.read_text(encoding="utf-8")
    start = time.time()
    results = {}
    for parametrization in ("standard", "mup"):
        for w in args.widths:
            runs = [activations(w, parametrization, s, args.lr, args.steps, text)
                    for s in range(args.seeds)]
            results[parametrization, w] = [
                {k: statistics.fmean(r[t][k] for r in runs) for k in LAYERS}
                for t in range(args.steps)]
    plot(results, args.widths, args.steps, HERE / "coord_check.png")
    lines = [f"`python experiments/mup/coord_check.py --lr {args.lr:g} --steps {args.steps}` "
             f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{time.time() - start:.0f} s): mean |x| at step {args.steps}, mean of "
             f"{args.seeds} seeds; the last column is the largest width's over the "
             "smallest's", "", "| parametrization | layer | "
             + " | ".join(f"width {w}" for w in args.widths) + " | ratio |",
             "|---|---|" + "---:|" * (len(args.widths) + 1)]
    for parametrization in ("standard", "mup"):
        for layer in LAYERS:
            values = [results[parametrization, w][-1][layer] for w in args.widths]
            lines.append(f"| {parametrization} | {layer} | "
                         + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {values[-1] / values[0]:.2f} |")
    text_out = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(text_out)
    print(text_out)


if __name__ == "__main__":
    main()
