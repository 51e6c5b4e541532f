"""A header-only GGUF reader: keys, values and tensor infos, never tensor data.

gguf's GGUFReader turns every metadata array into numpy parts up front (about 20 s for a
262k-token vocabulary) and refuses a file whose tensor data is cut short. `inspect` needs
the header in milliseconds, and a truncated tensor is a --verify finding, not a parse error.
So this parser skips long arrays (keeping their first items) and checks nothing past the
tensor infos.
"""

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as V

from nvfp4q.errors import UserError

MAGIC = b"GGUF"
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
DEFAULT_ALIGNMENT = 32
HEAD_ITEMS = 8  # array items kept; the rest are skipped
_FULL_ARRAYS = 1 << 20  # items kept of the arrays read whole (below)
_FULL_KEYS = ("nvfp4q.", "imatrix.")  # our own keys (--against needs the factors), an imatrix's datasets
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**63 - 1  # a tensor's element count is an int64 in ggml
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
_STRUCTS = {vt: struct.Struct(fmt) for vt, fmt in _SCALARS.items()}
_U32, _U64 = _STRUCTS[V.UINT32], _STRUCTS[V.UINT64]


@dataclass
class Array:
    item_type: V
    length: int
    head: list  # the first HEAD_ITEMS items (all of them when the array is short)

    @property
    def complete(self) -> bool:
        return len(self.head) == self.length


@dataclass
class Field:
    key: str
    type: V
    value: object  # int, float, bool, str or Array
    span: tuple[int, int] = (0, 0)  # file bytes of the type id and value, for copying as is


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    type_id: int
    rel_offset: int  # as stored: from the start of the data section
    offset: int  # absolute, in its file
    part: int  # index into the model's parts

    @property
    def type(self) -> GGMLQuantizationType | None:
        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            return None

    @property
    def type_name(self) -> str:
        t = self.type
        return t.name if t is not None else f"TYPE_{self.type_id}"

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.n_elements // self.shape[0] if self.shape and self.shape[0] else 0

    @property
    def row_bytes(self) -> int | None:
        """Bytes per row, or None when the type is unknown or ne0 does not fill whole blocks."""
        sizes = GGML_QUANT_SIZES.get(self.type)
        if sizes is None or not self.shape or self.shape[0] % sizes[0]:
            return None
        return self.shape[0] // sizes[0] * sizes[1]

    @property
    def nbytes(self) -> int | None:
        rb = self.row_bytes
        return None if rb is None else rb * self.rows


@dataclass
class Header:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: list[Tensor]
    alignment: int
    data_start: int
    file_size: int

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, vt: V):
        s = _STRUCTS[vt]
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def string(self) -> str:
        n = self.scalar(V.UINT64)
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8", "replace")

    def value(self, vt: V, limit: int = HEAD_ITEMS):
        if vt == V.STRING:
            return self.string()
        if vt == V.ARRAY:
            return self.array(limit)
        return self.scalar(vt)

    def array(self, limit: int = HEAD_ITEMS) -> Array:
        item_type = V(self.scalar(V.UINT32))
        n = self.scalar(V.UINT64)
        head = [self.value(item_type) for _ in range(min(n, limit))]
        self.skip(item_type, n - len(head))
        return Array(item_type, n, head)

    def skip(self, vt: V, n: int) -> None:
        if vt in _STRUCTS:
            self.pos += n * _STRUCTS[vt].size
        elif vt == V.STRING:
            unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
            for _ in range(n):
                pos += 8 + unpack(buf, pos)[0]
            self.pos = pos
        else:  # nested arrays: rare and short, walk them
            for _ in range(n):
                self.array()
        if self.pos > len(self.buf):
            raise struct.error("array runs past the end of the file")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic; UserError if it cannot be opened."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None


def read(path: Path, part: int = 0) -> Header:
    """Parse the header and tensor infos of one GGUF file; UserError if it is not readable."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise UserError(f"{path}: not a GGUF file (bad magic)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, part)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except struct.error:
        raise UserError(f"{path}: unreadable GGUF header (the file is cut short or corrupt)") from None
    except (ValueError, OverflowError) as e:  # garbage value types, counts or sizes
        raise UserError(f"{path}: unreadable GGUF header ({e})") from None


def _parse(path: Path, buf, part: int) -> Header:
    c = _Cursor(buf)
    c.pos = 4
    version = c.scalar(V.UINT32)
    if version not in (2, 3):
        hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
        raise UserError(f"{path}: unsupported GGUF version {version}{hint}")
    n_tensors, n_kv = c.scalar(V.UINT64), c.scalar(V.UINT64)
    fields = {}
    for _ in range(n_kv):
        key = c.string()
        start = c.pos
        vt = V(c.scalar(V.UINT32))
        value = c.value(vt, _FULL_ARRAYS if key.startswith(_FULL_KEYS) else HEAD_ITEMS)
        fields[key] = Field(key, vt, value, (start, c.pos))
    align_field = fields.get("general.alignment")
    alignment = int(align_field.value) if align_field is not None else DEFAULT_ALIGNMENT
    if alignment <= 0 or alignment & (alignment - 1):
        raise UserError(f"{path}: general.alignment {alignment} is not a power of two")
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar(V.UINT32)
        if n_dims > MAX_DIMS:
            raise UserError(f"{path}: tensor {name} has {n_dims} dimensions")
        shape = tuple(c.scalar(V.UINT64) for _ in range(n_dims))
        if 0 in shape or math.prod(shape) >= MAX_ELEMENTS:  # as ggml's own loader refuses them
            raise UserError(f"{path}: tensor {name} has an impossible shape {list(shape)}")
        infos.append((name, shape, c.scalar(V.UINT32), c.scalar(V.UINT64)))
    data_start = -(-c.pos // alignment) * alignment
    tensors = [Tensor(n, s, t, o, data_start + o, part) for n, s, t, o in infos]
    return Header(path, version, fields, tensors, alignment, data_start, len(buf))


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


def read_parts(path: Path) -> list[Header]:
    """The headers of every part of the model that path names (one for a single file); a tensor
    name may occur once in all of them (llama.cpp refuses a model otherwise, our writer too)."""
    headers = [read(p, i) for i, p in enumerate(split_parts(path))]
    seen = set()
    for h in headers:
        for t in h.tensors:
            if t.name in seen:
                raise UserError(f"{h.path}: tensor {t.name} occurs twice in the model")
            seen.add(t.name)
    return headers
