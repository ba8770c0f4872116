"""edgellm.runtime: run an exported model without torch or transformers (numpy, numba, onnx, tokenizers).

Never import torch or transformers here: a test enforces it.
"""
