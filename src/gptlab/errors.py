"""The exceptions gptlab raises on purpose, and how the console scripts turn any failure into
one line on stderr and an exit code. Only `exit_on_error` ends the process."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

# exit codes: bad input or an unusable record; an unexpected failure; a stop signal adds 128
BAD_INPUT, UNEXPECTED = 2, 1


class GptlabError(Exception):
    """Bad input or an unusable record: reported as `error: <message>` with exit code 2."""


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """A stop signal (SIGINT, SIGTERM) reached the run at a point where it could stop cleanly:
    the run ends KILLED, resumable from its newest checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def gptlab_cause(e: BaseException | None) -> GptlabError | None:
    """The GptlabError behind `e`, also when a library (Hydra's instantiate) wrapped it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, GptlabError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def refusal(e: BaseException | None) -> str | None:
    """A tracking server's refusal of the user (HTTP 401 or 403), behind `e`, in one line; or
    None. MLflow's client reports either with the endpoint and the server's page but not who
    was refused, and neither is an outage: waiting would not change the answer."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        status = getattr(getattr(e, "response", None), "status_code", None)  # artifacts
        code = getattr(e, "error_code", None)  # the tracking API
        if status == 401 or code == "UNAUTHENTICATED":
            user = tracking_user()
            if user is None:
                return ("the tracking server asks who you are: set MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)")
            return (f"the tracking server refused user {user}: wrong password or no such user "
                    "(MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)")
        if status == 403 or code == "PERMISSION_DENIED":
            return (f"the tracking server refused user {tracking_user()}: no permission to "
                    f"{refused_request(e)} (an experiment's owner or an admin grants it: "
                    "gptlab-server grant USER EXPERIMENT EDIT)")
        e = e.__cause__ or e.__context__
    return None


def refused_request(e: BaseException) -> str:
    """What was asked, as MLflow's endpoint (`runs/create`) or the artifact's method and path."""
    request = getattr(e, "request", None)
    if request is not None and getattr(request, "url", None):
        path = request.url.partition("/mlflow-artifacts/artifacts/")[2] or request.url
        return f"{request.method} artifact {path}"
    endpoint = str(e).partition("endpoint ")[2].split(" ")[0]
    return endpoint.removeprefix("/api/2.0/mlflow/").removeprefix("/api/3.0/mlflow/") or \
        "make this request"


def tracking_user() -> str | None:
    """Who MLflow's client signs in as: MLFLOW_TRACKING_USERNAME, or its credentials file."""
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username


def first_line(e: BaseException) -> str:
    """A library's exception as one line of an error message."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def describe(e: BaseException) -> str:
    """What went wrong, in one line, for the console and for a run's `gptlab.error` tag."""
    cause = gptlab_cause(e)
    if cause is not None:
        return str(cause)
    refused = refusal(e)
    if refused is not None:
        return refused
    if isinstance(e, StopRequested):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    if isinstance(e, OverrideParseException | MissingConfigException | HydraException):
        return hydra_message(e)
    if isinstance(e, OmegaConfBaseException):
        return f"bad config: {first_line(e)}"
    return f"{type(e).__name__}: {first_line(e)}"


def hydra_message(e: BaseException) -> str:
    """Hydra's multi-line reports of a bad command line, as one line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if isinstance(e, MissingConfigException) or "Available options" in str(e):
        options = [ln for ln in lines[1:] if not ln.endswith(":") and "provider=" not in ln
                   and not ln.startswith(("Config search path", "Available options"))]
        head = lines[0].removeprefix("In 'train': ").removeprefix("In 'sample': ")
        return f"{head}" + (f" (choices: {', '.join(options)})" if options else "")
    message = lines[0]
    if len(lines) > 1 and lines[1].startswith("To append"):
        message += f" ({lines[1][0].lower()}{lines[1][1:]})"
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and "full_key" not in message:
        message += f": {first_line(cause)}"
    return message


def exit_code(e: BaseException) -> int:
    if isinstance(e, StopRequested):
        return 128 + e.signum
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT
    expected = (gptlab_cause(e) is not None or refusal(e) is not None
                or isinstance(e, OSError | HydraException | OmegaConfBaseException))
    return BAD_INPUT if expected else UNEXPECTED


def report(e: BaseException, prefix: str = "error: ", log_file: Path | None = None) -> None:
    """Print one line for `e`; an unexpected failure (a bug) also shows its traceback, after
    saving it to `log_file` when there is one."""
    if exit_code(e) == UNEXPECTED:
        text = "".join(traceback.format_exception(e))
        if log_file is not None:
            try:
                with open(log_file, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError:
                pass
        sys.stderr.write(text)
    if not isinstance(e, KeyboardInterrupt | StopRequested):
        print(f"{prefix}{describe(e)}", file=sys.stderr, flush=True)


def exit_on_error(fn: Callable[..., Any]) -> Callable[..., NoReturn]:
    """Wrap a console script: its result is an exit code (None is 0); any exception ends in
    one line on stderr and an exit code, not a traceback (unless it is a bug, or the user set
    HYDRA_FULL_ERROR to see everything)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> NoReturn:
        user_wants_traces = bool(os.environ.get("HYDRA_FULL_ERROR"))
        # Hydra prints its own multi-line report and exits 1 unless this is set; with it,
        # Hydra's errors reach us and become one line like every other
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            code = fn(*args, **kwargs) or 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - every failure is reported here, once
            if user_wants_traces and gptlab_cause(e) is None:
                raise
            report(e)
            code = exit_code(e)
        finally:
            if not user_wants_traces:
                os.environ.pop("HYDRA_FULL_ERROR", None)
        leave(code)

    return wrapped


def after_hydra(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a Hydra task function (under @hydra.main) so that what it raises is raised again
    by `task.reraise()` once Hydra has returned: raised inside, Hydra first writes a line of
    its own ("Error executing job with overrides"), and the error would not be one line."""
    failures: list[BaseException] = []

    @functools.wraps(task)
    def wrapped(cfg: Any) -> Any:
        try:
            return task(cfg)
        except BaseException as e:  # noqa: BLE001 - raised again by reraise()
            failures.append(e)
            return None

    def reraise() -> None:
        if failures:
            raise failures.pop()

    wrapped.reraise = reraise  # functools.wraps in hydra.main carries it to Hydra's wrapper
    return wrapped


def leave(code: int) -> NoReturn:
    """End the process once its output is flushed. Python's own teardown of the modules torch,
    Lightning and MLflow load takes seconds (3 s here) and does nothing a finished command
    needs, so it is skipped, unless worker processes (a parallel sweep's) are still to be
    shut down by it. Called other than as a console script (main() from Python), a plain
    exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    if not Path(sys.argv[0]).name.startswith("gptlab-") or multiprocessing.active_children():
        sys.exit(code)
    logging.shutdown()  # log files are flushed and closed, as at a normal exit
    os._exit(code)
