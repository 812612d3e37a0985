"""A model the machine cannot hold is refused in one line before it is built: in training,
and when a checkpoint or a logged model is loaded to sample or score."""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY_GPT, cli, copy_run, one_line_error, store_uri
from gptlab.cli import sample as sample_cli
from gptlab.cli import train as train_cli
from gptlab.models import build_model, memory

# about 51.5 billion parameters: 824 GB to train, 206 GB for the weights alone
HUGE = {"n_layer": 64, "n_head": 64, "n_embd": 8192}


def test_parameters_are_counted_without_memory():
    kwargs = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 65, "block_size": 16}
    real = build_model("gptlab.models.gpt.GPT", kwargs)
    assert memory.count_parameters(lambda: build_model("gptlab.models.gpt.GPT", kwargs)) == \
        sum(p.numel() for p in real.parameters())
    before = psutil.Process().memory_info().rss
    n = memory.count_parameters(
        lambda: build_model("gptlab.models.gpt.GPT", {**kwargs, **HUGE}))
    assert n > 51e9
    assert psutil.Process().memory_info().rss - before < 500e6


def test_a_model_too_big_to_train_is_refused_before_it_is_built(in_process, capsys, seeded):
    start = time.monotonic()
    code, _, err = in_process(train_cli.main, [
        *TINY_GPT, *(f"model.{k}={v}" for k, v in HUGE.items()), "trainer.max_steps=2",
        "logger.experiment_name=huge"], capsys)
    one_line_error(code, err, "51.5 billion parameters", "GB", "available",
                   "model.n_embd")
    assert time.monotonic() - start < 60
    client = MlflowClient(store_uri(seeded))
    experiment = client.get_experiment_by_name("huge")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_a_checkpoint_too_big_to_load_is_refused_before_it_is_built(
        monkeypatch, capsys, tmp_path, tiny_run):
    tmp, _ = copy_run(tiny_run, tmp_path)
    path = sorted(tmp.rglob("step_*.ckpt"))[-1]
    ckpt = torch.load(path, weights_only=True)
    ckpt["gptlab"]["model_kwargs"].update(HUGE)  # what it claims to be, weights aside
    torch.save(ckpt, tmp / "huge.ckpt")
    code, _, err = cli(monkeypatch, capsys, tmp, tmp, sample_cli.main,
                       [f"checkpoint={tmp / 'huge.ckpt'}", "max_new_tokens=5"])
    one_line_error(code, err, "51.5 billion parameters", "its weights", "available")
    # the checkpoint itself loads as before
    code, out, err = cli(monkeypatch, capsys, tmp, tmp, sample_cli.main,
                         [f"checkpoint={path}", "max_new_tokens=5"])
    assert code == 0, err


def test_the_refusal_names_need_and_limit(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device="cpu": 3_000_000_000)
    need = memory.training(100_000_000, "adamw", 8, 256, 50_304)
    assert need.bytes == 100_000_000 * 16 + 8 * 256 * 50_304 * 8
    memory.check_fits(need)  # 2.4 GB of 3
    with pytest.raises(Exception, match=r"at least 2\.4 GB in each of 2 processes .*100\.0 "
                                        r"million parameters.*3\.0 GB of memory available"):
        memory.check_fits(need, processes=2)
