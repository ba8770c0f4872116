"""Benchmark harness: speed, memory, energy, quality, peers side by side."""
