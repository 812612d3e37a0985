"""The path every MLflow model logged by gptlab imports (its `generator.py`); the code lives in
gptlab/tracking/logged_model.py."""

from gptlab.tracking.logged_model import *  # noqa: F403
from gptlab.tracking.logged_model import TextGenerator, load, log  # noqa: F401
