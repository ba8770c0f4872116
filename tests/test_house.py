"""The house's structure (docs/ARCHITECTURE.md), held by the code's own imports and names:
the arrows between rooms point down, the export format has one home, no private name crosses a
package, and no kernel reads an index slot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_arrow_points_down():
    graph = _script("import_graph")
    arrows = graph.arrows(ROOT)
    assert ("runtime", "runtime.format") in arrows  # the picture is read from the code, not empty
    assert graph.upward(arrows) == []


def test_the_runtime_imports_nothing_of_the_compress_side():
    graph = _script("import_graph")
    runtime = {b for (a, b) in graph.arrows(ROOT) if a.startswith("runtime")}
    assert runtime <= {"runtime", "runtime.cuda", "runtime.kernels", "runtime.format", "runtime.errors"}, runtime


def test_one_home_for_the_format():
    counts = _script("house_counts").main(ROOT)
    assert counts["packing_copies"] == ["runtime/format/blocks.py"]
    assert counts["index_slot_constants"] == []
    assert counts["private_cross_package_imports"] == []
    # names of the export's tensors are spelled in the format room; the others here read
    # checkpoints, whose module names (transformers') the export's names share in part: Phi-3's
    # fused qkv_proj, a checkpoint's lm_head.weight
    spelled = set(counts["files_spelling_tensor_names"])
    assert spelled <= {
        "runtime/format/names.py",
        "edgellm/arch.py",
        "edgellm/distill/train.py",
        "edgellm/quant/stream.py",
        "benchmarks/scripts/hf_to_gguf.py",  # checkpoint names -> GGUF names (llama.cpp converter)
        "benchmarks/scripts/stream_quantize.py",
    }, spelled


def test_the_counts_can_see_a_slot_and_a_name(tmp_path):
    """The measure finds what it forbids (a check that cannot fail is a defect)."""
    (tmp_path / "runtime" / "cuda").mkdir(parents=True)
    (tmp_path / "runtime" / "cuda" / "bad.py").write_text(
        'D_KIND, D_N = range(2)\nname = f"{p}.qweight"\nfrom edgellm.runtime.model import _names\n'
        "def pack(c):\n    return c[..., 0::2] | (c[..., 1::2] << 4)\n"
    )
    counts = _script("house_counts").main(tmp_path)["counts"]
    assert counts == {
        "files_spelling_tensor_names": 1,
        "packing_copies": 1,
        "index_slot_constants": 2,
        "private_cross_package_imports": 1,
        "functions_over_80_lines": 0,
        "function_bodies_over_80_lines": 0,
    }
