"""gptlab-compare: the runs of an experiment or of one sweep side by side, in the terminal and
as a plot of their validation-loss curves.

    gptlab-compare                                   # runs of the default experiment
    gptlab-compare --experiment lecture_progression --plot curves.png
    gptlab-compare --sweep latest                    # the children of the newest sweep
    gptlab-compare --sweep latest --by model.pos_emb --baseline model.pos_emb=learned
    gptlab-compare --experiment sizes --scaling --by model.pos_emb --baseline \
        model.pos_emb=learned --plot scaling.png       # loss against compute, multipliers

MLflow is imported once the arguments are read (gptlab.tracking.comparison), so that --help and a
wrong argument answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from gptlab.errors import GptlabError, exit_on_error

PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_plot_path(path: str) -> None:
    """Refuse a plot that cannot be written before anything is printed."""
    target = Path(path)
    if target.suffix.lower() not in PLOT_FORMATS:
        raise GptlabError(f"--plot {path}: the file name must end in one of "
                          f"{', '.join(PLOT_FORMATS)}")
    if not target.parent.is_dir():
        raise GptlabError(f"--plot {path}: folder {target.parent} does not exist")
    existed = target.exists()
    try:
        with open(target, "ab"):
            pass
    except OSError as e:
        raise GptlabError(f"--plot {path}: cannot write there ({e.strerror})") from None
    if not existed:
        target.unlink()


@exit_on_error
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="gptlab-compare", description=__doc__.split("\n\n")[0],
        epilog="Runs: name, the params that differ, best and final val/loss, best val/bpc, "
               "steps, median "
               "tokens/s, ms/step, wall time, status; best val/loss first. Groups (runs "
               "repeating a setting with other seeds, or agreeing on --by keys): runs, mean and "
               "std of best and final val/loss, 95%% confidence interval of the mean (t), "
               "tokens/s, ms/step; with --baseline, the difference to it and Welch's p-value.")
    ap.add_argument("--experiment", "-e", default="gptlab",
                    help="MLflow experiment name (default: gptlab)")
    ap.add_argument("--sweep", "-s", metavar="RUN_ID",
                    help="compare the children of this sweep's parent run, or 'latest'")
    ap.add_argument("--plot", "-p", metavar="FILE.png", help="write the val/loss curves here")
    ap.add_argument("--by", nargs="+", metavar="KEY",
                    help="group runs that agree on these params (default: runs that differ "
                         "only in seed form a group)")
    ap.add_argument("--baseline", metavar="GROUP",
                    help="a group, as KEY=VALUE pairs with the keys as --by names them "
                         "(model.pos_emb=learned) or as the table shows them "
                         "(pos_emb=learned): the other groups' difference to it and "
                         "Welch's p-value")
    ap.add_argument("--metric", choices=("val/loss", "val/bpc"),
                    help="what ranks, groups and plots the runs (default: val/loss, or "
                         "val/bpc where the runs' tokenizers differ: losses per token do not "
                         "compare across tokenizers)")
    ap.add_argument("--scaling", action="store_true",
                    help="fit each group's loss against training compute, L = E + A "
                         "C^-alpha (groups: --by, or every differing param but the seed and "
                         "the model's size and steps); with --baseline, each group's compute "
                         "multiplier; with --plot, loss against compute on log axes")
    ap.add_argument("--bootstrap", type=int, default=200, metavar="N",
                    help="--scaling's intervals: N draws of the seeds at each size "
                         "(default: 200; 0: fits without intervals)")
    ap.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else mlruns/")
    args = ap.parse_args(argv)
    if args.bootstrap < 0:
        raise GptlabError("--bootstrap takes a number of draws, 0 or more")
    if args.plot:
        check_plot_path(args.plot)
    from gptlab.tracking.comparison import compare

    compare(args.experiment, args.sweep, args.plot, args.tracking_uri, args.by, args.baseline,
            args.metric, args.scaling, args.bootstrap)


if __name__ == "__main__":
    main()
