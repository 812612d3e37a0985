"""What happens at which step: the learning rate, and when a run logs, validates and
checkpoints. Each is a function of the global step alone (the number of optimizer updates
made), never of where the process started, so an interrupted and resumed run does the same
things at the same steps as an uninterrupted one."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptlab.errors import GptlabError

SCHEDULES = ("constant", "cosine")


class LRSchedule:
    """Multiplier of the base lr at a step: `constant`, or linear warmup then cosine decay
    to `min_lr` at `decay_steps` (nanoGPT's schedule). A plain object so that LambdaLR
    saves its fields in the checkpoint."""

    def __init__(self, schedule: str, lr: float, min_lr: float, warmup_steps: int,
                 decay_steps: int):
        if schedule not in SCHEDULES:
            raise GptlabError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {schedule!r}")
        self.schedule, self.lr, self.min_lr = schedule, lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps

    def __call__(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_lr / self.lr
        ratio = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
        return (self.min_lr + coeff * (self.lr - self.min_lr)) / self.lr


@dataclass(frozen=True)
class Steps:
    """When a run of `max_steps` logs, validates and checkpoints.

    Training metrics are logged every `log_every` steps; validation (with a logged sample and
    a checkpoint) runs every `val_every` steps and at the last step; with `checkpoint_every`
    a checkpoint is also taken every that many steps.
    """

    max_steps: int
    val_every: int
    log_every: int = 1
    checkpoint_every: int | None = None

    def logs(self, step: int) -> bool:
        return step > 0 and step % self.log_every == 0

    def validates(self, step: int) -> bool:
        return step > 0 and (step % self.val_every == 0 or step == self.max_steps)

    def checkpoints(self, step: int) -> bool:
        every = self.checkpoint_every
        return self.validates(step) or bool(every and step > 0 and step % every == 0)

    def validation_steps(self) -> list[int]:
        return [s for s in range(1, self.max_steps + 1) if self.validates(s)]
