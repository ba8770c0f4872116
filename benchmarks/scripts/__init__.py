"""One-off studies behind the figures of README.md and benchmarks/RESULTS.md: each is a script,
run as `python -m edgellm.benchmarks.scripts.NAME --help` (benchmarks/README.md lists them).
None of this is part of `edgellm bench`."""
