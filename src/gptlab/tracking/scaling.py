"""Loss against compute: a saturating power law per group of runs, its confidence intervals
over seeds, and what an idea is worth in compute against a baseline.

    L(C) = E + A C^(-alpha)

fitted to each run's best validation loss L and its training compute C (FLOPs, recorded by
every run: models/compute.py), robustly, as Besiroglu et al. (2024) refit Chinchilla: a Huber
loss (delta 1e-3) on the difference of log losses, E and A fitted through their logarithms,
from a grid of starting points, the best fit kept. Intervals come from the bootstrap: at each
size the seeds are drawn again with replacement and the law fitted again.

A group's *compute multiplier* at compute C is how much more compute the baseline needs to
reach the loss the group's law gives at C: C_base(L_group(C)) / C, where C_base(L) inverts
the baseline's law. Above 1 the idea saves compute; infinite where the group's loss is below
anything the baseline's law reaches (its E).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gptlab.errors import GptlabError

DELTA = 1e-3  # Huber's delta on log-loss residuals (Besiroglu et al. 2024)
MIN_SIZES = 3  # three parameters: fewer sizes cannot tell them apart


@dataclass(frozen=True)
class Law:
    E: float  # the irreducible loss
    A: float
    alpha: float

    def loss(self, compute: float) -> float:
        return self.E + self.A * compute ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which this law reaches `loss`; infinite below E."""
        if loss <= self.E:
            return math.inf
        return (self.A / (loss - self.E)) ** (1 / self.alpha)


def fit(compute: Sequence[float], loss: Sequence[float], start: Law | None = None) -> Law:
    """The law through (compute, loss) points, Huber on log-loss: the best fit from a grid of
    starting points, or from `start` alone (a bootstrap draw starts from the point fit)."""
    from scipy.optimize import least_squares

    log_c, log_l = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
    scale = float(np.exp(log_c.mean()))  # C measured in units of its geometric mean
    x = log_c - math.log(scale)
    top = math.log(float(np.exp(log_l.min())))  # E below every loss measured

    def residuals(theta: np.ndarray) -> np.ndarray:
        e, a, alpha = theta
        return np.logaddexp(e, a - alpha * x) - log_l

    if start is None:
        starts = itertools.product((top + math.log(f) for f in (0.1, 0.5, 0.9)),
                                   (-2.0, 0.0, 1.0), (0.1, 0.3, 0.7))
    else:  # the same law in these units, kept inside the bounds
        starts = [(min(math.log(start.E), top - 1e-6),
                   math.log(start.A) - start.alpha * math.log(scale), start.alpha)]
    best = None
    for x0 in starts:
        result = least_squares(residuals, x0=list(x0), loss="huber", f_scale=DELTA,
                               bounds=([-10.0, -20.0, 1e-3], [top, 20.0, 3.0]))
        if best is None or result.cost < best.cost:
            best = result
    e, a, alpha = best.x
    # A in the units of C itself: A' (C/scale)^-alpha = (A' scale^alpha) C^-alpha
    return Law(E=math.exp(e), A=math.exp(a + alpha * math.log(scale)), alpha=float(alpha))


def multiplier(base: Law, law: Law, compute: float) -> float:
    """How many times `compute` the baseline needs to reach what `law` reaches at `compute`."""
    return base.compute_for(law.loss(compute)) / compute


def by_size(points: Sequence[tuple[float, float]]) -> dict[float, list[float]]:
    """Losses (one per seed) by compute, runs of the same size together (compute agreeing to
    6 significant digits: seeds of one setting train on the same number of tokens)."""
    sizes: dict[float, list[float]] = {}
    for compute, loss in points:
        sizes.setdefault(float(f"{compute:.6g}"), []).append(loss)
    return dict(sorted(sizes.items()))


def check_points(name: str, sizes: Mapping[float, Sequence[float]], intervals: bool) -> None:
    if len(sizes) < MIN_SIZES:
        raise GptlabError(f"group {name} has runs at {len(sizes)} compute sizes; a scaling fit "
                          f"needs at least {MIN_SIZES}")
    if intervals and all(len(losses) < 2 for losses in sizes.values()):
        raise GptlabError(f"group {name} has one seed at each size: intervals need repeated "
                          "seeds (or --bootstrap 0 for fits without intervals)")


def bootstrap(sizes: Mapping[float, Sequence[float]], draws: int, start: Law,
              seed: int = 0) -> list[Law]:
    """The law fitted again, from `start`, to `draws` resamples of the seeds at each size."""
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(draws):
        compute, loss = [], []
        for c, losses in sizes.items():
            picked = rng.choice(np.asarray(losses, float), size=len(losses), replace=True)
            compute += [c] * len(picked)
            loss += picked.tolist()
        laws.append(fit(compute, loss, start))
    return laws


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The bootstrap's percentile interval."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


@dataclass
class GroupFit:
    name: str
    sizes: dict[float, list[float]]
    law: Law
    draws: list[Law]


def fit_groups(points: Mapping[str, Sequence[tuple[float, float]]], draws: int = 200,
               seed: int = 0) -> list[GroupFit]:
    """Each group's law and its bootstrap draws."""
    out = []
    for name, pts in points.items():
        sizes = by_size(pts)
        check_points(name, sizes, draws > 0)
        compute = [c for c, losses in sizes.items() for _ in losses]
        loss = [v for losses in sizes.values() for v in losses]
        law = fit(compute, loss)
        out.append(GroupFit(name, sizes, law,
                            bootstrap(sizes, draws, law, seed) if draws else []))
    return out


def multipliers(base: GroupFit, group: GroupFit) -> list[tuple[float, float, float, float]]:
    """At each size the baseline was measured: (compute, multiplier, interval low, high); the
    interval pairs the bootstrap draws of both groups."""
    out = []
    for c in base.sizes:
        m = multiplier(base.law, group.law, c)
        paired = [multiplier(b, g, c) for b, g in zip(base.draws, group.draws, strict=False)]
        low, high = interval(paired) if paired else (math.nan, math.nan)
        out.append((c, m, low, high))
    return out


# -- output ------------------------------------------------------------------------------------

def _ci(value: float, low: float, high: float, fmt: str) -> str:
    if math.isnan(low):
        return format(value, fmt)
    return f"{format(value, fmt)} [{format(low, fmt)}, {format(high, fmt)}]"


def fit_table(fits: Sequence[GroupFit]) -> list[dict[str, str]]:
    """One row per group: its sizes and runs, and E, A, alpha with 95% intervals."""
    rows = []
    for f in fits:
        row = {"group": f.name, "sizes": str(len(f.sizes)),
               "runs": str(sum(len(v) for v in f.sizes.values())),
               "compute (FLOPs)": f"{min(f.sizes):.2g}..{max(f.sizes):.2g}"}
        for key, fmt in (("E", ".4f"), ("A", ".4g"), ("alpha", ".3f")):
            value = getattr(f.law, key)
            row[key] = _ci(value, *interval([getattr(d, key) for d in f.draws]), fmt) \
                if f.draws else format(value, fmt)
        rows.append(row)
    return rows


def multiplier_table(fits: Sequence[GroupFit], baseline: str) -> list[dict[str, str]]:
    """Each group's compute multiplier against `baseline` at each of the baseline's sizes."""
    base = next(f for f in fits if f.name == baseline)
    rows = []
    for f in fits:
        if f is base:
            continue
        row = {"group": f.name}
        for c, m, low, high in multipliers(base, f):
            row[f"x at {c:.2g}"] = _ci(m, low, high, ".2f")
        rows.append(row)
    return rows


def plot(fits: Sequence[GroupFit], title: str, ylabel: str, path: str) -> None:
    """Loss against compute on log axes: each size's mean with one std over seeds, and the
    fitted law of each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for f in fits:
        cs = list(f.sizes)
        means = [float(np.mean(v)) for v in f.sizes.values()]
        stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in f.sizes.values()]
        bar = ax.errorbar(cs, means, yerr=stds, fmt="o", capsize=3, label=f.name)
        grid = np.geomspace(min(cs) / 1.5, max(cs) * 1.5, 100)
        ax.plot(grid, [f.law.loss(c) for c in grid], color=bar[0].get_color(), alpha=0.7,
                label=f"  E={f.law.E:.3f} alpha={f.law.alpha:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(f"{ylabel} (mean, bars: one std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
