"""gptlab: an experiment-tracked research framework for small GPT language models."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    """The checkout holding conf/ (an editable install), else the working directory."""
    return PROJECT_ROOT if (PROJECT_ROOT / "conf").is_dir() else Path.cwd()


CONF_DIR = str(project_root() / "conf")
