"""The one exception type that the command-line tools turn into a one-line message."""

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class GptlabError(Exception):
    """Bad input or an unusable record: reported as `error: <message>` with exit code 2."""


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Bad input ends in one line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except GptlabError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
