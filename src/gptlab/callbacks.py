"""The path runs' `config.yaml` name for `callbacks/sample` (`resume=` builds it again); the
code lives in gptlab/run/callbacks.py."""

from gptlab.run.callbacks import *  # noqa: F403
from gptlab.run.callbacks import SampleText  # noqa: F401
