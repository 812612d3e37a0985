"""Runs side by side: which runs, the params that differ, their figures, a table and a plot.
Reads through MLflow's client API only, so it works against a remote tracking server as well
as the embedded store. The command line is gptlab.compare."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from gptlab import store
from gptlab.errors import GptlabError

# params that say where or how a run was recorded, not what it trained
_NOT_COMPARED = ("logger.", "hydra.", "callbacks.", "trainer.enable_", "resume",
                 "checkpoint.", "data.path", "data.cache_dir")


def select_runs(client: MlflowClient, experiment: str, sweep: str | None) -> tuple[list[Run], str]:
    """The runs to compare and a title for them."""
    exp_id = store.experiment_id(client, experiment)
    if sweep is None:
        # filtered here: MLflow's `!=` on a tag also drops the runs without that tag
        runs = [r for r in client.search_runs([exp_id], max_results=1000)
                if r.data.tags.get("gptlab.sweep") != "true"]
        title = f"experiment {experiment}"
    else:
        if sweep == "latest":
            parents = client.search_runs([exp_id], "tags.gptlab.sweep = 'true'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
            if not parents:
                raise GptlabError(f"experiment {experiment!r} has no sweep")
            parent = parents[0]
        else:
            parent = store.get_run(client, sweep)
            exp_id = parent.info.experiment_id
        runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
        title = f"{parent.info.run_name} ({parent.info.run_id})"
    if not runs:
        raise GptlabError(f"no runs to compare in {title}")
    return runs, title


def differing_params(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params if not k.startswith(_NOT_COMPARED)})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def summarize(client: MlflowClient, run: Run, keys: Sequence[str]) -> dict[str, Any]:
    val = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_sec")]
    end = run.info.end_time
    return {
        "run": run.info.run_name,
        **{k: _short_value(run.data.params.get(k, "")) for k in keys},
        "best val/loss": min((m.value for m in val), default=float("nan")),
        "final val/loss": val[-1].value if val else float("nan"),
        "steps": max((m.step for m in steps), default=0),
        "tokens/s": statistics.median(speed) if speed else float("nan"),
        "wall time": f"{(end - run.info.start_time) / 1000:.0f}s" if end else "-",
        "status": run.info.status,
        "_curve": [(m.step, m.value) for m in val],
    }


def _short_value(value: str) -> str:
    """`gptlab.models.gpt.GPT` -> `GPT`: class paths are long and only the name differs."""
    return value.rsplit(".", 1)[-1] if value.startswith("gptlab.") else value


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in rows[0] if not c.startswith("_")]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else (f"{v:.4f}" if v < 100 else f"{v:,.0f}")
        return str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], title: str, path: str) -> None:
    # imported here, when a plot is asked for: a table alone should not pay for matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["_curve"]:
            steps, values = zip(*r["_curve"], strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(experiment: str, sweep: str | None = None, plot_path: str | None = None,
            tracking_uri: str | None = None) -> list[dict[str, Any]]:
    client = store.connect(tracking_uri)
    runs, title = select_runs(client, experiment, sweep)
    keys = differing_params(runs)
    rows = sorted((summarize(client, r, keys) for r in runs),
                  key=lambda r: (r["best val/loss"] != r["best val/loss"], r["best val/loss"]))
    print(title)
    print(format_table(rows))
    if plot_path:
        plot(rows, title, plot_path)
        print(f"plot written to {plot_path}")
    return rows
