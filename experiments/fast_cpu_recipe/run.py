"""The CPU recipes side by side: nanoGPT's CPU recipe (`experiment=shakespeare_char_cpu`),
the fast schedule (`shakespeare_char_cpu_fast`), the best recipe with today's ideas and AdamW
(`shakespeare_char_cpu_best`) and the CPU record (`shakespeare_char_cpu_record`), one after the
other on this machine, and, given a nanoGPT checkout, first nanoGPT's own `train.py` with the
CPU recipe.

For nanoGPT and each gptlab recipe: the best val/loss, the wall time of the whole command
(start-up included) and the time since the command started at which val/loss first reached
each target (1.88, nanoGPT's published figure for its recipe, to 1.65), from the validations
each run recorded (gptlab's in MLflow, nanoGPT's from the lines its train.py prints). Plots
val/loss against time.

    python experiments/fast_cpu_recipe/run.py
    python experiments/fast_cpu_recipe/run.py --nanogpt /tmp/nanoGPT
    python experiments/fast_cpu_recipe/run.py --recipes shakespeare_char_cpu_best --targets 1.7

Writes results.md, results.json and val_loss_vs_time.png beside this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from gptlab.data.corpus import resolve_corpus
from gptlab.tracking import store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "fast_cpu_recipe"
RECIPES = ["shakespeare_char_cpu", "shakespeare_char_cpu_fast", "shakespeare_char_cpu_best",
           "shakespeare_char_cpu_record"]


def train(recipe: str) -> tuple[str, float, float]:
    """Train one recipe through gptlab-train; its run id, the command's wall time and the
    clock time at which it started."""
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), f"experiment={recipe}",
           f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={recipe}",
           "trainer.enable_progress_bar=false"]
    started, start = time.time(), time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.split("MLflow run id: ")[1].split()[0], time.perf_counter() - start, started


def curve(client: MlflowClient, run_id: str,
          started: float) -> list[tuple[int, float, float]]:
    """(step, seconds since the command started, val/loss) at each validation."""
    return [(m.step, m.timestamp / 1000 - started, m.value) for m in
            sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)]


def nanogpt(repo: Path) -> tuple[float, list[tuple[int, float, float]]]:
    """nanoGPT's train.py with the CPU recipe (the parity study's runner): its wall time and
    validations."""
    # the runner lives in the parity study's script, loaded from its file: one copy of it
    spec = importlib.util.spec_from_file_location(
        "nanogpt_parity", HERE.parent / "nanogpt_parity" / "run.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    with tempfile.TemporaryDirectory() as tmp:
        return parity.run_nanogpt(repo, resolve_corpus(None), 1337, Path(tmp))[1:]


NANOGPT = "nanoGPT `train.py`, CPU recipe"


def report(results: dict, targets: list[float]) -> str:
    head = ["recipe", "steps", "best val/loss", "command wall time",
            *(f"time to {t:.2f}" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results["recipes"].items():
        points = r["curve"]
        reach = []
        for t in targets:
            at = next((s for _, s, v in points if v <= t), None)
            reach.append("not reached" if at is None else f"{at:.0f} s")
        label = name if name == NANOGPT else f"`{name}`"
        lines.append(f"| {label} | {points[-1][0]} | {min(v for *_, v in points):.4f} | "
                     f"{r['command_s']:.0f} s | " + " | ".join(reach) + " |")
    return ("\n".join(lines) + "\n\nTimes from the command's start (start-up included), at "
            "the validations each run recorded (every 250 steps for nanoGPT and the CPU "
            "recipe; gptlab's val/loss on the same 240 fixed validation blocks in every "
            "recipe, nanoGPT's on 20 random batches of 12 drawn at each evaluation). "
            "Machine: " + results["machine"] + ".\n")


def plot(results: dict, targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results["recipes"].items():
        ax.plot([s for _, s, _ in r["curve"]], [v for *_, v in r["curve"]], marker="o",
                label=name, **({"color": "black", "linestyle": ":"} if name == NANOGPT else {}))
    for t in targets:
        ax.axhline(t, color="grey", linestyle="--", linewidth=1)
    if NANOGPT in results["recipes"]:
        ax.axvline(results["recipes"][NANOGPT]["command_s"], color="black", linestyle=":",
                   linewidth=1, label="nanoGPT's CPU recipe, whole command")
    ax.set_xlabel("seconds since the command started")
    ax.set_ylabel("val/loss")
    ax.set_title("CPU recipes on a 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--targets", type=float, nargs="+",
                    default=[1.88, 1.80, 1.75, 1.70, 1.65])
    ap.add_argument("--nanogpt", type=Path, default=None, help="a checkout of nanoGPT")
    args = ap.parse_args(argv)
    client = store.connect()
    results: dict = {"recipes": {}, "machine": (
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")}
    if args.nanogpt is not None:
        seconds, points = nanogpt(args.nanogpt)
        results["recipes"][NANOGPT] = {"command_s": seconds, "curve": points}
        print(f"nanoGPT: {seconds:.0f} s", flush=True)
    for recipe in args.recipes:
        run_id, seconds, started = train(recipe)
        results["recipes"][recipe] = {"run_id": run_id, "command_s": seconds,
                                      "curve": curve(client, run_id, started)}
        print(f"{recipe}: {seconds:.0f} s", flush=True)
    text = report(results, args.targets)
    print(text)
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.targets, HERE / "val_loss_vs_time.png")


if __name__ == "__main__":
    main()
