"""edgellm: make a trained transformer LM small and fast for the edge.

Importing this package is cheap and torch-free: heavy modules are imported by the commands
that need them (see ``edgellm._deps``).
"""

__version__ = "0.1.0"
