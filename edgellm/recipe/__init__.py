"""Recipes: a YAML list of stages (prune, distill, quantize, export, bench, eval) run by `edgellm compress`."""
