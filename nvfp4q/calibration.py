"""Calibration files: the second moments `nvfp4q calibrate` collects, in a GGUF that is also an imatrix.

Beside llama-imatrix's own tensors (`<weight>.in_sum2`, `<weight>.counts`: any tool that reads
an imatrix reads this file), it holds for each distinct weight input the sum over the calibration
tokens of x x^T (`<weight>.xtx`, F32, ggml shape [band, band, blocks]), less each chunk's first
token, whose x^2 is in `in_sum2` only (docs/calibration.md). An input at most `band`
wide has one block, the whole matrix; a wider one keeps its diagonal band x band blocks (zero
padded at the end), the approximation the rounding then honours, and the share of the Frobenius
norm it drops, measured on the first chunk. Weights that read the same input (q/k/v, gate/up) share
one matrix: `nvfp4q.calibration.weights` lists every weight with one and `.sources` the weight
whose `.xtx` it uses. Expert tensors (MUL_MAT_ID) have the diagonal only, per expert.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from nvfp4q import gguf_header, gguf_io, imatrix
from nvfp4q.errors import UserError

XTX = ".xtx"
KEY_WEIGHTS = "nvfp4q.calibration.weights"
KEY_SOURCES = "nvfp4q.calibration.sources"
KEY_BAND = "nvfp4q.calibration.band"
KEY_OFFBAND = "nvfp4q.calibration.offband_share"  # one per source, in KEY_SOURCES' first-seen order
KEY_CTX = "nvfp4q.calibration.ctx"


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

    def diagonal(self) -> np.ndarray:
        return np.diagonal(self.blocks, axis1=1, axis2=2).reshape(-1)[: self.width].copy()


@dataclass
class Calibration:
    path: Path
    imatrix: imatrix.Imatrix  # the diagonal, as llama-imatrix writes it
    band: int
    sources: dict[str, str]  # weight -> the weight whose moments it uses
    moments: dict[str, Moments]  # by source weight

    def for_weight(self, name: str) -> Moments | None:
        src = self.sources.get(name)
        return None if src is None else self.moments[src]


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
    moments = {}
    for src, share in zip(distinct, offband.head):
        t = tensors.get(src + XTX)
        entry = imat.entries.get(src)
        if t is None or entry is None:
            raise UserError(f"{path}: no {src}{XTX} with its imatrix entry")
        if t.type != T.F32 or len(t.shape) != 3 or t.shape[0] != t.shape[1] or t.nbytes is None:
            raise UserError(f"{path}: {t.name} is not F32 [band, band, blocks] (shape {list(t.shape)})")
        if t.offset + t.nbytes > h.file_size:
            raise UserError(f"{path}: truncated: {t.name} ends past the end of the file")
        width = entry.values.shape[1]
        if t.shape[0] * t.shape[2] < width or (t.shape[2] > 1 and (t.shape[0] != band or band % 64)):
            raise UserError(f"{path}: {t.name} of shape {list(t.shape)} does not cover {width} columns")
        blocks = np.frombuffer(mm, np.float32, t.n_elements, t.offset).reshape(t.shape[2], t.shape[1], t.shape[0])
        if not np.all(np.isfinite(blocks)):
            raise UserError(f"{path}: {t.name} has non-finite values")
        count = float(_counts(path, h, tensors, src))
        moments[src] = Moments(width, count, blocks, float(share))
    return Calibration(path, imat, band, dict(zip(weights, sources)), moments)


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


def write(out: Path, moments: dict[str, Moments], sources: dict[str, str], diag: dict[str, tuple],
          dataset: str, chunks: int, ctx: int, band: int) -> Path:
    """diag: weight -> (in_sum2 [n_mat, width], counts [n_mat]) for every weight seen, experts too."""
    w = gguf_io.Writer(out, "", gguf_header.DEFAULT_ALIGNMENT)
    g = w.gguf
    g.kv_data[0].pop("general.architecture", None)  # an imatrix has none
    try:
        g.add_type("imatrix")
        g.add_array("imatrix.datasets", [dataset])
        g.add_uint32("imatrix.chunk_count", chunks)
        g.add_uint32("imatrix.chunk_size", ctx)
        g.add_uint32(KEY_CTX, ctx)
        g.add_uint32(KEY_BAND, band)
        g.add_array(KEY_WEIGHTS, list(sources))
        g.add_array(KEY_SOURCES, list(sources.values()))
        g.add_array(KEY_OFFBAND, [float(moments[s].offband) for s in dict.fromkeys(sources.values())])
        data = []
        for name, (sums, counts) in diag.items():
            data += [(name + imatrix.SUM2, sums), (name + imatrix.COUNTS, counts.reshape(-1, 1))]
        data += [(src + XTX, moments[src].blocks) for src in dict.fromkeys(sources.values())]
        data = [(name, np.ascontiguousarray(arr, np.float32)) for name, arr in data]
        for name, arr in data:
            w.add_tensor_info(name, tuple(reversed(arr.shape)), T.F32, arr.nbytes)
        w.begin_data()
        for _, arr in data:
            w.write_tensor(arr)
        return w.commit()[0]
    except BaseException:
        w.abort()
        raise
