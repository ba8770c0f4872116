"""edgellm.runtime: run an exported model without torch or transformers (numpy, numba, tokenizers;
model.onnx is read by the runtime's own protobuf reader, onnx_proto.py).

Never import torch or transformers here: a test enforces it.

    from edgellm.runtime import load, Sampling
    gen = load("q4-onnx/", threads=2)
    print("".join(gen.stream("Hello", Sampling(temperature=0))))
    gen.model.kernels                        # the kernel tier that runs, e.g. 'avx2 (numba target haswell)'
    load("q4-onnx/", kernels="generic")      # force a lower tier (kernels/tiers.py); one the CPU lacks: EdgeLLMError
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    gen.stream("JSON: ", Sampling(grammar=gen.grammar("json_schema", schema)))  # only schema-valid JSON
"""

from .kernels.pin import pin

pin()  # before any kernel is compiled: numba's target is the host's x86-64 level (kernels/pin.py)

from .generate import Generator, Sampling, load  # noqa: E402, F401
