"""User-facing errors (their home is edgellm.runtime.errors, the bottom room: the runtime raises
them without importing the compress side). The CLI prints them as one line and exits with code 2."""

from edgellm.runtime.errors import EdgeLLMError, UnsupportedError

__all__ = ["EdgeLLMError", "UnsupportedError"]
