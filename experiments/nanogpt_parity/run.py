"""Parity with the reference: gptlab's CPU recipe against nanoGPT's `train.py` with the same
recipe (4 layers, 4 heads, 128 channels, block 64, batch 12, 2000 iterations, lr 1e-3 with
100 warmup steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1, clipping at 1.0),
over several seeds, the final weights of both scored the same way on the whole validation
split: every non-overlapping block of 64 characters of the last 10% of Tiny Shakespeare.

    python experiments/nanogpt_parity/run.py --nanogpt PATH/TO/nanoGPT --seeds 0 1 2 3 4

nanoGPT is public (github.com/karpathy/nanoGPT); this script runs a checkout of it as it is,
in a copy it makes, and keeps none of its code. nanoGPT seeds with a fixed 1337; to vary the
seed, its train.py is run by a short harness that adds an offset to torch.manual_seed.
Both implementations hold the same architecture under other parameter names, so nanoGPT's
checkpoints load into gptlab's GPT and one scorer evaluates both. Writes results.md,
results.json and parity.png beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from scipy import stats

from gptlab.data.corpus import resolve_corpus
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.checkpoints import model_from_checkpoint, read_checkpoint
from gptlab.models.gpt import GPT
from gptlab.tracking import store

HERE = Path(__file__).resolve().parent
BLOCK = 64
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=100", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0", "--always_save_checkpoint=True"]
# runs nanoGPT's train.py unchanged, with torch.manual_seed shifted by SEED_OFFSET
HARNESS = ("import os, runpy, torch; _seed = torch.manual_seed; "
           "torch.manual_seed = lambda s: _seed(s + int(os.environ['SEED_OFFSET'])); "
           "runpy.run_path('train.py', run_name='__main__')")


def validation_blocks(corpus: Path, tokenizer: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-overlapping block of 64 characters of the validation split (its last 10%),
    with the next character as target."""
    data = torch.tensor(tokenizer.encode(corpus.read_text(encoding="utf-8")))
    val = data[int(0.9 * len(data)):]
    n = (len(val) - 1) // BLOCK
    x = val[:n * BLOCK].view(n, BLOCK)
    y = val[1:n * BLOCK + 1].view(n, BLOCK)
    return x, y


@torch.no_grad()
def score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Mean cross-entropy (nats per character) over all the blocks."""
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(),
                                 reduction="sum").item()
    return total / y.numel()


def nanogpt_model(ckpt_path: Path, vocab_size: int) -> GPT:
    """A nanoGPT checkpoint's weights in gptlab's GPT: the same modules, without the
    `transformer.` prefix (and `_orig_mod.` of a compiled model)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    args = ckpt["model_args"]
    model = GPT(vocab_size=vocab_size, block_size=args["block_size"], n_layer=args["n_layer"],
                n_head=args["n_head"], n_embd=args["n_embd"], bias=args["bias"])
    state = {k.removeprefix("_orig_mod.").removeprefix("transformer."): v
             for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model


def run_nanogpt(repo: Path, corpus: Path, seed: int,
                work: Path) -> tuple[Path, float, list[tuple[int, float, float]]]:
    """Train nanoGPT's CPU recipe once; returns its final checkpoint, the wall time and its
    validations as (step, seconds since the command started, val loss), read from the lines
    its train.py prints as it goes."""
    copy = work / "nanoGPT"
    if not copy.exists():
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
        data = copy / "data" / "shakespeare_char"
        shutil.copy(corpus, data / "input.txt")  # prepare.py reads it instead of downloading
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True,
                       capture_output=True)
    out = work / f"nanogpt-{seed}"
    env = dict(os.environ, SEED_OFFSET=str(seed - 1337), PYTHONUNBUFFERED="1")
    curve = []
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-c", HARNESS, *NANOGPT_ARGS, f"--out_dir={out}"],
                          cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:  # "step 250: train loss 2.0123, val loss 2.0845"
            if line.startswith("step ") and "val loss" in line:
                step = int(line.split()[1].rstrip(":"))
                curve.append((step, time.perf_counter() - start, float(line.split()[-1])))
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return out / "ckpt.pt", seconds, curve


def run_gptlab(seed: int, tracking_uri: str) -> tuple[str, float]:
    """Train gptlab's CPU recipe once; returns its MLflow run id and the wall time."""
    train = Path(sys.executable).parent / "gptlab-train"
    start = time.perf_counter()
    res = subprocess.run([str(train), "experiment=shakespeare_char_cpu", f"seed={seed}",
                          "logger.experiment_name=nanogpt_parity",
                          f"logger.tracking_uri={tracking_uri}"],
                         capture_output=True, text=True, check=True)
    run_id = res.stdout.split("MLflow run id: ")[1].split()[0]
    return run_id, time.perf_counter() - start


def gptlab_model(client: MlflowClient, run_id: str, scratch: Path) -> torch.nn.Module:
    names = [n for n in store.artifact_names(client, run_id, "checkpoints")
             if n.startswith("step_")]
    path = store.download(client, run_id, f"checkpoints/{sorted(names)[-1]}", scratch)
    return model_from_checkpoint(read_checkpoint(path))


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values),
            "n": len(values), "values": values}


def report(results: dict, out: Path) -> str:
    g, n = results["gptlab"], results["nanogpt"]
    p = results["welch_p"]
    lines = [
        "| implementation | seeds | val loss on the whole split (mean +- std) | wall time "
        "(mean) |", "|---|---:|---:|---:|",
        f"| gptlab `experiment=shakespeare_char_cpu` | {g['n']} | "
        f"{g['mean']:.4f} +- {g['std']:.4f} | {statistics.fmean(results['gptlab_s']):.0f} s |",
        f"| nanoGPT `train.py` (same recipe) | {n['n']} | {n['mean']:.4f} +- {n['std']:.4f} | "
        f"{statistics.fmean(results['nanogpt_s']):.0f} s |", "",
        f"Difference gptlab - nanoGPT: {g['mean'] - n['mean']:+.4f} nats; Welch's t-test "
        f"p = {p:.3f} ({'significant' if p < 0.05 else 'not significant'} at 0.05).",
        "", "Per seed (gptlab, nanoGPT): " + ", ".join(
            f"{s}: {a:.4f} / {b:.4f}" for s, a, b in zip(results["seeds"], g["values"],
                                                         n["values"], strict=True)),
        "", f"Machine: {results['machine']}.",
    ]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(("gptlab", "nanogpt")):
        values = results[name]["values"]
        ax.scatter([i] * len(values), values, alpha=0.6)
        ax.errorbar([i + 0.15], [results[name]["mean"]], yerr=[results[name]["std"]],
                    fmt="o", capsize=6, color="black")
    ax.set_xticks([0, 1], ["gptlab", "nanoGPT"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("val loss, whole split (nats/char)")
    ax.set_title(f"CPU recipe, {len(results['seeds'])} seeds: each seed, mean +- std")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, required=True, help="a checkout of nanoGPT")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tracking-uri", default=None, help="default: the project's mlruns/")
    args = ap.parse_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        ap.error(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    corpus = resolve_corpus(None)
    tokenizer = CharTokenizer.from_text(corpus.read_text(encoding="utf-8"))
    x, y = validation_blocks(corpus, tokenizer)
    uri = store.resolve_tracking_uri(args.tracking_uri)
    client = store.connect(uri)
    results: dict = {"seeds": args.seeds, "blocks": len(x), "gptlab_s": [], "nanogpt_s": []}
    gptlab, nanogpt = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:  # in turn, so that drifts in machine speed fall on both alike
            run_id, seconds = run_gptlab(seed, uri)
            gptlab.append(score(gptlab_model(client, run_id, work), x, y))
            results["gptlab_s"].append(seconds)
            ckpt, seconds, _ = run_nanogpt(args.nanogpt, corpus, seed, work)
            nanogpt.append(score(nanogpt_model(ckpt, tokenizer.vocab_size), x, y))
            results["nanogpt_s"].append(seconds)
            print(f"seed {seed}: gptlab {gptlab[-1]:.4f}, nanoGPT {nanogpt[-1]:.4f}", flush=True)
    results["gptlab"], results["nanogpt"] = summary(gptlab), summary(nanogpt)
    results["welch_p"] = float(stats.ttest_ind(gptlab, nanogpt, equal_var=False).pvalue)
    results["machine"] = (f"{platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, {torch.get_num_threads()} threads")
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, HERE / "results.md"))
    plot(results, HERE / "parity.png")


if __name__ == "__main__":
    main()
