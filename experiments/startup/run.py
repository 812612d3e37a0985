"""How long each command takes to start, against the floor of importing torch and Lightning.

    python experiments/startup/run.py [--rounds 3] [--work /tmp/gptlab-startup]

Times, best of `--rounds` wall-clock runs of each console script as a user starts it: every
command's `--help`; `gptlab-sample`, `gptlab-eval` and `gptlab-compare` on a store holding one
tiny run; and a one-step tiny `gptlab-train` run on that store. Beside each, which of the
heavy libraries (torch, Lightning, MLflow, scipy, Optuna, tokenizers, datasets, matplotlib) the
command imported, read from `python -X importtime`. The floor is `python -c 'import torch,
pytorch_lightning'` on the same machine, in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEAVY = ("torch", "pytorch_lightning", "mlflow", "scipy", "optuna", "tokenizers", "datasets",
         "matplotlib")
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.block_size=16",
        "data.batch_size=4", "data.eval_iters=2", "trainer.max_steps=1",
        "trainer.val_check_interval=1", "callbacks.sample.max_new_tokens=20",
        "callbacks.final_sample_tokens=30", "trainer.enable_progress_bar=false"]


def best_of(cmd: list[str], rounds: int, env: dict[str, str], cwd: Path) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return min(times)


def heavy_imports(cmd: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    err = subprocess.run(cmd, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True).stderr
    names = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines()
             if line.startswith("import time:")}
    return [h for h in HEAVY if h in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptlab-startup"))
    args = ap.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = os.environ.get("GPTLAB_DATA") or str(
        Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt")
    small = work / "small.txt"
    small.write_text(Path(corpus).read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    text = work / "text.txt"
    text.write_text(Path(corpus).read_text(encoding="utf-8")[:2_000], encoding="utf-8")
    env = dict(os.environ, GPTLAB_DATA=str(small),
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    train = [str(BIN / "gptlab-train"), *TINY]
    subprocess.run(train, env=env, cwd=work, check=True, capture_output=True)  # the store

    rows = [("floor: import torch", [sys.executable, "-c", "import torch"]),
            ("floor: import torch, pytorch_lightning",
             [sys.executable, "-c", "import torch, pytorch_lightning"])]
    rows += [(f"gptlab-{c} --help", [str(BIN / f"gptlab-{c}"), "--help"])
             for c in ("train", "sample", "eval", "compare", "prepare", "server")]
    rows += [("gptlab-sample run_id=latest max_new_tokens=20",
              [str(BIN / "gptlab-sample"), "run_id=latest", "max_new_tokens=20"]),
             ("gptlab-eval run_id=latest text=...",
              [str(BIN / "gptlab-eval"), "run_id=latest", f"text={text}"]),
             ("gptlab-compare", [str(BIN / "gptlab-compare")]),
             ("gptlab-train, one step (tiny)", train)]
    print(f"{'seconds, best of ' + str(args.rounds):<48} {'s':>6}  heavy imports")
    for name, cmd in rows:
        seconds = best_of(cmd, args.rounds, env, work)
        heavy = "" if name.startswith("floor") else " ".join(heavy_imports(cmd, env, work))
        print(f"{name:<48} {seconds:6.2f}  {heavy}", flush=True)


if __name__ == "__main__":
    main()
