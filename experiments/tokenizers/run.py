"""What a tokenizer buys at equal compute: characters against byte-level BPE, in bits per
character over the same validation characters, at equal training time on this CPU.

nanoGPT's CPU architecture (4 layers, 4 heads, 128 channels, a block of 64 tokens, batch 12)
with each tokenizer. A short timing run of each (2 threads, one run at a time, no validation)
measures its milliseconds per step; each then trains for as many steps as fit in the time the
char recipe's 2000 steps take, with the recipe's schedule stretched to those steps. Every run
is scored by val/bpc (the first 32,768 characters of the validation split, whatever the
tokenizer) and compared with gptlab's seed grouping (mean, std, Welch's t-test against char).

    python experiments/tokenizers/run.py                     # char, bpe 512, bpe 2048 x 3 seeds
    python experiments/tokenizers/run.py --report-only       # the table and plot again

Writes results.md, results.json, val_bpc.png and samples.md beside this file.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from gptlab.tracking import comparison, store

BASE_STEPS = 2000  # the char recipe's; --base-steps to spend less time


@dataclass
class Study:
    """Tokenizers compared at equal training time on one corpus (the code-corpus study
    runs this one on another corpus)."""

    experiment: str = "tokenizers"
    tokenizers: dict[str, list[str]] = field(default_factory=lambda: {
        "char": [], "bpe512": ["data.tokenizer=bpe", "data.vocab_size=512"],
        "bpe2048": ["data.tokenizer=bpe", "data.vocab_size=2048"]})
    data: list[str] = field(default_factory=list)  # the corpus's data.* overrides
    out: Path = Path(__file__).resolve().parent  # results, plot and samples go here
    command: str = "python experiments/tokenizers/run.py"


def gptlab_train(study: Study, args: list[str]) -> None:
    subprocess.run([str(Path(sys.executable).parent / "gptlab-train"),
                    "experiment=shakespeare_char_cpu", *study.data, *args], check=True,
                   stdout=subprocess.DEVNULL)


def ms_per_step(study: Study, client: MlflowClient, name: str, overrides: list[str],
                steps: int) -> float:
    """Median training ms/step of a short run (logged tokens/s over every 10 steps)."""
    timing = f"{study.experiment}_timing"
    gptlab_train(study, [*overrides, f"trainer.max_steps={steps}",
                         f"trainer.val_check_interval={steps}",
                         f"logger.experiment_name={timing}", f"logger.run_name={name}",
                         "logger.log_model=false", "trainer.enable_progress_bar=false"])
    run = client.search_runs([store.experiment_id(client, timing)],
                             f"attributes.run_name = '{name}'", max_results=1)[0]
    speeds = [m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_sec")]
    return 1000 * 12 * 64 / statistics.median(speeds[2:])  # past the first interval's warm-up


def data_module(study: Study, overrides: list[str]):  # noqa: ANN201 - a CorpusDataModule
    """The data module a run of the study sets up (its corpus already prepared)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from gptlab import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shakespeare_char_cpu", *study.data,
                                          *overrides])
    dm = instantiate(cfg.data)
    dm.setup()
    return dm


def chars_per_token(study: Study, overrides: list[str]) -> float:
    """Characters a token of this tokenizer spells on the training split (its end-of-text
    tokens aside)."""
    dm = data_module(study, overrides)
    ids = [i for i in dm.train_data.head(200_000).tolist() if i != dm.prepared.eot]
    return len(dm.tokenizer.decode(ids)) / len(ids)


def plan(study: Study, client: MlflowClient, timing_steps: int, base_steps: int,
         timed: dict[str, dict] | None = None) -> dict[str, dict]:
    """Each tokenizer's speed (timed now, or as `timed` says) and its steps."""
    out = timed or {}
    for name, overrides in study.tokenizers.items():
        if name not in out:
            out[name] = {"ms_per_step": ms_per_step(study, client, name, overrides,
                                                    timing_steps),
                         "chars_per_token": chars_per_token(study, overrides)}
    base = out["char"]["ms_per_step"] * base_steps
    for p in out.values():
        p["steps"] = int(round(base / p["ms_per_step"], -1))
    return out


def train(study: Study, settings: dict[str, dict], seeds: list[int]) -> None:
    for name, overrides in study.tokenizers.items():
        steps = settings[name]["steps"]
        for seed in seeds:
            gptlab_train(study, [*overrides, f"seed={seed}", f"trainer.max_steps={steps}",
                                 f"trainer.val_check_interval={max(10, steps // 8)}",
                                 f"logger.experiment_name={study.experiment}",
                                 f"logger.run_name={name}", "trainer.enable_progress_bar=false"])


def collect(study: Study, client: MlflowClient, settings: dict[str, dict]
            ) -> tuple[list, list]:
    runs = [r for r in client.search_runs([store.experiment_id(client, study.experiment)],
                                          "attributes.status = 'FINISHED'", max_results=500)]
    rows = [comparison.summarize(client, r, []) for r in runs]
    for row, run in zip(rows, runs, strict=True):
        row["_params"] = {"tokenizer": run.info.run_name}
        row["_run"] = run
    groups = comparison.groups(rows, ["tokenizer"], baseline="tokenizer=char",
                               metric="val/bpc")
    for g in groups:
        name = g["group"].removeprefix("tokenizer=")
        g["tokenizer"] = name
        members = [r for r in rows if r["_params"]["tokenizer"] == name]
        g["steps"] = members[0]["steps"]
        # speeds from the timing runs, made one at a time on a quiet machine: the runs'
        # own figures depend on what else the machine ran meanwhile
        g["tokens/s"] = 1000 * 12 * 64 / settings[name]["ms_per_step"]
        g["ms/step"] = settings[name]["ms_per_step"]
        g["chars/s"] = g["tokens/s"] * settings[name]["chars_per_token"]
        g["best_run"] = min(members, key=lambda r: r["best val/bpc"])["_run"]
    return rows, groups


def table(study: Study, groups: list[dict], settings: dict[str, dict]) -> str:
    lines = ["| tokenizer | chars/token | block covers (chars) | steps | runs | "
             "val bpc (mean +- std) | vs char | p (Welch) | tokens/s | chars/s | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in sorted(groups, key=lambda g: list(study.tokenizers).index(g["tokenizer"])):
        s = settings[g["tokenizer"]]
        p = g["p (Welch)"]
        lines.append(
            f"| {g['tokenizer']} | {s['chars_per_token']:.2f} | "
            f"{64 * s['chars_per_token']:.0f} | {g['steps']} | {g['runs']} | "
            f"{g['best val/bpc']:.4f} +- {g['best std']:.4f} | "
            + ("-" if g["tokenizer"] == "char" else f"{g['diff']:+.4f}") + " | "
            + ("-" if math.isnan(p) else f"{p:.3g}{' *' if p < 0.05 else ''}") + " | "
            f"{g['tokens/s']:,.0f} | {g['chars/s']:,.0f} | {g['ms/step']:.1f} |")
    return "\n".join(lines)


def samples(study: Study, client: MlflowClient, groups: list[dict], scratch: Path) -> str:
    out = ["# Samples: the final sample of each tokenizer's best run\n"]
    for g in sorted(groups, key=lambda g: list(study.tokenizers).index(g["tokenizer"])):
        run = g["best_run"]
        text = Path(client.download_artifacts(run.info.run_id, "samples/final.txt",
                                              str(scratch))).read_text()
        bpc = min(m.value for m in client.get_metric_history(run.info.run_id, "val/bpc"))
        out.append(f"## {g['tokenizer']} (seed {run.data.params['seed']}, val bpc {bpc:.4f})"
                   f"\n\n```\n{text[:700]}\n```\n")
    return "\n".join(out)


def main(argv: list[str] | None = None, study: Study | None = None) -> None:
    study = study or Study()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--timing-steps", type=int, default=200)
    ap.add_argument("--base-steps", type=int, default=BASE_STEPS,
                    help="the char run's steps; the others get as much time")
    ap.add_argument("--report-only", action="store_true", help="read the runs again")
    ap.add_argument("--reuse-timing", action="store_true",
                    help="the speeds of settings.json, from an earlier timing on this machine")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--threads", help="threads per run (one thread is steadier on a "
                                       "machine that runs other work too)")
    args = ap.parse_args(argv)
    if args.threads:  # torch's threads in each training run
        os.environ["OMP_NUM_THREADS"] = args.threads
    uri = store.resolve_tracking_uri(args.tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    client = store.connect(uri)
    settings_file = study.out / "settings.json"
    start = time.time()
    if args.report_only:
        settings = json.loads(settings_file.read_text())
    else:
        timed = json.loads(settings_file.read_text()) if args.reuse_timing else None
        settings = plan(study, client, args.timing_steps, args.base_steps, timed)
        settings_file.write_text(json.dumps(settings, indent=2) + "\n")
        train(study, settings, args.seeds)
    rows, groups = collect(study, client, settings)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    text = (f"`{study.command}` (experiment `{study.experiment}`), "
            f"{machine}, one run at a time with {args.threads or 2} thread(s)"
            + ("" if args.report_only else f", {(time.time() - start) / 60:.0f} min in all")
            + f"\n\n{table(study, groups, settings)}\n\n* p < 0.05. Steps: as many as the char "
            f"run's {settings['char']['steps']} take, from each tokenizer's ms/step in a "
            f"{args.timing_steps}-step timing run (tokens/s, chars/s and ms/step are that "
            f"run's; chars/token on the training split).\n")
    (study.out / "results.md").write_text(text)
    (study.out / "results.json").write_text(json.dumps(
        [{k: v for k, v in g.items() if not k.startswith("_") and k != "best_run"}
         for g in groups], indent=2, default=str) + "\n")
    comparison.plot(rows, "val/bpc by tokenizer at equal training time (band: one std)",
                    str(study.out / "val_bpc.png"), groups, metric="val/bpc")
    with store.scratch() as scratch:
        (study.out / "samples.md").write_text(samples(study, client, groups, scratch))
    print(text)


if __name__ == "__main__":
    main()
