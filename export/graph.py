"""A small ONNX graph builder: nodes, weight initializers, constants, graph inputs/outputs.

Why build the graph by hand instead of tracing (torch.onnx.export): the exporter must choose
the node types (MatMulNBits / DequantizeLinear / GatherBlockQuantized on the model's own packed
bytes), fuse q/k/v and gate/up, name initializers by the contract in docs/EXPORT_FORMAT.md and
lay out the KV cache I/O exactly. A tracer would give us PyTorch's dequantize-then-matmul ops
and generated names that we would then have to pattern-match and rewrite; onnxruntime-genai's
model builder takes the same direct approach for the same reasons.

Weights are kept as numpy arrays until the writer streams them into the external data file,
or, with a `sink` (writer.DataSink: the streamed export), written there as they are added and
dropped, so a model's weights are never all in memory at once. Small graph constants (shapes,
axes, scalars) are `Constant` nodes, so the set of initializers is exactly the set of weights
the runtime looks up by name.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class Graph:
    """Accumulates an ONNX graph; `op` returns the output name(s) of the node it adds."""

    def __init__(self, name: str, sink=None):
        self.name = name
        self.sink = sink  # writer.DataSink, or None: weights kept until writer.write
        self.nodes: list = []
        # name -> (array, onnx elem type, dims); the array is None once a sink has written it
        self.weights: dict[str, tuple[np.ndarray | None, int, list]] = {}
        self.memo: dict[str, str] = {}  # node outputs shared between users (e.g. a tied table)
        self.inputs: list = []
        self.outputs: list = []
        self._count: dict[str, int] = {}
        self.uses_ms = False

    # -- naming -----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    # -- nodes ------------------------------------------------------------------------------
    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str | None = None,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs,
    ):
        name = self.fresh(name or op_type)
        outs = (
            [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
            if isinstance(outputs, int)
            else outputs
        )
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms = True
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64, name: str = "const") -> str:
        """A small constant (shape, axes, scalar) as a Constant node."""
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(arr, name)))
        return name

    def memo_const(self, key: str, value: np.ndarray) -> str:
        """A float constant made once and shared by every layer that uses it."""
        if key not in self.memo:
            self.memo[key] = self.const(value, value.dtype, key)
        return self.memo[key]

    def weight(self, name: str, array: np.ndarray, elem_type: int | None = None, dims: list | None = None) -> str:
        """A weight initializer (written to external data). `elem_type`/`dims` override the numpy
        dtype/shape (UINT4: the array holds the bytes, two codes per byte, low nibble first)."""
        if name in self.weights:
            raise ValueError(f"initializer {name!r} added twice")
        array = np.ascontiguousarray(array)
        elem = elem_type if elem_type is not None else helper.np_dtype_to_tensor_dtype(array.dtype)
        shape = list(array.shape) if dims is None else list(dims)
        if self.sink is not None:
            self.sink.write(name, array)
            array = None
        self.weights[name] = (array, elem, shape)
        return name

    # -- I/O --------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, source: str, name: str, elem_type: int, shape: list, first: bool = False) -> None:
        """Expose `source` as graph output `name` (through Identity when the names differ);
        `first` puts it before the others (Optimum order: logits, then present.*)."""
        if source != name:
            self.nodes.append(helper.make_node("Identity", [source], [name], name=self.fresh(f"{name}/identity")))
        self.outputs.insert(0 if first else len(self.outputs), helper.make_tensor_value_info(name, elem_type, shape))

    # -- composite helpers used by every family -------------------------------------------------
    def shape_dim(self, x: str, axis: int, name: str = "dim") -> str:
        """A 1-element int64 tensor holding x.shape[axis]."""
        return self.op("Shape", [x], name=name, start=axis, end=axis + 1)

    def rms_norm(self, x: str, weight: str, eps: float, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * weight, in standard ops. Written as Pow -> ReduceMean -> Add ->
        Sqrt -> Div -> Mul, the exact pattern ONNX Runtime fuses into (Skip)SimplifiedLayerNormalization
        at load (six nodes -> one per norm matters: a 135M model's decode step is op-overhead bound)."""
        sq = self.op("Pow", [x, self.const(2.0, np.float32, "two")], name=f"{name}/sq")
        mean = self.op("ReduceMean", [sq, self.const([-1])], name=f"{name}/mean", keepdims=1)
        var = self.op("Add", [mean, self.const(eps, np.float32, "eps")], name=f"{name}/add_eps")
        normed = self.op("Div", [x, self.op("Sqrt", [var], name=f"{name}/sqrt")], name=f"{name}/normed")
        return self.op("Mul", [normed, weight], name=f"{name}/scaled")

    def layer_norm(self, x: str, weight: str, bias: str, eps: float, name: str) -> str:
        return self.op("LayerNormalization", [x, weight, bias], name=name, axis=-1, epsilon=float(eps))
