"""Everything about a training config that can be checked before a run is recorded.

A value of the wrong type or out of range is refused here in one line naming its key, rather
than failing part-way through a recorded run (or, worse, training on nonsense such as a `nan`
learning rate).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import GptlabError, gptlab_cause
from gptlab.models import check_sampling_args, check_window, memory
from gptlab.run.devices import check_devices, processes_per_node
from gptlab.run.optim import OPTIMIZERS, muon_dtype
from gptlab.run.schedule import SCHEDULES


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(cfg: DictConfig, key: str, minimum: int = 1, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise GptlabError(f"{key} must be {what}" + (" or null" if optional else "")
                          + f", got {value!r}")


def number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite number within [low, high] (ends open where asked)."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    ok = _number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f" in {lo}, {hi}" if lo and hi else (f" > {low:g}" if low_open else
                                                      f" >= {low:g}" if lo else "")
        raise GptlabError(f"{key} must be a finite number{where}, got {value!r}")


def check_train_config(cfg: DictConfig) -> None:
    """Refuse, before any run is recorded, what would otherwise fail part-way through it."""
    integer(cfg, "seed", minimum=0)
    # data
    for key in ("block_size", "batch_size", "eval_iters"):
        integer(cfg, f"data.{key}")
    number(cfg, "data.train_frac", 0.0, 1.0, low_open=True, high_open=True)
    # optimizer and schedule
    number(cfg, "optim.lr", 0.0, low_open=True)
    lr = cfg.optim.lr
    number(cfg, "optim.min_lr", 0.0, lr)
    number(cfg, "optim.weight_decay", 0.0)
    integer(cfg, "optim.warmup_steps", minimum=0)
    integer(cfg, "optim.decay_steps", optional=True)
    if cfg.optim.schedule not in SCHEDULES:
        raise GptlabError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                          f"got {cfg.optim.schedule!r}")
    name = cfg.optim.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise GptlabError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "muon":
        number(cfg, "optim.muon_lr", 0.0, low_open=True)
        number(cfg, "optim.muon_momentum", 0.0, 1.0, high_open=True)
        number(cfg, "optim.muon_weight_decay", 0.0)
        muon_dtype(cfg.optim.get("muon_precision", "auto"), torch.device("cpu"))
    betas = cfg.optim.betas
    if (not OmegaConf.is_list(betas) or len(betas) != 2
            or not all(_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise GptlabError(f"optim.betas must be two numbers in [0, 1), got {betas}")
    # trainer
    integer(cfg, "trainer.max_steps")
    integer(cfg, "trainer.log_every_n_steps")
    value = cfg.trainer.get("val_check_interval")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GptlabError("trainer.val_check_interval must be a whole number of steps "
                          f"(validate every that many steps), got {value!r}")
    number(cfg, "trainer.gradient_clip_val", 0.0, optional=True)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise GptlabError(f"trainer.accelerator={cfg.trainer.accelerator} needs a CUDA GPU and "
                          "none is available here: use trainer=cpu")
    check_devices(cfg.trainer)
    integer(cfg, "checkpoint.every_n_steps", optional=True)
    integer(cfg, "checkpoint.keep")
    # the validation sample
    sample = cfg.callbacks.sample
    check_sampling_args(sample.temperature, sample.top_k)
    check_window(sample.window, 1)
    integer(cfg, "callbacks.sample.max_new_tokens", minimum=0)
    integer(cfg, "callbacks.final_sample_tokens", minimum=0)
    number(cfg, "logger.outage_timeout", 0.0, low_open=True)
    if cfg.logger.get("serve_limits") is not None:
        from gptlab.tracking.logged_model import serve_limits

        serve_limits(OmegaConf.to_container(cfg.logger.serve_limits), environ={})


def check_memory(cfg: DictConfig, params: int, vocab_size: int) -> None:
    """Refuse a model of `params` parameters that this machine's processes cannot train."""
    need = memory.training(params, cfg.optim.get("name", "adamw"), cfg.data.batch_size,
                           cfg.data.block_size, vocab_size)
    advice = "make the model (model.n_layer, model.n_embd) or the batch (data.batch_size) smaller"
    if cfg.trainer.get("accelerator") in ("gpu", "cuda"):
        memory.check_fits(need, f"cuda:{torch.cuda.current_device()}", advice=advice)
    elif int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # the CPU processes of a node share its memory; the first checks for all of them,
        # before the others have taken any
        memory.check_fits(need, "cpu", processes_per_node(cfg.trainer), advice)


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def instantiate(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` of the config at `key`, its failures as one line naming the
    key: an unknown argument, a value the class refuses, a class that cannot be built here."""
    try:
        return hydra.utils.instantiate(node, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reworded below, with the cause kept
        cause = gptlab_cause(e)
        if cause is not None:
            raise cause from None
        inner = e.__cause__ or e
        m = _UNEXPECTED.search(str(inner))
        if m:
            raise GptlabError(f"unknown key {key}.{m.group(1)}") from None
        text = str(inner).strip().splitlines()
        raise GptlabError(f"cannot build {key}: {text[0] if text else type(inner).__name__}"
                          ) from None


def build_with(fn: Callable[..., Any], key: str, **kwargs: Any) -> Any:
    """Call a constructor with a config section's values, naming the section on failure."""
    try:
        return fn(**kwargs)
    except TypeError as e:
        m = _UNEXPECTED.search(str(e))
        if m:
            raise GptlabError(f"unknown key {key}.{m.group(1)}") from None
        raise
