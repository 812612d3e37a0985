"""The lecture's progression from bigram to GPT, each stage trained by `gptlab-train` and
compared through MLflow: parameters, final train and val loss, wall time, a sample, and the
val-loss curves of all stages in one plot.

    python experiments/lecture_progression/run.py                   # every stage that fits
    python experiments/lecture_progression/run.py --stages bow,multihead --steps 500
    python experiments/lecture_progression/run.py --report-only     # table and plot again

Each stage is one `gptlab-train experiment=lecture/<stage>` subprocess and one MLflow run in
the experiment `lecture_progression`, in the store of $MLFLOW_TRACKING_URI (else the
project's mlruns/). The report covers the newest finished run of every stage in that
experiment, so stages run at different times end up in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from gptlab.tracking import store

HERE = Path(__file__).resolve().parent
EXPERIMENT = "lecture_progression"
# in the lecture's order; each is conf/experiment/lecture/<stage>.yaml
STAGES = ["bigram", "bow", "attention_head", "multihead", "multihead_ffn", "blocks",
          "blocks_residual", "blocks_residual_ln", "gpt"]
GPU_SIZED = {"gpt"}
TRAIN_WINDOW = 200  # steps: a single step's train loss is one batch of 256 tokens, too noisy


@dataclass
class StageResult:
    stage: str
    run_name: str
    run_id: str
    n_params: int
    steps: int
    accelerator: str
    train_loss: float | None
    val_loss: float | None
    wall_s: float
    sample: str
    val_curve: list[tuple[int, float]]


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(STAGES)}")
    return stages


def train_command() -> str:
    """gptlab-train beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "gptlab-train"
    found = str(beside) if beside.is_file() else shutil.which("gptlab-train")
    if found is None:
        raise SystemExit("error: gptlab-train not found; install the project first")
    return found


def stage_overrides(stage: str, steps: int | None, seed: int, extra: list[str]) -> list[str]:
    """What the command line changes for one stage (also the run's name, with the stage)."""
    out = []
    if steps is not None:
        # ten evaluations whatever the length, as the full 5000-step runs have
        out += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 10)}"]
    if stage in GPU_SIZED and not torch.cuda.is_available():
        out.append("trainer=cpu")  # its experiment asks for the GPU trainer
    if seed != 1337:
        out.append(f"seed={seed}")
    return out + extra


def run_stage(stage: str, overrides: list[str], uri: str, workdir: Path, threads: int) -> bool:
    """Train one stage in a subprocess; its log goes to workdir/<stage>.log."""
    # the run's name says what differs from the stage's experiment, e.g. `gpt (steps=200)`
    changes = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key != "trainer.val_check_interval":
            key = key.rsplit(".", 1)[-1].replace("max_steps", "steps")
            changes.append(f"{key}={value}")
    name = f"{stage} ({', '.join(changes)})" if changes else stage
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    cmd = [train_command(), f"experiment=lecture/{stage}",
           f"logger.experiment_name={EXPERIMENT}", f"logger.run_name='{quoted}'",
           "trainer.enable_progress_bar=false", *overrides]
    log = workdir / f"{stage}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with log.open("w") as f:
        # the working directory takes Hydra's outputs/, away from the checkout
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS=str(threads))
        res = subprocess.run(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT)
    took = time.perf_counter() - started
    if res.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print(f"  FAILED (exit {res.returncode}) after {took:.0f}s; end of {log}:", flush=True)
        print("\n".join("    " + line for line in tail), flush=True)
        return False
    print(f"  done in {took:.0f}s", flush=True)
    return True


def stage_of(run) -> str | None:
    """The stage a run trained, from the command line recorded with it."""
    for word in run.data.tags.get("gptlab.command", "").split():
        if word.startswith("experiment=lecture/"):
            stage = word.split("/", 1)[1]
            return stage if stage in STAGES else None
    return None


def collect(client: MlflowClient, train_window: int = TRAIN_WINDOW) -> list[StageResult]:
    """The newest finished run of each stage, in the lecture's order."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    newest: dict[str, object] = {}
    for run in runs:
        stage = stage_of(run)
        if stage is not None and stage not in newest:
            newest[stage] = run
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in [s for s in STAGES if s in newest]:
            run = newest[stage]
            run_id, params = run.info.run_id, run.data.params
            steps = int(params["trainer.max_steps"])
            train = [m.value for m in client.get_metric_history(run_id, "train/loss")
                     if m.step > steps - train_window]
            val = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/loss"))
            sample = Path(client.download_artifacts(run_id, "samples/final.txt", tmp))
            results.append(StageResult(
                stage=stage, run_name=run.info.run_name, run_id=run_id,
                n_params=int(params["n_params"]), steps=steps,
                accelerator=params.get("trainer.accelerator", "?"),
                train_loss=sum(train) / len(train) if train else None,
                val_loss=val[-1][1] if val else None,
                wall_s=(run.info.end_time - run.info.start_time) / 1000,
                sample=sample.read_text(encoding="utf-8"), val_curve=val,
            ))
    return results


def sample_excerpt(text: str, width: int = 70) -> str:
    """The first lines of a sample joined by ' / ', cut to `width`, safe in a table cell."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    excerpt = " / ".join(lines)
    if len(excerpt) > width:
        excerpt = excerpt[: width - 1] + "…"
    return "`" + excerpt.replace("`", "'").replace("|", "\\|") + "`"


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}"


def results_table(results: list[StageResult]) -> str:
    head = ("| stage | parameters | steps | device | train loss | val loss | wall time "
            "| sample (first lines) |\n|---|---:|---:|---|---:|---:|---:|---|\n")
    rows = [
        f"| {r.run_name} | {r.n_params:,} | {r.steps:,} | {r.accelerator} "
        f"| {fmt(r.train_loss)} | {fmt(r.val_loss)} | {r.wall_s:.0f} s "
        f"| {sample_excerpt(r.sample)} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def write_report(results: list[StageResult], out_dir: Path, train_window: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = (
        f"train loss: mean of the logged train/loss over the last {train_window} steps; "
        "val loss: at the last step, on the fixed validation blocks (data.eval_iters "
        "batches); wall time: the MLflow run's duration (training, evaluations, samples and "
        f"checkpoints). Measured on {hardware()}.\n"
    )
    (out_dir / "results.md").write_text(
        "# Lecture progression: results\n\n" + results_table(results) + "\n" + notes,
        encoding="utf-8")
    (out_dir / "results.json").write_text(
        json.dumps([asdict(r) for r in results], indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")
    samples = ["# Final samples (500 characters, temperature 1, seed 1337)\n"]
    for r in results:
        samples.append(f"## {r.run_name}\n\n```text\n{r.sample.strip()}\n```\n")
    (out_dir / "samples.md").write_text("\n".join(samples), encoding="utf-8")
    plot(results, out_dir / "val_loss.png")


def plot(results: list[StageResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if r.val_curve:
            steps, losses = zip(*r.val_curve, strict=True)
            ax.plot(steps, losses, marker="o", markersize=3, label=r.run_name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("Tiny Shakespeare, bigram to GPT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Train the lecture's stages (bigram to GPT) with gptlab-train and "
                    "compare them: a markdown table and a plot of the val-loss curves.")
    p.add_argument("--stages", type=parse_stages, default=STAGES,
                   help=f"comma-separated stages to train (default: all: {','.join(STAGES)})")
    p.add_argument("--steps", type=int, default=None,
                   help="train every stage this many steps instead of its configured number, "
                        "evaluating every steps/10 (a shortened run)")
    p.add_argument("--skip-gpu-sized", action=argparse.BooleanOptionalAction, default=None,
                   help=f"skip the GPU-sized stages ({', '.join(sorted(GPU_SIZED))}); "
                        "default: skip them when no CUDA GPU is available")
    p.add_argument("--seed", type=int, default=1337, help="seed of every stage (default 1337)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per stage (default 1: these models are too small "
                        "to gain from more, and several threads slow down badly when other "
                        "processes share the cores)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra Hydra override for every stage trained, e.g. "
                        "data.eval_iters=20 (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; rebuild the table and plot from the MLflow runs")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's)")
    p.add_argument("--out-dir", type=Path, default=HERE,
                   help="where results.md, results.json, samples.md, val_loss.png go "
                        "(default: this script's folder)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        p.error("--steps must be positive")

    uri = store.resolve_tracking_uri(args.tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per sample
    failed = []
    if not args.report_only:
        skip = args.skip_gpu_sized if args.skip_gpu_sized is not None \
            else not torch.cuda.is_available()
        with tempfile.TemporaryDirectory(prefix="lecture-progression-") as workdir:
            for stage in args.stages:
                if skip and stage in GPU_SIZED:
                    print(f"skipping {stage}: GPU-sized (--no-skip-gpu-sized runs it)")
                    continue
                overrides = stage_overrides(stage, args.steps, args.seed, args.override)
                if not run_stage(stage, overrides, uri, Path(workdir), args.threads):
                    failed.append(stage)

    results = collect(store.connect(uri))
    if not results:
        print(f"no finished runs in experiment {EXPERIMENT!r} of {uri}")
        return 1
    write_report(results, args.out_dir, TRAIN_WINDOW)
    print("\n" + results_table(results))
    print(f"wrote results.md, results.json, samples.md and val_loss.png to {args.out_dir}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
