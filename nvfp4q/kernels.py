"""Block codecs: float32 rows in, GGUF block bytes out (and back).

Kernels know nothing of files or tensors. Every arithmetic step is float32 in a
fixed order so that results are byte-identical to ggml's C reference and do not
depend on the thread count (rows are independent; see docs/kernels.md).
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numba
import numpy as np
from numba import njit

# LLVM at -O2 compiles these kernels a second faster than numba's default -O3 (about 4.9 -> 3.9 s
# on first use), and they run as fast (scripts/bench_kernels.py): no pass that -O3 adds pays here.
# No fastmath either way, so the bytes are the same. An explicit NUMBA_OPT is left as it is.
if "NUMBA_OPT" not in os.environ:
    os.environ["NUMBA_OPT"] = "2"
    numba.config.reload_config()

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


@njit(cache=True)  # a call, not inlined: only rare paths use it, and it compiles once
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
# midpoint comparisons of _sums and _nibble_value pick exactly what ggml's 16-value scan picks.
EXACT_RATIO = np.float32(2.0**21)
F12 = np.float32(12.0)


# The midpoints of MAGS and the steps between its values: the value nearest a at scale d is
# the sum of the steps times d whose midpoint times d a passed (exact: small integers times d).
MIDPOINTS = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], np.float32)
STEPS = np.array([1, 1, 1, 1, 2, 2, 4], np.float32)


@njit(cache=True, inline="always")
def _sums(a, w, tab, err):
    """err[l] += w (a - q)^2 over the elements of every lane l, at the scale whose
    midpoints and steps are tab[:7, l] and tab[7:, l] (_tabulate).

    Lanes are independent sub-blocks (element j of lane l at [j, l]), so each lane's sum
    keeps the defined j order while the work is SIMD-wide and free of dependency chains.
    """
    for j in range(NVFP4_SUB):
        for lane in range(err.shape[0]):
            aj = a[j, lane]
            q = np.float32(0.0)
            for i in range(7):
                q = q + tab[7 + i, lane] if aj > tab[i, lane] else q  # a masked add
            diff = aj - q
            err[lane] += (w[j, lane] * diff) * diff


@njit(cache=True, inline="always")
def _clipped(a, w, d, err):
    """err[l] = the part of lane l's error at scale d[l] from the elements above its largest
    value 12 d[l]: each of them rounds to it, so these are the same terms _sums adds, in the
    same order."""
    for lane in range(err.shape[0]):
        err[lane] = np.float32(0.0)
    for j in range(NVFP4_SUB):
        for lane in range(err.shape[0]):
            diff = a[j, lane] - F12 * d[lane]
            err[lane] += (w[j, lane] * diff) * diff if diff > np.float32(0.0) else np.float32(0.0)


@njit(cache=True, inline="always")
def _tabulate(d, tab):
    for i in range(7):
        for lane in range(d.shape[0]):
            tab[i, lane], tab[7 + i, lane] = MIDPOINTS[i] * d[lane], STEPS[i] * d[lane]


@njit(cache=True, inline="always")
def _scan_error(x, w, d):
    """The defined error with ggml's 16-value scan, for scales too small for midpoint tests."""
    s = np.float32(0.0)
    for j in range(NVFP4_SUB):
        diff = x[j] - KVALUES[_nearest(x[j], d)] * d
        s += (w[j] * diff) * diff
    return s


LANES = 64  # sub-blocks searched together


@njit(cache=True, inline="always")
def lane_scratch(lanes):
    """The work space search_codes needs for that many lanes: sub-blocks in (x, w), codes out,
    and what lies between."""
    return (np.zeros((NVFP4_SUB, lanes), np.float32), np.zeros((NVFP4_SUB, lanes), np.float32),
            np.zeros(lanes, np.int64), np.empty((NVFP4_SUB, lanes), np.float32), np.empty((4, lanes), np.float32),
            np.empty((3, lanes), np.int64), np.empty((14, lanes), np.float32))


@njit(cache=True, inline="always")
def search_codes(scratch, search):
    """Scale codes of as many sub-blocks as the scratch has lanes (lane_scratch), at once: lane l
    is x[:, l] with weights w[:, l], its code goes to codes[l] and its largest |x| to f[2, l]
    (x, w, codes, a, f, ii, tab = scratch).

    Per lane: ggml's amax / 6 encoded (the only code when search is 0), then the best of the
    window around it (docs/kernels.md), pruned without changing it. Codes are tried at
    offsets 0, -1, -2, ... from base until every lane's clipped elements alone (_clipped) cost
    more than its best so far (that part only grows further down), then 1, 2, ...
    """
    x, w, codes, a, f, ii, tab = scratch
    err, best, amax, d = f[0], f[1], f[2], f[3]
    base, lo, hi = ii[0], ii[1], ii[2]
    n = x.shape[1]
    for lane in range(n):
        amax[lane], best[lane] = np.float32(0.0), np.float32(np.inf)
    for j in range(NVFP4_SUB):
        for lane in range(n):
            a[j, lane] = abs(x[j, lane])
            amax[lane] = max(amax[lane], a[j, lane])
    for lane in range(n):
        b = scale_encode(amax[lane] / np.float32(6.0))
        base[lane], codes[lane] = b, b
        lo[lane], hi[lane] = min(b, max(1, b - search)), min(MAX_CODE, b + search)
        if amax[lane] > SCALES[lo[lane]] * EXACT_RATIO:  # rare: tiny scales in a wide window
            if search > 0:
                codes[lane] = _scan_search(x[:, lane], w[:, lane], lo[lane], hi[lane])
            lo[lane], hi[lane] = 1, 0  # an empty window
        elif amax[lane] == np.float32(0.0):
            lo[lane], hi[lane] = 1, 0  # an empty window
    o = 0
    while search > 0:
        live = False
        for lane in range(n):
            d[lane] = SCALES[min(max(base[lane] + o, 0), MAX_CODE)]
        if o < 0:
            _clipped(a, w, d, err)
        for lane in range(n):
            c = base[lane] + o
            if o < 0 and c >= lo[lane] and err[lane] > best[lane]:
                lo[lane] = c + 1
            live |= (lo[lane] <= c) & (c <= hi[lane])
        if live:
            _tabulate(d, tab)
            for lane in range(n):
                err[lane] = np.float32(0.0)
            _sums(a, w, tab, err)
            for lane in range(n):
                c = base[lane] + o
                if lo[lane] <= c <= hi[lane] and (err[lane] < best[lane] or (
                        err[lane] == best[lane] and c < codes[lane])):
                    best[lane], codes[lane] = err[lane], c
        if o <= 0 and live and o > -search:
            o -= 1
        elif o <= 0:
            o = 1
        elif live and o < search:
            o += 1
        else:
            break


@njit(cache=True)
def _scan_search(x, w, first, last):
    best_err, best_code = np.float32(np.inf), MAX_CODE + 1
    for c in range(first, last + 1):
        e = _scan_error(x, w, SCALES[c])
        if e < best_err:
            best_err, best_code = e, c
    return best_code


@njit(cache=True, inline="always")
def _nibble_value(a, x, tab, lane):
    """Nibble of x (a = |x|) at the scale tabulated in tab[:, lane] (_tabulate), as a float32:
    the index into MAGS of the value nearest a, ties to the smaller, by midpoint tests, 8 more
    when x is negative and not 0. Float compares and masked adds vectorize across lanes."""
    m = np.float32(0.0)
    for i in range(7):
        m = m + np.float32(1.0) if a > tab[i, lane] else m
    return m + np.float32(8.0) if (m > np.float32(0.0)) & (x < np.float32(0.0)) else m


@njit(cache=True, inline="always")
def _pack_lanes(scratch, packed):
    """Every lane's 16 nibbles at its code's scale, packed two to a byte into packed[:8, lane]:
    midpoint tests across the lanes (vectorized), ggml's scan for a lane whose scale is too small
    for them (x, w, codes, a, f, ii, tab = scratch, after search_codes)."""
    x, _, codes, a, f, _, tab = scratch
    d = f[3]
    for lane in range(x.shape[1]):
        d[lane] = SCALES[codes[lane]]
    _tabulate(d, tab)
    for j in range(8):
        for lane in range(x.shape[1]):
            packed[j, lane] = np.uint8(_nibble_value(a[j, lane], x[j, lane], tab, lane)
                                       + np.float32(16.0) * _nibble_value(a[j + 8, lane], x[j + 8, lane], tab, lane))
    for lane in range(x.shape[1]):
        if f[2, lane] > d[lane] * EXACT_RATIO:  # rare
            for j in range(8):
                packed[j, lane] = _nearest(x[j, lane], d[lane]) | (_nearest(x[j + 8, lane], d[lane]) << 4)


ROWS_PER_TASK = 16  # rows one thread encodes with one work space, at least
# Tasks per thread and call: enough to even out a thread slowed by other work, few enough that
# starting them (about 20 us each) stays small against a 768-row expert (8 cost 5% more than 4).
TASKS_PER_THREAD = 4


# Source rows the kernels read as they are: float32, float16, or bfloat16 bits as uint16 (numpy
# has no bfloat16); decoded (exactly, by table) and scaled row by row inside the kernel, so a
# tensor is not first written out as float32 and read again.
SOURCE_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.uint16): 2}
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
BF16_TO_F32 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


def _output(out, rows: int, nbytes: int) -> np.ndarray:
    if out is None:
        return np.empty((rows, nbytes), np.uint8)
    if out.shape != (rows, nbytes) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {(rows, nbytes)}, got {out.dtype} {out.shape}")
    return out


def _source(x) -> tuple[np.ndarray, np.ndarray, int]:
    """(float32 rows, 16-bit rows, kind) of 2D source rows: the kind's array holds them, the
    other is empty, so one compiled kernel serves every kind and no kernel reinterprets bytes."""
    x = np.ascontiguousarray(x)
    if x.dtype not in SOURCE_KINDS:
        x = x.astype(np.float32)
    kind = SOURCE_KINDS[x.dtype]
    none32, none16 = np.empty((0, 0), np.float32), np.empty((0, 0), np.uint16)
    return (x, none16, kind) if kind == 0 else (none32, x.view(np.uint16), kind)


@njit(cache=True, inline="always")
def _cols(s32, s16, kind):
    return s32.shape[1] if kind == 0 else s16.shape[1]


@njit(cache=True, inline="always")
def _load(s32, s16, r, kind, mult, row):
    """Row r of the source, decoded, times mult (1, or a power of two: exact) into row."""
    if kind == 0:
        for j in range(row.shape[0]):
            row[j] = s32[r, j] * mult
    else:
        table = F16_TO_F32 if kind == 1 else BF16_TO_F32
        for j in range(row.shape[0]):
            row[j] = table[s16[r, j]] * mult


@njit(cache=True, nogil=True)
def _decode_rows(s32, s16, kind, mult, out, r0, r1):
    for r in range(r0, r1):
        _load(s32, s16, r, kind, mult, out[r])


def as_float32(x, mult: float = 1.0) -> np.ndarray:
    """Source rows (float32, float16 or bfloat16 bits) times mult as float32 [rows, cols]."""
    if x.dtype == np.float32 and mult == 1:
        return np.ascontiguousarray(x)
    out = np.empty((x.shape[0], x.shape[1]), np.float32)
    over_rows(_decode_rows, x.shape[0], *_source(x), np.float32(mult), out)
    return out




@njit(cache=True, inline="always")
def _to_lanes(v, s0, n, lanes):
    """Sub-blocks s0 .. s0 + n - 1 of the row v as lanes (element j of lane l at [j, l]), 0 beyond."""
    for j in range(NVFP4_SUB):
        for lane in range(lanes.shape[1]):
            lanes[j, lane] = v[(s0 + lane) * NVFP4_SUB + j] if lane < n else np.float32(0.0)


@njit(cache=True, nogil=True)
def _encode_rows(s32, s16, kind, mult, importance, search, weighting, out, r0, r1):
    """Rows [r0, r1) of NVFP4 blocks into out (uint8, cols // 64 * 36 bytes per row)."""
    xs, _, codes, a, f, ii, tab = lane_scratch(LANES)
    packed = np.empty((8, LANES), np.uint8)
    x = np.empty(_cols(s32, s16, kind), np.float32)
    w = np.empty_like(x)
    nsub = x.shape[0] // NVFP4_SUB
    wl = np.zeros((-(-nsub // LANES), NVFP4_SUB, LANES), np.float32)  # the row's weights as lanes
    for r in range(r0, r1):
        _load(s32, s16, r, kind, mult, x)
        # Without a search (ggml's reference) the weights play no part; where they depend on
        # the column only, they are put into lanes once, not for every row.
        if search > 0 and (r == r0 or weighting == WEIGHT_GGML):
            _row_weights(x, importance, weighting, w)
            for s0 in range(0, nsub, LANES):
                _to_lanes(w, s0, min(LANES, nsub - s0), wl[s0 // LANES])
        for s0 in range(0, nsub, LANES):
            n = min(LANES, nsub - s0)
            _to_lanes(x, s0, n, xs)
            scratch = (xs, wl[s0 // LANES], codes, a, f, ii, tab)
            search_codes(scratch, search)
            _pack_lanes(scratch, packed)
            for lane in range(n):
                s = s0 + lane
                ob = s // 4 * NVFP4_BYTES
                out[r, ob + s % 4] = codes[lane]
                for j in range(8):
                    out[r, ob + 4 + s % 4 * 8 + j] = packed[j, lane]


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


@lru_cache(maxsize=1)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="nvfp4q")


def over_rows(kernel, rows: int, *args) -> None:
    """kernel(*args, r0, r1) over rows [0, rows) in tasks, on numba.get_num_threads() threads.

    The kernels release the GIL and rows are independent, so threads run side by side and the
    bytes do not depend on their number; and no parallel (parfor) kernel is compiled, which
    took longer to compile than the kernel it ran.
    """
    threads = numba.get_num_threads()
    step = max(rows, 1) if threads == 1 else max(ROWS_PER_TASK, -(-rows // (TASKS_PER_THREAD * threads)))
    over_chunks(kernel, rows, step, *args)


def over_chunks(kernel, rows: int, step: int, *args) -> None:
    """kernel(*args, r0, r1) over rows [0, rows) in chunks of step rows, as tasks on the pool when
    there are several and more than one thread, else one after the other."""
    threads = numba.get_num_threads()
    if threads == 1 or rows <= step:
        for r0 in range(0, rows, step):
            kernel(*args, r0, min(rows, r0 + step))
        return
    for task in [_pool(threads).submit(kernel, *args, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]:
        task.result()


def quantize_nvfp4(x, importance=None, search=0, weighting=WEIGHT_RAW, mult=1.0, out=None):
    """Source rows [rows, cols] (float32, float16 or bfloat16 bits) times mult -> uint8
    [rows, cols // 64 * 36] NVFP4 blocks, written into out when given (C-contiguous rows of the
    output file: no copy, no fresh pages per call).

    search is the scale-code window S; importance (cols float32) weights the error.
    With search 0 the importance is irrelevant and the bytes are ggml's reference.
    """
    rows, cols = x.shape
    if cols % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a multiple of {NVFP4_BLOCK} columns, got {cols}")
    if not 0 <= search <= MAX_SEARCH:
        raise ValueError(f"search window must be in 0..{MAX_SEARCH}, got {search}")
    imp = np.empty(0, np.float32) if importance is None else np.ascontiguousarray(importance, np.float32)
    if imp.shape[0] not in (0, cols):
        raise ValueError(f"importance has {imp.shape[0]} values for {cols} columns")
    out = _output(out, rows, cols // NVFP4_BLOCK * NVFP4_BYTES)
    over_rows(_encode_rows, rows, *_source(x), np.float32(mult), imp, search, weighting, out)
    return out


@njit(cache=True, inline="always")
def _nibble(blocks, r, ib, s, j):
    """Nibble of element j (0..15) of sub-block s of the block at byte ib of row r: byte j % 8 of
    the sub-block's eight, low nibble for j < 8, high nibble for the rest."""
    q = np.int64(blocks[r, ib + 4 + s * 8 + (j & 7)])
    return (q >> (4 * (j >> 3))) & 15


@njit(cache=True, inline="always")
def _value(blocks, r, ib, s, j, d):
    """Element j (0..15) of sub-block s of the block at byte ib of row r, at scale d."""
    return KVALUES[_nibble(blocks, r, ib, s, j)] * d


@njit(cache=True, nogil=True)
def _decode_nvfp4(blocks, out, r0, r1):
    nblocks = blocks.shape[1] // NVFP4_BYTES
    for r in range(r0, r1):
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
    over_rows(_decode_nvfp4, blocks.shape[0], blocks, out)
    return out


@njit(cache=True, inline="always")
def _store_half(x, out, o):
    """0 <= x < 65520 (float32) as IEEE half bits, rounded to nearest even like numpy and
    ggml's GGML_FP32_TO_FP16, little-endian into out[o:o + 2]."""
    if x < np.float32(2.0**-14):  # half subnormal: x * 2^24 is exact, then rint (to even)
        h = np.uint32(np.rint(x * np.float32(2.0**24)))
    else:  # x = m 2^e, m in [0.5, 1): ten mantissa bits rounded to even; 1024 carries into the exponent
        m, e = math.frexp(np.float64(x))
        h = np.uint32((e + 14) * 1024 + np.rint((m * 2.0 - 1.0) * 1024.0))
    out[o] = np.uint8(h & np.uint32(0xFF))
    out[o + 1] = np.uint8(h >> np.uint32(8))


@njit(cache=True, nogil=True)
def _encode_q8_0(s32, s16, kind, mult, out, r0, r1):
    x = np.empty(_cols(s32, s16, kind), np.float32)
    for r in range(r0, r1):
        _load(s32, s16, r, kind, mult, x)
        for b in range(x.shape[0] // Q8_0_BLOCK):
            off, o = b * Q8_0_BLOCK, b * Q8_0_BYTES
            amax = np.float32(0.0)
            for j in range(Q8_0_BLOCK):
                amax = max(amax, abs(x[off + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            _store_half(d, out[r], o)
            for j in range(Q8_0_BLOCK):
                v = x[off + j] * inv
                m = np.floor(np.float64(abs(v)) + 0.5)  # roundf: half away from zero, exact
                out[r, o + 2 + j] = np.uint8(np.int64(m if v >= 0 else -m) & 0xFF)


def quantize_q8_0(x, mult=1.0, out=None):
    """Source rows [rows, cols] (float32, float16 or bfloat16 bits) times mult -> uint8
    [rows, cols // 32 * 34] Q8_0 blocks (fp16 d, 32 int8), into out when given (as
    quantize_nvfp4). |x * mult| must stay below 65520 * 127."""
    rows, cols = x.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a multiple of {Q8_0_BLOCK} columns, got {cols}")
    out = _output(out, rows, cols // Q8_0_BLOCK * Q8_0_BYTES)
    over_rows(_encode_q8_0, rows, *_source(x), np.float32(mult), out)
    return out


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


@njit(cache=True, nogil=True)
def _encode_q5_0(x, d_out, out, r0, r1):
    """ggml's quantize_row_q5_0_ref: d = (the value of largest magnitude) / -16, values
    truncated after adding 16.5, the low nibbles of j and j + 16 sharing a byte."""
    nblocks = x.shape[1] // Q8_0_BLOCK
    for r in range(r0, r1):
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
    over_rows(_encode_q5_0, rows, x, d, out)
    out.reshape(rows, nb, Q5_0_BYTES)[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return out


def dequantize_q5_0(blocks):
    """uint8 [rows, nbytes] Q5_0 blocks -> float32 [rows, nbytes // 22 * 32]."""
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks, np.uint8).reshape(rows, -1, Q5_0_BYTES)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float32)
    return ((_fifth_bit_values(b, 2) - 16) * d).astype(np.float32).reshape(rows, -1)


@njit(cache=True, nogil=True)
def _encode_q5_1(x, d_out, m_out, out, r0, r1):
    """ggml's quantize_row_q5_1_ref: d = (max - min) / 31, values (x - min) / d rounded by
    truncating after adding 0.5."""
    nblocks = x.shape[1] // Q8_0_BLOCK
    for r in range(r0, r1):
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
    over_rows(_encode_q5_1, rows, x, d, m, out)
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


# A float's magnitude bits (sign cleared) order like its magnitude, and from the bits of inf up
# it is inf or NaN: the scan reads bits in the source's own width. numpy's integer reductions run
# as fast as a compiled scan, and nothing is compiled for it.
SCAN_BITS = {0: (np.uint32, 0x7FFFFFFF, 0x7F800000), 1: (np.uint16, 0x7FFF, 0x7C00), 2: (np.uint16, 0x7FFF, 0x7F80)}
SCAN_CHUNK = 1 << 20  # values per pass: the work space stays small and in cache


def scan(x):
    """(largest finite |x|, (row, col) of the first NaN/Inf or None) of 2D source rows, one pass."""
    s32, s16, kind = _source(x)
    src = s16 if kind else s32
    dt, mask, limit = SCAN_BITS[kind]
    bits = src.view(dt).reshape(-1)
    work = np.empty(min(bits.size, SCAN_CHUNK), dt)
    top, where = dt(0), None
    for i in range(0, bits.size, SCAN_CHUNK):
        mags = np.bitwise_and(bits[i:i + SCAN_CHUNK], dt(mask), out=work[:min(SCAN_CHUNK, bits.size - i)])
        t = mags.max()
        if t >= limit:  # rare: where the first one is, and the largest below them
            bad = mags >= limit
            if where is None:
                where = divmod(i + int(np.argmax(bad)), src.shape[1])
            t = mags[~bad].max(initial=0)
        top = max(top, t)
    top = np.array([top], dt)
    amax = top.view(np.float32) if kind == 0 else top.view(np.float16) if kind == 1 else \
        (top.astype(np.uint32) << 16).view(np.float32)
    return float(amax[0]), where
