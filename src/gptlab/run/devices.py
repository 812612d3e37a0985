"""What devices a run asks for (`trainer.devices`, `trainer.num_nodes`), read as Lightning
reads them, and checked against the machine before anything is recorded."""

from __future__ import annotations

import os

from omegaconf import DictConfig, ListConfig, OmegaConf

from gptlab.errors import GptlabError


def processes_per_node(trainer_cfg: DictConfig) -> int:
    """How many processes `trainer.devices` asks for on each node, read as Lightning reads
    it: a count, a list of device ids, or "auto"/-1 (every GPU; one process on a CPU)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, list | ListConfig):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if devices in ("auto", -1, "-1"):
        import torch

        gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto")
        return torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    try:
        return int(devices)
    except (TypeError, ValueError):
        raise GptlabError(f"trainer.devices must be a number of devices, a list of device ids "
                          f"or auto, got {devices!r}") from None


def world_size(trainer_cfg: DictConfig) -> int:
    return processes_per_node(trainer_cfg) * int(trainer_cfg.get("num_nodes", 1) or 1)


def check_devices(trainer_cfg: DictConfig) -> None:
    """Refuse more processes than the machine has devices for, and a process-group backend
    this torch lacks, before anything is recorded."""
    import torch  # here: reading a config's devices needs no torch

    n = processes_per_node(trainer_cfg)
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    if n < 1:
        raise GptlabError(f"trainer.devices must be at least 1, got {trainer_cfg.devices!r}")
    if accelerator == "cpu" and n > (os.cpu_count() or 1):
        raise GptlabError(f"trainer.devices={n} asks for {n} processes, but this machine has "
                          f"{os.cpu_count()} CPU cores")
    if accelerator in ("gpu", "cuda") and n > torch.cuda.device_count():
        raise GptlabError(f"trainer.devices={n} asks for {n} GPUs, but this machine has "
                          f"{torch.cuda.device_count()}")
    strategy = trainer_cfg.get("strategy")
    backend = strategy.get("process_group_backend") if OmegaConf.is_dict(strategy) else None
    if backend is not None and n > 1 and not (torch.distributed.is_available()
                                              and torch.distributed.is_backend_available(backend)):
        raise GptlabError(f"trainer.strategy.process_group_backend={backend} is not available "
                          "in this torch build (gloo runs on CPUs, nccl on NVIDIA GPUs)")
