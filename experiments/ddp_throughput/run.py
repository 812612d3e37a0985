"""Data-parallel training on this machine's CPU: `trainer=ddp` (2 processes, 1 thread each)
against one process with all the cores' threads, at the same batch per process and at the
same global batch.

Each setting trains the CPU recipe's model (4x4x128, block 64) for `--steps` steps through
`gptlab-train`, in rotating rounds so that drifts in the machine's speed fall on all alike;
the figure is the median over rounds of the run's mean `tokens_per_sec` (every rank's tokens
counted) and of its ms per step.

    python experiments/ddp_throughput/run.py                 # 3 rounds of 300 steps
    python experiments/ddp_throughput/run.py --rounds 5 --steps 500

Writes results.md and results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from gptlab.tracking import store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "ddp_throughput"
SETTINGS = {
    "1 process, 2 threads, batch 12": ["data.batch_size=12"],
    "1 process, 2 threads, batch 24": ["data.batch_size=24"],
    "trainer=ddp: 2 processes x 1 thread, batch 12 each (24 in all)": [
        "trainer=ddp", "data.batch_size=12"],
}


def train(args: list[str], steps: int) -> str:
    cmd = [str(Path(sys.executable).parent / "gptlab-train"), "experiment=shakespeare_char_cpu",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           "trainer.enable_progress_bar=false", "callbacks.final_sample_tokens=0",
           f"logger.experiment_name={EXPERIMENT}", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out.split("MLflow run id: ")[1].split()[0]


def figures(client, run_id: str, steps: int) -> tuple[float, float]:  # noqa: ANN001
    """The run's mean logged tokens/s (past the first logging point) and ms per step."""
    history = sorted(client.get_metric_history(run_id, "tokens_per_sec"), key=lambda m: m.step)
    tps = statistics.fmean(m.value for m in history[1:])
    run = client.get_run(run_id)
    tokens_per_step = (int(run.data.params["global_batch_size"])
                       * int(run.data.params["data.block_size"]))
    return tps, 1000 * tokens_per_step / tps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    client = store.connect()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
            results[name].append(figures(client, train(SETTINGS[name], args.steps),
                                         args.steps))
            print(f"round {r + 1}: {name}: {results[name][-1][0]:,.0f} tok/s", flush=True)
    base = statistics.median(t for t, _ in results[names[0]])
    lines = ["| setting | tokens/s (median) | ms/step | vs 1 process, batch 12 |",
             "|---|---:|---:|---:|"]
    for name, values in results.items():
        tps = statistics.median(t for t, _ in values)
        ms = statistics.median(m for _, m in values)
        lines.append(f"| {name} | {tps:,.0f} | {ms:.1f} | {tps / base:.2f}x |")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
               f"{args.rounds} rounds of {args.steps} steps")
    text = "\n".join(lines) + f"\n\nMachine: {machine}.\n"
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps(
        {"machine": machine, "runs": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
