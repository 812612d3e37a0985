"""The one exception type that the command-line tools turn into a one-line message."""


class GptlabError(Exception):
    """Bad input or an unusable record: reported as `error: <message>` with exit code 2."""
