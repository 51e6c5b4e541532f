"""Stock ggml, as built by llama-cpp-python, called through ctypes: the reference we must match."""

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

NVFP4 = 40
Q8_0 = 8
Q5_0 = 6
Q5_1 = 7


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@cache
def lib() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
    if not candidates:
        raise RuntimeError(f"no ggml library in {libdir}")
    handle = ctypes.CDLL(str(candidates[0]), mode=ctypes.RTLD_GLOBAL)
    handle.ggml_quantize_chunk.restype = ctypes.c_size_t
    handle.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]
    handle.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    handle.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return handle


def row_bytes(qtype: int, cols: int) -> int:
    t = lib().ggml_get_type_traits(qtype).contents
    return cols // t.blck_size * t.type_size


def quantize(qtype: int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk on a float32 [rows, cols] array (one thread, as ggml runs it)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(qtype, cols)), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    written = lib().ggml_quantize_chunk(
        qtype, x.ctypes.data, out.ctypes.data, 0, rows, cols,
        None if imat is None else imat.ctypes.data,
    )
    assert written == out.nbytes
    return out


def dequantize(qtype: int, blocks: np.ndarray, cols: int) -> np.ndarray:
    """The type traits' to_float on uint8 [rows, nbytes] blocks."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = blocks.shape[0]
    out = np.zeros((rows, cols), dtype=np.float32)
    to_float = _TO_FLOAT(lib().ggml_get_type_traits(qtype).contents.to_float)
    to_float(blocks.ctypes.data, out.ctypes.data, rows * cols)
    return out
