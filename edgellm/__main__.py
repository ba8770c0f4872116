"""`python -m edgellm` is the `edgellm` command."""

from .cli import main

main()
