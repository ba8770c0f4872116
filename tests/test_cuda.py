"""The CUDA path (issue 15) from a plain CPU process: its kernels and model under numba's CUDA
simulator (tests/cuda_suite.py, in a subprocess: NUMBA_ENABLE_CUDASIM never reaches this
process or other tests' subprocesses), the same suite on a real GPU where there is one, the
kernels compiled for the H200 (sm_90) by NVVM where the CUDA compiler is installed, and the
device errors and bench spelling, which need no GPU at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from guards import one_line_error  # noqa: E402

HERE = Path(__file__).parent
SUITE = HERE / "cuda_suite.py"
FAMILIES = HERE / "cuda_families.py"  # issue 25's families on the CUDA path


def _gpu_present() -> bool:
    """A real CUDA GPU, asked in a subprocess (importing numba.cuda here would stay imported)."""
    code = "from numba import cuda; print(int(cuda.is_available()))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    return r.stdout.strip().endswith("1")


def _suite(sim: bool, k: str | None = None, path: Path = SUITE) -> subprocess.CompletedProcess:
    env = {k_: v for k_, v in os.environ.items() if k_ != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), "-rs"] + (["-k", k] if k else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800, cwd=HERE.parent)


@pytest.mark.parametrize("group", ["kernels", pytest.param("model", marks=pytest.mark.slow)])
def test_cuda_suite_under_simulator(group):
    """Every CUDA kernel against its numpy reference, and the CUDA model against the CPU runtime
    (logits, 32 greedy tokens, streaming, the CLI), under numba's CUDA simulator."""
    k = (
        "not (logits or greedy or phases or stream or torch)"
        if group == "kernels"
        else "logits or greedy or phases or stream or torch"
    )
    r = _suite(sim=True, k=k)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert " passed" in r.stdout and not skips, tail  # nothing skipped under the simulator


def test_cuda_families_under_simulator():
    """Issue 25 on the CUDA path (tests/cuda_families.py): each family's greedy tokens and logits
    against the CPU runtime, fp32 and 4-bit, under numba's CUDA simulator."""
    r = _suite(sim=True, path=FAMILIES)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "SKIPPED" not in r.stdout, tail


@pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU here (the simulator runs the same suite above)")
def test_cuda_suite_on_gpu():
    for path in (SUITE, FAMILIES):
        r = _suite(sim=False, path=path)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def _nvvm_home() -> str | None:
    """CUDA_HOME for numba when the pip CUDA compiler (nvidia-cuda-nvcc-cu12) is installed."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        home = Path(root) / "cuda_nvcc"
        if (home / "nvvm" / "lib64" / "libnvvm.so").is_file():
            return str(home)
    return None


@pytest.mark.skipif(
    _nvvm_home() is None,
    reason="NVVM not installed (pip install nvidia-cuda-nvcc-cu12 to compile the kernels for sm_90 without a GPU)",
)
def test_kernels_compile_for_h200():
    """numba's real CUDA pipeline (typing, lowering, NVVM) turns every kernel into sm_90 PTX, the
    cooperative decode step included: what the simulator cannot check (it runs Python)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["CUDA_HOME"] = _nvvm_home()
    r = subprocess.run(
        [sys.executable, str(HERE / "cuda_ptx.py")], capture_output=True, text=True, env=env, timeout=900
    )
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert "decode_coop" in r.stdout


def test_cpu_path_never_imports_numba_cuda(tmp_path):
    """device='cpu' (the default) must not pay for, or depend on, numba's CUDA target."""
    code = textwrap.dedent("""
        import sys
        from edgellm.runtime import load
        import edgellm.commands.run
        import edgellm.runtime.cuda.device as d
        d.check_device('cpu')
        assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'
        print('OK')
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_fit_check_names_the_memory():
    from edgellm.errors import EdgeLLMError
    from edgellm.runtime.cuda.device import check_fits

    check_fits(1 << 30, 4 << 30, 8 << 30, "GPU", "model")
    with pytest.raises(EdgeLLMError, match=r"needs 3,072 MiB of GPU memory.*GPU has 2,048 of 8,192 MiB free"):
        check_fits(3 << 30, 2 << 30, 8 << 30, "GPU", "model")


_one_line_error = one_line_error  # tests/guards.py


def test_device_errors(tmp_path):
    """Unknown device, a backend without a GPU path, and (without a GPU) --device cuda: one line, exit 2.
    Run in a subprocess: importing numba.cuda in this process would leak into later tests."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from test_cuda import _one_line_error
        print(_one_line_error(['run', {str(tmp_path)!r}, '-p', 'hi', '--device', 'tpu']))
        print(_one_line_error(['run', {str(tmp_path)!r}, '-p', 'hi', '--device', 'cuda', '--backend', 'onnxruntime']))
        if {not _gpu_present()!r}:
            print(_one_line_error(['run', {str(tmp_path)!r}, '-p', 'hi', '--device', 'cuda']))
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert "unknown device 'tpu'" in lines[0] and "cpu, cuda" in lines[0]
    assert "numba backend" in lines[1]
    if len(lines) > 2:
        assert "no usable NVIDIA GPU" in lines[2] and "driver" in lines[2].lower(), lines[2]


def test_bench_spelling(tmp_path):
    from edgellm.benchmarks.variants import parse

    (tmp_path / "q4").mkdir()
    (tmp_path / "q4" / "model.onnx").write_bytes(b"")
    for spec in (f"{tmp_path}/q4:numba-cuda", f"{tmp_path}/q4:cuda"):
        v = parse(spec)
        assert v.backend == "numba-cuda" and v.label == "q4:numba-cuda"
