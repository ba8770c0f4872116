"""Greedy tokens of an edgellm export under OpenVINO (run by tests/test_ov_export.py in OpenVINO's
python: imports only numpy and openvino). Reads model.onnx directly (the ONNX frontend), feeds the
KV cache back as tensors, prints {"tokens": [...], "logits0": [...]} as JSON.

    OV_PYTHON ov_greedy.py EXPORT_DIR PROMPT_IDS(comma-separated) N_NEW [PRECISION]
"""

import json
import sys

import numpy as np
import openvino as ov


def main(export: str, prompt: list[int], n_new: int, precision: str) -> dict:
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": precision}
    if precision == "f32":  # no int8 activations either (OpenVINO quantizes them dynamically by default)
        cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    model = core.compile_model(f"{export}/model.onnx", "CPU", cfg)
    req = model.create_infer_request()
    kv_in = [p.get_any_name() for p in model.inputs if p.get_any_name().startswith("past_key_values.")]
    shape = model.input(kv_in[0]).get_partial_shape()
    past = {n: np.zeros((1, shape[1].get_length(), 0, shape[3].get_length()), np.float32) for n in kv_in}
    ids, pos, out_tokens, first = list(prompt), 0, [], None
    for _ in range(n_new):
        feed = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, pos + len(ids)), np.int64),
            "position_ids": np.arange(pos, pos + len(ids), dtype=np.int64)[None],
            **past,
        }
        out = req.infer(feed)
        logits = np.array(out["logits"][0, -1])
        first = logits if first is None else first
        past = {n: np.array(out[n.replace("past_key_values.", "present.")]) for n in kv_in}
        pos += len(ids)
        ids = [int(np.argmax(logits))]
        out_tokens.append(ids[0])
    return {"tokens": out_tokens, "logits0": first.tolist()}


if __name__ == "__main__":
    a = sys.argv[1:]
    res = main(a[0], [int(t) for t in a[1].split(",")], int(a[2]), a[3] if len(a) > 3 else "f32")
    print(json.dumps(res))
