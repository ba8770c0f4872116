"""The CUDA path of the runtime (`load(dir, device="cuda")`): numba's CUDA target, no torch.

Nothing here imports numba.cuda at package import: `device.open_gpu()` does, when a user asks
for the GPU. Modules: kernels.py (fused dequantize + GEMV, tiled dequantize + GEMM, norms, RoPE
and KV cache, attention, activations, and the decode step as one cooperative kernel or the same
phases as separate launches; q/k norm, post-norms and the families' multipliers and soft-caps),
references.py (the numpy reference of every kernel), model.py (weights uploaded once, the
family's description as records, `CudaModel.forward`), device.py (which GPU, does the model fit).
"""
