"""Runs side by side: which runs, the params that differ, their figures, groups of repeated
runs with their statistics, a table and a plot. Reads through MLflow's client API only, so it
works against a remote tracking server as well as the embedded store. The command line is
gptlab.cli.compare.

Runs that differ only in `seed` (or agree on the keys named with `--by`) form a group. A
group shows how many runs it has, the mean and standard deviation of their best and final
val/loss, a 95% confidence interval of the mean best val/loss (Student's t), tokens/s and
ms/step; against a baseline group, the difference of the means and the p-value of Welch's
t-test, which does not assume equal variances.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from scipy import stats

from gptlab.errors import GptlabError
from gptlab.tracking import store

# what varies between repeats of the same setting
REPEAT_KEYS = ("seed",)
# what follows from other params, so never tells settings apart by itself
DERIVED = ("n_params", "n_params_non_embedding", "flops_per_token", "vocab_size", "model.class")


def select_runs(client: MlflowClient, experiment: str, sweep: str | None) -> tuple[list[Run], str]:
    """The runs to compare and a title for them."""
    exp_id = store.experiment_id(client, experiment)
    if sweep is None:
        # filtered here: MLflow's `!=` on a tag also drops the runs without that tag
        runs = [r for r in client.search_runs([exp_id], max_results=5000)
                if r.data.tags.get("gptlab.sweep") != "true"]
        title = f"experiment {experiment}"
    else:
        parent = find_sweep(client, exp_id, experiment, sweep)
        runs = sweep_children(client, parent)
        title = f"{parent.info.run_name} ({parent.info.run_id})"
    if not runs:
        raise GptlabError(f"no runs to compare in {title}")
    return runs, title


def find_sweep(client: MlflowClient, exp_id: str, experiment: str, sweep: str) -> Run:
    if sweep != "latest":
        return store.get_run(client, sweep)
    parents = client.search_runs([exp_id], "tags.gptlab.sweep = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise GptlabError(f"experiment {experiment!r} has no sweep")
    return parents[0]


def sweep_children(client: MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=5000)


def differing_params(runs: Sequence[Run]) -> list[str]:
    # best.*: results a sweep's parent records, not settings
    keys = sorted({k for r in runs for k in r.data.params
                   if store.changes_training(k) and not k.startswith("best.")})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


METRICS = ("val/loss", "val/bpc")


def default_metric(runs: Sequence[Run]) -> str:
    """val/loss, unless the runs tokenize differently: losses per token do not compare
    across tokenizers, bits per character over the same characters do."""
    return "val/bpc" if len({tokenizer_of(r) for r in runs}) > 1 else "val/loss"


def tokenizer_of(run: Run) -> tuple[str, str | None]:
    """A run's tokenizer and, for BPE, its vocabulary size. A char tokenizer's vocabulary is
    its corpus's characters: whether its (null) vocab_size was recorded, as the whole config
    of a failed job is, changes nothing."""
    kind = run.data.params.get("data.tokenizer", "char")
    return (kind, None) if kind == "char" else (kind, run.data.params.get("data.vocab_size"))


def summarize(client: MlflowClient, run: Run, keys: Sequence[str]) -> dict[str, Any]:
    val = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    bpc = sorted(client.get_metric_history(run.info.run_id, "val/bpc"), key=lambda m: m.step)
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    speed = [m.value for m in client.get_metric_history(run.info.run_id, "tokens_per_sec")]
    end = run.info.end_time
    p = run.data.params
    batch_tokens = _number(p.get("data.batch_size")) * _number(p.get("data.block_size"))
    tok_s = statistics.median(speed) if speed else math.nan
    return {
        "run": run.info.run_name,
        **{k: _short_value(p.get(k, "")) for k in keys},
        "best val/loss": min((m.value for m in val), default=math.nan),
        "final val/loss": val[-1].value if val else math.nan,
        "best val/bpc": min((m.value for m in bpc), default=math.nan),
        "_final val/bpc": bpc[-1].value if bpc else math.nan,
        "steps": max((m.step for m in steps), default=0),
        "tokens/s": tok_s,
        "ms/step": 1000 * batch_tokens / tok_s if not math.isnan(tok_s) and tok_s > 0 else math.nan,
        "wall time": f"{(end - run.info.start_time) / 1000:.0f}s" if end else "-",
        "status": run.info.status,
        "_params": dict(p),
        "_flops": run.data.metrics.get("flops", math.nan),  # compute trained, for --scaling
        "_curve": [(m.step, m.value) for m in val],
        "_curve val/bpc": [(m.step, m.value) for m in bpc],
    }


def _number(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _short_value(value: str) -> str:
    """`gptlab.models.gpt.GPT` -> `GPT`: class paths are long and only the name differs."""
    return value.rsplit(".", 1)[-1] if value.startswith("gptlab.") else value


# -- groups ------------------------------------------------------------------------------------

def group_keys(runs: Sequence[Run], by: Sequence[str] | None) -> list[str]:
    """What defines a group: the keys named, or every differing param but the seed."""
    if by:
        known = {k for r in runs for k in r.data.params}
        missing = [k for k in by if k not in known]
        if missing:
            raise GptlabError(f"no run has {', '.join(missing)} (--by takes param names such "
                              f"as {', '.join(sorted(known)[:5])})")
        return list(by)
    return [k for k in differing_params(runs) if k not in REPEAT_KEYS + DERIVED]


def group_name(params: dict[str, str], keys: Sequence[str]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_short_value(params.get(k, '-'))}"
                    for k in keys) or "all"


def named_group(name: str) -> str:
    """A group's name as the table shows it, given with its keys as --by takes them
    (`model.pos_emb=learned`) or as the table shows them (`pos_emb=learned`)."""
    pairs = [pair.partition("=") for pair in name.split()]
    if not pairs or not all(eq for _, eq, _ in pairs):
        return name
    return group_name({k: v for k, _, v in pairs}, [k for k, _, _ in pairs])


def baseline_group(baseline: str | None, groups: Sequence[str]) -> str | None:
    """--baseline as the name of one of `groups` (named_group), or a one-line refusal."""
    if baseline is None or baseline in groups:
        return baseline
    if named_group(baseline) in groups:
        return named_group(baseline)
    raise GptlabError(f"--baseline {named_group(baseline)!r} names no group (groups: "
                      f"{', '.join(sorted(groups))})")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def confidence_interval(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the confidence interval of the mean (Student's t)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return math.nan
    t = stats.t.ppf(0.5 + level / 2, len(values) - 1)
    return t * statistics.stdev(values) / math.sqrt(len(values))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test that two groups have the same mean."""
    a, b = [v for v in a if not math.isnan(v)], [v for v in b if not math.isnan(v)]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def by_metric(row: dict[str, Any], metric: str) -> tuple[float, float, list]:
    """A run's best and final value of `metric`, and its curve."""
    if metric == "val/loss":
        return row["best val/loss"], row["final val/loss"], row["_curve"]
    return row["best val/bpc"], row["_final val/bpc"], row["_curve val/bpc"]


def groups(rows: Sequence[dict[str, Any]], keys: Sequence[str], baseline: str | None = None,
           metric: str = "val/loss") -> list[dict[str, Any]]:
    """One row per group: size, means and spreads of `metric`, interval, speed; against the
    baseline, the difference of mean best values and Welch's p-value."""
    members: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        members.setdefault(group_name(row["_params"], keys), []).append(row)
    baseline = baseline_group(baseline, members)
    out = []
    for name, rs in members.items():
        best, final, curves = zip(*(by_metric(r, metric) for r in rs), strict=True)
        (bm, bs), (fm, fs) = mean_std(best), mean_std(final)
        g = {"group": name, "runs": len(rs), f"best {metric}": bm, "best std": bs,
             "95% CI +-": confidence_interval(best), f"final {metric}": fm, "final std": fs,
             "tokens/s": mean_std([r["tokens/s"] for r in rs])[0],
             "ms/step": mean_std([r["ms/step"] for r in rs])[0],
             "_best": list(best), "_curves": list(curves)}
        if baseline is not None:
            base = [by_metric(r, metric)[0] for r in members[baseline]]
            g["diff"] = bm - mean_std(base)[0]
            g["p (Welch)"] = math.nan if name == baseline else welch_p(best, base)
        out.append(g)
    key = f"best {metric}"
    return sorted(out, key=lambda g: (g[key] != g[key], g[key]))


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]
               ) -> tuple[list[int], list[float], list[float]]:
    """Steps every run of a group validated at, with the mean and standard deviation."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(s for s, vs in by_step.items() if len(vs) == len(curves))
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(curves) > 1 else 0.0 for s in steps]
    return steps, means, stds


# -- output ------------------------------------------------------------------------------------

def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [c for c in rows[0] if not c.startswith("_")]

    def fmt(c: str, v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if c.startswith("p ("):
                return f"{v:.3g}"
            if c == "diff":
                return f"{v:+.4f}"
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], title: str, path: str,
         grouped: Sequence[dict[str, Any]] | None = None, metric: str = "val/loss") -> None:
    """`metric` against step: each run, or each group's mean with a band of one std."""
    # imported here, when a plot is asked for: a table alone should not pay for matplotlib
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if grouped:
        for g in grouped:
            steps, means, stds = mean_curve(g["_curves"])
            if steps:
                line, = ax.plot(steps, means, marker="o", markersize=3,
                                label=f"{g['group']} (n={g['runs']})")
                ax.fill_between(steps, [m - s for m, s in zip(means, stds, strict=True)],
                                [m + s for m, s in zip(means, stds, strict=True)],
                                color=line.get_color(), alpha=0.2)
    else:
        for r in rows:
            curve = by_metric(r, metric)[2]
            if curve:
                steps, values = zip(*curve, strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel(metric + (" (mean, band: one std)" if grouped else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# what sets a run's size: runs that differ only in these (and seeds) are one group's sizes
SIZE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "trainer.max_steps",
             "optim.warmup_steps", "optim.decay_steps", "trainer.val_check_interval")


def scaling_points(rows: Sequence[dict[str, Any]], runs: Sequence[Run],
                   by: Sequence[str] | None, metric: str
                   ) -> tuple[dict[str, list[tuple[float, float]]], list[str]]:
    """(compute, best `metric`) of each finished run, by group: the keys named, or every
    differing param but the seed and what sets a run's size. A run that failed, was killed or
    still runs stopped short of its schedule: its loss is not its size's, so it is left out,
    and said so on stderr."""
    unfinished = Counter(r["status"] for r in rows if r["status"] != store.FINISHED)
    if unfinished:
        rows = [r for r in rows if r["status"] == store.FINISHED]
        runs = [r for r in runs if r.info.status == store.FINISHED]  # nor do their params group
        if not rows:
            raise GptlabError("no finished runs to fit")
        print(f"left out {sum(unfinished.values())} runs that did not finish ("
              + ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items())) + ")",
              file=sys.stderr)
    keys = group_keys(runs, by)
    if not by:
        keys = [k for k in keys if k not in SIZE_KEYS]
    missing = [r["run"] for r in rows if math.isnan(r["_flops"])]
    if missing:
        raise GptlabError(f"{len(missing)} runs have no compute recorded (the flops metric; "
                          f"runs trained before gptlab recorded it): {', '.join(missing[:5])}")
    points: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        best = by_metric(r, metric)[0]
        if not math.isnan(best):
            points.setdefault(group_name(r["_params"], keys), []).append((r["_flops"], best))
    return points, keys


def scaling_report(client: MlflowClient, rows: Sequence[dict[str, Any]], runs: Sequence[Run],
                   title: str, by: Sequence[str] | None, baseline: str | None, metric: str,
                   draws: int, plot_path: str | None, parent: Run | None) -> str:
    """Fit each group's law, print it (and the multipliers against `baseline`), plot it, and
    keep both on the sweep's parent run."""
    from gptlab.tracking import scaling

    points, keys = scaling_points(rows, runs, by, metric)
    baseline = baseline_group(baseline, list(points))
    fits = scaling.fit_groups(points, draws)
    text = (f"{title}\n{metric} = E + A C^-alpha by {', '.join(keys) or 'nothing'} "
            f"(C: training FLOPs; [95% interval over {draws} bootstrap draws of the seeds])\n"
            + format_table(scaling.fit_table(fits)))
    if baseline is not None and len(fits) > 1:
        text += (f"\n\ncompute multipliers against {baseline}: the baseline's compute to "
                 "reach each group's loss, over the group's, at the baseline's sizes\n"
                 + format_table(scaling.multiplier_table(fits, baseline)))
    print(text)
    if plot_path:
        scaling.plot(fits, f"{title}: {metric} against compute", f"best {metric}", plot_path)
        print(f"plot written to {plot_path}")
    if parent is not None:
        client.log_text(parent.info.run_id, text + "\n", "scaling.txt")
        if plot_path:
            client.log_artifact(parent.info.run_id, plot_path)
    return text


def compare(experiment: str, sweep: str | None = None, plot_path: str | None = None,
            tracking_uri: str | None = None, by: Sequence[str] | None = None,
            baseline: str | None = None, metric: str | None = None, scaling: bool = False,
            draws: int = 200) -> dict[str, list[dict[str, Any]]]:
    """Print the runs (and their groups, where runs repeat a setting) and plot them, ranked
    by `metric` (default: val/loss, or val/bpc where the runs' tokenizers differ); with
    `scaling`, each group's loss against compute instead (tracking/scaling.py)."""
    client = store.connect(tracking_uri)
    runs, title = select_runs(client, experiment, sweep)
    metric = metric or default_metric(runs)
    keys = differing_params(runs)
    rows = sorted((summarize(client, r, keys) for r in runs),
                  key=lambda r: (by_metric(r, metric)[0] != by_metric(r, metric)[0],
                                 by_metric(r, metric)[0]))
    if scaling:
        parent = (find_sweep(client, store.experiment_id(client, experiment), experiment,
                             sweep) if sweep else None)
        text = scaling_report(client, rows, runs, title, by, baseline, metric, draws,
                              plot_path, parent)
        return {"runs": rows, "groups": [], "scaling": [text]}
    gkeys = group_keys(runs, by)
    grouped = groups(rows, gkeys, baseline, metric)
    repeated = bool(by) or baseline is not None or any(g["runs"] > 1 for g in grouped)
    print(title)
    print(format_table(rows))
    if repeated:
        print(f"\ngroups by {', '.join(gkeys) or 'nothing'} (runs that differ only in "
              f"{', '.join(REPEAT_KEYS)} repeat a setting)")
        print(format_table(grouped))
    if plot_path:
        plot(rows, title, plot_path, grouped if repeated else None, metric)
        print(f"plot written to {plot_path}")
    return {"runs": rows, "groups": grouped if repeated else []}
