"""Block codecs: float32 rows in, GGUF block bytes out (and back).

Kernels know nothing of files or tensors. Every arithmetic step is float32 in a
fixed order so that results are byte-identical to ggml's C reference and do not
depend on the thread count (rows are independent; see docs/kernels.md).
"""

import math

import numpy as np
from numba import njit, prange

NVFP4_BLOCK = 64
NVFP4_SUB = 16
NVFP4_BYTES = 36
Q8_0_BLOCK = 32
Q8_0_BYTES = 34
MAX_CODE = 0x7E
MAX_SEARCH = 126

WEIGHT_RAW = 0  # error weight = importance
WEIGHT_GGML = 1  # error weight = importance * sqrt(sigma2 + x^2), ggml's k-quant convention

# E2M1 magnitudes doubled (ggml's kvalues_mxfp4 for nibbles 0..7); nibble 8+i is -MAGS[i].
MAGS = np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=np.float32)
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def _scale_table() -> np.ndarray:
    """Decoded UE4M3 scale for all 256 codes (exact in float32), as ggml_ue4m3_to_fp32."""
    table = np.zeros(256, dtype=np.float64)
    for code in range(256):
        if code in (0x00, 0x7F):
            continue
        e, m = (code >> 3) & 15, code & 7
        raw = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        table[code] = raw * 0.5
    return table.astype(np.float32)


SCALES = _scale_table()


@njit(cache=True)
def scale_encode(x):
    """ggml_fp32_to_ue4m3 for a float32 x: round half up on the 4th mantissa bit."""
    if not (x > np.float32(0.0)):
        return 0
    if x > np.float32(448.0):
        x = np.float32(448.0)
    frac, exp2 = math.frexp(np.float64(x))  # x = frac * 2^exp2, frac in [0.5, 1), exact
    exp = exp2 - 1 + 7
    if exp <= 0:
        man = int(x * np.float32(512.0) + np.float32(0.5))
        return min(man, 7)
    bits = int((frac * 2.0 - 1.0) * 16.0)  # top 4 mantissa bits, exact truncation
    man = (bits >> 1) + (bits & 1)
    if man > 7:
        man = 0
        exp += 1
    if exp >= 15:
        return MAX_CODE
    return (exp << 3) | man


@njit(cache=True, inline="always")
def _nearest(x, d):
    """Nibble of ggml's best_index_mxfp4(x, d): first minimum of |k*d - x| over k in table order."""
    a = abs(x)
    u = 0  # first magnitude index with MAGS[u]*d >= a, or 8 if none
    while u < 8 and MAGS[u] * d < a:
        u += 1
    if u == 0:
        return 0
    best = u - 1
    best_err = a - MAGS[best] * d
    if u < 8 and MAGS[u] * d - a < best_err:
        best = u
    else:
        # rounding can make neighbours below x tie; the scan keeps the first one
        while best > 0 and a - MAGS[best - 1] * d <= best_err:
            best -= 1
    if best == 0 or x > np.float32(0.0):
        return best
    return best + 8


# Beyond amax > d * 2^21 float32 rounding can tie neighbouring values; below it the
# midpoint comparisons of _level and _accumulate pick exactly what ggml's 16-value scan picks.
EXACT_RATIO = np.float32(2.0**21)
HALF, ONE_HALF, TWO_HALF, THREE_HALF = np.float32(0.5), np.float32(1.5), np.float32(2.5), np.float32(3.5)
F2, F4, F5, F7, F10, F12 = (np.float32(v) for v in (2, 4, 5, 7, 10, 12))


@njit(cache=True, inline="always")
def _level(a, d):
    """Index into MAGS of the value nearest to a >= 0, ties to the smaller: midpoint tests."""
    return ((a > HALF * d) + (a > ONE_HALF * d) + (a > TWO_HALF * d) + (a > THREE_HALF * d)
            + (a > F5 * d) + (a > F7 * d) + (a > F10 * d))


@njit(cache=True, inline="always")
def _signed_level(a, x, d):
    """Nibble of x (a = |x|) by midpoint tests: its magnitude's index, 8 more when negative and not 0."""
    m = _level(a, d)
    return m + 8 * ((m > 0) & (x < np.float32(0.0)))


@njit(cache=True, inline="always")
def _term(aj, wj, d):
    """w (a - q)^2 with q the value nearest a at scale d: the step heights of MAGS
    (1,1,1,1,2,2,4) summed over passed midpoints, branch-free so that LLVM vectorizes it,
    and exact (small integers times d)."""
    k = (np.float32(aj > HALF * d) + np.float32(aj > ONE_HALF * d)
         + np.float32(aj > TWO_HALF * d) + np.float32(aj > THREE_HALF * d)
         + F2 * (np.float32(aj > F5 * d) + np.float32(aj > F7 * d))
         + F4 * np.float32(aj > F10 * d))
    diff = aj - k * d
    return (wj * diff) * diff


@njit(cache=True, inline="always")
def _accumulate(a, w, j0, j1, scales, err, n):
    """err[c] += w_j (a_j - q_j)^2 for j in [j0, j1), for the first n candidate scales.

    Candidates are the vector lanes, so each lane's sum keeps the defined j order while
    the work is SIMD-wide.
    """
    if j0 == 0:
        for c in range(n):
            err[c] = np.float32(0.0)
    for j in range(j0, j1):
        aj, wj = a[j], w[j]
        for c in range(n):
            err[c] += _term(aj, wj, scales[c])


@njit(cache=True, inline="always")
def _scan_error(x, w, d):
    """The defined error with ggml's 16-value scan, for scales too small for midpoint tests."""
    s = np.float32(0.0)
    for j in range(NVFP4_SUB):
        diff = x[j] - KVALUES[_nearest(x[j], d)] * d
        s += (w[j] * diff) * diff
    return s


LANES = 8


@njit(cache=True, inline="always")
def _lanes(n):
    return (n + LANES - 1) // LANES * LANES


@njit(cache=True, inline="always")
def _best(err, codes, n, best_err, best_code):
    """Lowest error, ties to the lower code."""
    for k in range(n):
        if err[k] < best_err or (err[k] == best_err and codes[k] < best_code):
            best_err, best_code = err[k], int(codes[k])
    return best_code


@njit(cache=True, inline="always")
def _search(x, a, w, amax, jmax, base, search, scratch):
    """Best code of the window around base (docs/kernels.md), pruned without changing it.

    Base's error E is computed first. Codes below base whose clipped largest element alone
    costs more than E are dropped (that term only grows further down). The others are
    summed over the first 8 elements as vector lanes; only those whose partial sum (which
    never decreases) is still <= E finish the last 8.
    """
    first = min(base, max(1, base - search))
    last = min(MAX_CODE, base + search)
    err, cand, codes = scratch[0], scratch[1], scratch[2]
    if amax > SCALES[first] * EXACT_RATIO:  # rare: tiny scales in a wide window
        n = last - first + 1
        for c in range(n):
            codes[c] = first + c
            err[c] = _scan_error(x, w, SCALES[first + c])
        return _best(err, codes, n, np.float32(np.inf), MAX_CODE + 1)
    d = SCALES[base]
    for j in range(NVFP4_SUB):  # terms as vector lanes, then their sum in the defined order
        err[j] = _term(a[j], w[j], d)
    bound = np.float32(0.0)
    for j in range(NVFP4_SUB):
        bound += err[j]
    while first < base:
        diff = amax - F12 * SCALES[first]
        if not (diff > 0 and (w[jmax] * diff) * diff > bound):
            break
        first += 1
    m = 0
    for c in range(first, last + 1):
        if c != base:
            cand[m], codes[m] = SCALES[c], c
            m += 1
    for half in range(2):
        for k in range(m, _lanes(m)):  # whole vectors: a scalar remainder loop would dominate
            cand[k] = d
        _accumulate(a, w, half * 8, half * 8 + 8, cand, err, _lanes(m))
        if half == 0:
            kept = 0
            for k in range(m):
                if err[k] <= bound:
                    cand[kept], err[kept], codes[kept] = cand[k], err[k], codes[k]
                    kept += 1
            m = kept
            if m == 0:
                return base
    return _best(err, codes, m, bound, base)


@njit(cache=True, inline="always")
def search_scratch():
    """The work space _code needs, allocated once per row (or tile of rows)."""
    return np.empty(NVFP4_SUB, np.float32), np.empty((3, _lanes(MAX_CODE + 2)), np.float32)


@njit(cache=True, inline="always")
def _code(x, w, search, a, scratch):
    """A sub-block's scale code and largest |x| (a receives |x|): ggml's amax / 6 encoded, then
    the best of the search window around it."""
    amax = np.float32(0.0)
    jmax = 0
    for j in range(NVFP4_SUB):
        a[j] = abs(x[j])
        if amax < a[j]:
            amax = a[j]
            jmax = j
    base = scale_encode(amax / np.float32(6.0))
    if search > 0 and amax > np.float32(0.0):
        return _search(x, a, w, amax, jmax, base, search, scratch), amax
    return base, amax


@njit(cache=True)
def _encode_row(x, w, search, out):
    """One row of NVFP4 blocks into out (uint8, cols // 64 * 36 bytes)."""
    nblocks = x.shape[0] // NVFP4_BLOCK
    a, scratch = search_scratch()
    nib = np.empty(NVFP4_SUB, np.uint8)
    for b in range(nblocks):
        ob = b * NVFP4_BYTES
        for s in range(4):
            off = b * NVFP4_BLOCK + s * NVFP4_SUB
            code, amax = _code(x[off:off + NVFP4_SUB], w[off:off + NVFP4_SUB], search, a, scratch)
            d = SCALES[code]
            out[ob + s] = code
            if amax > d * EXACT_RATIO:
                for j in range(NVFP4_SUB):
                    nib[j] = _nearest(x[off + j], d)
            else:
                for j in range(NVFP4_SUB):  # branch-free: vectorizes
                    nib[j] = _signed_level(a[j], x[off + j], d)
            for j in range(8):
                out[ob + 4 + s * 8 + j] = nib[j] | (nib[j + 8] << 4)


@njit(cache=True)
def _row_weights(x, importance, weighting, w):
    n = x.shape[0]
    sigma2 = np.float32(0.0)
    if weighting == WEIGHT_GGML:
        for j in range(n):
            sigma2 += x[j] * x[j]
        sigma2 = sigma2 / np.float32(n)
    for j in range(n):
        imp = importance[j] if importance.shape[0] > 0 else np.float32(1.0)
        if weighting == WEIGHT_GGML:
            w[j] = imp * np.sqrt(sigma2 + x[j] * x[j])
        else:
            w[j] = imp


@njit(cache=True, parallel=True)
def _encode_nvfp4(x, importance, search, weighting, out):
    for r in prange(x.shape[0]):
        w = np.empty(x.shape[1], dtype=np.float32)
        _row_weights(x[r], importance, weighting, w)
        _encode_row(x[r], w, search, out[r])


def quantize_nvfp4(x, importance=None, search=0, weighting=WEIGHT_RAW):
    """float32 [rows, cols] -> uint8 [rows, cols // 64 * 36] NVFP4 blocks.

    search is the scale-code window S; importance (cols float32) weights the error.
    With search 0 the importance is irrelevant and the bytes are ggml's reference.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a multiple of {NVFP4_BLOCK} columns, got {cols}")
    if not 0 <= search <= MAX_SEARCH:
        raise ValueError(f"search window must be in 0..{MAX_SEARCH}, got {search}")
    imp = np.empty(0, np.float32) if importance is None else np.ascontiguousarray(importance, np.float32)
    if imp.shape[0] not in (0, cols):
        raise ValueError(f"importance has {imp.shape[0]} values for {cols} columns")
    out = np.empty((rows, cols // NVFP4_BLOCK * NVFP4_BYTES), dtype=np.uint8)
    _encode_nvfp4(x, imp, search, weighting, out)
    return out


@njit(cache=True, inline="always")
def _value(blocks, r, ib, s, j, d):
    """Element j (0..15) of sub-block s of the block at byte ib of row r, at scale d: byte j % 8
    of the sub-block's eight, low nibble for j < 8, high nibble for the rest."""
    q = np.int64(blocks[r, ib + 4 + s * 8 + (j & 7)])
    return KVALUES[(q >> (4 * (j >> 3))) & 15] * d


@njit(cache=True, parallel=True)
def _decode_nvfp4(blocks, out):
    nblocks = blocks.shape[1] // NVFP4_BYTES
    for r in prange(blocks.shape[0]):
        for b in range(nblocks):
            ib = b * NVFP4_BYTES
            for s in range(4):
                d = SCALES[blocks[r, ib + s]]
                o = b * NVFP4_BLOCK + s * NVFP4_SUB
                for j in range(NVFP4_SUB):
                    out[r, o + j] = _value(blocks, r, ib, s, j, d)


def dequantize_nvfp4(blocks):
    """uint8 [rows, nbytes] NVFP4 blocks -> float32 [rows, nbytes // 36 * 64]."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.empty((blocks.shape[0], blocks.shape[1] // NVFP4_BYTES * NVFP4_BLOCK), np.float32)
    _decode_nvfp4(blocks, out)
    return out


@njit(cache=True, parallel=True)
def _encode_q8_0(x, d_out, q_out):
    nblocks = x.shape[1] // Q8_0_BLOCK
    for r in prange(x.shape[0]):
        for b in range(nblocks):
            off = b * Q8_0_BLOCK
            amax = np.float32(0.0)
            for j in range(Q8_0_BLOCK):
                amax = max(amax, abs(x[r, off + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            d_out[r, b] = d
            for j in range(Q8_0_BLOCK):
                v = x[r, off + j] * inv
                m = np.floor(np.float64(abs(v)) + 0.5)  # roundf: half away from zero, exact
                q_out[r, off + j] = np.int8(m if v >= 0 else -m)


def quantize_q8_0(x):
    """float32 [rows, cols] -> uint8 [rows, cols // 32 * 34] Q8_0 blocks (fp16 d, 32 int8)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a multiple of {Q8_0_BLOCK} columns, got {cols}")
    nb = cols // Q8_0_BLOCK
    d = np.empty((rows, nb), np.float32)
    q = np.empty((rows, cols), np.int8)
    _encode_q8_0(x, d, q)
    out = np.empty((rows, nb, Q8_0_BYTES), np.uint8)
    out[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = q.view(np.uint8).reshape(rows, nb, Q8_0_BLOCK)
    return out.reshape(rows, nb * Q8_0_BYTES)


def dequantize_q8_0(blocks):
    """uint8 [rows, nbytes] Q8_0 blocks -> float32 [rows, nbytes // 34 * 32]."""
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks, np.uint8).reshape(rows, -1, Q8_0_BYTES)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
    q = b[:, :, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, -1)


Q5_0_BYTES = 22  # fp16 d, 32 fifth bits, 16 bytes of low nibbles
Q5_1_BYTES = 24  # fp16 d, fp16 m, 32 fifth bits, 16 bytes of low nibbles


def _blocks_of_32(x, name):
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"{name} needs a multiple of {Q8_0_BLOCK} columns, got {cols}")
    return x, rows, cols // Q8_0_BLOCK


@njit(cache=True, inline="always")
def _pack5(out, o, q0, q1, j, qh):
    """(out: one row's bytes) Low nibbles of elements j and j + 16 in one byte at o + j; their fifth bits into qh."""
    out[o + j] = np.uint8((q0 & 0x0F) | ((q1 & 0x0F) << 4))
    return qh | (np.uint32((q0 >> 4) & 1) << np.uint32(j)) | (np.uint32((q1 >> 4) & 1) << np.uint32(j + 16))


@njit(cache=True, inline="always")
def _store_qh(out, o, qh):
    for k in range(4):
        out[o + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


def _fifth_bit_values(b, qh_at):
    """The 5-bit values of Q5_0/Q5_1 blocks [rows, nb, bytes]: qh at qh_at, nibbles after it."""
    qh = b[:, :, qh_at:qh_at + 4].copy().view(np.uint32)
    nib = b[:, :, qh_at + 4:]
    lo = np.concatenate([nib & 0x0F, nib >> 4], axis=2).astype(np.int32)
    return lo | (((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4)


@njit(cache=True, parallel=True)
def _encode_q5_0(x, d_out, out):
    """ggml's quantize_row_q5_0_ref: d = (the value of largest magnitude) / -16, values
    truncated after adding 16.5, the low nibbles of j and j + 16 sharing a byte."""
    nblocks = x.shape[1] // Q8_0_BLOCK
    for r in prange(x.shape[0]):
        for b in range(nblocks):
            off = b * Q8_0_BLOCK
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(Q8_0_BLOCK):
                if amax < abs(x[r, off + j]):
                    amax = abs(x[r, off + j])
                    vmax = x[r, off + j]
            d = vmax / np.float32(-16.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            d_out[r, b] = d
            qh = np.uint32(0)
            o = b * Q5_0_BYTES
            for j in range(Q8_0_BLOCK // 2):
                q0 = min(31, np.int32(x[r, off + j] * inv + np.float32(16.5)))
                q1 = min(31, np.int32(x[r, off + 16 + j] * inv + np.float32(16.5)))
                qh = _pack5(out[r], o + 6, q0, q1, j, qh)
            _store_qh(out[r], o + 2, qh)


def quantize_q5_0(x):
    """float32 [rows, cols] -> uint8 [rows, cols // 32 * 22] Q5_0 blocks, as ggml's reference
    quantizer writes them (ggml's own imatrix path searches the scale; this one does not)."""
    x, rows, nb = _blocks_of_32(x, "Q5_0")
    d = np.empty((rows, nb), np.float32)
    out = np.empty((rows, nb * Q5_0_BYTES), np.uint8)
    _encode_q5_0(x, d, out)
    out.reshape(rows, nb, Q5_0_BYTES)[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out


def dequantize_q5_0(blocks):
    """uint8 [rows, nbytes] Q5_0 blocks -> float32 [rows, nbytes // 22 * 32]."""
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks, np.uint8).reshape(rows, -1, Q5_0_BYTES)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
    return ((_fifth_bit_values(b, 2) - 16) * d).astype(np.float32).reshape(rows, -1)


@njit(cache=True, parallel=True)
def _encode_q5_1(x, d_out, m_out, out):
    """ggml's quantize_row_q5_1_ref: d = (max - min) / 31, values (x - min) / d rounded by
    truncating after adding 0.5."""
    nblocks = x.shape[1] // Q8_0_BLOCK
    for r in prange(x.shape[0]):
        for b in range(nblocks):
            off = b * Q8_0_BLOCK
            lo = np.float32(np.inf)
            hi = np.float32(-np.inf)
            for j in range(Q8_0_BLOCK):
                lo = min(lo, x[r, off + j])
                hi = max(hi, x[r, off + j])
            d = (hi - lo) / np.float32(31.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            d_out[r, b] = d
            m_out[r, b] = lo
            qh = np.uint32(0)
            o = b * Q5_1_BYTES
            for j in range(Q8_0_BLOCK // 2):
                q0 = np.int32((x[r, off + j] - lo) * inv + np.float32(0.5))
                q1 = np.int32((x[r, off + 16 + j] - lo) * inv + np.float32(0.5))
                qh = _pack5(out[r], o + 8, q0, q1, j, qh)
            _store_qh(out[r], o + 4, qh)


def quantize_q5_1(x):
    """float32 [rows, cols] -> uint8 [rows, cols // 32 * 24] Q5_1 blocks, as ggml's reference
    quantizer writes them."""
    x, rows, nb = _blocks_of_32(x, "Q5_1")
    d, m = np.empty((rows, nb), np.float32), np.empty((rows, nb), np.float32)
    out = np.empty((rows, nb * Q5_1_BYTES), np.uint8)
    _encode_q5_1(x, d, m, out)
    blocks = out.reshape(rows, nb, Q5_1_BYTES)
    blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    blocks[:, :, 2:4] = m.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out


def dequantize_q5_1(blocks):
    """uint8 [rows, nbytes] Q5_1 blocks -> float32 [rows, nbytes // 24 * 32]."""
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks, np.uint8).reshape(rows, -1, Q5_1_BYTES)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
    m = b[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    return (_fifth_bit_values(b, 4) * d + m).astype(np.float32).reshape(rows, -1)


F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, parallel=True)
def _f16_rows(bits, out):
    for r in prange(bits.shape[0]):
        for j in range(bits.shape[1]):
            out[r, j] = F16_TO_F32[bits[r, j]]


def f16_to_f32(bits):
    """IEEE half bits (uint16 [rows, cols]) -> float32, exact; a table gather, parallel."""
    out = np.empty(bits.shape, np.float32)
    _f16_rows(np.ascontiguousarray(bits), out)
    return out


def bf16_to_f32(bits):
    """bfloat16 bits (uint16) -> float32, exact: they are the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@njit(cache=True, parallel=True)
def _row_scan(x, amax, bad):
    for r in prange(x.shape[0]):
        m = np.float32(0.0)
        first = -1
        for j in range(x.shape[1]):
            v = x[r, j]
            if not np.isfinite(v):
                if first < 0:
                    first = j
            elif abs(v) > m:
                m = abs(v)
        amax[r] = m
        bad[r] = first


def scan(x):
    """(largest |x|, (row, col) of the first NaN/Inf or None) of a 2D float32 array, one pass."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    amax = np.empty(x.shape[0], np.float32)
    bad = np.empty(x.shape[0], np.int64)
    _row_scan(x, amax, bad)
    rows = np.flatnonzero(bad >= 0)
    first = (int(rows[0]), int(bad[rows[0]])) if rows.size else None
    return (float(amax.max()) if amax.size else 0.0), first
