"""Shared test tools: tiny models, running the CLI, logits from stock llama.cpp."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from scripts.make_tiny_model import make

PROMPT = b"the first people who were in the new time of their history"


def tiny_model(folder: Path, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make(folder / "tiny-f16.gguf", embd=kw.pop("embd", 128), layers=kw.pop("layers", 2),
                vocab_size=kw.pop("vocab_size", 320), **kw)


def run_cli(*args, env=None, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "nvfp4q", *map(str, args)], capture_output=True, text=True,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def logits(path: Path) -> np.ndarray:
    """Next-token logits at every position of PROMPT, computed by stock llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False,
                          n_threads=2, n_batch=128)
    try:
        tokens = llm.tokenize(PROMPT, add_bos=True)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def tensors(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def copy_metadata(r: GGUFReader, dst: Path) -> GGUFWriter:
    """A writer to dst with r's key/values (general.file_type left out), for a changed copy."""
    w = GGUFWriter(dst, r.get_field("general.architecture").contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub)
    return w


def changed_copy(src: Path, dst: Path, change) -> Path:
    """A copy of a GGUF with src's key/values; change(tensor) -> (array in numpy order, raw type or None)."""
    r = GGUFReader(src)
    w = copy_metadata(r, dst)
    for t in r.tensors:
        data, raw_type = change(t)
        w.add_tensor(t.name, data, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def dequantized_copy(src: Path, dst: Path) -> Path:
    """An F32 copy of a GGUF, every tensor decoded by gguf's own dequantizer (not ours)."""
    def decode(t):
        data = (np.asarray(t.data, np.float32) if t.tensor_type in (T.F32, T.F16)
                else dequantize(t.data, t.tensor_type).astype(np.float32))
        return data.reshape(tuple(reversed([int(d) for d in t.shape]))), None

    return changed_copy(src, dst, decode)


def rel_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.std(a))


def decoded(ts: dict, name: str) -> np.ndarray:
    """A tensor's values (float64, numpy order) as llama.cpp sees them: decoded by gguf's
    dequantizer and multiplied by its .scale sidecar (one per expert) when it has one."""
    t = ts[name]
    raw = np.asarray(t.data)
    values = (raw.astype(np.float64) if t.tensor_type in (T.F16, T.F32)
              else dequantize(raw, t.tensor_type).astype(np.float64))
    values = values.reshape(tuple(reversed([int(d) for d in t.shape])))
    sidecar = ts.get(name.removesuffix(".weight") + ".scale")
    if sidecar is not None:
        scale = np.asarray(sidecar.data, np.float64).reshape(-1)
        values = values * scale.reshape((-1,) + (1,) * (values.ndim - 1)) if scale.size > 1 else values * scale[0]
    return values


# the key/values of an imatrix GGUF: (value, type, item type)
KEYS = {
    "imatrix.datasets": (["calib-a.txt", "calib-b.txt"], GGUFValueType.ARRAY, GGUFValueType.STRING),
    "imatrix.chunk_count": (17, GGUFValueType.UINT32, None),
    "imatrix.chunk_size": (512, GGUFValueType.UINT32, None),
}


def gguf_arrays(weight: str, sums, counts) -> dict:
    """The two tensors llama-imatrix writes for one weight: in_sum2 [n_mat, ne0], counts [n_mat, 1]."""
    counts = np.asarray(counts, np.float32).reshape(-1, 1)
    return {f"{weight}.in_sum2": np.asarray(sums, np.float32).reshape(counts.shape[0], -1), f"{weight}.counts": counts}


def write_imatrix(path, arrays: dict, keys: dict = KEYS):
    """An imatrix GGUF as llama-imatrix writes it, with these tensors and key/values."""
    # GGUFWriter always adds general.architecture; real imatrix files have none
    w = GGUFWriter(path, "llama")
    w.add_type("imatrix")
    for key, (value, vtype, sub) in keys.items():
        w.add_key_value(key, value, vtype, sub)
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
