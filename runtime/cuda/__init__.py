"""The CUDA path of the runtime (`load(dir, device="cuda")`): numba's CUDA target, no torch.

Nothing here imports numba.cuda at package import: `device.open_gpu()` does, when a user asks
for the GPU. Modules: linear.py (fused dequantize + GEMV / tiled GEMM), layers.py (norms, RoPE,
KV cache, attention, activations), step.py (the decode step as one cooperative kernel, and the
same phases as separate launches), model.py (weights uploaded once, `CudaModel.forward`),
device.py (which GPU, does the model fit), references.py (the numpy references of every kernel).
"""
