"""Compile every CUDA kernel of the runtime to sm_90 (H200) PTX with numba's real CUDA pipeline
(typing, lowering, NVVM), no GPU needed: `CUDA_HOME=<nvidia-cuda-nvcc-cu12>/cuda_nvcc python
tests/cuda_ptx.py`. tests/test_cuda.py runs it where NVVM is installed."""

from __future__ import annotations

import numba.cuda.dispatcher as disp
from numba import cuda
from numba import types as T


class H200:
    compute_capability = (9, 0)


disp.get_current_device = lambda: H200()  # device functions compile for the target, not a present GPU

from edgellm.runtime.cuda import kernels as K  # noqa: E402


def kernels():
    from numba.np.numpy_support import from_dtype

    from edgellm.runtime.format.records import CUDA_CONFIG, CUDA_LAYER, CUDA_LINEAR, CUDA_MODEL

    C = lambda dt, nd: T.Array(dt, nd, "C")  # noqa: E731  (device arrays are C-contiguous)
    rec = lambda dtype: C(from_dtype(dtype), 1)  # noqa: E731  (arrays of records: one per layer, or one)
    i64, f32, f16, u32 = T.int64, T.float32, T.float16, T.uint32
    weights = T.NamedTuple((C(u32, 1), C(f16, 1), C(f16, 1), C(f32, 1), C(f32, 1)), K.Weights)
    state = T.NamedTuple(
        (
            C(f32, 3),  # cos (2, ctx, rope_dims/2): global | local
            C(f32, 3),  # sin
            C(f16, 4),  # kc
            C(f16, 4),  # vc
            C(f32, 2),  # x
            C(f32, 2),  # qkv
            C(f16, 2),  # att
            C(f32, 2),  # up
            C(f32, 2),  # scores
            C(f32, 2),  # logits
            C(f32, 2),  # res
        ),
        K.State,
    )
    step = (rec(CUDA_CONFIG), rec(CUDA_MODEL), rec(CUDA_LAYER), weights, state)
    w = (rec(CUDA_LINEAR), weights)  # one linear and the arrays it points into
    return [
        ("decode_coop", K.decode_coop, (i64, i64) + step),
        ("phase_kernel", K.phase_kernel, (i64, i64, i64, i64, i64) + step),
        ("gemm_kernel", K.gemm_kernel, w + (C(f16, 2), i64, C(f32, 2), i64, f32, f32)),
        (
            "gemv_kernel[fp32 in]",
            K.gemv_kernel,
            w + (C(f32, 2), i64, i64, i64, i64, i64, f32, f32, C(f32, 2), i64, i64, f32, f32),
        ),
        (
            "gemv_kernel[fp16 in]",
            K.gemv_kernel,
            w + (C(f16, 2), i64, i64, i64, i64, i64, f32, f32, C(f32, 2), i64, i64, f32, f32),
        ),
        ("embed_kernel", K.embed_kernel, w + (C(i64, 1), i64, i64, i64, f32, C(f32, 2))),
        ("transpose_into[u32]", K.transpose_into, (C(u32, 2), C(u32, 1), i64)),
        ("transpose_into[f32->f16]", K.transpose_into, (C(f32, 2), C(f16, 1), i64)),
        ("transpose_into[f16]", K.transpose_into, (C(f16, 2), C(f16, 1), i64)),
        ("norm_rows_kernel", K.norm_rows_kernel, (C(f32, 2), i64, i64, i64, f32, C(f32, 1), i64, i64, C(f16, 2))),
        (
            "rope_kv_kernel",
            K.rope_kv_kernel,
            (C(f32, 2), i64, i64, i64, i64, i64, i64, i64, i64, C(f32, 3), C(f32, 3), C(f16, 4), C(f16, 4)),
        ),
        (
            "attention_kernel",
            K.attention_kernel,
            (C(f32, 2), C(f16, 4), C(f16, 4), i64, i64, i64, i64, i64, i64, i64, f32, f32, C(f32, 2), C(f16, 2)),
        ),
        ("qk_norm_kernel", K.qk_norm_kernel, (C(f32, 2), i64, i64, i64, i64, i64, i64, i64, f32, C(f32, 1))),
        ("residual_norm_kernel", K.residual_norm_kernel, (C(f32, 2), C(f32, 2), i64, i64, f32, C(f32, 1), i64, f32)),
        ("act_kernel", K.act_kernel, (C(f32, 2), i64, i64, i64, C(f16, 2))),
    ]


if __name__ == "__main__":
    for name, fn, sig in kernels():
        ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))
        assert ".entry" in ptx, name
        print(name, len(ptx), "bytes of PTX", flush=True)
    print("OK")
