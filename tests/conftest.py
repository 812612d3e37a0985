from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def find_corpus() -> Path | None:
    for candidate in (os.environ.get("GPTLAB_DATA"),
                      ROOT.parent / "shared/data/tinyshakespeare/input.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def corpus() -> Path:
    path = find_corpus()
    if path is None:
        if os.environ.get("CI"):  # CI has the corpus beside the checkout: skipping would hide
            pytest.fail("Tiny Shakespeare not found beside the checkout nor in GPTLAB_DATA")
        pytest.skip("Tiny Shakespeare not found: set GPTLAB_DATA")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus) -> Path:
    """The first 20,000 characters of Tiny Shakespeare: every character class, fast to train."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


TINY_GPT = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
    "data.block_size=16", "data.batch_size=4", "data.eval_iters=2",
    "trainer.max_steps=20", "trainer.val_check_interval=10",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "callbacks.sample.max_new_tokens=20", "callbacks.final_sample_tokens=30",
]


def store_uri(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"


def cli_env(tmp: Path, corpus: Path) -> dict[str, str]:
    # tests/ on the path: test-only callbacks (interrupt.SignalAt) load in the subprocess
    env = dict(os.environ, GPTLAB_DATA=str(corpus), MLFLOW_TRACKING_URI=store_uri(tmp),
               PYTHONPATH=str(ROOT / "tests"))
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(tool: str, args: list[str], tmp: Path, corpus: Path, timeout: float = 300,
            **kw) -> subprocess.CompletedProcess:
    """Run a console script in a subprocess, in `tmp`, against the store under `tmp`."""
    return subprocess.run([str(BIN / tool), *args], cwd=tmp, env=cli_env(tmp, corpus),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def in_process(monkeypatch, tmp_path, small_corpus):
    """Run a console script's main() in this process (no start-up cost); returns
    (exit code, stdout, stderr)."""

    def call(main, args: list[str], capsys) -> tuple[int, str, str]:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("GPTLAB_DATA", str(small_corpus))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(tmp_path))
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        monkeypatch.setattr(sys, "argv", ["prog", *args])
        GlobalHydra.instance().clear()
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
