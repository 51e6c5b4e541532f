"""One planned tensor's output bytes: its source rows read slab by slab, checked for values the
output type cannot hold, and encoded (with the calibration's rounding where there is one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import codecs, damage, global_scale, gguf_io, imatrix, kernels, rounding
from nvfp4q.errors import UserError
from nvfp4q.plan import Step

if TYPE_CHECKING:  # quantize builds the Job this module converts
    from nvfp4q.quantize import Job, Settings

# Error weights (--weighting): the imatrix value (the default: the upstream method's); the
# imatrix value plus a tenth of its mean over the tensor, so that columns the calibration text
# hardly exercised count too (helped gemma3 slightly, hurt llama on code: docs/global-scale.md);
# or ggml's k-quant weight, importance * sqrt(sigma2 + x^2).
WEIGHTINGS = ("importance", "floor", "ggml")
SCALE_CHOICES = ("search", "local")  # --scales: by the search, or on the sub-block's block of the covariance
FLOOR = 0.1
ROUNDING_CACHE = 4  # inputs whose rounding factors are kept: the distinct inputs of one layer
SLAB_BYTES = 64 << 20  # float32 rows converted at a time: bounds memory for huge tensors
# Below what |w| an output type stays finite: F16 rounds 65520 and up to inf, a Q8_0 block stores
# its scale amax / 127 as F16 (Q5_0: amax / 16; Q5_1: the block's minimum itself), BF16 rounds
# 0x7F7F8000 and up to inf. NVFP4's scale codes saturate.
_F16_INF = 65520.0
FINITE_BELOW = {T.F16: _F16_INF, T.Q8_0: _F16_INF * 127, T.Q5_0: _F16_INF * 16, T.Q5_1: _F16_INF,
                T.BF16: float(np.uint32(0x7F7F8000).view(np.float32))}


def amax(t: gguf_io.SourceTensor, first: int, stop: int, s: Settings) -> float:
    """Largest |w| of rows [first, stop), read slab by slab."""
    slab = max(1, SLAB_BYTES // (4 * t.info.shape[0]))
    return max(m for _, _, m in slabs(t, first, stop, slab, s))


def tensor_errors(t: gguf_io.SourceTensor, entry: imatrix.Entry | None, types: list[T], s: Settings) -> dict[T, float]:
    """damage.relative_errors of a source tensor, with the importance and kernels its run would use."""
    imp = entry and [_importance(v, s) if seen else None for v, seen in zip(entry.values, entry.seen)]
    err = damage.relative_errors(lambda a, b: kernels.as_float32(next(slabs(t, a, b, b - a, s))[1]), t.info.shape,
                                 imp, types, s.search, _mode(s))
    t.release()
    return err


def _mode(s: Settings) -> int:
    return kernels.WEIGHT_GGML if s.weighting == "ggml" else kernels.WEIGHT_RAW


def _encode(step: Step, rows: np.ndarray, mult: np.float32, importance: np.ndarray | None, s: Settings,
            fed: tuple | None, out: np.ndarray) -> None:
    """Source rows times mult in the step's type, into out (their rows of the output)."""
    if fed is not None:
        rounding.quantize_nvfp4(rows, fed[0], importance, s.search, _mode(s), fed[1], s.feedback, fed[2], mult, out,
                                fed[3], s.passes)
    else:
        codecs.encode(step.type, rows, importance, s.search, _mode(s), mult, out)


def slabs(t: gguf_io.SourceTensor, first: int, stop: int, slab: int, s: Settings):
    """(start, source rows (gguf_io.source_rows), their largest |w|) over rows [first, stop),
    checked for NaN/Inf."""
    for start in range(first, stop, slab):
        rows = gguf_io.source_rows(t, start, min(start + slab, stop), s.allow_requantize)
        top, bad = kernels.scan(rows)
        if bad is not None:
            r, c = bad
            raise UserError(f"tensor {t.info.name}: non-finite value {kernels.as_float32(rows[r:r + 1])[0, c]} "
                            f"at row {start + r}, column {c}")
        yield start, rows, top


def _too_large(step: Step, rows: np.ndarray, start: int) -> UserError:
    """A finite weight the output type would store as inf: refused like a NaN, with its place."""
    rows = kernels.as_float32(rows)
    r, c = np.unravel_index(int(np.argmax(np.abs(rows) >= FINITE_BELOW[step.type])), rows.shape)
    return UserError(f"tensor {step.tensor.name}: value {rows[r, c]} at row {start + r}, column {c} "
                     f"is too large for {step.type.name} (it would be stored as inf)")


def _importance(values: np.ndarray, s: Settings) -> np.ndarray:
    """One expert's imatrix values as the kernel weighs them."""
    return (values + np.float32(FLOOR * values.mean(dtype=np.float64))).astype(np.float32) \
        if s.weighting == "floor" else values


def _rounding(job: Job, step: Step, s: Settings) -> tuple | None:
    """(U, local H blocks or None, low-rank terms or None, the whole H or None) for a tensor with
    calibrated moments, made once per input (q/k/v and gate/up share it); without error feedback U
    is the identity.
    Which inputs take the low-rank path is decided for the whole model (rounding.low_rank_inputs)."""
    if job.calib is None or step.type != T.NVFP4:
        return None
    src = job.calib.sources.get(step.tensor.name)
    if src is None:
        return None
    if src not in job.rounding_of:
        m = job.calib.moments[src]
        try:
            low = h = None
            if not s.feedback:
                u = rounding.identity(m.width)
            elif src in job.low_rank:
                u, *low = rounding.low_rank(m, s.rank, s.damp, s.shrink)
            else:
                h = rounding.covariance(m, s.damp, s.shrink)
                u = job.calib.stored_factor(src, s.damp, s.shrink)
                u = rounding.inverse_factor(h) if u is None else u
        except ValueError as e:
            raise UserError(f"{job.calib.path}: {src}: {e}") from None
        if len(job.rounding_of) >= ROUNDING_CACHE:  # tensors come sorted by name, a layer's inputs interleave
            del job.rounding_of[next(iter(job.rounding_of))]
        job.rounding_of[src] = (u, rounding.local_blocks(m) if s.scales == "local" else None, low, h)
    return job.rounding_of[src]


def convert_tensor(job: Job, index: int, s: Settings) -> tuple[np.ndarray, np.ndarray | None]:
    """One tensor's output bytes, and its sidecar scales (one per expert) when it has one.

    Converted slab by slab; a slab never crosses an expert. With a sidecar, each expert's
    amax gives its power of two g first (a pass of its own when the expert spans several
    slabs), then W/g is quantized.
    """
    step, t = job.plan[index], job.model.tensors[index]
    if not step.converts:
        return t.raw_rows(), None
    ne0 = step.tensor.shape[0]
    per_expert = step.tensor.shape[1] if len(step.tensor.shape) >= 2 else 1
    entry = job.importance.get(step.tensor.name)
    slab = max(1, min(per_expert, SLAB_BYTES // (4 * ne0)))
    # two output buffers in turn: the writer holds the previous tensor's while this one is made
    out = gguf_io.reused_buffer(1 + index % 2, step.nbytes).reshape(t.rows, -1)
    scales = np.ones(t.rows // per_expert, np.float32) if step.sidecar else None
    factor = job.factors.get(step.tensor.name, np.float32(1.0))
    fed = _rounding(job, step, s)
    for expert, first in enumerate(range(0, t.rows, per_expert)):
        imp = _importance(entry.values[expert], s) if entry is not None and entry.seen[expert] else None
        parts = slabs(t, first, first + per_expert, slab, s)
        if step.sidecar:
            if per_expert <= slab:  # one slab: convert it once
                parts = list(parts)
                g = global_scale.sidecar_scale(parts[0][2])
            else:
                g = global_scale.sidecar_scale(amax(t, first, first + per_expert, s))
            scales[expert] = g
            mult = np.float32(1.0) / g  # g is a power of two: times 1/g is exactly the division by g
        else:
            mult = factor
        for start, rows, top in parts:
            if top >= FINITE_BELOW.get(step.type, np.inf):  # these types have no sidecar or factor: mult is 1
                raise _too_large(step, rows, start)
            _encode(step, rows, mult, imp, s, fed, out[start:start + len(rows)])
    return out, scales
