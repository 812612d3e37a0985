"""A run's MLflow model: its best weights as an MLflow pyfunc model that generates text.

    mlflow.pyfunc.load_model("runs:/<id>/model").predict(["ROMEO:"], params={"seed": 1})
    mlflow models serve -m runs:/<id>/model --env-manager local
    gptlab-sample model=models:/<name>@champion

The model holds its weights, tokenizer and model config (one small checkpoint of plain
values, read with `torch.load(weights_only=True)`), so loading it needs the gptlab package
installed, not the checkout, the corpus or the run's config. It generates exactly as
`gptlab-sample` does with the same prompt and settings. The Lightning checkpoints that exact
resume needs stay in the run beside it.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from gptlab.errors import GptlabError

NAME = "model"  # the run's model: runs:/<id>/model
WEIGHTS = "weights"  # the model's artifact: the slim checkpoint
# params of predict(), as gptlab-sample's defaults (top_k 0: sample among all tokens)
PARAMS = {"max_new_tokens": 500, "temperature": 1.0, "top_k": 0, "seed": 1337}
# what one request may cost: chosen at training time (logger.serve_limits, kept in the model's
# config), overridden where the model is served by GPTLAB_<KEY> (GPTLAB_MAX_NEW_TOKENS, ...).
# MLflow's server answers a request in a thread of its own and cannot stop it (its timeout
# answers 504 and leaves the thread running), so the time budget is kept here, token by token
LIMITS = {"max_new_tokens": 2048, "max_prompts": 16, "max_prompt_chars": 16_384,
          "request_seconds": 30.0}


def serve_limits(model_config: Mapping[str, Any] | None,
                 environ: Mapping[str, str] = os.environ) -> dict[str, float]:
    """The limits a served model keeps: its own config's over the defaults, the environment's
    over both."""
    limits = {**LIMITS, **{k: v for k, v in (model_config or {}).items() if k in LIMITS}}
    for key in LIMITS:
        name = f"GPTLAB_{key.upper()}"
        if name in environ:
            limits[key] = environ[name]
        try:
            value = float(limits[key])
        except (TypeError, ValueError):
            value = math.nan
        if not value > 0 or math.isinf(value) or (key != "request_seconds"
                                                 and value != int(value)):
            raise GptlabError(f"the serve limit {key} (logger.serve_limits.{key}, or {name} "
                              "where the model is served) must be a positive "
                              f"{'number' if key == 'request_seconds' else 'whole number'}, "
                              f"got {limits[key]!r}")
        limits[key] = value if key == "request_seconds" else int(value)
    return limits


class TextGenerator(mlflow.pyfunc.PythonModel):
    """Prompts in, generated texts out (each prompt continued on its own, from `seed`)."""

    def load_context(self, context: Any) -> None:
        from gptlab.data import tokenizer as tokenizers
        from gptlab.models.checkpoints import model_from_checkpoint, read_checkpoint

        self.limits = serve_limits(getattr(context, "model_config", None))
        ckpt = read_checkpoint(Path(context.artifacts[WEIGHTS]))
        self.info = ckpt["gptlab"]
        self.model = model_from_checkpoint(ckpt)
        self.tokenizer = tokenizers.from_checkpoint(self.info)

    # MLflow passes the prompts as the caller gave them: a list (as the server's JSON has
    # them) or a frame. The hint is one MLflow infers nothing from: a list[str] hint would
    # make it replace the logged signature, params and all, with one of its own
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        try:
            prompts = prompts_of(model_input)
            params = {**PARAMS, **(params or {})}
            self.check_request(prompts, params["max_new_tokens"], params["top_k"])
            deadline = time.monotonic() + self.limits["request_seconds"]
            return self.generate(prompts, **params, deadline=deadline)
        except GptlabError as e:  # the server answers 400 with this one line
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None

    def check_request(self, prompts: list[str], max_new_tokens: Any, top_k: Any = 0) -> None:
        """Refuse, before any work, a request past the limits this model is served with."""
        limits, vocab = self.limits, self.tokenizer.vocab_size
        if (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool)
                and not 0 <= top_k <= vocab):
            raise GptlabError(f"top_k must be from 0 (all tokens) to {vocab} (this model's "
                              f"vocabulary), got {top_k!r}")
        if (not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool)
                or not 0 <= max_new_tokens <= limits["max_new_tokens"]):
            raise GptlabError(f"max_new_tokens must be a whole number from 0 to "
                              f"{limits['max_new_tokens']} (this model's serve limit, "
                              f"GPTLAB_MAX_NEW_TOKENS), got {max_new_tokens!r}")
        if len(prompts) > limits["max_prompts"]:
            raise GptlabError(f"{len(prompts)} prompts is more than the "
                              f"{limits['max_prompts']} a request may hold (this model's "
                              "serve limit, GPTLAB_MAX_PROMPTS)")
        longest = max((len(p) for p in prompts), default=0)
        if longest > limits["max_prompt_chars"]:
            raise GptlabError(f"a prompt of {longest:,} characters is longer than the "
                              f"{limits['max_prompt_chars']:,} this model takes (its serve "
                              "limit, GPTLAB_MAX_PROMPT_CHARS)")

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 top_k: int | None, seed: int, num_samples: int = 1, kv_cache: bool = True,
                 window: str = "half", deadline: float | None = None) -> list[str]:
        """Each prompt's continuation; past `deadline` (time.monotonic()), a refusal that
        names the time budget."""
        from gptlab.models import check_sampling_args
        from gptlab.models.generation import stream_text

        if not prompts:
            raise GptlabError("no prompts: give one or more texts to continue")
        top_k = top_k or None
        check_sampling_args(temperature, top_k)
        if max_new_tokens < 0 or seed < 0:
            raise GptlabError("max_new_tokens and seed must be >= 0")
        texts = []
        for prompt in prompts:
            made = [[] for _ in range(num_samples)]
            for pieces in stream_text(self.model, self.tokenizer, prompt, int(max_new_tokens),
                                      float(temperature), top_k, int(seed), num_samples,
                                      kv_cache=kv_cache, window=window):
                if deadline is not None and time.monotonic() > deadline:
                    raise GptlabError(
                        f"the request ran past the {self.limits['request_seconds']:g} s this "
                        "model may spend on one (its serve limit, GPTLAB_REQUEST_SECONDS): "
                        "ask for fewer tokens or prompts")
                for text, piece in zip(made, pieces, strict=True):
                    text.append(piece)
            texts += ["".join(text) for text in made]
        return texts


def prompts_of(model_input: Any) -> list[str]:
    """The prompts, however the caller or the server passed them: a list, a string, a
    pandas column or one-column frame."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a DataFrame
        if len(model_input.columns) != 1:
            raise GptlabError("give the prompts as a list of texts (one column)")
        model_input = model_input.iloc[:, 0]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if not isinstance(model_input, list) or not all(isinstance(p, str) for p in model_input):
        raise GptlabError("give the prompts as a list of texts")
    return model_input


GENERATOR_CODE = """\
import mlflow

from gptlab.tracking.logged_model import TextGenerator

mlflow.models.set_model(TextGenerator())
"""


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # no input schema: MLflow would refuse an empty list of prompts with a multi-line report
    # of its own before predict() could say what is wrong in one line
    return ModelSignature(
        inputs=None, outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", PARAMS["max_new_tokens"]),
                            ParamSpec("temperature", "double", PARAMS["temperature"]),
                            ParamSpec("top_k", "long", PARAMS["top_k"]),
                            ParamSpec("seed", "long", PARAMS["seed"])]))


def requirements() -> list[str]:
    """What loading the model needs: gptlab and the libraries it runs on, at these versions."""
    from importlib.metadata import version

    return [f"gptlab=={version('gptlab')}", f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", f"tokenizers=={version('tokenizers')}"]


def slim(ckpt: dict, path: Path) -> Path:
    """The weights and the gptlab entry of a training checkpoint, without the optimizer's
    state and the loops' progress (a third of the size)."""
    torch.save({"state_dict": ckpt["state_dict"], "gptlab": ckpt["gptlab"]}, path)
    return path


def log(tracking_uri: str, run_id: str, checkpoint: Path, step: int,
        register_as: str | None = None, limits: Mapping[str, Any] | None = None) -> Any:
    """Log a checkpoint's weights as the run's model (and register it as a new version of
    `register_as`); returns MLflow's ModelInfo."""
    from mlflow.models import Model

    from gptlab.models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    weights = slim(ckpt, checkpoint.with_name("model.ckpt"))
    # the model as code (MLflow's models from code), not a pickled object: loading it runs
    # these lines, which need the gptlab package and nothing else
    code = checkpoint.with_name("generator.py")
    code.write_text(GENERATOR_CODE)
    mlflow.set_tracking_uri(tracking_uri)  # Model.log writes through the fluent API's store
    # gptlab's runs are opened with a client, not as the fluent API's active run: the model
    # is created in the run's experiment here, and Model.log (unlike mlflow.pyfunc.log_model)
    # takes the run and the model to log to
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=NAME, source_run_id=run_id,
                                       params=dict(run.data.params))
    return Model.log(
        artifact_path=None, name=NAME, flavor=mlflow.pyfunc, run_id=run_id, step=step,
        model_id=model.model_id,
        python_model=str(code), artifacts={WEIGHTS: str(weights)},
        signature=signature(), pip_requirements=requirements(),
        model_config=serve_limits(limits, environ={}),  # the serving machine's, not ours
        # checked by MLflow as a server would call it: two prompts, a short continuation
        input_example=(["\n", "ROMEO:"], {"max_new_tokens": 8}),
        registered_model_name=register_as)


def load(uri: str) -> TextGenerator:
    """The generator behind a logged or registered model (`runs:/<id>/model`,
    `models:/<name>@<alias>`, `models:/<name>/<version>`)."""
    import os

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no download bars
    try:
        loaded = mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise GptlabError(f"cannot load model {uri}: {e.message.splitlines()[0]}") from None
    except OSError as e:
        raise GptlabError(f"cannot load model {uri}: {e}") from None
    model = loaded.unwrap_python_model()
    if not isinstance(model, TextGenerator):
        raise GptlabError(f"{uri} is not a gptlab model")
    return model
