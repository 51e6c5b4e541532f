"""GGUF files in and out: memory-mapped reading, float32 row slabs, streamed writing.

Reading goes through gguf's memory-mapped reader, so a tensor's bytes are only
touched when its rows are converted. Writing goes through gguf's writer for the
header, metadata and tensor infos, then tensor data one tensor at a time.
"""

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from nvfp4q.errors import UserError
from nvfp4q.plan import FLOAT_SOURCES, TensorInfo

GGUF_MAGIC = b"GGUF"
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Keys the writer owns: copying them from the source would describe the wrong file.
_OWNED_KEYS = ("GGUF.", "split.")
_OWNED_EXACT = ("general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment")


@dataclass
class SourceTensor:
    info: TensorInfo
    data: np.ndarray  # memory-mapped, as gguf's reader gives it

    @property
    def rows(self) -> int:
        return int(np.prod(self.info.shape[1:], dtype=np.int64))

    def raw_rows(self) -> np.ndarray:
        """The tensor's bytes as [rows, bytes per row] (a view: nothing is read yet)."""
        return self.data.reshape(-1).view(np.uint8).reshape(self.rows, -1)


@dataclass
class Model:
    paths: list[Path]
    arch: str
    fields: list  # gguf ReaderField, in file order, from the first part
    tensors: list[SourceTensor]
    alignment: int
    readers: list[GGUFReader]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def split_parts(path: Path) -> list[Path]:
    """All parts of a split model named by any one part (llama.cpp's -0000i-of-0000n naming)."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise UserError(f"{path}: split part(s) missing: {', '.join(missing)}")
    return parts


def open_reader(path: Path) -> GGUFReader:
    """gguf's reader, with its exceptions turned into one line naming the file."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    try:
        if not is_gguf(path):
            raise UserError(f"{path}: not a GGUF file (bad magic)")
        return GGUFReader(path, "r")
    except UserError:
        raise
    except PermissionError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors on bad files
        raise UserError(f"{path}: not a valid GGUF file (truncated or corrupt: {e})") from None


def field_value(field):
    return field.contents()


def open_model(path: Path) -> Model:
    parts = split_parts(path)
    readers = [open_reader(p) for p in parts]
    first = readers[0]
    arch_field = first.get_field("general.architecture")
    arch = field_value(arch_field) if arch_field is not None else ""
    align_field = first.get_field("general.alignment")
    alignment = int(field_value(align_field)) if align_field is not None else 32
    tensors = []
    for p, reader in zip(parts, readers):
        size = p.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise UserError(f"{p}: truncated: tensor {t.name} ends past the end of the file")
            info = TensorInfo(t.name, tuple(int(d) for d in t.shape), T(t.tensor_type))
            tensors.append(SourceTensor(info, t.data))
    fields = [f for f in first.fields.values()]
    return Model(parts, arch, fields, tensors, alignment, readers)


def to_float32(t: SourceTensor, start: int, stop: int, allow_requantize: bool) -> np.ndarray:
    """Rows [start, stop) of a tensor as float32 [rows, ne0]."""
    qtype = t.info.type
    raw = t.raw_rows()[start:stop]
    if qtype == T.F32:
        return raw.view(np.float32)
    if qtype == T.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if allow_requantize and qtype in GGML_QUANT_SIZES and qtype not in (T.I8, T.I16, T.I32, T.I64, T.F64):
        return dequantize(raw, qtype).astype(np.float32).reshape(stop - start, -1)
    raise UserError(f"tensor {t.info.name}: cannot convert from type {qtype.name}")


def check_convertible(t: SourceTensor, allow_requantize: bool) -> None:
    if t.info.type in FLOAT_SOURCES:
        return
    if t.info.type in (T.I8, T.I16, T.I32, T.I64, T.F64):
        raise UserError(f"tensor {t.info.name}: unsupported source type {t.info.type.name}")
    if not allow_requantize:
        raise UserError(
            f"tensor {t.info.name}: source is already quantized ({t.info.type.name}); "
            "requantizing loses quality, pass --allow-requantize to do it anyway"
        )


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's round-to-nearest-even float32 -> bf16 (NaN stays a quiet NaN)."""
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded


@contextmanager
def temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary path in target's folder; removed on any failure, moved onto target on success."""
    folder = target.parent
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    except OSError as e:
        raise UserError(f"{folder}: cannot write there: {e.strerror}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def copy_metadata(writer: GGUFWriter, fields) -> None:
    for f in fields:
        if f.name.startswith(_OWNED_KEYS) or f.name in _OWNED_EXACT:
            continue
        vtype = GGUFValueType(f.types[0])
        value = field_value(f)
        if vtype == GGUFValueType.ARRAY:
            if len(f.types) > 2 or not value:
                continue  # nested or empty arrays: gguf's writer cannot write them
            writer.add_key_value(f.name, value, vtype, sub_type=GGUFValueType(f.types[-1]))
        else:
            writer.add_key_value(f.name, value, vtype)


class Writer:
    """gguf's writer, used for the header and infos; tensor data streamed in plan order."""

    def __init__(self, path: Path, arch: str, alignment: int):
        self._w = GGUFWriter(path, arch)
        if alignment != 32:
            self._w.data_alignment = alignment
            self._w.add_custom_alignment(alignment)

    @property
    def gguf(self) -> GGUFWriter:
        return self._w

    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: T, nbytes: int) -> None:
        self._w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)

    def begin_data(self) -> None:
        self._w.write_header_to_file()
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()

    def write_tensor(self, data: np.ndarray) -> None:
        try:
            self._w.write_tensor_data(np.ascontiguousarray(data))
        except OSError as e:
            raise UserError(f"writing output failed: {e.strerror or e}") from None

    def close(self) -> None:
        if self._w.fout:
            for f in self._w.fout:
                f.flush()
                os.fsync(f.fileno())
        self._w.close()
