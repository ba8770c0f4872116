"""Benchmark harness: speed, memory, energy, quality, peers side by side (`edgellm bench`).

What `edgellm bench` (edgellm/commands/bench.py) and the recipes (edgellm/recipe/report.py) use:

- `variants.parse_all` / `variants.parse`: `VARIANT[:BACKEND]` -> a checked variant;
- `run.Settings`, `run.run_variants`, `run.build_report`: every variant in its own
  `python -m edgellm.benchmarks.worker` process, failed rows kept, the report dict;
- `report.write` (report.json checked against report.schema.json, report.md, report.html),
  `report.HEADERS` / `report.table_rows` for the console table.

Behind them: `worker` (one variant), `backends` and `runtime_adapter` (the engines), `energy`
(counters and estimates), `environment` (machine and versions). Importing this package imports
nothing else: a worker pays only for its own engine.

The one-off studies behind README.md and RESULTS.md are `edgellm.benchmarks.scripts`, each run
as `python -m edgellm.benchmarks.scripts.NAME` (benchmarks/README.md lists both)."""

__all__ = ["variants", "run", "report", "worker", "backends", "runtime_adapter", "energy", "environment"]
