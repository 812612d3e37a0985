"""A run's lifecycle: the job, its MLflow record and resume, checks, the LightningModule and
its optimizers and schedule, checkpoints, signals, progress and data-parallel ranks."""
