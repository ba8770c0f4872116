"""ONNX data type codes used by export format 1 (TensorProto.DataType), and their numpy dtypes."""

from __future__ import annotations

import numpy as np

FLOAT, UINT8, INT8, INT16, INT32, INT64, FLOAT16, DOUBLE = 1, 2, 3, 5, 6, 7, 10, 11
UINT4, INT4 = 21, 22  # packed two per byte: ONNX Runtime reads them (qdq graphs); the numba runtime never views them

NUMPY_OF = {
    FLOAT: np.float32,
    UINT8: np.uint8,
    INT8: np.int8,
    INT16: np.int16,
    INT32: np.int32,
    INT64: np.int64,
    FLOAT16: np.float16,
    DOUBLE: np.float64,
}
