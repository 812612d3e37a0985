"""The one exception type that the command-line tools turn into a one-line message."""

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class GptlabError(Exception):
    """Bad input or an unusable record: reported as `error: <message>` with exit code 2."""


def gptlab_cause(e: BaseException) -> GptlabError | None:
    """The GptlabError behind `e`, also when a library (Hydra's instantiate) wrapped it."""
    while e is not None:
        if isinstance(e, GptlabError):
            return e
        e = e.__cause__ or e.__context__
    return None


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Bad input ends in one line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            cause = gptlab_cause(e)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)

    return wrapped
