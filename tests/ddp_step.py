"""One optimizer step of gptlab's LitLM under Lightning's DDP strategy (gloo), for
test_ddp: run as two processes, each given its rank in the environment (as gptlab starts its
ranks) and its half of a fixed batch; rank 0 saves the weights after the step.

    python tests/ddp_step.py OUT     (with MASTER_ADDR, MASTER_PORT, WORLD_SIZE, LOCAL_RANK)
"""

import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from gptlab.models.gpt import GPT
from gptlab.run.lit_module import LitLM

V, T, B = 65, 16, 8


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    x = torch.randint(V, (B, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


def lit() -> LitLM:
    torch.manual_seed(0)
    model = GPT(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32)
    # full lr from the first step and a weight decay: the step moves every weight
    return LitLM(model, lr=1e-2, min_lr=1e-2, warmup_steps=0, weight_decay=0.1)


def step(batch: tuple[torch.Tensor, torch.Tensor], devices: int) -> LitLM:
    module = lit()
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1,
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0)
    x, y = batch
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return module


if __name__ == "__main__":
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    x, y = whole_batch()
    half = B // world
    module = step((x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]), world)
    if rank == 0:
        torch.save(module.model.state_dict(), sys.argv[1])
