"""Does the best learning rate move with width? An lr sweep at three widths, under the standard
parametrization and under muP (base width 128), 2 seeds each: one `gptlab-train -m` sweep.

    python experiments/mup/transfer.py                       # 3 widths x 4 lrs x 2 x 2 seeds
    python experiments/mup/transfer.py --steps 1000 --jobs 2
    python experiments/mup/transfer.py --report-only         # read the newest sweep again

The CPU recipe's GPT (4 layers, 4 heads, block 64, batch 12) at n_embd 64, 128 and 256, a
shorter run than the recipe's (--steps, cosine decay to it). Writes results.md and
transfer.png here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from gptlab.tracking import comparison, store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "mup_transfer"


def train(widths: list[int], lrs: list[str], seeds: int, steps: int, jobs: int) -> None:
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), "-m",
           "experiment=shakespeare_char_cpu", f"model.n_embd={','.join(map(str, widths))}",
           f"optim.lr={','.join(lrs)}", "model.parametrization=standard,mup",
           f"seed={','.join(str(s) for s in range(seeds))}", f"trainer.max_steps={steps}",
           "trainer.val_check_interval=250", "callbacks.final_sample_tokens=0",
           f"logger.experiment_name={EXPERIMENT}"]
    env = dict(os.environ)
    if jobs > 1:  # one thread per job
        cmd += ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, check=True)


def collect(uri: str | None) -> dict[tuple[str, int, float], list[float]]:
    """Best val/loss by (parametrization, width, lr), one value per seed."""
    client = store.connect(uri)
    runs, _ = comparison.select_runs(client, EXPERIMENT, "latest")
    out: dict[tuple[str, int, float], list[float]] = {}
    for run in runs:
        p = run.data.params
        row = comparison.summarize(client, run, [])
        key = (p["model.parametrization"], int(p["model.n_embd"]), float(p["optim.lr"]))
        out.setdefault(key, []).append(row["best val/loss"])
    return out


def report(results: dict[tuple[str, int, float], list[float]], command: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({w for _, w, _ in results})
    lrs = sorted({lr for _, _, lr in results})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    lines = [f"`{command}` ({platform.machine()}, {os.cpu_count()} cores): best val/loss, "
             "mean +- std over seeds; * the best lr of each width", "",
             "| parametrization | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|---:|" + "---:|" * len(lrs)]
    for ax, parametrization in zip(axes, ("standard", "mup"), strict=True):
        for w in widths:
            means = [statistics.fmean(results[parametrization, w, lr]) for lr in lrs]
            stds = [statistics.stdev(results[parametrization, w, lr])
                    if len(results[parametrization, w, lr]) > 1 else 0.0 for lr in lrs]
            best = lrs[means.index(min(means))]
            ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=f"width {w}")
            lines.append(f"| {parametrization} | {w} | " + " | ".join(
                f"{m:.4f} +- {s:.4f}{' *' if lr == best else ''}"
                for m, s, lr in zip(means, stds, lrs, strict=True)) + " |")
        ax.set_xscale("log")
        ax.set_xlabel("AdamW lr")
        ax.set_title(parametrization)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("best val/loss (mean, bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(HERE / "transfer.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--lrs", nargs="+", default=["3e-4", "1e-3", "3e-3", "1e-2"])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--tracking-uri")
    args = ap.parse_args(argv)
    if not args.report_only:
        train(args.widths, args.lrs, args.seeds, args.steps, args.jobs)
    command = "python experiments/mup/transfer.py " + " ".join(argv or sys.argv[1:])
    text = report(collect(args.tracking_uri), command.strip())
    (HERE / "results_transfer.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
