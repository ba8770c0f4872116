"""Weight quantization: formats as data (formats.py), packing (packing.py), quantized modules
(modules.py), the algorithms (rtn.py, gptq.py, awq.py) and the driver that applies them to a
model layer by layer (apply.py)."""
