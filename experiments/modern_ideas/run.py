"""What each of today's transformer ideas buys on Tiny Shakespeare, with error bars.

nanoGPT's CPU recipe (4 layers, 4 heads, 128 channels, block 64, batch 12, 2000 steps) is the
baseline; each idea of conf/ideas/ is switched on alone, then all together, each over several
seeds, at equal steps and batch (so equal tokens). One `gptlab-train -m` sweep trains them all
into one MLflow parent run; gptlab's own comparison groups the runs by idea and tests each
against the baseline (Welch's t-test).

    python experiments/modern_ideas/run.py                       # 8 settings x 3 seeds
    python experiments/modern_ideas/run.py --seeds 0 1 2 3 4 --jobs 2
    python experiments/modern_ideas/run.py --report-only         # table and plot again

Writes results.md, results.json, val_loss.png and samples.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from gptlab.tracking import comparison, store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "modern_ideas"
IDEAS = ["baseline", "rope", "rmsnorm", "swiglu", "relu2", "qk_norm", "muon", "all"]
WHAT = {
    "baseline": "GPT-2's choices: learned positions, LayerNorm, 4x GELU MLP, AdamW",
    "rope": "rotary position embeddings",
    "rmsnorm": "RMSNorm instead of LayerNorm",
    "swiglu": "SwiGLU MLP, as many parameters",
    "relu2": "squared-ReLU MLP",
    "qk_norm": "queries and keys RMS-normalised per head",
    "muon": "Muon for the blocks' matrices, AdamW for the rest",
    "all": "all of the above (SwiGLU as the MLP)",
}


def train(ideas: list[str], seeds: list[int], jobs: int, extra: list[str]) -> None:
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), "-m",
           "experiment=shakespeare_char_cpu", f"ideas={','.join(ideas)}",
           f"seed={','.join(map(str, seeds))}", f"logger.experiment_name={EXPERIMENT}", *extra]
    env = dict(os.environ)
    if jobs > 1:
        # one thread per job: two jobs on two cores, not four threads fighting over them
        cmd += ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={jobs}"]
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, env=env, check=True)


def collect(client: MlflowClient) -> tuple[list[dict], list[dict], object]:
    exp_id = store.experiment_id(client, EXPERIMENT)
    parent = comparison.find_sweep(client, exp_id, EXPERIMENT, "latest")
    runs = [r for r in comparison.sweep_children(client, parent)
            if r.info.status == "FINISHED"]
    rows = [comparison.summarize(client, r, ["ideas"]) for r in runs]
    groups = comparison.groups(rows, ["ideas"], baseline="ideas=baseline")
    for g in groups:
        g["idea"] = g["group"].removeprefix("ideas=")
        members = [r for r in runs if r.data.params.get("ideas") == g["idea"]]
        g["params"] = int(members[0].data.params["n_params"])
        g["best_run"] = min(members, key=lambda r: r.data.metrics.get("best_val_loss", 9e9))
    return rows, groups, parent


def table(groups: list[dict]) -> str:
    order = {name: i for i, name in enumerate(IDEAS)}
    lines = ["| idea | what | runs | best val/loss (mean +- std) | vs baseline | p (Welch) | "
             "ms/step | params |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for g in sorted(groups, key=lambda g: order.get(g["idea"], 99)):
        p = g["p (Welch)"]
        lines.append(
            f"| {g['idea']} | {WHAT.get(g['idea'], '')} | {g['runs']} | "
            f"{g['best val/loss']:.4f} +- {g['best std']:.4f} | "
            + ("-" if g["idea"] == "baseline" else f"{g['diff']:+.4f}") + " | "
            + ("-" if math.isnan(p) else f"{p:.3g}{' *' if p < 0.05 else ''}") + " | "
            f"{g['ms/step']:.1f} | {g['params']:,} |")
    return "\n".join(lines)


def samples(client: MlflowClient, groups: list[dict], scratch: Path) -> str:
    best = min(groups, key=lambda g: g["best val/loss"])
    run = best["best_run"]
    text = Path(client.download_artifacts(run.info.run_id, "samples/final.txt",
                                          str(scratch))).read_text()
    return (f"# A sample of the best run\n\n`{run.info.run_name}` (idea `{best['idea']}`, best "
            f"val/loss {run.data.metrics['best_val_loss']:.4f}), 500 characters from a "
            f"newline:\n\n```\n{text}\n```\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ideas", nargs="+", default=IDEAS, choices=IDEAS)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report-only", action="store_true", help="read the newest sweep again")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("overrides", nargs="*", help="extra gptlab-train overrides")
    args = ap.parse_args(argv)
    uri = store.resolve_tracking_uri(args.tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if not args.report_only:
        train(args.ideas, args.seeds, args.jobs, args.overrides)
    client = store.connect(uri)
    rows, groups, parent = collect(client)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
               f"{args.jobs} run(s) at a time")
    text = (f"Sweep `{parent.info.run_name}` ({parent.info.run_id}): "
            f"`gptlab-train -m experiment=shakespeare_char_cpu ideas=... seed=...`\n\n"
            f"{table(groups)}\n\n* p < 0.05. Machine: {machine}.\n")
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(
        [{k: v for k, v in g.items() if not k.startswith("_") and k != "best_run"}
         for g in groups], indent=2, default=str) + "\n")
    comparison.plot(rows, "val/loss by idea (mean, band: one std over seeds)",
                    str(HERE / "val_loss.png"), groups)
    with store.scratch() as scratch:
        (HERE / "samples.md").write_text(samples(client, groups, scratch))
    print(text)


if __name__ == "__main__":
    main()
