"""The workflows behind the commands, as a library: one module per workflow.

Each takes a plain options record (its field defaults are the CLI's defaults; each field's
metadata holds the option's command-line spelling and range, which the recipe checks against)
and returns a result record. Nothing here prints or imports typer: the CLI (edgellm.commands)
and the recipe runner (edgellm.recipe) both call these functions.
"""
