"""Does a faster CPU recipe reach val loss 1.88 in at most 60% of the CPU recipe's wall time?

Trains `experiment=shakespeare_char_cpu` (nanoGPT's CPU recipe) and
`experiment=shakespeare_char_cpu_fast` one after the other on this machine, then reports for
each the final val/loss, the training wall time and the time at which val/loss first reached
the target (by default 1.88, nanoGPT's published figure for its recipe), as a share of the
recipe's wall time, and plots both curves against time.

    python experiments/fast_cpu_recipe/run.py
    python experiments/fast_cpu_recipe/run.py --target 1.9175
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from gptlab import store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "fast_cpu_recipe"
RECIPES = ["shakespeare_char_cpu", "shakespeare_char_cpu_fast"]


def train(recipe: str) -> str:
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), f"experiment={recipe}",
           f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={recipe}",
           "trainer.enable_progress_bar=false"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.split("MLflow run id: ")[1].split()[0]


def curve(client: MlflowClient, run_id: str) -> list[tuple[int, float, float]]:
    """(step, seconds since the run started, val/loss) at each validation."""
    start = client.get_run(run_id).info.start_time
    return [(m.step, (m.timestamp - start) / 1000, m.value) for m in
            sorted(client.get_metric_history(run_id, "val/loss"), key=lambda m: m.step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=1.88, help="val/loss to reach")
    args = ap.parse_args()
    client = store.connect()
    curves = {recipe: curve(client, train(recipe)) for recipe in RECIPES}
    target = args.target
    recipe_time = curves[RECIPES[0]][-1][1]
    lines = [f"target val/loss {target:.4f}", "",
             "| recipe | steps | final val/loss | wall time (s) | time to target (s) "
             "| share of the recipe's wall time |",
             "|---|---|---|---|---|---|"]
    for recipe, points in curves.items():
        reached = next((t for _, t, v in points if v <= target), None)
        share = "" if reached is None else f"{100 * reached / recipe_time:.0f}%"
        lines.append(f"| {recipe} | {points[-1][0]} | {points[-1][2]:.4f} | {points[-1][1]:.0f} "
                     f"| {'not reached' if reached is None else f'{reached:.0f}'} | {share} |")
    table = "\n".join(lines)
    print(table)
    (HERE / "results.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for recipe, points in curves.items():
        ax.plot([t for _, t, _ in points], [v for *_, v in points], marker="o", label=recipe)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("val/loss")
    ax.set_title("CPU recipe vs the fast schedule (2-core CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "val_loss_vs_time.png", dpi=120)


if __name__ == "__main__":
    main()
