"""Each output type's encoder and decoder in one place, so that quantize, the damage estimate of
`--target-size` and `inspect --verify` reach a type the same way."""

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import gguf_io, kernels

_VIEWS = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64,
          T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def encode(qtype: T, rows: np.ndarray, importance: np.ndarray | None = None, search: int = 0,
           weighting: int = kernels.WEIGHT_RAW) -> np.ndarray:
    """float32 rows -> the type's values (blocks or floats), row by row; only NVFP4 uses
    importance, search and weighting."""
    if qtype == T.NVFP4:
        return kernels.quantize_nvfp4(rows, importance, search, weighting)
    if qtype == T.Q8_0:
        return kernels.quantize_q8_0(rows)
    if qtype == T.F16:
        return rows.astype(np.float16)
    if qtype == T.BF16:
        return gguf_io.f32_to_bf16(rows)
    return rows.astype(np.float32)


def decode(qtype: T, raw: np.ndarray) -> np.ndarray:
    """Raw uint8 rows [rows, row bytes] -> values [rows, ne0] (float32, or the file's own dtype).
    Damaged bytes decode to inf or NaN (with numpy's warnings unless the caller, who checks the
    values, computes under np.errstate)."""
    if qtype == T.NVFP4:
        return kernels.dequantize_nvfp4(raw)
    if qtype == T.Q8_0:
        return kernels.dequantize_q8_0(raw)
    if qtype == T.BF16:
        return kernels.bf16_to_f32(raw.view(np.uint16))
    if qtype in _VIEWS:
        return raw.view(_VIEWS[qtype])
    return gguf_io.dequantized(raw, qtype)


def decodable(qtype: T | None) -> bool:
    """Whether decode() can read the type (gguf has no dequantizer for a few)."""
    own = (T.NVFP4, T.Q8_0, T.BF16, *_VIEWS)
    return qtype is not None and (qtype in own or gguf_io.gguf_decodes(qtype))
