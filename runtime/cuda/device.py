"""Which GPU the CUDA path runs on, and whether a model fits in it: one-line errors otherwise.

numba.cuda is imported here, and only when `load(..., device="cuda")` asks for it.
"""

from __future__ import annotations

from ..errors import EdgeLLMError

DEVICES = ("cpu", "cuda")
RESERVE = 256 << 20  # bytes left free on the GPU for the CUDA context, kernels and their local memory


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise EdgeLLMError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    return device


def simulator() -> bool:
    """True when numba's CUDA simulator stands in for the GPU (NUMBA_ENABLE_CUDASIM=1: tests)."""
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def open_gpu():
    """numba.cuda, with a usable GPU selected, or an EdgeLLMError that names what is missing."""
    try:
        from numba import cuda
    except ImportError as exc:  # a numba build without its CUDA target
        raise EdgeLLMError(f"--device cuda needs numba's CUDA target, which this numba cannot import ({exc})") from None
    if simulator():
        return cuda
    try:
        cuda.current_context()
    except Exception as exc:  # CudaSupportError (no driver / no device), CudaDriverError, ...
        raise EdgeLLMError(f"--device cuda: no usable NVIDIA GPU: {_reason(exc)}") from None
    return cuda


def _reason(exc: Exception) -> str:
    """The informative line of numba's driver errors ('Error at driver init: \\n\\nCUDA driver
    library cannot be found. ...')."""
    lines = [ln.strip().rstrip(":") for ln in str(exc).splitlines() if ln.strip().rstrip(":")]
    lines = [ln for ln in lines if not ln.startswith("Error at driver init")] or lines or [type(exc).__name__]
    return lines[0].rstrip(".") + f" ({type(exc).__name__})"


def memory_info(cuda) -> tuple[float, float, str]:
    """(free bytes, total bytes, device name) of the current GPU."""
    ctx = cuda.current_context()
    free, total = ctx.get_memory_info()
    name = ctx.device.name
    return float(free), float(total), name.decode() if isinstance(name, bytes) else str(name)


def check_fits(need: int, free: float, total: float, name: str, what: str):
    """Raise unless `need` bytes (+ RESERVE) fit in the GPU's free memory."""
    if need + RESERVE > free:
        raise EdgeLLMError(
            f"{what} needs {need / 2**20:,.0f} MiB of GPU memory (+ {RESERVE >> 20} MiB for the CUDA context); "
            f"{name} has {free / 2**20:,.0f} of {total / 2**20:,.0f} MiB free (try a smaller --ctx or a 4-bit export)"
        )
