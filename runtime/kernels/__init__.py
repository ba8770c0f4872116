"""Numba kernels, each beside its numpy reference."""
