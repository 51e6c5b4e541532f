"""Per-token facts of next-token distributions, and the statistics llama-perplexity reports.

The kernels work on one chunk's logits at a time (a 262k vocabulary times 256 scored tokens is
a quarter GB in f32), row by row in float64, so nothing of vocabulary size is ever kept or
copied beyond the logits themselves; a row's sums run in a fixed order, so the figures do not
depend on the thread count.
"""

from dataclasses import dataclass

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def _softmax_facts(logits, targets, lse, argmax, nll):
    for r in numba.prange(logits.shape[0]):
        row = logits[r]
        top = 0
        for i in range(1, row.shape[0]):
            if row[i] > row[top]:
                top = i
        m = np.float64(row[top])
        s = 0.0
        for i in range(row.shape[0]):
            s += np.exp(np.float64(row[i]) - m)
        lse[r] = m + np.log(s)
        argmax[r] = top
        nll[r] = lse[r] - np.float64(row[targets[r]])


@numba.njit(cache=True, parallel=True)
def _kld(base, lse_b, quant, lse_q, out):
    for r in numba.prange(base.shape[0]):
        s = 0.0
        for i in range(base.shape[1]):
            lb = np.float64(base[r, i]) - lse_b[r]
            s += np.exp(lb) * (lb - (np.float64(quant[r, i]) - lse_q[r]))
        out[r] = max(s, 0.0)  # a rounding-level negative is a zero divergence


@dataclass
class Softmax:
    """One model's facts on one chunk: log-normaliser, top token and NLL of each target."""

    lse: np.ndarray
    argmax: np.ndarray
    nll: np.ndarray


def softmax_facts(logits: np.ndarray, targets: np.ndarray) -> Softmax:
    n = logits.shape[0]
    f = Softmax(np.empty(n), np.empty(n, np.int64), np.empty(n))
    _softmax_facts(logits, targets.astype(np.int64), f.lse, f.argmax, f.nll)
    return f


def kld(base: np.ndarray, fb: Softmax, quant: np.ndarray, fq: Softmax) -> np.ndarray:
    """KL(base || quant) per row, in nats."""
    out = np.empty(base.shape[0])
    _kld(base, fb.lse, quant, fq.lse, out)
    return out


@dataclass
class Tokens:
    """Per-token results of one quantized model against the base, over all scored tokens."""

    nll: np.ndarray  # the quantized model's negative log-likelihood of each target
    kld: np.ndarray
    same_top1: np.ndarray  # bool: its most likely token is the base's


def _se(x: np.ndarray) -> float | None:
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None


def _times(a: float, b: float | None) -> float | None:
    return None if b is None else a * b


def ppl(nll: np.ndarray) -> dict:
    """Perplexity with llama-perplexity's uncertainty (delta method on the mean NLL)."""
    value = float(np.exp(nll.mean()))
    return {"value": value, "se": _times(value, _se(nll))}


def summarise(base_nll: np.ndarray, t: Tokens) -> dict:
    """What llama-perplexity --kl-divergence prints, per-token standard errors included."""
    diff = t.nll - base_nll
    ratio = float(np.exp(diff.mean()))
    top1 = float(t.same_top1.mean())
    return {
        "ppl": ppl(t.nll),
        "ppl_ratio": {"value": ratio, "se": _times(ratio, _se(diff))},
        "kld": {"mean": float(t.kld.mean()), "se": _se(t.kld), "median": float(np.median(t.kld)),
                "p99": float(np.percentile(t.kld, 99)), "max": float(t.kld.max())},
        "same_top1": {"value": top1, "se": float(np.sqrt(top1 * (1 - top1) / t.kld.size))},
    }


def paired(a: Tokens, b: Tokens, n_chunks: int) -> dict:
    """B minus A on the same tokens: negative means B is closer to the base. Besides the
    per-token standard error, one from the spread of the chunk means, which does not assume
    that neighbouring tokens' differences are independent."""
    out = {}
    for key in ("kld", "nll"):
        d = getattr(b, key) - getattr(a, key)
        out[key] = {"mean": float(d.mean()), "se": _se(d), "se_chunks": _se(d.reshape(n_chunks, -1).mean(axis=1))}
    return out
