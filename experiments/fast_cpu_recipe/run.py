"""The CPU recipes side by side: nanoGPT's CPU recipe (`experiment=shakespeare_char_cpu`),
the fast schedule (`shakespeare_char_cpu_fast`) and the best recipe found with today's ideas
(`shakespeare_char_cpu_best`), one after the other on this machine, and, given a nanoGPT
checkout, nanoGPT's own `train.py` with the CPU recipe for its wall time.

For each gptlab recipe: the best val/loss, the wall time of the whole command (start-up
included, as for nanoGPT) and of the MLflow run, and the time since the run started at which
val/loss first reached each target (1.88, nanoGPT's published figure for its recipe, and 1.70).
Plots val/loss against time.

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


def train(recipe: str) -> tuple[str, float]:
    """Train one recipe through gptlab-train; its run id and the command's wall time."""
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), f"experiment={recipe}",
           f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={recipe}",
           "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.split("MLflow run id: ")[1].split()[0], time.perf_counter() - start


def curve(client: MlflowClient, run_id: str) -> list[tuple[int, float, float]]:
    """(step, seconds since the run started, val/loss) at each validation."""
    start = client.get_run(run_id).info.start_time
    return [(m.step, (m.timestamp - start) / 1000, m.value) for m in
            sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)]


def nanogpt_seconds(repo: Path) -> float:
    """Wall time of nanoGPT's train.py with the CPU recipe (the parity study's runner)."""
    # the runner lives in the parity study's script, loaded from its file: one copy of it
    spec = importlib.util.spec_from_file_location(
        "nanogpt_parity", HERE.parent / "nanogpt_parity" / "run.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    with tempfile.TemporaryDirectory() as tmp:
        return parity.run_nanogpt(repo, resolve_corpus(None), 1337, Path(tmp))[1]


def report(results: dict, targets: list[float]) -> str:
    head = ["recipe", "steps", "best val/loss", "command wall time", "run wall time",
            *(f"time to {t:.2f}" for t in targets)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    if "nanogpt_s" in results:
        cells = ["nanoGPT `train.py`, CPU recipe", "2000", "(1.88 published)",
                 f"{results['nanogpt_s']:.0f} s", "", *([""] * len(targets))]
        lines.append("| " + " | ".join(cells) + " |")
    for recipe, r in results["recipes"].items():
        points = r["curve"]
        reach = []
        for t in targets:
            at = next((s for _, s, v in points if v <= t), None)
            reach.append("not reached" if at is None else f"{at:.0f} s")
        lines.append(f"| `{recipe}` | {points[-1][0]} | {min(v for *_, v in points):.4f} | "
                     f"{r['command_s']:.0f} s | {points[-1][1]:.0f} s | " + " | ".join(reach)
                     + " |")
    return "\n".join(lines) + f"\n\nMachine: {results['machine']}.\n"


def plot(results: dict, targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for recipe, r in results["recipes"].items():
        ax.plot([s for _, s, _ in r["curve"]], [v for *_, v in r["curve"]], marker="o",
                label=recipe)
    for t in targets:
        ax.axhline(t, color="grey", linestyle="--", linewidth=1)
    if "nanogpt_s" in results:
        ax.axvline(results["nanogpt_s"], color="black", linestyle=":", linewidth=1,
                   label="nanoGPT's CPU recipe, whole command")
    ax.set_xlabel("seconds since the run started")
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
        results["nanogpt_s"] = nanogpt_seconds(args.nanogpt)
        print(f"nanoGPT: {results['nanogpt_s']:.0f} s", flush=True)
    for recipe in args.recipes:
        run_id, seconds = train(recipe)
        results["recipes"][recipe] = {"run_id": run_id, "command_s": seconds,
                                      "curve": curve(client, run_id)}
        print(f"{recipe}: {seconds:.0f} s", flush=True)
    text = report(results, args.targets)
    print(text)
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.targets, HERE / "val_loss_vs_time.png")


if __name__ == "__main__":
    main()
