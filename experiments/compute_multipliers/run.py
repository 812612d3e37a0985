"""What each idea is worth in compute: the baseline and each idea that helped in
experiments/modern_ideas, at five model sizes, 3 seeds each, fitted as L = E + A C^-alpha per
idea by `gptlab-compare --scaling`, with each idea's compute multiplier against the baseline.

    python experiments/compute_multipliers/run.py                 # 7 ideas x 5 sizes x 3 seeds
    python experiments/compute_multipliers/run.py --widths 48 64 96 --ideas baseline rope
    python experiments/compute_multipliers/run.py --report-only   # fit and table again

The sizes are the CPU recipe's GPT (4 layers, 4 heads, block 64, batch 12) at n_embd 48 to
128. Each size trains on tokens in a fixed ratio to its non-embedding parameters N: the CPU
recipe's own ratio (2000 steps x 768 tokens for its N at width 128, about 1.95 tokens per
parameter), with warmup and the validation interval in the same proportion to the steps, so
that every size is trained on the recipe's schedule, stretched. One `gptlab-train -m` sweep
per size (the ideas and seeds swept), all in one MLflow experiment; the fit reads them all.
Writes results.md, results.json and loss_vs_compute.png beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENT = "compute_multipliers"
IDEAS = ["baseline", "rope", "swiglu", "relu2", "qk_norm", "muon", "all"]
WIDTHS = [48, 64, 80, 96, 128]
RECIPE = {"width": 128, "steps": 2000, "warmup": 100, "val_every": 250}  # shakespeare_char_cpu
BIN = Path(sys.executable).parent


def non_embedding(width: int) -> int:
    """N of the baseline GPT (the recipe's shape) at this width."""
    import torch

    from gptlab.models.compute import non_embedding_parameters
    from gptlab.models.gpt import GPT

    with torch.device("meta"):  # shapes only, no storage
        return non_embedding_parameters(GPT(vocab_size=65, block_size=64, n_layer=4, n_head=4,
                                            n_embd=width, dropout=0.0, bias=False))


def schedule(width: int) -> dict[str, int]:
    """Steps (tokens in the recipe's ratio to N), warmup and validation interval for a width."""
    steps = round(RECIPE["steps"] * non_embedding(width) / non_embedding(RECIPE["width"]))
    return {"steps": steps, "warmup": max(1, round(steps * RECIPE["warmup"] / RECIPE["steps"])),
            "val_every": max(1, round(steps * RECIPE["val_every"] / RECIPE["steps"]))}


def train(width: int, ideas: list[str], seeds: list[int], jobs: int) -> None:
    s = schedule(width)
    cmd = [str(BIN / "gptlab-train"), "-m", "experiment=shakespeare_char_cpu",
           f"model.n_embd={width}", f"ideas={','.join(ideas)}",
           f"seed={','.join(map(str, seeds))}", f"trainer.max_steps={s['steps']}",
           f"optim.warmup_steps={s['warmup']}", f"trainer.val_check_interval={s['val_every']}",
           "callbacks.final_sample_tokens=0", f"logger.experiment_name={EXPERIMENT}"]
    env = dict(os.environ)
    if jobs > 1:  # one thread per job
        cmd += ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, check=True)


def compare(plot: Path, bootstrap: int) -> str:
    """gptlab-compare's scaling fit over every run of the study."""
    cmd = [str(BIN / "gptlab-compare"), "-e", EXPERIMENT, "--scaling", "--by", "ideas",
           "--baseline", "ideas=baseline", "--bootstrap", str(bootstrap), "--plot", str(plot)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def means() -> str:
    """Best val/loss by idea and width, mean +- std over seeds: the points the fits go through."""
    from gptlab.tracking import comparison, store

    client = store.connect()
    runs, _ = comparison.select_runs(client, EXPERIMENT, None)
    losses: dict[tuple[str, int], list[float]] = {}
    for run in runs:
        if run.info.status == store.FINISHED:
            key = (run.data.params["ideas"], int(run.data.params["model.n_embd"]))
            best = comparison.summarize(client, run, [])["best val/loss"]
            losses.setdefault(key, []).append(best)
    ideas = [i for i in IDEAS if any(k[0] == i for k in losses)]
    widths = sorted({w for _, w in losses})
    lines = ["Best val/loss by idea and width (mean +- std over seeds):", "",
             "| idea | " + " | ".join(f"width {w}" for w in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    for idea in ideas:
        cells = [f"{statistics.fmean(v):.4f} +- {statistics.stdev(v):.4f}" if len(v) > 1
                 else f"{v[0]:.4f}" for v in (losses.get((idea, w), [math.nan]) for w in widths)]
        lines.append(f"| {idea} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    ap.add_argument("--ideas", nargs="+", default=IDEAS, choices=IDEAS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    seconds: dict[int, float] = {}
    if args.report_only and (HERE / "results.json").exists():  # the sweeps' times, kept
        seconds = {int(w): s for w, s in json.loads(
            (HERE / "results.json").read_text())["seconds"].items()}
    if not args.report_only:
        for width in sorted(args.widths, reverse=True):  # the costliest first
            start = time.perf_counter()
            train(width, args.ideas, args.seeds, args.jobs)
            seconds[width] = time.perf_counter() - start
            print(f"width {width}: {seconds[width]:.0f} s", flush=True)
    table = compare(HERE / "loss_vs_compute.png", args.bootstrap)
    command = "python experiments/compute_multipliers/run.py " + " ".join(argv or sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time"
    sizes = "\n".join(f"| {w} | {non_embedding(w):,} | {schedule(w)['steps']} | "
                      + (f"{seconds[w] / 60:.1f} min" if w in seconds else "") + " |"
                      for w in sorted(args.widths))
    text = (f"`{command.strip()}` ({machine})\n\n| width | N (non-embedding) | steps | "
            f"sweep wall time |\n|---:|---:|---:|---:|\n{sizes}\n\n```\n{table}```\n\n"
            + means())
    (HERE / "results.md").write_text(text)
    if not args.report_only:
        (HERE / "results.json").write_text(json.dumps(
            {"seconds": seconds, "machine": machine, "command": command.strip()}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
