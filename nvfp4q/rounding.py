"""NVFP4 rounding with error feedback (GPTQ/OBQ): the off-diagonal of E[x x^T] at work.

What a row w passes on to the next layer is off by (q - w) x, whose mean square is
(q - w) H (q - w)^T with H = E[x x^T]; the scale search alone sees only diag(H). Here the
columns are quantized in their natural order and each one's rounding error, divided by U[j, j],
is taken off the columns not yet quantized in proportion to U[j, :], U the upper Cholesky factor
of H^-1: the update that keeps the rest optimal given what is fixed. A sub-block's scale code is
chosen when its first column comes up, by the search of kernels.py on the weights as updated so
far, weighted by diag(H) (the imatrix). A diagonal H gives a diagonal U, nothing moves, and the
bytes are the search's. Where H is kept as diagonal blocks (calibration.py) the updates stay
inside each block. Sidecars and rescaling scale whole tensors or inputs by one number, which
scales H or W uniformly: U's ratios, and so the result, are unchanged.

The whole U costs cols / 2 multiply-adds per weight, which outgrows the search on wide inputs;
low_rank() keeps the diagonal and the leading `rank` directions of the correlations instead,
H ~ Delta + V V^T, whose feedback is exact for that H and costs about 2 * rank per weight.
"""

import numpy as np
from numba import njit, prange

from nvfp4q import descent
from nvfp4q.calibration import Moments, Sketch
from nvfp4q.kernels import (EXACT_RATIO, KVALUES, LANES, MAX_CODE, NVFP4_BLOCK, NVFP4_BYTES, NVFP4_SUB, SCALES,
                            _cols, _load, _nearest, _nibble_value, _output, _row_weights, _source, _tabulate,
                            lane_scratch, scale_encode, search_codes)
from nvfp4q.matmul import matmul

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: GPTQ's usual dampening
# The off-diagonal of H is multiplied by 1 - SHRINK: correlations measured on the calibration text
# carry over to other text only in part (docs/calibration.md: unshrunk, ffn_down's rounding fitted
# the calibration text and lost on code)
SHRINK = 0.5
NOT_DEFINITE = "the covariance is not positive definite"
# Rows updated together (each row of U is read once per tile), and the search's lanes: as many
# as the search's own, whose loops vectorize 16 lanes wide (8 left them scalar: 3x slower).
TILE = LANES
RANK = 64  # the low-rank approximation's rank (--rank)
# Inputs wider than this times the rank take low_rank(): the whole U's feedback (width / 2 per
# weight) would cost more than 8 times the low-rank one's (2 * rank), which loses a little
# (docs/calibration.md); narrower ones keep the whole covariance.
WIDTH_PER_RANK = 32
POWER_STEPS = 4  # subspace iterations that find the leading directions
# The mean feedback per NVFP4 weight, in multiply-adds, up to which a model's inputs keep their
# whole covariance: about 3x the default's time there (docs/calibration.md, "Wide inputs").
FEEDBACK_BUDGET = 512


def low_rank_inputs(inputs: dict[str, tuple[Moments | Sketch, int]], rank: int, total: int = 0) -> set[str]:
    """The inputs (name -> (moments, weights that read it)) rounded through rank-`rank`
    covariances: the sketched ones, those wider than WIDTH_PER_RANK * rank, and then, while the
    mean feedback over the `total` NVFP4 weights (at least those that read the inputs; the rest,
    as MoE experts, have none) is over FEEDBACK_BUDGET, the costliest of the rest, all inputs of
    one width and weight count at a time (a layer's gate/up before its q/k/v, and every layer
    alike). A whole covariance costs band / 2 multiply-adds per weight, a low-rank one
    2 * rank + 32. Rank 0: none."""
    if not rank:
        return set()
    low = {name for name, (m, _) in inputs.items()
           if isinstance(m, Sketch) or m.width > WIDTH_PER_RANK * rank}
    whole = {name: (min(m.band, m.width), n) for name, (m, n) in inputs.items() if name not in low}
    low_cost = 2 * rank + 32
    total = max(total, sum(n for _, n in inputs.values()))
    cost = sum(band / 2 * n for band, n in whole.values()) + low_cost * sum(n for name, (_, n) in inputs.items()
                                                                          if name in low)
    for key in sorted(set(whole.values()), reverse=True):
        if cost <= FEEDBACK_BUDGET * total or key[0] / 2 <= low_cost:
            break
        group = [name for name, v in whole.items() if v == key]
        cost -= len(group) * key[1] * (key[0] / 2 - low_cost)
        low.update(group)
    return low


def nvfp4_inputs(weights: list[tuple[str, int]], sources: dict[str, str]) -> dict[str, int]:
    """The calibrated inputs that NVFP4 weights read, with how many weights read each: weights are
    each tensor's (name, NVFP4 weights, 0 if it is not NVFP4), sources a calibration file's."""
    inputs: dict[str, int] = {}
    for name, n in weights:
        src = sources.get(name)
        if n and src is not None:
            inputs[src] = inputs.get(src, 0) + n
    return inputs


def model_low_rank(weights: list[tuple[str, int]], sources: dict[str, str], moments: dict, rank: int) -> set[str]:
    """low_rank_inputs() for a whole model (arguments as nvfp4_inputs(), moments a calibration file's)."""
    inputs = {src: (moments[src], n) for src, n in nvfp4_inputs(weights, sources).items()}
    return low_rank_inputs(inputs, rank, sum(n for _, n in weights))


def covariance(m: Moments, damp: float = DAMP, shrink: float = SHRINK) -> np.ndarray:
    """float32 [n_blocks, band, band]: per diagonal block, the H that the rounding minimises the
    error through, X^T X / count with its off-diagonal times 1 - shrink and damp * mean(diag)
    added to the diagonal. A column whose input was always zero (and the padding of the last
    block) gets its diagonal set to 1: its row of H is zero, so it stays apart and moves nothing."""
    n_blocks, band = m.blocks.shape[0], m.blocks.shape[1]
    h = np.empty(m.blocks.shape, np.float32)
    with np.errstate(all="ignore"):  # a damaged file's overflow is refused by factor(), not warned about
        lam = _damping(m, damp)
        for b in range(n_blocks):
            h[b] = m.blocks[b] * np.float32((1.0 - shrink) / m.count)
            d = np.diagonal(m.blocks[b]).astype(np.float64) / m.count
            cols = np.arange(b * band, (b + 1) * band)
            d[(cols >= m.width) | (d <= 0)] = 1.0
            np.fill_diagonal(h[b], d + lam)
    return h


def factor(m: Moments, damp: float = DAMP, shrink: float = SHRINK) -> np.ndarray:
    """float32 [n_blocks, band, band]: inverse_factor() of covariance()."""
    return inverse_factor(covariance(m, damp, shrink))


def inverse_factor(h: np.ndarray) -> np.ndarray:
    """Per diagonal block of H, the upper triangular U with U^T U = H^-1, in float32 as GPTQ does
    (float64 measured 5x slower for a relative difference of 3e-7 in U).

    For J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J): U is L^-1 reversed.
    """
    u = np.empty(h.shape, np.float32)
    with np.errstate(all="ignore"):
        for b in range(h.shape[0]):
            u[b] = _cholesky_inverse(np.ascontiguousarray(h[b, ::-1, ::-1]))[::-1, ::-1]
            if not np.all(np.isfinite(u[b])):
                raise ValueError(NOT_DEFINITE)
    return u


def _damping(m: Moments, damp: float) -> float:
    """What is added to H's diagonal: damp times the mean of its used columns' diagonal."""
    diag = m.diagonal() / m.count
    live = diag > 0
    return damp * diag[live].mean() if live.any() else 1.0


def _cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """L^-1 for a symmetric positive definite h = L L^T, by halves, so that the work is matrix
    products: with [[A, B^T], [B, C]] = L L^T, L's lower-left block is B A_L^-T and its lower-right
    block the factor of C - (B A_L^-T)(B A_L^-T)^T; L itself is never needed. The products
    are matmul()'s, whose bits do not depend on the thread count (LAPACK's Cholesky's do)."""
    n = h.shape[0]
    if n <= 64:
        return _small_cholesky_inverse(h)
    k = n // 2
    i11 = _cholesky_inverse(h[:k, :k])
    l21 = matmul(h[k:, :k], i11.T)
    i22 = _cholesky_inverse(h[k:, k:] - matmul(l21, l21.T))
    inv = np.empty_like(h)
    inv[:k, :k], inv[:k, k:], inv[k:, k:] = i11, 0, i22
    inv[k:, :k] = -matmul(i22, matmul(l21, i11))
    return inv


@njit(cache=True)
def _cholesky(a, tiny):
    """Lower L with L L^T = a, in a's precision; a pivot not above tiny leaves its column zero
    (a direction that a positive semidefinite a lacks)."""
    n = a.shape[0]
    low = np.zeros((n, n), a.dtype)
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= low[j, k] * low[j, k]
        if s > tiny:
            low[j, j] = np.sqrt(s)
            for i in range(j + 1, n):
                t = a[i, j]
                for k in range(j):
                    t -= low[i, k] * low[j, k]
                low[i, j] = t / low[j, j]
    return low


@njit(cache=True)
def _small_cholesky_inverse(h):
    n = h.shape[0]
    low = _cholesky(h, 0.0)
    for j in range(n):
        if not low[j, j] > 0:
            raise ValueError(NOT_DEFINITE)
    inv = np.zeros((n, n), h.dtype)
    for j in range(n):  # forward substitution, column by column of the identity
        inv[j, j] = 1.0 / low[j, j]
        for i in range(j + 1, n):
            s = 0.0
            for k in range(j, i):
                s -= low[i, k] * inv[k, j]
            inv[i, j] = s / low[i, i]
    return inv


def identity(width: int) -> np.ndarray:
    """The U of a diagonal H in 64-wide bands: no error moves."""
    return np.broadcast_to(np.eye(NVFP4_BLOCK, dtype=np.float32), (-(-width // NVFP4_BLOCK), NVFP4_BLOCK, NVFP4_BLOCK))


def low_rank(m: Moments | Sketch, rank: int = RANK, damp: float = DAMP, shrink: float = SHRINK) -> tuple:
    """(U, V / Delta, G) for H ~ Delta + V V^T per diagonal block (low_rank_terms()).

    For that H, quantizing column j with error e moves a later column l of its block by
    e * (V_l / Delta_l) . G_j with G_j = P_j V_j, P_j = (I + sum_{m > j} V_m V_m^T / Delta_m)^-1
    (Woodbury); the kernel adds e * G_j into a per-row sum that each 64-column block reads at
    its start, and U ([cols / 64, 64, 64], 1 on its diagonal) carries the same updates inside a
    block as factor()'s U would. Only matrix products with the rows split, and loops of our own:
    the bits do not depend on the thread count.
    """
    terms = list(low_rank_terms(m, min(rank, m.max_rank), damp, shrink))
    vd = np.stack([v / delta[:, None] for v, delta in terms]).astype(np.float32)
    g = np.stack([_generators(v, delta) for v, delta in terms])
    return _couplings(vd, g), vd, g


def low_rank_terms(m: Moments | Sketch, rank: int, damp: float, shrink: float):
    """Per diagonal block, (V, Delta) in float64: V the leading `rank` directions of the
    correlations (H_ij / sqrt(H_ii H_jj)) scaled back, times sqrt(1 - shrink) as factor() shrinks
    the off-diagonal, and Delta what is left of H's damped diagonal (at least the damping), so
    that Delta + V V^T has H's diagonal. An unused column gets Delta 1 and V 0."""
    band = m.band
    with np.errstate(all="ignore"):
        lam = _damping(m, damp)
        for b, (d, xtx) in enumerate(m.parts()):
            d = d / m.count
            d[np.arange(b * band, (b + 1) * band) >= m.width] = 0.0
            root = np.sqrt(np.maximum(d, 0.0))
            inv = np.where(d > 0, 1.0 / (root * np.sqrt(m.count)), 0.0).astype(np.float32)[:, None]
            v = _leading(xtx, inv, min(rank, band)) * (root * np.sqrt(1.0 - shrink))[:, None]
            delta = np.where(d > 0, np.maximum(d + lam - np.sum(v * v, axis=1), lam), 1.0)
            if not (np.all(np.isfinite(v)) and np.all(np.isfinite(delta))):
                raise ValueError(NOT_DEFINITE)
            yield v, delta


def _leading(xtx, inv: np.ndarray, rank: int) -> np.ndarray:
    """float64 [n, rank] W with W W^T the projection of the correlations C = inv X^T X inv
    (inv diagonal, as a column) onto their leading `rank` directions, found by subspace
    iteration from a fixed start; C is applied as inv (xtx(inv q)), never formed."""
    q = np.random.default_rng(0).standard_normal((inv.shape[0], rank)).astype(np.float32)
    for _ in range(POWER_STEPS):
        q = _orthonormal((inv * xtx(inv * q)).astype(np.float64)).astype(np.float32)
    y = (inv * xtx(inv * q)).astype(np.float64)
    q64 = q.astype(np.float64)
    return q64 @ _psd_cholesky(q64.T @ y)


@njit(cache=True)
def _psd_cholesky(a):
    """_cholesky of a positive semidefinite a, pivots up to 1e-12 of its largest diagonal taken as 0."""
    return _cholesky(a, 1e-12 * max(np.max(np.diag(a)), 1e-300))


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """y's columns made orthonormal (Cholesky QR, twice); lacking directions become zero."""
    for _ in range(2):
        y = matmul(y, _solver(_psd_cholesky(y.T @ y)))
    return y


@njit(cache=True)
def _solver(low):
    """T such that row r of y @ T solves L q = y[r] by forward substitution, with q_j = 0 where
    L's pivot is 0 (a direction y lacks): the substitution applied to each row of the identity."""
    k = low.shape[0]
    t = np.zeros((k, k))
    for r in range(k):
        for j in range(k):
            if low[j, j] > 0:
                v = 1.0 if r == j else 0.0
                for m in range(j):
                    v -= low[j, m] * t[r, m]
                t[r, j] = v / low[j, j]
    return t


@njit(cache=True)
def _generators(v, delta):
    """G_j = P_j V_j, P_j from the last column back by Sherman-Morrison, in float64."""
    n, k = v.shape
    p = np.eye(k)
    g = np.empty((n, k), np.float32)
    pv = np.empty(k)
    for j in range(n - 1, -1, -1):
        pv[:] = 0.0
        for b in range(k):  # p stays symmetric bit for bit: its row b is its column b, and each pv[a]
            vb = v[j, b]  # still sums over b in order (along a, the sums vectorize)
            for a in range(k):
                pv[a] += p[b, a] * vb
        den = delta[j]
        for a in range(k):
            den += v[j, a] * pv[a]
        for a in range(k):
            g[j, a] = pv[a]
            for b in range(k):
                p[a, b] -= pv[a] * pv[b] / den
    return g


@njit(cache=True)
def _couplings(vd, g):
    """U of 64-column blocks for the low-rank H: 1 on the diagonal, -(V_l / Delta_l) . G_j at
    (j, l) for l after j in the block, so that the kernel's update -e * U[j, l] is e's share."""
    n_blocks, band, k = vd.shape
    u = np.zeros((n_blocks * band // NVFP4_BLOCK, NVFP4_BLOCK, NVFP4_BLOCK), np.float32)
    for t in range(u.shape[0]):
        b, o = divmod(t * NVFP4_BLOCK, band)
        for j in range(NVFP4_BLOCK):
            u[t, j, j] = 1.0
            for l in range(j + 1, NVFP4_BLOCK):
                s = 0.0
                for a in range(k):
                    s += np.float64(vd[b, o + l, a]) * g[b, o + j, a]
                u[t, j, l] = -s
    return u


def local_blocks(m: Moments | Sketch) -> np.ndarray:
    """float32 [width // 16, 16, 16]: the 16 x 16 diagonal blocks of H = X^T X / count, one per
    sub-block, for choosing its scale on the error that reaches the output (e^T H_s e)."""
    n = m.width // NVFP4_SUB
    out = np.empty((n, NVFP4_SUB, NVFP4_SUB), np.float32)
    for t in range(n):
        out[t] = m.square(t * NVFP4_SUB, (t + 1) * NVFP4_SUB) / np.float32(m.count)
    return out


@njit(cache=True, inline="always")
def _local_code(x, hl, search, e):
    """The code of the search window (as kernels.search_codes's) whose rounding error e, pushed
    through the sub-block's own block of H, e^T H_s e, is lowest; ties to the lower code."""
    amax = np.float32(0.0)
    for j in range(NVFP4_SUB):
        amax = max(amax, abs(x[j]))
    base = scale_encode(amax / np.float32(6.0))
    if search == 0 or not amax > np.float32(0.0):
        return base
    best, best_err = base, np.inf
    for c in range(min(base, max(1, base - search)), min(MAX_CODE, base + search) + 1):
        d = SCALES[c]
        for j in range(NVFP4_SUB):
            e[j] = KVALUES[_nearest(x[j], d)] * d - x[j]
        err = 0.0
        for j in range(NVFP4_SUB):
            t = 0.0
            for k in range(NVFP4_SUB):
                t += hl[j, k] * e[k]
            err += e[j] * t
        if err < best_err or (err == best_err and c < best):
            best, best_err = c, err
    return best


@njit(cache=True, parallel=True)
def _encode_gptq(s32, s16, kind, mult, u, vd, g, importance, search, weighting, hloc, feedback, out):
    """Tiles of rows; inside a 64-column block every column's error moves the block's later
    columns at once, the columns after the block take the block's 64 errors afterwards, in
    column order: each weight sees the updates in the same order as one column at a time.
    The block being rounded is held transposed (a row per column, a lane per row of the tile),
    so that a column's rounding and its updates run along the tile's rows.
    With low_rank()'s vd and g (else empty), the errors go into a per-row sum instead, which each
    block reads at its start (the sum restarts with each of the covariance's blocks)."""
    rows, cols = out.shape[0], _cols(s32, s16, kind)
    band = u.shape[1]
    rank, lr_band = vd.shape[2], vd.shape[1]
    for t in prange((rows + TILE - 1) // TILE):
        r0 = t * TILE
        n = min(TILE, rows - r0)
        w = np.empty((n, cols), np.float32)
        imp = np.empty((n, cols), np.float32)
        for i in range(n):
            _load(s32, s16, r0 + i, kind, mult, w[i])
            _row_weights(w[i], importance, weighting, imp[i])
        scratch = lane_scratch(TILE)  # the tile's rows are the search's lanes
        d = np.empty(n, np.float32)
        nibs = np.empty(TILE, np.float32)
        wb = np.zeros((NVFP4_BLOCK, TILE), np.float32)  # the block, transposed; lanes past n stay 0
        eb = np.zeros((NVFP4_BLOCK, TILE), np.float32)  # its errors, divided by U[j, j]
        nb = np.zeros((NVFP4_BLOCK, TILE), np.uint8)  # its nibbles
        e16 = np.empty(NVFP4_SUB, np.float64)
        acc = np.zeros((rank, TILE), np.float32)
        pull = np.empty((NVFP4_BLOCK, TILE), np.float32)
        for j0 in range(0, cols, NVFP4_BLOCK):
            ib = j0 // NVFP4_BLOCK * NVFP4_BYTES
            b = j0 // band
            first = b * band
            stop = min(cols, first + band)
            for i in range(n):
                for c in range(NVFP4_BLOCK):
                    wb[c, i] = w[i, j0 + c]
            if rank > 0 and feedback:
                _pull(wb, acc, vd[j0 // lr_band], j0 % lr_band, pull)
            for jb in range(NVFP4_BLOCK):
                j, s, k = j0 + jb, jb // NVFP4_SUB, jb % NVFP4_SUB
                if k == 0:
                    if hloc.shape[0] == 0:
                        for m in range(NVFP4_SUB):
                            for i in range(TILE):
                                scratch[0][m, i] = wb[jb + m, i]
                                scratch[1][m, i] = imp[i, j + m] if i < n else np.float32(0.0)
                        search_codes(scratch, search)
                    for i in range(n):
                        if hloc.shape[0] > 0:
                            code = _local_code(wb[jb:jb + NVFP4_SUB, i], hloc[j // NVFP4_SUB], search, e16)
                        else:
                            code = scratch[2][i]
                        out[r0 + i, ib + s] = code
                        d[i] = SCALES[code]
                    _tabulate(d, scratch[6])  # the midpoints and steps of each row's scale
                inv = np.float32(1.0) / u[b, j - first, j - first]
                for i in range(n):  # the midpoint tests along the rows (they vectorize)
                    nibs[i] = _nibble_value(abs(wb[jb, i]), wb[jb, i], scratch[6], i)
                for i in range(n):  # as kernels._pack_lanes: the scan only where midpoint tests could tie
                    if abs(wb[jb, i]) > d[i] * EXACT_RATIO:
                        nibs[i] = _nearest(wb[jb, i], d[i])
                for i in range(n):
                    nb[jb, i] = np.uint8(nibs[i])
                    eb[jb, i] = (wb[jb, i] - KVALUES[nb[jb, i]] * d[i]) * inv
                if feedback:
                    for c in range(jb + 1, NVFP4_BLOCK):
                        uc = u[b, j - first, j0 + c - first]
                        for i in range(TILE):
                            wb[c, i] -= eb[jb, i] * uc
            for i in range(n):  # two nibbles to a byte, columns k and k + 8 of each sub-block
                for c in range(0, NVFP4_BLOCK, NVFP4_SUB):
                    for k in range(NVFP4_SUB // 2):
                        out[r0 + i, ib + 4 + c // 2 + k] = nb[c + k, i] | (nb[c + k + 8, i] << 4)
            if rank > 0 and feedback:
                _push(eb, acc, g[j0 // lr_band], j0 % lr_band)
            if feedback and j0 + NVFP4_BLOCK < stop:
                # four errors per pass over a row, each element still taking them one by one in
                # column order (the same operations as four passes): a quarter of the loads and stores
                lo, hi = j0 + NVFP4_BLOCK - first, stop - first
                for jb in range(0, NVFP4_BLOCK, 4):
                    k0 = j0 + jb - first
                    u0, u1, u2, u3 = u[b, k0, lo:hi], u[b, k0 + 1, lo:hi], u[b, k0 + 2, lo:hi], u[b, k0 + 3, lo:hi]
                    for i in range(n):
                        e0, e1, e2, e3 = eb[jb, i], eb[jb + 1, i], eb[jb + 2, i], eb[jb + 3, i]
                        rest = w[i, j0 + NVFP4_BLOCK:stop]
                        for c in range(rest.shape[0]):
                            rest[c] = (((rest[c] - e0 * u0[c]) - e1 * u1[c]) - e2 * u2[c]) - e3 * u3[c]


@njit(cache=True, inline="always")
def _pull(wb, acc, vd, o, pull):
    """The block's columns (wb, transposed) take what the errors before it in its covariance
    block owe them (acc . V_l / Delta_l, summed in rank order); at the covariance block's start
    acc is reset. The rank is the outer loop, so that the 64 x 64 sums run along the rows."""
    if o == 0:
        acc[:] = np.float32(0.0)
        return
    pull[:] = np.float32(0.0)
    rank = acc.shape[0]
    for a in range(0, rank - rank % 4, 4):  # four terms per pass over pull, each still added in rank order
        for c in range(NVFP4_BLOCK):
            v0, v1, v2, v3 = vd[o + c, a], vd[o + c, a + 1], vd[o + c, a + 2], vd[o + c, a + 3]
            for i in range(TILE):
                pull[c, i] = (((pull[c, i] + v0 * acc[a, i]) + v1 * acc[a + 1, i]) + v2 * acc[a + 2, i]) \
                    + v3 * acc[a + 3, i]
    for a in range(rank - rank % 4, rank):
        for c in range(NVFP4_BLOCK):
            va = vd[o + c, a]
            for i in range(TILE):
                pull[c, i] += va * acc[a, i]
    for c in range(NVFP4_BLOCK):
        for i in range(TILE):
            wb[c, i] += pull[c, i]


@njit(cache=True, inline="always")
def _push(eb, acc, g, o):
    """The block's errors (eb, transposed) into acc, in column order (four per pass over acc)."""
    for c in range(0, NVFP4_BLOCK, 4):
        for a in range(acc.shape[0]):
            g0, g1, g2, g3 = g[o + c, a], g[o + c + 1, a], g[o + c + 2, a], g[o + c + 3, a]
            for i in range(TILE):
                acc[a, i] = (((acc[a, i] + eb[c, i] * g0) + eb[c + 1, i] * g1) + eb[c + 2, i] * g2) + eb[c + 3, i] * g3


def quantize_nvfp4(x, u, importance=None, search=0, weighting=0, hloc=None, feedback=True, low=None, mult=1.0,
                   out=None, h=None, passes=0):
    """Source rows [rows, cols] (float32, float16 or bfloat16 bits, as kernels.quantize_nvfp4's)
    times mult -> NVFP4 blocks as kernels.quantize_nvfp4, rounded with error feedback through u
    (factor()) unless not feedback, or through low = (V / Delta, G) with low_rank()'s u; the
    scales chosen on hloc (local_blocks()) when given, else by the search; then `passes` of
    descent.py through h (covariance(): u's H) when given; written into out when given (every
    byte); the bytes do not depend on the thread count (rows are independent, each in a fixed
    order)."""
    s32, s16, kind = _source(x)
    rows, cols = x.shape
    if cols % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a multiple of {NVFP4_BLOCK} columns, got {cols}")
    if u.shape[0] * u.shape[1] < cols:
        raise ValueError(f"factor covers {u.shape[0] * u.shape[1]} columns, the rows have {cols}")
    imp = np.empty(0, np.float32) if importance is None else np.ascontiguousarray(importance, np.float32)
    out = _output(out, rows, cols // NVFP4_BLOCK * NVFP4_BYTES)
    hl = np.empty((0, NVFP4_SUB, NVFP4_SUB), np.float32) if hloc is None else np.ascontiguousarray(hloc, np.float32)
    none = np.empty((0, 1, 0), np.float32)
    vd, g = (none, none) if low is None else (np.ascontiguousarray(a, np.float32) for a in low)
    _encode_gptq(s32, s16, kind, np.float32(mult), np.ascontiguousarray(u, np.float32), vd, g, imp, search, weighting,
                 hl, feedback, out)
    if feedback and h is not None:
        descent.descend(x, mult, out, h, passes)
    return out
