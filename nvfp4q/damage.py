"""What a type costs a tensor in quality: an estimate of the tensor's share of the mean KLD to
the source model, for the `--target-size` allocator.

A tensor's relative error is its importance-weighted squared rounding error over its
importance-weighted squared weights. An imatrix value is E[x_j^2], so under its diagonal view
this is E|(Q - W)x|^2 / E|Wx|^2: the noise the tensor adds to its own output, as a fraction of
that output. It is measured on a sample of rows with the kernels the run will use. For small
noise KLD grows linearly in it; how much depends on where the tensor sits, which a sensitivity
per tensor kind carries, learned from single-group ablations on the development models
(docs/allocation.md, scripts/fit_sensitivity.py). A block's share is divided by the number of
blocks, as each block writes about that fraction of the residual stream.
"""

import re
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import codecs

SAMPLE_RUNS, RUN_ROWS = 16, 32  # rows measured per tensor: 16 evenly spaced runs of 32

# KLD per unit relative error, per tensor kind (times the number of blocks for block tensors).
SENSITIVITY = {
    "token_embd": 1.0, "output": 1.0,
    "attn_q": 1.0, "attn_k": 1.0, "attn_v": 1.0, "attn_output": 1.0,
    "ffn_gate": 1.0, "ffn_up": 1.0, "ffn_down": 1.0,
}
# kinds no development model has, read as the measured kind they resemble
_ALIASES = {"attn_qkv": "attn_v", "attn_q_a": "attn_q", "attn_q_b": "attn_q", "attn_kv_a_mqa": "attn_k",
            "attn_kv_b": "attn_v", "attn_k_b": "attn_k", "attn_v_b": "attn_v", "per_layer_token_embd": "token_embd"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def kind(name: str) -> str:
    """blk.3.ffn_down_exps.weight -> ffn_down; token_embd.weight -> token_embd."""
    m = _BLOCK.match(name)
    k = m.group(2) if m else name.removesuffix(".weight")
    k = re.sub(r"_(exps|shexp|chexps)$", "", k)
    return _ALIASES.get(k, k)


def n_blocks(names: list[str]) -> int:
    return len({m.group(1) for m in map(_BLOCK.match, names) if m}) or 1


def sensitivity(name: str, blocks: int) -> float:
    """Unknown kinds get the mean of the measured block kinds."""
    k = kind(name)
    s = SENSITIVITY.get(k)
    if s is None:
        block_kinds = [v for k2, v in SENSITIVITY.items() if k2 not in ("token_embd", "output")]
        s = sum(block_kinds) / len(block_kinds)
    return s / blocks if _BLOCK.match(name) else s


def sample(shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(matrix, first row, end row) runs spread over a tensor; a run never crosses an expert."""
    per_mat = shape[1] if len(shape) >= 2 else 1
    mats = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    run = min(RUN_ROWS, per_mat)
    per = per_mat // run
    picks = np.unique(np.linspace(0, mats * per - 1, min(SAMPLE_RUNS, mats * per)).round().astype(np.int64))
    return [(int(j // per), int(j // per * per_mat + j % per * run), int(j // per * per_mat + j % per * run + run))
            for j in picks]


def relative_errors(read: Callable[[int, int], np.ndarray], shape: tuple[int, ...], importance,
                    qtypes: list[T], search: int, weighting: int) -> dict[T, float]:
    """Relative error per type, on the sampled rows. importance: per matrix a weight vector or None
    (plain squared error); read(first, stop) gives float32 rows."""
    err = dict.fromkeys(qtypes, 0.0)
    ref = 0.0
    for mat, first, stop in sample(shape):
        rows = read(first, stop)
        w = None if importance is None else importance[min(mat, len(importance) - 1)]
        x = rows.astype(np.float64)
        ww = np.ones(rows.shape[1]) if w is None else w.astype(np.float64)
        ref += float(((x * x) @ ww).sum())
        for qtype in qtypes:
            raw = codecs.encode(qtype, rows, w, search, weighting)
            q = codecs.decode(qtype, raw.view(np.uint8).reshape(len(rows), -1)).astype(np.float64)
            err[qtype] += float((((q - x) ** 2) @ ww).sum())
    return {qtype: (e / ref if ref > 0 else 0.0) for qtype, e in err.items()}
