"""Optional dependencies and their extras: the home is edgellm.runtime.deps (the runtime needs it too)."""

from edgellm.runtime.deps import EXTRA_OF, install_hint, missing_extra_message, require

__all__ = ["EXTRA_OF", "install_hint", "missing_extra_message", "require"]
