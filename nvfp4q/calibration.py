"""Calibration files: the second moments `nvfp4q calibrate` collects, in a GGUF that is also an imatrix.

Beside llama-imatrix's own tensors (`<weight>.in_sum2`, `<weight>.counts`: any tool that reads
an imatrix reads this file), it holds for each distinct weight input the sum over the calibration
tokens of x x^T (`<weight>.xtx`, F32, ggml shape [band, band, blocks]), less each chunk's first
token, whose x^2 is in `in_sum2` only (docs/calibration.md). An input at most `band`
wide has one block, the whole matrix; a wider one keeps its diagonal band x band blocks (zero
padded at the end), the approximation the rounding then honours, and the share of the Frobenius
norm it drops, measured on the first chunk. Weights that read the same input (q/k/v, gate/up) share
one matrix: `nvfp4q.calibration.weights` lists every weight with one and `.sources` the weight
whose `.xtx` it uses. An input that calibrate sketched has instead `<weight>.sketch` (F32, ggml
shape [size, width]: F with X^T X ~ F F^T off the diagonal) and `<weight>.diag` (X^T X's own
diagonal). Expert tensors (MUL_MAT_ID) have the diagonal only, per expert.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from nvfp4q import gguf_header, gguf_io, imatrix
from nvfp4q.errors import UserError
from nvfp4q.matmul import matmul

XTX = ".xtx"
SKETCH = ".sketch"
DIAG = ".diag"
FACTOR = ".u"  # the rounding's U of a Moments input, for the settings in KEY_FACTOR
KEY_WEIGHTS = "nvfp4q.calibration.weights"
KEY_SOURCES = "nvfp4q.calibration.sources"
KEY_BAND = "nvfp4q.calibration.band"
# one per source, in KEY_SOURCES' first-seen order: the share of ||X^T X||_F^2 outside the blocks,
# or for a sketch the share of the trace of the scaled X^T X outside it (Sketch)
KEY_OFFBAND = "nvfp4q.calibration.offband_share"
KEY_CTX = "nvfp4q.calibration.ctx"
KEY_FACTOR = "nvfp4q.calibration.factor_settings"  # [damp, shrink] of the stored factors


@dataclass
class Moments:
    """One input's sum of x x^T over the calibration tokens but each chunk's first (`count` is all
    of them: the scale of H does not change the rounding), as diagonal blocks of `band`."""

    width: int
    count: float
    blocks: np.ndarray  # float32 [n_blocks, band, band]
    offband: float = 0.0  # share of ||X^T X||_F outside the blocks (first chunk); 0 when whole

    @property
    def band(self) -> int:
        return self.blocks.shape[1]

    @property
    def whole(self) -> bool:
        return self.blocks.shape[0] == 1 and self.band == self.width

    @property
    def max_rank(self) -> int:
        return self.band

    def diagonal(self) -> np.ndarray:
        return np.diagonal(self.blocks, axis1=1, axis2=2).reshape(-1)[: self.width].copy()

    def parts(self):
        """Per diagonal block: its diagonal (float64) and q -> block @ q."""
        for blk in self.blocks:
            yield np.diagonal(blk).astype(np.float64), lambda q, blk=blk: matmul(blk, q)

    def square(self, lo: int, hi: int) -> np.ndarray:
        """X^T X[lo:hi, lo:hi], inside one block."""
        b, o = divmod(lo, self.band)
        return self.blocks[b, o:o + hi - lo, o:o + hi - lo]

    def tensors(self, src: str) -> list:
        return [(src + XTX, self.blocks)]


@dataclass
class Sketch:
    """An input too wide to keep whole: X^T X ~ F F^T + the diagonal that F lacks (calibrate's
    Nystrom sketch; its columns, `max_rank`, are the rank). The low-rank rounding needs no more
    (docs/calibration.md)."""

    width: int
    count: float
    factor: np.ndarray  # float32 [width, size]
    diag: np.ndarray  # float32 [width]: X^T X's own diagonal
    offband: float = 0.0  # share of the trace of the scaled X^T X outside F F^T

    @property
    def band(self) -> int:
        return self.width

    @property
    def max_rank(self) -> int:
        return self.factor.shape[1]

    def diagonal(self) -> np.ndarray:
        return self.diag.copy()

    def parts(self):
        f = self.factor
        rest = np.maximum(self.diag - np.einsum("ij,ij->i", f, f), np.float32(0.0))[:, None]
        yield self.diag.astype(np.float64), lambda q: matmul(f, f.T @ q) + rest * q

    def square(self, lo: int, hi: int) -> np.ndarray:
        f = self.factor[lo:hi]
        out = f @ f.T
        np.fill_diagonal(out, self.diag[lo:hi])
        return out

    def tensors(self, src: str) -> list:
        return [(src + SKETCH, self.factor), (src + DIAG, self.diag)]


@dataclass
class Calibration:
    path: Path
    imatrix: imatrix.Imatrix  # the diagonal, as llama-imatrix writes it
    band: int
    sources: dict[str, str]  # weight -> the weight whose moments it uses
    moments: dict[str, Moments | Sketch]  # by source weight
    factors: dict[str, np.ndarray] = field(default_factory=dict)  # by source weight, for factor_settings
    factor_settings: tuple[float, float] | None = None  # (damp, shrink)

    def for_weight(self, name: str) -> Moments | Sketch | None:
        src = self.sources.get(name)
        return None if src is None else self.moments[src]

    def stored_factor(self, src: str, damp: float, shrink: float) -> np.ndarray | None:
        """The U that calibrate computed for src, if it was for these settings."""
        return self.factors.get(src) if self.factor_settings == (damp, shrink) else None


def load(path: Path) -> Calibration:
    path = Path(path)
    imat = imatrix.load(path)
    h = gguf_header.read(path)
    weights, sources = (_strings(h, k) for k in (KEY_WEIGHTS, KEY_SOURCES))
    if len(weights) != len(sources):
        raise UserError(f"{path}: {len(weights)} calibrated weights but {len(sources)} sources")
    band = h.get(KEY_BAND)
    if not isinstance(band, int) or band < 1:
        raise UserError(f"{path}: {KEY_BAND} is missing or not a positive integer")
    offband = h.get(KEY_OFFBAND)
    distinct = list(dict.fromkeys(sources))
    if not (isinstance(offband, gguf_header.Array) and offband.complete and len(offband.head) == len(distinct)):
        raise UserError(f"{path}: {KEY_OFFBAND} does not have one value per source")
    tensors = {t.name: t for t in h.tensors}
    mm = gguf_io.map_file(path)
    moments, factors = {}, {}
    for src, share in zip(distinct, offband.head):
        entry = imat.entries.get(src)
        if entry is None:
            raise UserError(f"{path}: {src} has moments but no imatrix entry")
        width, count = entry.values.shape[1], float(_counts(path, h, tensors, src))
        if src + XTX in tensors:
            t = tensors[src + XTX]
            if len(t.shape) != 3 or t.shape[0] != t.shape[1]:
                raise UserError(f"{path}: {t.name} is not F32 [band, band, blocks] (shape {list(t.shape)})")
            if t.shape[0] * t.shape[2] < width or (t.shape[2] > 1 and (t.shape[0] != band or band % 64)):
                raise UserError(f"{path}: {t.name} of shape {list(t.shape)} does not cover {width} columns")
            blocks = _array(path, h, mm, t, (t.shape[2], t.shape[1], t.shape[0]))
            moments[src] = Moments(width, count, blocks, float(share))
            if src + FACTOR in tensors:
                u = tensors[src + FACTOR]
                if list(u.shape) != list(t.shape):
                    raise UserError(f"{path}: {u.name} of shape {list(u.shape)} is not {t.name}'s {list(t.shape)}")
                factors[src] = _array(path, h, mm, u, blocks.shape)
        elif src + SKETCH in tensors and src + DIAG in tensors:
            t, td = tensors[src + SKETCH], tensors[src + DIAG]
            if len(t.shape) != 2 or t.shape[1] != width or list(td.shape) != [width]:
                raise UserError(f"{path}: {t.name} {list(t.shape)} and {td.name} {list(td.shape)} are not "
                                f"[size, {width}] and [{width}]")
            factor = _array(path, h, mm, t, (t.shape[1], t.shape[0]))
            moments[src] = Sketch(width, count, factor, _array(path, h, mm, td, (width,)), float(share))
        else:
            raise UserError(f"{path}: no {src}{XTX} (or {SKETCH} and {DIAG}) for its imatrix entry")
    settings = h.get(KEY_FACTOR)
    if factors and not (isinstance(settings, gguf_header.Array) and settings.complete and len(settings.head) == 2):
        raise UserError(f"{path}: stored factors without {KEY_FACTOR} = [damp, shrink]")
    return Calibration(path, imat, band, dict(zip(weights, sources)), moments, factors,
                       tuple(map(float, settings.head)) if factors else None)


def _array(path: Path, h: gguf_header.Header, mm, t, shape: tuple) -> np.ndarray:
    """A finite F32 tensor of the file, mapped."""
    if t.type != T.F32 or t.nbytes is None:
        raise UserError(f"{path}: {t.name} is not F32")
    if t.offset + t.nbytes > h.file_size:
        raise UserError(f"{path}: truncated: {t.name} ends past the end of the file")
    a = np.frombuffer(mm, np.float32, t.n_elements, t.offset).reshape(shape)
    if not np.all(np.isfinite(a)):
        raise UserError(f"{path}: {t.name} has non-finite values")
    return a


def _strings(h: gguf_header.Header, key: str) -> list[str]:
    v = h.get(key)
    if not (isinstance(v, gguf_header.Array) and v.item_type == V.STRING and v.complete):
        raise UserError(f"{h.path}: not an nvfp4q calibration file ({key} is missing)")
    return list(v.head)


def _counts(path: Path, h: gguf_header.Header, tensors: dict, src: str) -> float:
    t = tensors[src + imatrix.COUNTS]
    with open(path, "rb") as f:
        c = imatrix.read_f32(f, h, t).reshape(-1)
    if c.shape[0] != 1 or not c[0] > 0:
        raise UserError(f"{path}: {src} has moments but {c.tolist()} counts")
    return c[0]


def write(out: Path, moments: dict[str, Moments | Sketch], sources: dict[str, str], diag: dict[str, tuple],
          datasets: list[str], chunks: int, ctx: int, band: int,
          factors: dict[str, Callable[[], np.ndarray]] | None = None, settings: tuple[float, float] = (0.0, 0.0)) -> Path:
    """diag: weight -> (in_sum2 [n_mat, width], counts [n_mat]) for every weight seen, experts too.
    factors: by source, what makes its U for settings (damp, shrink), made as it is written (one
    at a time in memory), so that quantize need not make it again."""
    w = gguf_io.Writer(out, "", gguf_header.DEFAULT_ALIGNMENT)
    g = w.gguf
    g.kv_data[0].pop("general.architecture", None)  # an imatrix has none
    try:
        g.add_type("imatrix")
        g.add_array("imatrix.datasets", datasets)
        g.add_uint32("imatrix.chunk_count", chunks)
        g.add_uint32("imatrix.chunk_size", ctx)
        g.add_uint32(KEY_CTX, ctx)
        g.add_uint32(KEY_BAND, band)
        g.add_array(KEY_WEIGHTS, list(sources))
        g.add_array(KEY_SOURCES, list(sources.values()))
        g.add_array(KEY_OFFBAND, [float(moments[s].offband) for s in dict.fromkeys(sources.values())])
        data = []  # (name, shape, the array or what makes it)
        for name, (sums, counts) in diag.items():
            data += [(name + imatrix.SUM2, sums.shape, sums), (name + imatrix.COUNTS, (counts.size, 1), counts)]
        for src in dict.fromkeys(sources.values()):
            data += [(name, arr.shape, arr) for name, arr in moments[src].tensors(src)]
            if factors and src in factors:
                data.append((src + FACTOR, moments[src].blocks.shape, factors[src]))
        if factors:
            g.add_key_value(KEY_FACTOR, [float(v) for v in settings], V.ARRAY, V.FLOAT64)  # read back exactly
        for name, shape, _ in data:
            w.add_tensor_info(name, tuple(reversed(shape)), T.F32, 4 * int(np.prod(shape)))
        w.begin_data()
        for _, shape, arr in data:
            w.write_tensor(np.ascontiguousarray((arr() if callable(arr) else arr).reshape(shape), np.float32))
        return w.commit()[0]
    except BaseException:
        w.abort()
        raise
