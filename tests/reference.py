"""Brute-force NumPy definition of the NVFP4 scale search (docs/kernels.md), slow on purpose.

Every candidate code is tried, every element scans all 16 values: nothing pruned, so the
fast kernel can be checked against the plain definition.
"""

import struct

import numpy as np

KV = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def decode_scale(code: int) -> np.float32:
    if code in (0, 0x7F):
        return np.float32(0)
    e, m = (code >> 3) & 15, code & 7
    raw = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return np.float32(raw * 0.5)


def encode_scale(x: np.float32) -> int:
    """ggml_fp32_to_ue4m3, transcribed bit by bit."""
    x = np.float32(x)
    if not x > 0:
        return 0
    x = min(x, np.float32(448))
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    exp = ((bits >> 23) & 0xFF) - 127 + 7
    if exp <= 0:
        return min(int(np.float32(x * np.float32(512)) + np.float32(0.5)), 7)
    if exp >= 15:
        return 0x7E
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    if man > 7:
        man, exp = 0, exp + 1
        if exp >= 15:
            return 0x7E
    return (exp << 3) | man


SCALES = np.array([decode_scale(c) for c in range(256)], dtype=np.float32)


def nearest(sub: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Index of the first minimum of |KV*d - x| (float32), as ggml's best_index_mxfp4."""
    err = np.abs(KV[None, None, :] * d[:, None, None] - sub[:, :, None])
    return np.argmin(err, axis=2)


def sub_errors(sub: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = KV[nearest(sub, d)] * d[:, None]
    diff = sub - q
    terms = (w * diff) * diff
    total = np.zeros(sub.shape[0], dtype=np.float32)
    for j in range(sub.shape[1]):
        total = total + terms[:, j]
    return total


def weights(x: np.ndarray, importance: np.ndarray | None, ggml_style: bool) -> np.ndarray:
    imp = np.ones(x.shape[1], np.float32) if importance is None else importance.astype(np.float32)
    if not ggml_style:
        return np.broadcast_to(imp, x.shape).astype(np.float32)
    sigma2 = np.add.accumulate(x * x, axis=1, dtype=np.float32)[:, -1] / np.float32(x.shape[1])
    return (imp[None, :] * np.sqrt(sigma2[:, None] + x * x)).astype(np.float32)


def codes(sub: np.ndarray, w: np.ndarray, search: int) -> np.ndarray:
    """Each 16-element sub-block's scale code: every code of the window tried."""
    amax = np.abs(sub).max(axis=1)
    base = np.array([encode_scale(a / np.float32(6)) for a in amax], dtype=np.int64)
    code = base.copy()
    best = sub_errors(sub, w, SCALES[base])
    if search > 0:
        for c in range(1, 0x7F):
            err = sub_errors(sub, w, np.full(len(sub), SCALES[c], np.float32))
            ok = (c >= base - search) & (c <= base + search) & (c != base) & (amax > 0)
            better = ok & ((err < best) | ((err == best) & (c < code)))
            code = np.where(better, c, code)
            best = np.where(better, err, best)
    return code


def gptq_nvfp4(x, u, importance=None, search=0, low=None) -> np.ndarray:
    """Error feedback the plain way: one column at a time, its error pushed at once onto every
    later column of its band (docs/calibration.md); the sub-block's code from the weights as they
    stand when its first column comes up. With low = (V / Delta, G) (rounding.low_rank), the
    errors before a 64-column block reach it at its start through their sum times G: each
    column gets sum_a (V / Delta)[a] * acc[a], acc summed in column order from the covariance
    block's start."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    band = u.shape[1]
    imp = weights(x, importance, False)
    out = np.zeros((rows, cols // 64 * 36), np.uint8)
    if low is not None:  # per column, whichever covariance block it is in
        vd, g = (a.reshape(-1, a.shape[2]) for a in low)
    for r in range(rows):
        w = x[r].copy()
        for j in range(cols):
            ib, s, k = j // 64 * 36, j % 64 // 16, j % 16
            if low is not None and j % 64 == 0:
                if j % low[0].shape[1] == 0:
                    acc = np.zeros(vd.shape[1], np.float32)
                for c in range(j, j + 64):
                    pull = np.float32(0)
                    for a in range(vd.shape[1]):
                        pull = pull + vd[c, a] * acc[a]
                    w[c] = w[c] + pull
            if k == 0:
                code = int(codes(w[None, j:j + 16], imp[r, None, j:j + 16], search)[0])
                out[r, ib + s] = code
                d = SCALES[code]
            nib = int(nearest(w[None, j:j + 1], np.array([d]))[0, 0])
            out[r, ib + 4 + s * 8 + k % 8] |= nib << (4 * (k // 8))
            b, jj = j // band, j % band
            e = (w[j] - KV[nib] * d) * (np.float32(1) / u[b, jj, jj])
            stop = min(cols, (b + 1) * band)
            w[j + 1:stop] = w[j + 1:stop] - e * u[b, jj, jj + 1:stop - b * band]
            if low is not None:
                acc = acc + e * g[j]
    return out


def quantize_nvfp4(x, importance=None, search=0, ggml_style=False) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    sub = x.reshape(-1, 16)
    code = codes(sub, weights(x, importance, ggml_style).reshape(-1, 16), search)
    nib = nearest(sub, SCALES[code]).astype(np.uint8)
    packed = nib[:, :8] | (nib[:, 8:] << 4)
    blocks = np.concatenate(
        [code.astype(np.uint8).reshape(-1, 4), packed.reshape(-1, 32)], axis=1
    )
    return blocks.reshape(rows, cols // 64 * 36)


def nibbles_and_scales(blocks) -> tuple[np.ndarray, np.ndarray]:
    """Per element of NVFP4 blocks, in order (flat): its nibble and its sub-block's scale."""
    b = blocks.reshape(-1, 36)
    qs = b[:, 4:].reshape(-1, 8)
    nib = np.concatenate([qs & 15, qs >> 4], axis=1).reshape(-1).astype(np.int64)
    return nib, np.repeat(SCALES[b[:, :4]].reshape(-1), 16)


def sub_block_errors(x, blocks, w) -> np.ndarray:
    """Weighted squared error per 16-sub-block of NVFP4 blocks against x (float64)."""
    nib, d = nibbles_and_scales(blocks)
    q = (KV[nib].astype(np.float64) * d).reshape(-1, 16)
    diff = np.asarray(x, np.float64).reshape(-1, 16) - q
    return (np.asarray(w, np.float64).reshape(-1, 16) * diff * diff).sum(axis=1)


def descend(w, blocks, h, passes=3) -> np.ndarray:
    """Coordinate descent the plain way (nvfp4q/descent.py): row by row, pass by pass, column by
    column, each element's 16 values scanned for the one nearest the coordinate's minimum, g
    updated by a whole row of H per move. The first gradients are the same BLAS product as the
    kernel's (another summing order would flip rare ties, not test anything)."""
    w = np.asarray(w, np.float32)
    blocks = blocks.copy()
    rows, cols = w.shape
    b = blocks.reshape(rows, -1, 36)
    nib, d = (a.reshape(rows, cols) for a in nibbles_and_scales(blocks))
    q = KV[nib] * d
    band = h.shape[1]
    for b0 in range(0, cols, band):
        n = min(band, cols - b0)
        hb = h[b0 // band, :n, :n]
        g, diag = (q - w)[:, b0:b0 + n] @ hb, np.diagonal(hb)
        for r in range(rows):
            for _ in range(passes):
                for c in range(n):
                    j = b0 + c
                    if not d[r, j] > 0:
                        continue
                    k = int(nearest(np.array([[q[r, j] - g[r, c] / diag[c]]], np.float32), d[r, j:j + 1])[0, 0])
                    delta = KV[k] * d[r, j] - q[r, j]
                    if delta * (np.float32(2) * g[r, c] + delta * diag[c]) < 0:
                        q[r, j], nib[r, j] = KV[k] * d[r, j], k
                        g[r] = g[r] + delta * hb[c]
    packed = (nib.reshape(rows, -1, 4, 16)[..., :8] | (nib.reshape(rows, -1, 4, 16)[..., 8:] << 4)).astype(np.uint8)
    b[:, :, 4:] = packed.reshape(rows, -1, 32)
    return blocks
