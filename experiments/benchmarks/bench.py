"""Training throughput of gptlab's path (Lightning + MLflow) against a plain PyTorch loop over
the same model, batches and optimizer; the cost of MLflow logging; generation speed with and
without the KV cache; peak memory. Prints a table and writes it as JSON.

    python experiments/benchmarks/bench.py                  # full run (~10 min on 2 cores)
    python experiments/benchmarks/bench.py --smoke          # a few steps, for the test suite
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gptlab import CONF_DIR
from gptlab.models.gpt import GPT
from gptlab.run.record import Job, run_job
from gptlab.run.training import build_lit, build_model, train

RECIPES = {
    # name: (overrides, steps on CPU)
    "bigram": (["experiment=bigram"], 2000),
    "shakespeare_char_cpu": (["experiment=shakespeare_char_cpu"], 200),
    "shakespeare_char": (["experiment=shakespeare_char"], 30),
}
WARMUP = 10  # steps left out of every timing


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())
        self.loss = outputs["loss"].detach()  # read once training ends: no sync per step


_timer = StepTimer()


def timed_trainer(**kwargs) -> pl.Trainer:
    """Stands in for pytorch_lightning.Trainer in the config, adding the step timer."""
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), _timer]
    return pl.Trainer(**kwargs)


def step_ms(times: list[float], last_loss: float) -> dict[str, float]:
    """Median and mean time per step after the warm-up (the mean includes the logging steps
    and MLflow flushes), how many steps ran, and the loss of the last: every path trains the
    same model on the same batches, so the last losses agree."""
    deltas = [b - a for a, b in zip(times[WARMUP:], times[WARMUP + 1:], strict=False)]
    return {"median": 1000 * statistics.median(deltas), "mean": 1000 * statistics.mean(deltas),
            "steps": len(times), "last_loss": last_loss}


def compose_cfg(overrides: list[str], store_dir: Path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{store_dir / 'mlflow.db'}"
        cfg.logger.experiment_name = "benchmarks"
    return cfg


def gptlab_step_ms(overrides: list[str], steps: int, logger: bool, tmp: Path
                   ) -> dict[str, float]:
    # validations (with their samples and checkpoints) four times, as a run has them: a step
    # slowed by what a validation leaves behind shows in the median, the validation itself not
    over = [*overrides, f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={max(1, steps // 4)}",
            f"trainer._target_={__name__}.timed_trainer", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "callbacks.final_sample_tokens=1",
            f"logger={'mlflow' if logger else 'none'}"]
    cfg = compose_cfg(over, tmp / "mlruns")
    job = Job(cfg=cfg, overrides=over, output_dir=tmp / "out", command="bench",
              run_name="bench")
    _timer.times.clear()
    with run_job(job) as run:
        run.best, run.sample = train(job, run.record, run.stop)
    if run.outcome.error is not None:
        raise run.outcome.error
    return step_ms(_timer.times, _timer.loss.item())


def plain_step_ms(overrides: list[str], steps: int, tmp: Path, device: str
                  ) -> dict[str, float]:
    """The bare loop: same data module, model init, optimizer groups, schedule, clipping."""
    cfg = compose_cfg(overrides, tmp / "mlruns")
    cfg.optim.decay_steps = cfg.optim.decay_steps or cfg.trainer.max_steps
    pl.seed_everything(cfg.seed, verbose=False)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    model, _, _ = build_model(cfg.model, dm.vocab_size, dm.block_size)
    lit = build_lit(cfg, model, False, {})
    model = lit.model.to(device)
    opt_cfg = lit.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    batches = iter(dm.train_dataloader())
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    times = []
    for _ in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return step_ms(times, loss.item())


def interleaved(overrides: list[str], steps: int, tmp: Path, device: str, rounds: int
                ) -> list[list[dict[str, float]]]:
    """Step times of the plain loop, gptlab and gptlab without MLflow, `rounds` of each,
    taken in turn with the order rotating, so that the drifts in speed of a shared machine
    fall on all three alike."""
    paths = [lambda: plain_step_ms(overrides, steps, tmp, device),
             lambda: gptlab_step_ms(overrides, steps, True, tmp),
             lambda: gptlab_step_ms(overrides, steps, False, tmp)]
    timings: list[list[dict[str, float]]] = [[{} for _ in range(rounds)] for _ in paths]
    for r in range(rounds):
        for i in range(len(paths)):
            k = (i + r) % len(paths)
            timings[k][r] = paths[k]()
    return timings


def training_row(name: str, steps: int, tokens: int, timings: list[list[dict[str, float]]]
                 ) -> dict:
    """Medians over the rounds; the overheads are medians of each round's own ratios, which
    compare timings taken minutes apart at most."""
    plain, gptlab, no_mlflow = timings
    row: dict = {"recipe": name, "steps": steps, "rounds": len(plain),
                 "steps_run": {k: [t["steps"] for t in ts] for k, ts in
                               zip(("plain", "gptlab", "gptlab_no_mlflow"), timings, strict=True)},
                 "last_loss": {k: [t["last_loss"] for t in ts] for k, ts in
                               zip(("plain", "gptlab", "gptlab_no_mlflow"), timings, strict=True)}}
    for stat in ("median", "mean"):
        p, g, n = (statistics.median(t[stat] for t in ts) for ts in timings)
        row[stat] = {
            "plain_ms": round(p, 3), "gptlab_ms": round(g, 3), "gptlab_no_mlflow_ms": round(n, 3),
            "plain_tok_s": round(1000 * tokens / p), "gptlab_tok_s": round(1000 * tokens / g),
            "overhead_pct": round(100 * statistics.median(
                b[stat] / a[stat] - 1 for a, b in zip(plain, gptlab, strict=True)), 1),
            "mlflow_cost_pct": round(100 * statistics.median(
                b[stat] / a[stat] - 1 for a, b in zip(no_mlflow, gptlab, strict=True)), 1),
        }
    return row


# (window policy, position embeddings) pairs timed: both policies of the GPT with learned
# positions, and the rotary model's `shift`, which keeps its cache as the window slides
GENERATION = {"half": ("half", "learned"), "slide": ("slide", "learned"),
              "rope_slide": ("slide", "rope"), "rope_shift": ("shift", "rope")}


def generation(new_tokens: int, device: str, rounds: int) -> dict:
    """Tokens/s generating `new_tokens` from a one-token prompt with a `shakespeare_char`-sized
    GPT, with the KV cache and recomputing the context, under each window policy
    (GPT.generate): the median of `rounds` timings taken in turn."""
    models = {}
    for pos_emb in ("learned", "rope"):
        torch.manual_seed(0)
        models[pos_emb] = GPT(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384,
                              pos_emb=pos_emb).to(device).eval()
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    configs = [(name, kv) for name in GENERATION for kv in (True, False)]
    rates: dict[tuple[str, bool], list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for name, kv in configs:
            window, pos_emb = GENERATION[name]
            start = time.perf_counter()
            models[pos_emb].generate(idx, new_tokens, kv_cache=kv, window=window)
            if device == "cuda":
                torch.cuda.synchronize()
            rates[name, kv].append(new_tokens / (time.perf_counter() - start))
    out: dict = {"new_tokens": new_tokens, "block_size": 256, "rounds": rounds}
    for name in GENERATION:
        cached, plain = (statistics.median(rates[name, kv]) for kv in (True, False))
        out[name] = {"kv_cache_tok_s": round(cached, 1), "no_cache_tok_s": round(plain, 1),
                     "speedup": round(cached / plain, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps only (for tests)")
    ap.add_argument("--out", default="experiments/benchmarks/results.json")
    ap.add_argument("--recipes", nargs="*", default=None, help="subset of " + ", ".join(RECIPES))
    ap.add_argument("--rounds", type=int, default=5,
                    help="timings per path, interleaved; the median is reported")
    ap.add_argument("--no-generation", action="store_true",
                    help="time training only (the generation timings take minutes)")
    ap.add_argument("overrides", nargs="*",
                    help="gptlab-train overrides for every recipe, e.g. "
                         "logger.system_metrics=false to time gptlab without them")
    args = ap.parse_args(argv)
    rounds = 1 if args.smoke else args.rounds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.recipes or [r for r in RECIPES if device == "cuda" or r != "shakespeare_char"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in names:
            overrides, steps = RECIPES[name]
            overrides = [*overrides, *args.overrides]
            if device == "cpu":
                overrides = [*overrides, "trainer=cpu"]
            steps = WARMUP + 5 if args.smoke else steps
            timings = interleaved(overrides, steps, tmp, device, rounds)
            cfg = compose_cfg(overrides, tmp)
            rows.append(training_row(name, steps, cfg.data.batch_size * cfg.data.block_size,
                                     timings))
    gen = {} if args.no_generation else generation(20 if args.smoke else 500, device, rounds)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = {
        "machine": {"device": torch.cuda.get_device_name() if device == "cuda" else cpu,
                    "torch": torch.__version__, "python": platform.python_version()},
        "training": rows, "generation": gen,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if device == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return result


def print_table(result: dict) -> None:
    cols = ["plain_ms", "gptlab_ms", "gptlab_no_mlflow_ms", "overhead_pct", "mlflow_cost_pct",
            "gptlab_tok_s"]
    print(" | ".join(["recipe", "step", *cols]))
    for row in result["training"]:
        for stat in ("median", "mean"):
            print(" | ".join([row["recipe"], stat, *(str(row[stat][c]) for c in cols)]))
    g = result["generation"]
    for name, (window, pos_emb) in GENERATION.items() if g else ():
        print(f"generation, window={window}, {pos_emb} positions ({g['new_tokens']} tokens, "
              f"10.7M-param GPT, block {g['block_size']}): {g[name]['kv_cache_tok_s']} tok/s "
              f"with KV cache, {g[name]['no_cache_tok_s']} without ({g[name]['speedup']}x)")
    print(f"peak RSS {result['peak_rss_mb']} MB  on {result['machine']['device']}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
