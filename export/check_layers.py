"""The parity check of an export too large to hold with its model: layer by layer (issue 26).

check.check_parity runs the whole export in ONNX Runtime beside the whole PyTorch model. Here
each part of the export (the embedding, each decoder layer, the final norm and head) is cut out
of model.onnx as its own small graph whose initializers point into the same model.onnx.data, so
ONNX Runtime loads only that part's weights; PyTorch computes the same part from the checkpoint
(export/stream.py Parts), on the same input: the residual stream PyTorch computed before it,
over a prompt and DECODE_STEPS more tokens. Per part, as check_parity holds the whole model:
- the shipped graph within INT8_ACT_REL_TOL of the part's output scale (MatMulNBits with int8
  activations), and its accuracy_level 0 twin (or an exact graph) within FP_TOL x max(1, scale);
- each layer run through its KV cache (the prompt, then one token at a time) equal to the same
  layer without the cache within CACHE_TOL x max(1, scale).
The worst figure of each kind is returned, with `check: "layer by layer"`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgellm.memory import trim

from .check import CACHE_TOL, DECODE_STEPS, FP_TOL, INT8_ACT_REL_TOL, ParityError, _session
from .writer import ONNX_NAME


class _Cutter:
    """Sub-graphs of an ONNX model (loaded without its external data): the nodes that compute
    `outputs` from `stops` and the graph inputs."""

    def __init__(self, proto, folder: Path):
        self.proto, self.folder = proto, Path(folder)
        g = proto.graph
        self.producer = {o: n for n, node in enumerate(g.node) for o in node.output}
        self.inputs = {v.name: v for v in g.input}
        self.outputs = {v.name: v for v in g.output}
        self.inits = {t.name: t for t in g.initializer}

    def cut(self, outputs: list[str], stops: list[str], tag: str) -> Path:
        """The sub-graph as a file beside model.onnx (its weights stay in model.onnx.data)."""
        from onnx import TensorProto, helper, save

        want, seen, todo = set(), set(stops), list(outputs)
        while todo:
            name = todo.pop()
            if name in seen or name == "":
                continue
            seen.add(name)
            n = self.producer.get(name)
            if n is not None and n not in want:
                want.add(n)
                todo.extend(self.proto.graph.node[n].input)
        nodes = [self.proto.graph.node[n] for n in sorted(want)]
        used = {i for node in nodes for i in node.input}
        ins = [helper.make_tensor_value_info(s, TensorProto.FLOAT, None) for s in stops]
        ins += [v for k, v in self.inputs.items() if k in used]
        outs = [
            self.outputs[o] if o in self.outputs else helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
            for o in outputs
        ]
        inits = [t for k, t in self.inits.items() if k in used]
        graph = helper.make_graph(nodes, f"{self.proto.graph.name}-{tag}", ins, outs, initializer=inits)
        model = helper.make_model(graph, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        path = self.folder / f".check-{tag}.onnx"
        save(model, str(path))
        return path


def _run_cut(path: Path, run):
    """(run(shipped session, exact), run(accuracy_level 0 twin, True) or None when the shipped
    graph is exact already) of a cut graph, one session alive at a time; removes the files."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
        changed = False
        for n in m.graph.node:
            if n.op_type == "MatMulNBits":
                for a in n.attribute:
                    if a.name == "accuracy_level" and a.i != 0:
                        a.i, changed = 0, True
        shipped = run(_session(str(path)), not changed)
        if not changed:
            return shipped, None
        twin_path = path.with_name(path.stem + "-level0.onnx")
        onnx.save(m, str(twin_path))
        try:
            return shipped, run(_session(str(twin_path)), True)
        finally:
            os.unlink(twin_path)
    finally:
        os.unlink(path)
        trim()  # the session's buffers back to the OS before the next part


def _run(sess, feed: dict) -> dict:
    names = {i.name for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    return dict(zip(outs, sess.run(None, {k: v for k, v in feed.items() if k in names})))


def _feed(ids: np.ndarray, start: int, past: dict | None, i: int, nkv: int, hd: int) -> dict:
    """The graph inputs of a cut graph for positions [start, start + len) of ids (1, len)."""
    s = ids.shape[1]
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((1, start + s), np.int64),
        "position_ids": np.arange(start, start + s, dtype=np.int64)[None],
    }
    for kind in ("key", "value"):
        name = f"past_key_values.{i}.{kind}"
        feed[name] = past[name] if past else np.zeros((1, nkv, 0, hd), np.float32)
    return feed


class _Figures:
    def __init__(self):
        self.res: dict = {}
        self.failures: list[str] = []

    def compare(self, key: str, got: np.ndarray, ref: np.ndarray, tol_scale: float, what: str, rel: bool = False):
        d = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max())
        tol = tol_scale * scale if rel else tol_scale * max(1.0, scale)
        self.res[key] = max(self.res.get(key, 0.0), d / max(1.0, scale) if not rel else d / max(scale, 1e-30))
        if d > tol:
            self.failures.append(f"{what}: max |Δ| {d:.3g} > {tol:.3g}")
        return d


def check_layers(out_dir: Path, model, parts, prompt_ids: list[int], progress=None) -> dict:
    """onnx.checker, then each part of the export in ONNX Runtime vs PyTorch: the figures, or ParityError."""
    import onnx
    import torch

    from edgellm.calibration import capture_layer_inputs
    from edgellm.export.llama import dims
    from edgellm.progress import NULL

    progress = progress or NULL
    out_dir = Path(out_dir)
    path = out_dir / ONNX_NAME
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ParityError(f"onnx.checker rejected the export: {str(exc).splitlines()[0]}") from None
    cutter = _Cutter(onnx.load(str(path), load_external_data=False), out_dir)
    d = dims(model)
    nkv, hd, n_layers = d["nkv"], d["hd"], d["layers"]
    S = len(prompt_ids)
    ids = np.array([prompt_ids + [prompt_ids[-1 - j % S] for j in range(DECODE_STEPS)]], np.int64)  # (1, T)
    T = ids.shape[1]
    fig = _Figures()
    b = parts.boundaries
    with torch.inference_mode():
        # the embedding (and what reaches layer 0: the rotary tables, the mask)
        parts.load("embedding")
        ((h, _),), layer_kw = capture_layer_inputs(model, torch.from_numpy(ids), 1)  # each layer's own mask, rotary
        emb, _ = _run_cut(
            cutter.cut([b[0]], [], "embedding"), lambda sess, _: _run(sess, _feed(ids, 0, None, 0, nkv, hd))
        )
        fig.compare("embedding_max_rel_diff", emb[b[0]], h.numpy(), FP_TOL, "the embedding")
        for i in progress.track(range(n_layers), "checking the export layer by layer", total=n_layers):
            parts.load("layer", i)
            out = parts.layers[i](h, **layer_kw.table[0][i])
            ref = (out[0] if isinstance(out, tuple) else out).numpy()
            x = h.numpy()

            def run(sess, exact, x=x, i=i):
                """The layer's output on all T positions; when exact, also through its KV cache."""
                f = _feed(ids, 0, None, i, nkv, hd)
                whole = _run(sess, {**f, b[i]: x})[b[i + 1]]
                if not exact:
                    return whole, None
                r = _run(sess, {**_feed(ids[:, :S], 0, None, i, nkv, hd), b[i]: x[:, :S]})
                cached = [r[b[i + 1]]]
                for t in range(S, T):  # one token at a time
                    past = {f"past_key_values.{i}.{k}": r[f"present.{i}.{k}"] for k in ("key", "value")}
                    f = _feed(ids[:, t : t + 1], t, past, i, nkv, hd)
                    r = _run(sess, {**f, b[i]: x[:, t : t + 1]})
                    cached.append(r[b[i + 1]])
                return whole, np.concatenate(cached, 1)

            cut = cutter.cut([b[i + 1], f"present.{i}.key", f"present.{i}.value"], [b[i]], f"l{i}")
            shipped, twin = _run_cut(cut, run)
            if twin is not None:
                fig.compare(
                    "layer_max_rel_diff", shipped[0], ref, INT8_ACT_REL_TOL, f"layer {i} (int8 activations)", rel=True
                )
            whole, cached = twin or shipped
            fig.compare("layer_exact_max_rel_diff", whole, ref, FP_TOL, f"layer {i}")
            fig.compare("cache_vs_nocache_max_rel_diff", cached, whole, CACHE_TOL, f"layer {i} through its KV cache")
            h = torch.from_numpy(ref)
        # the final norm and head
        parts.load("final")
        head = model.get_output_embeddings()
        if head not in parts.loaded:  # tied: the head is the embedding's table
            parts.materialize(model.get_input_embeddings())
        ref = _logits(model, parts, h[0]).numpy()[None]
        parts.load(None)
        feed = {b[n_layers]: h.numpy()}
        shipped, twin = _run_cut(cutter.cut(["logits"], [b[n_layers]], "head"), lambda s, _: _run(s, feed)["logits"])
        scale = float(np.abs(ref).max())
        fig.res.update(max_abs_logit=scale, max_abs_diff=float(np.abs(shipped - ref).max()))
        if twin is not None:
            fig.compare("head_max_rel_diff", shipped, ref, INT8_ACT_REL_TOL, "the head (int8 activations)", rel=True)
            fig.res["accuracy_level_0_max_abs_diff"] = float(np.abs(twin - ref).max())
        fig.compare("head_exact_max_rel_diff", twin if twin is not None else shipped, ref, FP_TOL, "the head")
    if fig.failures:
        raise ParityError("layer-by-layer parity check failed vs PyTorch: " + "; ".join(fig.failures[:4]))
    res = {
        "check": "layer by layer",
        "onnx_checker": "passed",
        "prompt_tokens": S,
        "decode_steps": DECODE_STEPS,
        **fig.res,
        "tolerance": {
            "exact": f"{FP_TOL:g} x max(1, max |output|) per part",
            "cache": f"{CACHE_TOL:g} x max(1, max |output|) per layer",
            "shipped": f"{INT8_ACT_REL_TOL:g} x max |output| per part",
        },
    }
    return res


def _logits(model, parts, h):
    """PyTorch's logits (T, V) of the residual stream h (T, d): the final norm, then the head's
    rows dequantized a chunk at a time (an 8B model's head is 2 GB in fp32), then what the
    model's forward does after its head."""
    from edgellm.quant.modules import PackedMatrix, TiedQuantLinear
    from edgellm.quant.stream import head_logits, packed_rows
    from edgellm.skeleton import final_logits

    x = parts.final_norm(h)
    head = model.get_output_embeddings()
    m = head.embedding[0] if isinstance(head, TiedQuantLinear) else head
    bias = getattr(head, "bias", None)

    def rows(t):
        if isinstance(m, PackedMatrix):
            out = head_logits(t, lambda r0, r1: packed_rows(m, r0, r1), m.out_features)
        else:
            out = head_logits(t, lambda r0, r1: m.weight[r0:r1], m.weight.shape[0])
        return out if bias is None else out + bias

    return final_logits(model, x, rows)  # and what the model's forward does after its head (Gemma 3's softcap)
