"""ONNX export: torch model -> model.onnx + external data, packed low-bit weights (see docs/EXPORT_FORMAT.md)."""
