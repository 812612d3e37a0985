"""The path runs' `config.yaml` name for `callbacks/progress` (`resume=` builds it again); the
code lives in gptlab/run/progress.py."""

from gptlab.run.progress import *  # noqa: F403
from gptlab.run.progress import ProgressLog, StepBar  # noqa: F401
