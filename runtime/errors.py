"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class EdgeLLMError(Exception):
    """An error caused by the user's input (path, option, file contents), not by a bug.

    The message must say what was wrong and, where possible, how to fix it.
    """


class UnsupportedError(EdgeLLMError):
    """The model, graph or option is valid in general but not supported by edgellm."""
