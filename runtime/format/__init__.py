"""The export format's single home: numpy only, no numba, no torch.

Everything that writes, checks or reads an export imports its vocabulary from here: the
compress side (`edgellm.quant`), the exporter (`edgellm.export`), the validator, the weights
plan, both runtimes (numba CPU and CUDA), the loader fuzzer and the tests.

    names     tensor names per architecture: layer roles, norms, embeddings, head
    blocks    each quantized format as data (bits, block, bytes per block, zero-point kind) and
              the one copy of code packing / unpacking / zero points / dequantization
    dtypes    the ONNX data type codes the format uses, and their numpy dtypes
    records   the named records (numpy structured dtypes) the compiled kernels read: layer
              descriptors, linear descriptors and the run config (one layout per backend)

Adding a family touches `names` (if its tensors are named differently) and the exporter's
builder; adding a quantized format touches `blocks` and its kernels. See docs/ARCHITECTURE.md.
"""
