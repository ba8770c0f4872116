"""Pruning: unstructured / N:M (magnitude, Wanda, SparseGPT) and structured (layers, heads, MLP channels)."""
