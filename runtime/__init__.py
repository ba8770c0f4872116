"""edgellm.runtime: run an exported model without torch or transformers (numpy, numba, onnx, tokenizers).

Never import torch or transformers here: a test enforces it.

    from edgellm.runtime import load, Sampling
    gen = load("q4-onnx/", threads=2)
    print("".join(gen.stream("Hello", Sampling(temperature=0))))
"""

from .generate import Generator, Sampling, load  # noqa: F401
