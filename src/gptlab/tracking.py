"""MLflow: where runs live, what each run records, and finding runs and checkpoints again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gptlab.errors import GptlabError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def project_root() -> Path:
    """The checkout holding conf/ (an editable install), else the working directory."""
    return PROJECT_ROOT if (PROJECT_ROOT / "conf").is_dir() else Path.cwd()


CONF_DIR = str(project_root() / "conf")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else the SQLite store in mlruns/."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go in artifacts/ beside the database file."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "artifacts").as_uri()


def first_line(e: BaseException) -> str:
    """A library's exception as one line of an error message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def connect(uri: str | None = None) -> MlflowClient:
    """A client for the tracking store, checked once so a bad store fails before training."""
    uri = resolve_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    # MLflow retries an unreachable server for minutes; the first look should fail fast
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        raise GptlabError(f"cannot reach the MLflow tracking store at {uri}: "
                          f"{first_line(e)[:300]}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return client


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(client.tracking_uri)
    location = None if root is None else f"{root}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a parallel job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted.key: value}; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(),
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])


def generate_text(model: torch.nn.Module, chars: str, prompt: str, max_new_tokens: int,
                  temperature: float, top_k: int | None, seed: int, num_samples: int = 1,
                  device: torch.device | str = "cpu", kv_cache: bool = True,
                  window: str = "half") -> list[str]:
    """Sample from a model with a generator of its own: the global random state is neither
    used nor changed, so this may run beside training."""
    from gptlab.data import CharTokenizer

    tok = CharTokenizer(chars)
    ids = tok.encode(prompt)
    if not ids:
        raise GptlabError("the prompt is empty")
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         kv_cache=kv_cache, window=window, generator=generator)
    model.train(was_training)
    return [tok.decode(row) for row in out]


def newest_run(client: MlflowClient, experiment_name: str, status_filter: str, what: str):
    """The most recently started run of an experiment that passes `status_filter`."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise GptlabError(f"no MLflow experiment named {experiment_name!r}")
    runs = client.search_runs([exp.experiment_id], status_filter,
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise GptlabError(f"experiment {experiment_name!r} has no {what}")
    return runs[0]


def find_run(client: MlflowClient, run_id: str, experiment_name: str):
    """A run by id, or `latest`: the newest finished run of the experiment."""
    if run_id == "latest":
        return newest_run(client, experiment_name, "attributes.status = 'FINISHED'",
                          "finished run")
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise GptlabError(f"no MLflow run with id {run_id!r} in {client.tracking_uri}") from None


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="gptlab-")


def _checkpoint_names(client: MlflowClient, run_id: str) -> list[str]:
    try:
        return [Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")]
    except Exception:  # noqa: BLE001 - an unreadable artifact store holds no checkpoint for us
        return []


def download_checkpoint(client: MlflowClient, run_id: str, name: str = "best.ckpt") -> Path:
    """Fetch a checkpoint artifact of a run (through the artifact API, so a server works too):
    `name` if the run has it, else its newest."""
    names = _checkpoint_names(client, run_id)
    if not names:
        raise GptlabError(f"run {run_id} has no checkpoint")
    if name not in names:
        steps = sorted(n for n in names if n.startswith("step_"))
        name = steps[-1] if steps else sorted(names)[-1]
    return Path(client.download_artifacts(run_id, f"checkpoints/{name}", scratch_dir()))


def newest_checkpoint(client: MlflowClient, run_id: str) -> tuple[Path, dict[str, Any]]:
    """The run's newest readable step checkpoint: one cut short by a kill while it was being
    logged is passed over for the one before it."""
    steps = sorted((n for n in _checkpoint_names(client, run_id) if n.startswith("step_")),
                   reverse=True)
    if not steps:
        raise GptlabError(f"run {run_id} has no checkpoint to resume from")
    errors = []
    for name in steps:
        path = Path(client.download_artifacts(run_id, f"checkpoints/{name}", scratch_dir()))
        try:
            return path, read_checkpoint(path)
        except GptlabError as e:
            errors.append(str(e))
    raise GptlabError(errors[0] if len(errors) == 1 else
                      f"none of the run's {len(errors)} checkpoints is readable: {errors[0]}")


def last_recorded_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The highest step recorded for each metric of a run."""
    run = client.get_run(run_id)
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}


def log_dict_artifact(client: MlflowClient, run_id: str, obj: Any, path: str) -> None:
    client.log_text(run_id, json.dumps(obj, indent=2, ensure_ascii=False), path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely: tensors and plain values only, never pickled code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GptlabError(f"checkpoint file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - truncated, corrupted or unsafe files all land here
        raise GptlabError(f"cannot read checkpoint {path}: {first_line(e)[:200]}") from None
    if not isinstance(ckpt, dict) or "gptlab" not in ckpt or "state_dict" not in ckpt:
        raise GptlabError(f"{path} is not a gptlab checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    from gptlab.models import build_model

    info = ckpt["gptlab"]
    model = build_model(info["model_class"], info["model_kwargs"])
    # the LightningModule holds the model as `model`, so its keys carry that prefix
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GptlabError(f"checkpoint weights do not match its model config: "
                          f"{str(e).splitlines()[0]}") from None
    return model
