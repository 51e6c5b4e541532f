"""Coordinate descent on the output error, after the error feedback (rounding.py).

GPTQ rounds each column once, knowing only the columns before it: the first columns of a
row were fixed before the errors of the rest were known. Here every element, in column order,
moves to the grid value (at its sub-block's scale, which stays) that most lowers
(q - w) H (q - w)^T given all the others, and the passes repeat (QuantEase and CDQuant do the
same for integer grids). A move of element j by delta changes the error by
delta (2 g_j + delta H_jj), g = H (q - w); only moves that lower it are taken, and g follows
each one by a row of H. A diagonal H moves nothing: the search's nearest values are already
its minimum. Inputs rounded through a low-rank covariance (rounding.low_rank) are left as the
feedback leaves them: there the checks alone (rank multiply-adds per weight and pass) measured
4x the feedback's own time.
"""

import numpy as np
from numba import njit, prange

from nvfp4q.kernels import (KVALUES, MAGS, NVFP4_BLOCK, NVFP4_BYTES, NVFP4_SUB, SCALES, _decode_nvfp4, _load, _nearest,
                            _nibble, _source)
from nvfp4q.matmul import matmul


def _gaps() -> tuple[np.ndarray, np.ndarray]:
    """Per nibble, the distance (in units of the scale) to the next value up and down (inf at the
    ends): 1, 2 or 4, powers of two."""
    up, down = np.empty(16, np.float32), np.empty(16, np.float32)
    for k in range(8):
        step_out = MAGS[k + 1] - MAGS[k] if k < 7 else np.inf  # away from zero
        step_in = MAGS[k] - MAGS[k - 1] if k > 0 else 1.0  # toward zero (from 0: to -1 or +1)
        up[k], down[k] = step_out, step_in
        up[k + 8], down[k + 8] = step_in, step_out
    return up, down


GAP_UP, GAP_DOWN = _gaps()
PASSES = 3  # over every column (--passes); the output error falls 2.1%, 2.7%, 2.9% after 1, 3, 10 (SmolLM2)


def descend(x: np.ndarray, mult, out: np.ndarray, h: np.ndarray, passes: int = PASSES) -> None:
    """Improve the NVFP4 rows in out (uint8 [rows, nbytes], their nibbles rewritten in place) of
    the source rows x times mult (as rounding.quantize_nvfp4's) under H, per diagonal block h's
    blocks (float32 [n_blocks, band, band]). The first gradients are matmul()'s, whose bits do not
    depend on the thread count; rows are then independent."""
    if passes <= 0:
        return
    q = np.empty((out.shape[0], out.shape[1] // NVFP4_BYTES * NVFP4_BLOCK), np.float32)
    e = np.empty_like(q)
    _errors(*_source(x), np.float32(mult), out, q, e)
    band = h.shape[1]
    g = np.empty_like(e)
    for b0 in range(0, e.shape[1], band):
        n = min(band, e.shape[1] - b0)
        g[:, b0:b0 + n] = matmul(e[:, b0:b0 + n], h[b0 // band, :n, :n])
    _descend(q, g, h, np.ascontiguousarray(np.diagonal(h, axis1=1, axis2=2)), out, passes)


@njit(cache=True, parallel=True)
def _errors(s32, s16, kind, mult, blocks, q, e):
    """q: the blocks' values; e: q minus the source rows times mult."""
    for r in prange(q.shape[0]):
        _decode_nvfp4(blocks, q, r, r + 1)
        _load(s32, s16, r, kind, mult, e[r])
        for j in range(q.shape[1]):
            e[r, j] = q[r, j] - e[r, j]


@njit(cache=True, inline="always")
def _move(qj, gj, hjj, d):
    """(nibble, delta) of the value at scale d nearest qj - gj / hjj, the minimum along this
    coordinate; delta 0 unless the move lowers the error (not so only at a tie)."""
    k = _nearest(qj - gj / hjj, d)
    delta = KVALUES[k] * d - qj
    if delta * (np.float32(2.0) * gj + delta * hjj) < np.float32(0.0):
        return k, delta
    return k, np.float32(0.0)


@njit(cache=True, inline="always")
def _place(j):
    """(byte of its block, its sub-block, its index there) of element j of a row of blocks."""
    return j // NVFP4_BLOCK * NVFP4_BYTES, j % NVFP4_BLOCK // NVFP4_SUB, j % NVFP4_SUB


@njit(cache=True, inline="always")
def _store(out, r, j, k):
    """Nibble k as element j's (kernels._nibble's place)."""
    ib, s, i = _place(j)
    o = ib + 4 + s * 8 + (i & 7)
    if i < 8:
        out[r, o] = (out[r, o] & 0xF0) | k
    else:
        out[r, o] = (out[r, o] & 0x0F) | (k << 4)


@njit(cache=True, inline="always")
def _thresholds(out, r, b0, hd, d, up, down):
    """Per element of row r from column b0 (a block's first): its scale d, and up / down, what
    -g_j / g_j must reach for a move up / down to lower the error (_limits). Read block by block,
    each sub-block's scale once."""
    for c0 in range(0, d.shape[0], NVFP4_BLOCK):
        ib = (b0 + c0) // NVFP4_BLOCK * NVFP4_BYTES
        for s in range(NVFP4_BLOCK // NVFP4_SUB):
            ds = SCALES[out[r, ib + s]]
            for i in range(NVFP4_SUB):
                c = c0 + s * NVFP4_SUB + i
                d[c] = ds
                _limits(_nibble(out, r, ib, s, i), ds, hd[c], up, down, c)


@njit(cache=True, inline="always")
def _limits(k, d, hjj, up, down, c):
    """A move of an element with nibble k by delta changes the error by delta (2 g_j + delta H_jj):
    to the next value up (delta = gap d) it is lower only if -g_j > gap d H_jj / 2, down only if
    g_j > gap d H_jj / 2, and the values further on are further still. Exact in float32: gap / 2
    is a power of two. Infinite where d = 0 (a sub-block of zeros), where nothing moves."""
    if d > np.float32(0.0):
        up[c] = np.float32(0.5) * GAP_UP[k] * d * hjj
        down[c] = np.float32(0.5) * GAP_DOWN[k] * d * hjj
    else:
        up[c] = down[c] = np.float32(np.inf)


@njit(cache=True, inline="always")
def _settled(gj, up, down):
    """No move of this element can lower the error (_limits): most are, and skip the scan."""
    return not (gj >= down or -gj >= up)


@njit(cache=True, parallel=True)
def _descend(q, g, h, diag, out, passes):
    """Passes over each row's columns, block of H by block; a move adds delta H[j] to g. H's
    diagonal comes apart (read along a row of H, each element would be a cache line of its own)."""
    rows, cols = q.shape
    band = h.shape[1]
    for r in prange(rows):
        d, up, down = np.empty(band, np.float32), np.empty(band, np.float32), np.empty(band, np.float32)
        for b0 in range(0, cols, band):
            n = min(band, cols - b0)
            hb, hd, gr = h[b0 // band], diag[b0 // band], g[r, b0:b0 + n]
            _thresholds(out, r, b0, hd, d[:n], up, down)
            for _ in range(passes):
                moved = False
                for c in range(n):
                    if _settled(gr[c], up[c], down[c]):
                        continue
                    k, delta = _move(q[r, b0 + c], gr[c], hd[c], d[c])
                    if delta != np.float32(0.0):
                        q[r, b0 + c] = KVALUES[k] * d[c]
                        _store(out, r, b0 + c, k)
                        _limits(k, d[c], hd[c], up, down, c)
                        for m in range(n):
                            gr[m] += delta * hb[c, m]
                        moved = True
                if not moved:  # a pass that moves nothing is a fixed point: the rest would not either
                    break
