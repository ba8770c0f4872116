"""First start and what `run` shows: one kernel tier per compiled step, the cold compile in a child
process or `edgellm warmup` (runtime/warmup.py), the cache keyed on the CPU; sampling that sorts
only the candidates, and a stats line that says which tokens it timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgellm.runtime.generate import Sampling, Stats, sample
from edgellm.runtime.kernels import quant as Q
from edgellm.runtime.kernels import tiers


@pytest.fixture(scope="module")
def q4(rtn_q4_export):
    return rtn_q4_export


# ----------------------------------------------------------------------------- one tier per specialization
def test_a_tier_compiles_its_own_code_only():
    """A `Tier` argument is typed as its literal id: the compiled kernel holds that tier's tile and
    no other's; a plain int id keeps the switch over every tier the target has."""
    best = tiers.best()
    if len(tiers.supported()) < 2:
        pytest.skip("one tier on this CPU: nothing to leave out")
    rng = np.random.default_rng(0)
    keep: list = []
    qw = rng.integers(0, 256, (8, 2, 16), dtype=np.uint8)
    d = Q.make_desc(qw, np.full(16, 0.01, np.float32), None, 4, 64, 32, keep)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for tier in (best, best.id):  # compiled here, or already in numba's cache
        Q.linear_mat(d, x, np.zeros((3, 8), np.float32), *Q.act_buffers(d, 3), tier)
    cache = Q.linear_mat._cache
    size = {  # bytes of each specialization's cache file (machine code + bitcode)
        str(key[0][-1]): os.path.getsize(os.path.join(cache._cache_path, name))
        for key, name in cache._cache_file._load_index().items()
        if key[1] == Q.linear_mat.targetctx.codegen().magic_tuple()
    }
    one, every = size[f"Literal[int]({best.id})"], size["int64"]
    assert one * 2 < every, size  # the prompt tiles are most of linear_mat


# ----------------------------------------------------------------------------- first start
_CHILD = textwrap.dedent(
    """
    import json, sys
    from edgellm.runtime.kernels import layers, quant
    from edgellm.runtime.model import NumbaModel, forward
    m = NumbaModel(sys.argv[1], n_ctx=16, threads=1)
    m.warmup()
    def entries(f):  # compiled specializations in numba's cache for this target
        magic = f.targetctx.codegen().magic_tuple()
        return sum(1 for key in f._cache._cache_file._load_index() if key[1] == magic)
    parts = (layers.attention, layers.attention_mat, quant.linear_mat, quant.linear_few)
    kernels = {f.__name__: entries(f) for f in parts}
    print(json.dumps({"child": m.compiled_in_child, "misses": sum(forward.stats.cache_misses.values()),
                      "hits": sum(forward.stats.cache_hits.values()), "kernels": kernels}))
    """
)

_FOREIGN = textwrap.dedent(
    """
    import sys
    from edgellm.runtime import warmup
    from edgellm.runtime.kernels import tiers
    from edgellm.runtime.kernels.layers import attention_mat
    from edgellm.runtime.model import forward
    keep = []
    step = warmup.is_cached(forward, warmup.step_args(tiers.BY_NAME[sys.argv[1]], True, keep))
    print(step, warmup.is_cached(attention_mat, warmup.attention_args(True, 2)))  # and a kernel compiled beside it
    """
)


def test_cold_start_compiles_in_a_child_and_warmup_covers_the_model(q4, tmp_path):
    """An empty cache: the model compiles its step in a child and loads it (no compile in the
    serving process); the kernels compiled side by side before the step (warmup.PARTS) were the
    step's own (one specialization each in the cache, not a second one for the step's call);
    `edgellm warmup`'s synthetic model has the real model's step signature (fp16 KV: already
    cached); a process compiling for another CPU finds neither the step nor those kernels."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "EDGELLM_CACHEPACK": "off"}  # no pack
    r = subprocess.run([sys.executable, "-c", _CHILD, str(q4)], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    one = {"attention": 1, "attention_mat": 1, "linear_mat": 1, "linear_few": 1}
    assert got == {"child": True, "misses": 0, "hits": 1, "kernels": one}, got
    warm = [sys.executable, "-c", "from edgellm.cli import main; main()", "warmup"]
    r = subprocess.run(warm, capture_output=True, text=True, env=env, timeout=1800)
    said = r.stdout + r.stderr  # the console writes to stderr
    assert r.returncode == 0, said[-2000:]
    assert "fp16 KV cache: already cached" in said and "fp32 KV cache: compiled" in said, said[-2000:]
    best = tiers.best().name
    native = subprocess.run([sys.executable, "-c", _FOREIGN, best], capture_output=True, text=True, env=env)
    assert native.stdout.strip() == "True True", native.stderr[-2000:]
    foreign = {**env, "NUMBA_CPU_NAME": "x86-64" if tiers.target()[2] == "x86_64" else "generic"}
    foreign["NUMBA_CPU_FEATURES"] = ""
    other = subprocess.run([sys.executable, "-c", _FOREIGN, best], capture_output=True, text=True, env=foreign)
    assert other.stdout.strip() == "False False", other.stderr[-2000:]


# ----------------------------------------------------------------------------- what run shows
def _full_sort(logits, p, rng):
    """The sampler before it sorted only the candidates: every logit, float64, a full argsort."""
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.size:
        x = np.where(x < np.partition(x, -p.top_k)[-p.top_k], -np.inf, x)
    order = np.argsort(-x)
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = np.searchsorted(np.cumsum(probs), p.top_p) + 1
        probs = probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(probs.size, p=probs)])


def test_sample_draws_what_a_full_sort_draws():
    g = np.random.default_rng(0)
    params = (Sampling(), Sampling(top_k=0), Sampling(top_k=7, top_p=1.0), Sampling(temperature=1.3, top_k=100))
    for i in range(100):
        logits = (g.standard_normal(3000) * 3).astype(np.float32)  # continuous: no ties
        for p in params:
            assert sample(logits, p, np.random.default_rng(i)) == _full_sort(logits, p, np.random.default_rng(i))
    assert sample(logits, Sampling(temperature=0), g) == int(np.argmax(logits))


def test_stats_line_says_which_tokens_it_timed():
    line = Stats(prompt_tokens=5, prompt_s=0.01, gen_tokens=32, gen_s=0.31).line()
    assert (
        line
        == "prompt: 5 tokens, 500.0 tokens/s | generation: 32 tokens, decode 31 tokens after the first: 100.0 tokens/s"
    )
    assert (
        Stats(prompt_tokens=5, prompt_s=0.01, gen_tokens=2, gen_s=0.01)
        .line()
        .endswith("decode 1 token after the first: 100.0 tokens/s")
    )
