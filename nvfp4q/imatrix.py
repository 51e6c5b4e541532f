"""Importance matrices from llama-imatrix: the GGUF format and the legacy .dat format.

Both become per-tensor importance vectors normalised as llama-quantize does, so the
search weights columns exactly as llama.cpp users expect from their imatrix files.
"""

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType as V

from nvfp4q import gguf_header
from nvfp4q.errors import UserError

SUM2, COUNTS = ".in_sum2", ".counts"


@dataclass
class Entry:
    values: np.ndarray  # float32 [n_mat, ne0]: one importance vector per expert (1 for dense)
    seen: np.ndarray  # bool [n_mat]: False where the expert was never activated (count 0)


@dataclass
class Imatrix:
    path: Path
    format: str  # "gguf" or "dat"
    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def load(path: Path) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such imatrix file")
    imat = _load_gguf(path) if gguf_header.is_gguf(path) else _load_dat(path)
    for name, e in imat.entries.items():
        if not np.all(np.isfinite(e.values)):
            raise UserError(f"{path}: imatrix entry {name} has non-finite values (after dividing by its counts)")
    return imat


def _load_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise UserError(f"{path}: truncated legacy imatrix at byte {pos}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries <= 0 or n_entries > len(data) // 12:
        raise UserError(f"{path}: not an imatrix file (entry count {n_entries})")
    entries = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise UserError(f"{path}: not an imatrix file (bad name length {name_len})")
        name = bytes(take(f"<{name_len}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval <= 0:
            raise UserError(f"{path}: entry {name} has {nval} values")
        sums = np.array(take(f"<{nval}f"), dtype=np.float32)
        values = sums / np.float32(ncall) if ncall > 0 else sums
        entries[name] = Entry(values.reshape(1, -1).astype(np.float32), np.array([ncall > 0]))
    imat = Imatrix(path, "dat", entries)
    if pos < len(data):  # optional trailer: chunk count, dataset name
        (imat.chunk_count,) = take("<i")
        (ds_len,) = take("<i")
        if ds_len < 0:
            raise UserError(f"{path}: not an imatrix file (bad dataset name length {ds_len})")
        imat.datasets = [bytes(take(f"<{ds_len}s")[0]).decode("utf-8", "replace")]
    return imat


def _load_gguf(path: Path) -> Imatrix:
    """Through nvfp4q's own header parser and bounded reads: gguf's reader raises, warns or
    allocates without bound on a damaged file (a bad UTF-8 string, a huge count)."""
    h = gguf_header.read(path)
    datasets, chunk_count, chunk_size = (_key(h, k) for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                              "imatrix.chunk_size"))
    if not (isinstance(datasets, gguf_header.Array) and datasets.item_type == V.STRING and datasets.complete):
        raise UserError(f"{path}: imatrix.datasets is not a list of strings")
    for k, v in (("imatrix.chunk_count", chunk_count), ("imatrix.chunk_size", chunk_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise UserError(f"{path}: {k} is not an integer")
    tensors = {t.name: t for t in h.tensors}
    entries = {}
    with open(path, "rb") as f:
        for name, t in tensors.items():
            if not name.endswith(COUNTS):
                continue
            base = name[: -len(COUNTS)]
            sums = tensors.get(base + SUM2)
            if sums is None:
                raise UserError(f"{path}: {name} has no matching {base}{SUM2}")
            s, c = read_f32(f, h, sums), read_f32(f, h, t).reshape(-1)
            if c.shape[0] != s.shape[0]:
                raise UserError(f"{path}: {base}: {c.shape[0]} counts for {s.shape[0]} matrices")
            seen = c > 0
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused by load()
                values = np.where(seen[:, None], s / np.where(seen, c, 1)[:, None], np.float32(1))
            entries[base] = Entry(values.astype(np.float32), seen)
    for name in tensors:
        if name.endswith(SUM2) and name[: -len(SUM2)] not in entries:
            raise UserError(f"{path}: {name} has no matching counts")
    return Imatrix(path, "gguf", entries, list(datasets.head), chunk_count, chunk_size)


def _key(h: gguf_header.Header, name: str):
    if name not in h.fields:
        raise UserError(f"{h.path}: GGUF imatrix lacks the key {name}")
    return h.fields[name].value


def read_f32(f, h: gguf_header.Header, t: gguf_header.Tensor) -> np.ndarray:
    """A tensor's values as float32 [rows, ne0]; llama.cpp reads imatrix tensors as F32 only."""
    if t.type != GGMLQuantizationType.F32 or t.nbytes is None:
        raise UserError(f"{h.path}: {t.name} is not F32 values (type {t.type_name}, shape {list(t.shape)})")
    if t.offset + t.nbytes > h.file_size:
        raise UserError(f"{h.path}: truncated: {t.name} ends past the end of the file")
    f.seek(t.offset)
    return np.frombuffer(f.read(t.nbytes), np.float32).reshape(t.rows, t.shape[0])


def for_tensor(imat: Imatrix, name: str, shape: tuple[int, ...]) -> Entry | None:
    """The entry for a weight, checked against its shape (ne0 per expert), or None."""
    entry = imat.entries.get(name)
    if entry is None:
        return None
    ne0 = shape[0]
    n_mat = shape[2] if len(shape) >= 3 else 1
    got = entry.values.size
    if got != ne0 * n_mat:
        raise UserError(
            f"imatrix entry {name} has {got} values, tensor needs {ne0 * n_mat} (ne0 {ne0} x {n_mat})"
        )
    if entry.values.shape[0] != n_mat:  # legacy files store experts as one flat vector
        entry = Entry(entry.values.reshape(n_mat, ne0), np.repeat(entry.seen, n_mat))
    return entry
