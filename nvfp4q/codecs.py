"""One codec per output type, keyed by the ggml type, so that quantize, the damage estimate of
`--target-size` and `inspect --verify` reach every type the same way."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import gguf_io, kernels


@dataclass(frozen=True)
class Codec:
    encode: Callable  # (float32 rows, importance, search, weighting) -> the type's values, row by row
    decode: Callable  # raw uint8 rows [rows, row bytes] -> values [rows, ne0]


CODECS = {
    T.NVFP4: Codec(kernels.quantize_nvfp4, kernels.dequantize_nvfp4),
    T.Q8_0: Codec(lambda x, *_: kernels.quantize_q8_0(x), kernels.dequantize_q8_0),
    T.Q5_0: Codec(lambda x, *_: kernels.quantize_q5_0(x), kernels.dequantize_q5_0),
    T.Q5_1: Codec(lambda x, *_: kernels.quantize_q5_1(x), kernels.dequantize_q5_1),
    T.F16: Codec(lambda x, *_: x.astype(np.float16), lambda raw: raw.view(np.float16)),
    T.BF16: Codec(lambda x, *_: gguf_io.f32_to_bf16(x), lambda raw: kernels.as_float32(raw.view(np.uint16))),
    T.F32: Codec(lambda x, *_: x.astype(np.float32), lambda raw: raw.view(np.float32)),
}
# types only read (inspect), never written
_VIEWS = {T.F64: np.float64, T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def encode(qtype: T, rows: np.ndarray, importance: np.ndarray | None = None, search: int = 0,
           weighting: int = kernels.WEIGHT_RAW, mult: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Source rows (float32, float16 or bfloat16 bits) times mult -> the type's values as bytes
    [rows, row bytes], into out when given. Only NVFP4 uses importance, search and weighting;
    NVFP4 and Q8_0 decode inside their kernels and write into out directly."""
    if qtype == T.NVFP4:
        return kernels.quantize_nvfp4(rows, importance, search, weighting, mult, out)
    if qtype == T.Q8_0:
        return kernels.quantize_q8_0(rows, mult, out)
    data = CODECS[qtype].encode(kernels.as_float32(rows, mult), importance, search, weighting)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(len(rows), -1)
    if out is None:
        return data
    out[...] = data
    return out


def decode(qtype: T, raw: np.ndarray) -> np.ndarray:
    """Raw uint8 rows [rows, row bytes] -> values [rows, ne0] (float32, or the file's own dtype).
    Damaged bytes decode to inf or NaN (with numpy's warnings unless the caller, who checks the
    values, computes under np.errstate)."""
    if qtype in CODECS:
        return CODECS[qtype].decode(raw)
    if qtype in _VIEWS:
        return raw.view(_VIEWS[qtype])
    return gguf_io.dequantized(raw, qtype)


def decodable(qtype: T | None) -> bool:
    """Whether decode() can read the type (gguf has no dequantizer for a few)."""
    return qtype is not None and (qtype in CODECS or qtype in _VIEWS or gguf_io.gguf_decodes(qtype))
