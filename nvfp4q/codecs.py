"""One codec per output type, keyed by the ggml type, so that quantize, the damage estimate of
`--target-size` and `inspect --verify` reach every type the same way."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import gguf_io, kernels


@dataclass(frozen=True)
class Codec:
    # (source rows, importance, search, weighting, mult, out) -> the type's bytes [rows, row bytes],
    # into out when given; source rows are float32, float16 or bfloat16 bits (kernels.as_float32)
    encode: Callable
    decode: Callable  # raw uint8 rows [rows, row bytes] -> values [rows, ne0]


def _from_float32(f: Callable) -> Callable:
    """A codec's encode from an encoder of float32 rows; NVFP4's and Q8_0's kernels read source
    rows and write into out themselves."""
    def encode(rows, importance, search, weighting, mult, out):
        data = np.ascontiguousarray(f(kernels.as_float32(rows, mult))).view(np.uint8).reshape(len(rows), -1)
        if out is None:
            return data
        out[...] = data
        return out
    return encode


CODECS = {
    T.NVFP4: Codec(kernels.quantize_nvfp4, kernels.dequantize_nvfp4),
    T.Q8_0: Codec(lambda x, _imp, _search, _weighting, mult, out: kernels.quantize_q8_0(x, mult, out),
                  kernels.dequantize_q8_0),
    T.Q5_0: Codec(_from_float32(kernels.quantize_q5_0), kernels.dequantize_q5_0),
    T.Q5_1: Codec(_from_float32(kernels.quantize_q5_1), kernels.dequantize_q5_1),
    T.F16: Codec(_from_float32(lambda x: x.astype(np.float16)), lambda raw: raw.view(np.float16)),
    T.BF16: Codec(_from_float32(gguf_io.f32_to_bf16), lambda raw: kernels.as_float32(raw.view(np.uint16))),
    T.F32: Codec(_from_float32(lambda x: x.astype(np.float32)), lambda raw: raw.view(np.float32)),
}
# types only read (inspect), never written
_VIEWS = {T.F64: np.float64, T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def encode(qtype: T, rows: np.ndarray, importance: np.ndarray | None = None, search: int = 0,
           weighting: int = kernels.WEIGHT_RAW, mult: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Source rows times mult -> the type's bytes [rows, row bytes], into out when given; only
    NVFP4 uses importance, search and weighting."""
    return CODECS[qtype].encode(rows, importance, search, weighting, mult, out)


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
