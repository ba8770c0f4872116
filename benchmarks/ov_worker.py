"""Run the bench worker (benchmarks/worker.py) under OpenVINO's python, where edgellm is not installed.

    OV_PYTHON ov_worker.py EDGELLM_DIR BENCHMARKS_DIR RUNTIME_DIR JOB.json RESULT.json

Mounts the three folders as the packages `edgellm`, `edgellm.benchmarks` and `edgellm.runtime`
without running `edgellm.runtime`'s __init__ (numba) and without putting the edgellm venv's
site-packages on the path, so the worker imports only what it needs from edgellm (the bench's own
torch-free modules, edgellm.data / .evaluate's text windows) and numpy/openvino from this venv.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def mount(name: str, folder: str, run_init: bool) -> None:
    if run_init:
        init = f"{folder}/__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    else:
        mod = types.ModuleType(name)
        mod.__path__ = [folder]
        sys.modules[name] = mod


def main(argv: list[str]) -> int:
    edgellm_dir, bench_dir, runtime_dir, job, result = argv
    mount("edgellm", edgellm_dir, True)
    mount("edgellm.runtime", runtime_dir, False)
    mount("edgellm.benchmarks", bench_dir, True)
    from edgellm.benchmarks import worker

    return worker.main([job, result])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
