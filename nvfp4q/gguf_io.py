"""GGUF files in and out: headers and mapped views, source rows read into reused buffers, streamed writing.

Reading parses only the header (gguf_header) and memory-maps the data (tensors copied as they
are are written from the mapping; converted rows are read with preadv), so a tensor's bytes are
only touched when it is written or converted, and metadata is copied as the source's own
bytes (a 262k-token vocabulary costs milliseconds, not gguf's reader's 20 s). Writing goes
through gguf's writer for the header, metadata and tensor infos, then tensor data one
tensor at a time.
"""

import functools
import io
import mmap
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.gguf_writer import GGUFValue
from gguf.quants import dequantize

from nvfp4q import gguf_header
from nvfp4q.errors import UserError
from nvfp4q.plan import FLOAT_SOURCES, TensorInfo

# Keys the writer owns: copying them from the source would describe the wrong file.
_OWNED_KEYS = ("GGUF.", "split.")
_OWNED_EXACT = ("general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment")


_BUFFERS: dict[int, np.ndarray] = {}


def reused_buffer(key: int, nbytes: int) -> np.ndarray:
    """nbytes of a buffer kept for reuse under key (uint8): fresh pages cost the kernel a
    zeroing each, and a model's tensors would ask for gigabytes of them. Main thread only."""
    buf = _BUFFERS.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = _BUFFERS[key] = np.empty(nbytes, np.uint8)
    return buf[:nbytes]


@dataclass
class SourceTensor:
    info: TensorInfo
    data: np.ndarray  # uint8, memory-mapped
    part: int = 0  # which file of a split model holds it
    mapping: mmap.mmap | None = None
    offset: int = 0
    file: io.FileIO | None = None  # for read(); closed when the last tensor of its file goes

    def release(self) -> None:
        """Drop the tensor's pages from this process: resident mapped pages count as our
        memory, and without this the peak would grow with the model."""
        self._advise(mmap.MADV_DONTNEED)

    def prefetch(self) -> None:
        """Have the kernel start reading the tensor from disk now, in the background, so that
        a source not in the page cache is read while the tensor before it is quantized."""
        self._advise(mmap.MADV_WILLNEED)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's bytes [rows, row bytes], copied from the file into
        a reused buffer (valid until the next read): cheaper than faulting the mapping's pages in,
        or fresh pages, one by one, and nothing stays mapped."""
        if self.file is None:
            return self.raw_rows()[start:stop]
        row = self.data.nbytes // max(1, self.rows)
        buf = reused_buffer(0, (stop - start) * row).reshape(stop - start, row)
        try:
            n = os.preadv(self.file.fileno(), [buf], self.offset + start * row)
        except OSError as e:
            raise UserError(f"reading tensor {self.info.name} failed: {e.strerror or e}") from None
        if n != buf.nbytes:
            raise UserError(f"reading tensor {self.info.name} failed: the file is shorter than its header says")
        return buf

    def _advise(self, advice: int) -> None:
        if self.mapping is not None:
            start = self.offset // mmap.PAGESIZE * mmap.PAGESIZE
            length = self.offset + self.data.nbytes - start
            if length > 0:
                self.mapping.madvise(advice, start, length)

    @property
    def rows(self) -> int:
        return int(np.prod(self.info.shape[1:], dtype=np.int64))

    def raw_rows(self) -> np.ndarray:
        """The tensor's bytes as [rows, bytes per row] (a view: nothing is read yet)."""
        return self.data.reshape(self.rows, -1)


@dataclass
class Model:
    paths: list[Path]
    arch: str
    header: gguf_header.Header  # of the first part: its metadata is the model's
    tensors: list[SourceTensor]

    @property
    def alignment(self) -> int:
        return self.header.alignment

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def map_file(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None


def open_model(path: Path) -> Model:
    headers = gguf_header.read_parts(path)
    tensors = []
    for h in headers:
        mapping = map_file(h.path) if h.tensors else None
        data = np.frombuffer(mapping, dtype=np.uint8) if mapping is not None else None
        file = open(h.path, "rb", buffering=0) if mapping is not None else None  # noqa: SIM115
        for t in h.tensors:
            if t.type is None or t.nbytes is None:
                raise UserError(f"{h.path}: tensor {t.name} has an unsupported type or shape ({t.type_name})")
            if t.offset + t.nbytes > h.file_size:
                raise UserError(f"{h.path}: truncated: tensor {t.name} ends past the end of the file")
            info = TensorInfo(t.name, t.shape, t.type)
            tensors.append(SourceTensor(info, data[t.offset:t.offset + t.nbytes], t.part, mapping, t.offset, file))
    arch = headers[0].get("general.architecture", "")
    return Model([h.path for h in headers], arch if isinstance(arch, str) else "", headers[0], tensors)


# How the kernels take each float type's rows as they are (kernels.SOURCE_KINDS)
SOURCE_VIEWS = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}


def source_rows(t: SourceTensor, start: int, stop: int, allow_requantize: bool) -> np.ndarray:
    """Rows [start, stop) of a tensor [rows, ne0] as the kernels read them: a view of a float
    type's bytes (kernels.as_float32 decodes it), or float32 decoded from a quantized type."""
    qtype = t.info.type
    raw = t.read(start, stop)
    if qtype in SOURCE_VIEWS:
        return raw.view(SOURCE_VIEWS[qtype])
    if allow_requantize and gguf_decodes(qtype):
        return dequantized(raw, qtype)
    raise UserError(f"tensor {t.info.name}: cannot convert from type {qtype.name}")


@functools.cache
def gguf_decodes(qtype: T) -> bool:
    """Whether gguf's dequantizer handles the type (integer types, Q8_1, Q8_K, ... it does not)."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def dequantized(raw: np.ndarray, qtype: T) -> np.ndarray:
    """Rows of raw blocks [rows, row bytes] decoded by gguf as float32 [rows, ne0]. A damaged
    block decodes to inf or NaN (inf * 0) without numpy's warnings: callers check the values."""
    with np.errstate(over="ignore", invalid="ignore"):
        return dequantize(raw, qtype).astype(np.float32).reshape(raw.shape[0], -1)


def check_convertible(t: SourceTensor, allow_requantize: bool) -> None:
    if t.info.type in FLOAT_SOURCES:
        return
    if not gguf_decodes(t.info.type):
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


def tensor_info_bytes(name: str, n_dims: int) -> int:
    """A tensor info in the header: name, dimension count, dimensions, type, offset."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8


def padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class _Raw(bytes):
    """A metadata value (type id and payload) copied byte for byte from the source."""


def copy_metadata(writer: GGUFWriter, header: gguf_header.Header) -> None:
    with open(header.path, "rb") as f:
        for key, field in header.fields.items():
            if key.startswith(_OWNED_KEYS) or key in _OWNED_EXACT:
                continue
            f.seek(field.span[0])
            writer.kv_data[0][key] = GGUFValue(_Raw(f.read(field.span[1] - field.span[0])), field.type)


class _TempShardWriter(GGUFWriter):
    """gguf's writer, writing each part under a hidden temporary name beside its final name."""

    final_names: list[Path] = []

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if isinstance(val, _Raw):
            return bytes(val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def format_shard_names(self, path: Path) -> list[Path]:
        self.final_names = super().format_shard_names(path)
        return [p.with_name(f".{p.name}.{os.getpid()}.part") for p in self.final_names]


class _FileWrite(np.ndarray):
    """An array gguf's writer writes through the file object, not with ndarray.tofile, whose
    short-write error has no errno ("N requested and M written"): a full disk must say so."""

    def tofile(self, fid, *args, **kwargs) -> None:
        fid.write(memoryview(self.view(np.ndarray)).cast("B"))


class Writer:
    """Header, metadata and tensor infos through gguf's writer, then tensor data in plan order.

    Parts are split by count/size (gguf's writer) or where new_part() is called; commit()
    renames the finished temporaries onto the final names, abort() removes them.
    """

    def __init__(self, out: Path, arch: str, alignment: int, split_max_tensors: int = 0,
                 split_max_size: int = 0):
        self._w = _TempShardWriter(out, arch, split_max_tensors=split_max_tensors,
                                   split_max_size=split_max_size)
        self._temps: list[Path] = []
        if alignment != 32:
            self._w.data_alignment = alignment
            self._w.add_custom_alignment(alignment)

    @property
    def gguf(self) -> GGUFWriter:
        return self._w

    def new_part(self) -> None:
        if self._w.tensors[-1]:
            self._w.tensors.append({})

    def add_tensor_info(self, name: str, shape: tuple[int, ...], qtype: T, nbytes: int) -> None:
        self._w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)

    def header_bytes(self) -> int:
        """Bytes of a single-part output's header, metadata and tensor infos, before the padding
        that aligns the data: what begin_data() will write."""
        w = self._w
        kv = sum(len(w._pack_val(k, GGUFValueType.STRING, add_vtype=False))
                 + len(w._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
                 for k, v in w.kv_data[0].items())
        return 24 + kv + sum(tensor_info_bytes(name, len(ti.shape)) for part in w.tensors for name, ti in part.items())

    def part_names(self) -> list[Path]:
        self._w.format_shard_names(self._w.path)
        return list(self._w.final_names)

    def begin_data(self) -> None:
        try:
            self._temps = self._w.format_shard_names(self._w.path)
            self._w.write_header_to_file()
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
        except OSError as e:
            raise UserError(f"{e.filename or self._w.path}: cannot write: {e.strerror or e}") from None

    def write_tensor(self, data: np.ndarray) -> None:
        try:
            self._w.write_tensor_data(np.ascontiguousarray(data).view(_FileWrite))
        except OSError as e:
            raise UserError(f"writing output failed: {e.strerror or e}") from None

    def commit(self) -> list[Path]:
        try:
            for f in self._w.fout or []:
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"writing output failed: {e.strerror or e}") from None
        self._w.close()
        # all parts or none: a signal arriving between two renames waits until they are done
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for tmp, final in zip(self._temps, self._w.final_names):
                os.replace(tmp, final)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return self._w.final_names

    def abort(self) -> None:
        for f in self._w.fout or []:
            try:
                f.close()
            except OSError:
                pass
        for tmp in self._temps:
            tmp.unlink(missing_ok=True)
