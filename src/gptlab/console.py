"""What reaches the console and what only the run's log file.

gptlab talks through the `gptlab` logger; Hydra's job logging (conf/hydra/job_logging/gptlab.yaml)
sends it to the console and to `<output dir>/gptlab-train.log`. The console filter keeps the
terminal clean: in a terminal the progress bar shows what the progress lines say, so they go to
the file only; in a sweep only one line per job reaches the console. Imports nothing heavy:
Hydra loads it before the job starts.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("gptlab")

_sweep = False  # this process runs jobs of a sweep


def set_sweep(on: bool) -> None:
    global _sweep
    _sweep = on


def in_sweep() -> bool:
    return _sweep


def on_terminal() -> bool:
    return sys.stderr.isatty()


class ConsoleFilter(logging.Filter):
    """Passes a record to the console unless the log file alone should have it: progress
    lines while a progress bar shows the same, and anything but a job's own line (or a
    warning) in a sweep."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if _sweep:
            return getattr(record, "sweep", False)
        return not (getattr(record, "progress", False) and on_terminal())


def line_buffered() -> None:
    """Output sent to a file or a pipe (nohup, a SLURM job) appears line by line, as it does
    in a terminal, instead of when the run ends."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
