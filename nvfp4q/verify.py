"""inspect --verify and --against: decode tensors slab by slab, check them or compare them.

Tensor bytes come from plain file reads at the offsets the header parser found, one bounded
slab at a time: a truncated or overlapping layout is reported rather than crashing a memory
map, and memory stays flat whatever the tensor size. Imported only for these two options,
because it pulls in numba through nvfp4q.kernels.
"""

import math
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from nvfp4q import global_scale, gguf_header, imatrix, kernels
from nvfp4q.codecs import decodable, decode
from nvfp4q.errors import UserError

SLAB_BYTES = 16 << 20  # decoded float32 bytes per slab
NAN_CODE, SIGN_BIT = 0x7F, 0x80


def row_ranges(t: gguf_header.Tensor):
    """(matrix index, first row, end row) slabs; a slab never spans two experts of a 3D tensor."""
    per_mat = max(1, t.shape[1]) if len(t.shape) >= 2 else 1
    slab = max(1, min(per_mat, SLAB_BYTES // (4 * max(1, t.shape[0]))))
    for first in range(0, t.rows, per_mat):
        for start in range(first, first + per_mat, slab):
            yield first // per_mat, start, min(start + slab, first + per_mat)


def read_rows(f, t: gguf_header.Tensor, start: int, stop: int) -> np.ndarray:
    buf = bytearray((stop - start) * t.row_bytes)
    f.seek(t.offset + start * t.row_bytes)
    if f.readinto(buf) != len(buf):
        raise UserError(f"tensor {t.name}: file ends inside its data")
    return np.frombuffer(buf, np.uint8).reshape(stop - start, t.row_bytes)


def layout_problems(h: gguf_header.Header) -> tuple[list[dict], set[str]]:
    """Offsets and sizes against types, shapes, alignment and the file size.

    Returns the problems and the names of tensors whose bytes cannot be read at all.
    """
    problems, unreadable = [], set()

    def problem(t, text, readable=True):
        problems.append({"tensor": t.name, "problem": text})
        if not readable:
            unreadable.add(t.name)

    for t in h.tensors:
        if t.type is None:
            problem(t, f"unknown tensor type id {t.type_id}", readable=False)
        elif t.row_bytes is None:
            problem(t, f"row length {t.shape[0] if t.shape else 0} is not a whole number of "
                       f"{t.type_name} blocks", readable=False)
        elif t.offset + t.nbytes > h.file_size:
            problem(t, f"extends past the end of the file: data ends at byte {t.offset + t.nbytes}, "
                       f"{h.path.name} has {h.file_size} bytes", readable=False)
        elif not decodable(t.type):
            problem(t, f"type {t.type_name} cannot be decoded (no dequantizer for it)", readable=False)
        if t.rel_offset % h.alignment:
            problem(t, f"data offset {t.rel_offset} is not a multiple of the alignment {h.alignment}")
    placed = sorted((t for t in h.tensors if t.name not in unreadable), key=lambda t: t.offset)
    end_of = None
    for t in placed:
        if end_of is not None and t.offset < end_of[0]:
            problem(t, f"overlaps tensor {end_of[1]}")
        if end_of is None or t.offset + t.nbytes > end_of[0]:
            end_of = (t.offset + t.nbytes, t.name)
    return problems, unreadable


def _check_values(f, t: gguf_header.Tensor, codes: np.ndarray) -> list[str]:
    """Decode one tensor; counts its NVFP4 scale codes into `codes` (256 bins)."""
    nonfinite, first_bad, nonzero = 0, None, False
    own = np.zeros(256, np.int64)
    for _, start, stop in row_ranges(t):
        raw = read_rows(f, t, start, stop)
        if t.type == T.NVFP4:
            scales = raw.reshape(stop - start, -1, kernels.NVFP4_BYTES)[:, :, :4]
            own += np.bincount(scales.ravel(), minlength=256)
        with np.errstate(over="ignore", invalid="ignore"):  # damaged values: counted here, not warned
            x = decode(t.type, raw)
            bad = ~np.isfinite(x) if x.dtype.kind == "f" else None
            nonzero = nonzero or bool(np.any(x != 0))
        if bad is not None and bad.any():
            if first_bad is None:
                r, c = np.unravel_index(int(np.argmax(bad)), bad.shape)
                first_bad = (start + int(r), int(c))
            nonfinite += int(bad.sum())
    codes += own
    found = []
    if own[NAN_CODE]:
        found.append(f"{own[NAN_CODE]} NVFP4 scale byte(s) 0x7F (the NaN sentinel)")
    if own[SIGN_BIT:].sum():
        found.append(f"{own[SIGN_BIT:].sum()} NVFP4 scale byte(s) >= 0x80 (sign bit set)")
    if nonfinite:
        found.append(f"{nonfinite} non-finite value(s), the first at row {first_bad[0]}, column {first_bad[1]}")
    if not nonzero and t.n_elements:
        found.append("all values are zero")
    return found


def scale_summary(codes: np.ndarray) -> dict | None:
    total = int(codes.sum())
    if not total:
        return None
    counts = {"zero": int(codes[0]), "subnormal": int(codes[1:8].sum()),
              "normal": int(codes[8:NAN_CODE].sum()), "invalid": int(codes[NAN_CODE:].sum())}
    return {"codes": total, **counts, **{f"{k}_share": v / total for k, v in counts.items()}}


def verify(headers: list[gguf_header.Header]) -> dict:
    """Layout checks for every part, then every readable tensor decoded and checked."""
    problems, checked = [], 0
    codes = np.zeros(256, np.int64)
    for h in headers:
        found, unreadable = layout_problems(h)
        problems += found
        with open(h.path, "rb") as f:
            for t in h.tensors:
                if t.name in unreadable:
                    continue
                problems += [{"tensor": t.name, "problem": p} for p in _check_values(f, t, codes)]
                checked += 1
    return {"tensor_count": sum(len(h.tensors) for h in headers), "tensors_checked": checked,
            "problems": problems, "nvfp4_scales": scale_summary(codes)}


def _weights(entry: imatrix.Entry | None, n_mat: int, ne0: int) -> np.ndarray:
    """Per-matrix column weights, each scaled to mean 1 so tensors add up comparably."""
    w = np.ones((n_mat, ne0))
    if entry is None:
        return w
    for k in range(n_mat):
        v = entry.values[k].astype(np.float64)
        if entry.seen[k] and v.mean() > 0:
            w[k] = v / v.mean()
    return w


def _tensor_error(files, t, s, weights, scale) -> tuple[float, float]:
    """Weighted sums of squared error and of squared source values over one tensor; inf or NaN
    when a decoded value is not finite (reported as null), without numpy's warnings.

    scale: the tensor's `.scale` sidecar values (one per expert), which llama.cpp multiplies in.
    """
    err = ref = 0.0
    for mat, start, stop in row_ranges(t):
        q_raw, x_raw = read_rows(files[0], t, start, stop), read_rows(files[1], s, start, stop)
        w = weights[min(mat, len(weights) - 1)]
        with np.errstate(over="ignore", invalid="ignore"):
            q, x = decode(t.type, q_raw).astype(np.float64), decode(s.type, x_raw).astype(np.float64)
            if scale is not None:
                q *= float(scale[min(mat, len(scale) - 1)])
            err += float((((q - x) ** 2) * w).sum())
            ref += float(((x * x) * w).sum())
    return err, ref


def _metrics(err: float, ref: float) -> dict:
    rel = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)
    snr = 10 * math.log10(ref / err) if err > 0 and ref > 0 else math.inf
    return {"rel_rmse": rel, "snr_db": snr}


def _json_floats(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}


def _sidecar(files, tensors: dict, name: str) -> np.ndarray | None:
    """The F32 `.scale` values of a weight, in whichever part of the model holds them."""
    h, t = tensors.get(global_scale.sidecar_name(name), (None, None))
    if t is None or t.type_name != "F32" or not _readable(h, t):
        return None
    return read_rows(files[t.part], t, 0, t.rows).view(np.float32).astype(np.float64).reshape(-1)


def _readable(h: gguf_header.Header, t: gguf_header.Tensor) -> bool:
    return t.nbytes is not None and t.offset + t.nbytes <= h.file_size and decodable(t.type)


def _skip_reason(h: gguf_header.Header, t: gguf_header.Tensor, sh, s) -> str | None:
    if s is None:
        return "not in source"
    if s.shape != t.shape:
        return "shape differs"
    if not (_readable(h, t) and _readable(sh, s)):
        return "unreadable (see --verify)"
    return None


def _recorded_factors(h: gguf_header.Header) -> dict[str, float]:
    """The rescaling factors a run recorded, by tensor; UserError when the keys are damaged (one
    without the other, other types or lengths, a factor 0 or not finite)."""
    names, values = (h.get(f"nvfp4q.rescale{k}") for k in ("d_tensors", "_factors"))
    if names is None and values is None:
        return {}
    arrays = isinstance(names, gguf_header.Array) and isinstance(values, gguf_header.Array)
    if not (arrays and names.item_type == V.STRING and values.item_type in (V.FLOAT32, V.FLOAT64)
            and names.complete and values.complete and names.length == values.length
            and all(math.isfinite(v) and v != 0 for v in values.head)):
        raise UserError(f"{h.path}: damaged nvfp4q.rescaled_tensors / nvfp4q.rescale_factors")
    return dict(zip(names.head, values.head))


def against(headers: list[gguf_header.Header], source: Path, imatrix_path: Path | None) -> dict:
    """Each tensor's error against the same-named, same-shaped tensor of SOURCE, worst first."""
    src_headers = gguf_header.read_parts(source)
    imat = imatrix.load(imatrix_path) if imatrix_path is not None else None
    src = {t.name: (h, t) for h in src_headers for t in h.tensors}
    ours = {t.name: (h, t) for h in headers for t in h.tensors}
    factors = _recorded_factors(headers[0])
    rows, skipped, err_total, ref_total = [], [], 0.0, 0.0
    with ExitStack() as stack:
        files = [stack.enter_context(open(h.path, "rb")) for h in headers]
        src_files = [stack.enter_context(open(h.path, "rb")) for h in src_headers]
        for h in headers:
            for t in h.tensors:
                sh, s = src.get(t.name, (None, None))
                reason = _skip_reason(h, t, sh, s)
                if reason is not None:
                    skipped.append({"tensor": t.name, "reason": reason})
                    continue
                entry = imatrix.for_tensor(imat, t.name, t.shape) if imat is not None else None
                n_mat = t.rows // max(1, t.shape[1]) if len(t.shape) >= 2 else 1
                weights = _weights(entry, n_mat, t.shape[0])
                scale = _sidecar(files, ours, t.name)
                if t.name in factors:  # written as W * factor (rescaling): undo it to compare
                    scale = np.array([1.0 / factors[t.name]]) if scale is None else scale / factors[t.name]
                err, ref = _tensor_error((files[t.part], src_files[s.part]), t, s, weights, scale)
                if math.isfinite(err):
                    err_total, ref_total = err_total + err, ref_total + ref
                rows.append({"name": t.name, "type": t.type_name, "source_type": s.type_name,
                             "weighted": entry is not None, **_metrics(err, ref)})
    rows.sort(key=lambda r: -r["rel_rmse"] if not math.isnan(r["rel_rmse"]) else -math.inf)
    return {
        "source": str(source), "source_parts": [str(h.path) for h in src_headers],
        "imatrix": str(imatrix_path) if imatrix_path is not None else None,
        "compared": len(rows), "skipped": skipped,
        "total": _json_floats(_metrics(err_total, ref_total)),
        "tensors": [_json_floats(r) for r in rows],
    }
