"""gptlab's Optuna sweeper (`hydra/sweeper=study`, used by conf/hparams_search/).

Hydra's own Optuna plugin pins Optuna below 3, whose database storage predates SQLAlchemy 2
(which MLflow brings), so a study cannot be shared through a database with it. This sweeper
drives Optuna 4+ through its ask-and-tell API: it claims trials of a study that other
processes may share (gptlab/sweeps/study.py), launches them through the configured Hydra launcher,
and tells Optuna each trial's result. It lives here because Hydra loads plugins only from the
`hydra_plugins` namespace; optuna is imported when a search starts, not when Hydra scans
plugins at every start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class StudySweeper(Sweeper):
    def __init__(self, study_name: str | None, storage: str | None, direction: str,
                 n_trials: int, n_jobs: int, sampler: Any = None,
                 params: Any = None) -> None:
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler = OmegaConf.to_container(sampler) if isinstance(sampler, DictConfig) \
            else sampler
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) \
            else dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[Any]:
        from gptlab.errors import GptlabError
        from gptlab.sweeps import multirun
        from gptlab.sweeps import study as studies

        if not (isinstance(self.n_trials, int) and self.n_trials >= 1):
            raise GptlabError(f"hydra.sweeper.n_trials must be a whole number >= 1, not "
                              f"{self.n_trials!r}")
        if not (isinstance(self.n_jobs, int) and self.n_jobs >= 1):
            raise GptlabError(f"hydra.sweeper.n_jobs must be a whole number >= 1, not "
                              f"{self.n_jobs!r}")
        if not self.study_name:
            raise GptlabError("a search needs hydra.sweeper.study_name: processes that give "
                              "the same name share one study")
        space, fixed = studies.search_space(self.params, arguments)
        storage = studies.storage_url(self.storage, self.config.logger.tracking_uri)
        study = studies.open_study(self.study_name, storage, self.direction, space)
        with studies.lock(self.study_name, storage):
            place = studies.join(study)
            parent = studies.open_parent(study, self.config)

        mine: set[int] = set()  # the trials this process runs now

        def others_go_on() -> bool:
            with studies.lock(self.study_name, storage):
                return studies.running(study, besides=mine) > 0

        if parent is not None:
            multirun.share_parent(parent, others_go_on)
        study.sampler = self._sampler(place)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns = []
        while True:
            with studies.lock(self.study_name, storage):
                trials = studies.claim(study, space, self.n_trials, self.n_jobs)
            if not trials:
                break
            mine.clear()
            mine.update(t.number for t in trials)
            batch = [[*fixed, *(f"{k}={v}" for k, v in t.params.items())] for t in trials]
            try:
                # numbered by trial: jobs of processes sharing a sweep folder never collide
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except BaseException:
                for trial in trials:  # a stop: these trials are run again by a later start
                    studies.tell(study, trial, None, interrupted=True)
                raise
            for trial, result in zip(trials, results, strict=True):
                ok = result.status == JobStatus.COMPLETED
                studies.tell(study, trial, result.return_value if ok else None)
            returns.append(results)
        self._write_results(study, sweep_dir)
        return returns

    def _sampler(self, place: int) -> Any:
        """The configured sampler; its seed offset by this process's place in the study."""
        from hydra.utils import instantiate

        if self.sampler is None:
            return None
        config = dict(self.sampler)
        if config.get("seed") is not None:
            config["seed"] = int(config["seed"]) + place
        return instantiate(config)

    def _write_results(self, study: Any, sweep_dir: Path) -> None:
        """The study's best so far, over every process (as Hydra's Optuna plugin wrote it)."""
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            return
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params,
                                         "best_value": best.value,
                                         "best_trial": best.number}),
                       sweep_dir / "optimization_results.yaml")
