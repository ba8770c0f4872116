"""An edgellm export as OpenVINO IR, for `edgellm bench DIR:openvino` (run in OpenVINO's python).

    OV_PYTHON ov_convert.py EXPORT_DIR OUT_DIR

writes OUT_DIR/model.xml/.bin (the export's model.onnx through OpenVINO's ONNX frontend,
`openvino.convert_model`, saved with fp32 constants kept: no fp16 compression, so the weights are
the export's) and OUT_DIR/openvino_tokenizer.xml/.bin (`openvino_tokenizers.convert_tokenizer` of
the export's tokenizer.json, no special tokens added, as the bench's other engines encode). OUT_DIR
is written as a temporary sibling renamed at the end. Imports only the standard library,
openvino, openvino_tokenizers and transformers' tokenizer (never edgellm, never torch). Any failure
is one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

MODEL_XML, TOKENIZER_XML = "model.xml", "openvino_tokenizer.xml"


def convert(export: Path, out: Path) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = ov.convert_model(str(export / "model.onnx"))
        ov.save_model(model, str(tmp / MODEL_XML), compress_to_fp16=False)
        del model
        hf = AutoTokenizer.from_pretrained(str(export))
        ov.save_model(convert_tokenizer(hf, add_special_tokens=False), str(tmp / TOKENIZER_XML))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ov_convert.py EXPORT_DIR OUT_DIR", file=sys.stderr)
        return 2
    export, out = Path(argv[0]), Path(argv[1])
    if not (export / "model.onnx").is_file():
        print(f"error: '{export}' has no model.onnx (not an edgellm export)", file=sys.stderr)
        return 2
    try:
        convert(export, out)
    except Exception as exc:  # one line for the parent's row; OpenVINO's message is multi-line
        text = str(exc)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in lines if ln.startswith("-- Conversion is failed for")), lines[0] if lines else "")
        if "MatMulNBits" in text and "constant as a zero_points" in text:  # fp16 zero points through a Cast
            why = (
                "its float zero points (quantize --float-zero) reach MatMulNBits through a Cast, and OpenVINO "
                "takes only constant zero points; quantize with integer zero points to run it on OpenVINO"
            )
        if "GatherBlockQuantized" in text and "must be a constant" in text:  # exports before 12-07
            why = "its quantized embedding is reshaped in the graph (written before 2026-12-07); export it again"
        print(f"error: OpenVINO cannot convert '{export}/model.onnx': {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
