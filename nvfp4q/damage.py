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

# KLD per unit of relative error, per tensor kind (block kinds: times the number of blocks).
# Geometric means of the two development models' single-group ablations (docs/allocation.md);
# token_embd is tied to the output in both, so the output role is in its figure.
SENSITIVITY = {
    "token_embd": 16.9, "output": 16.9,
    "attn_q": 1.32, "attn_k": 1.91, "attn_v": 1.97, "attn_output": 2.03,
    "ffn_gate": 2.77, "ffn_up": 3.31, "ffn_down": 5.34,
}
# Later blocks weigh more: the block at relative depth z (0 first, 1 last) counts 1 + DEPTH * (z - 1/2)
# (second half over first half of ffn_down: 1.46 and 1.32 in the two models).
DEPTH = 0.65
# llama.cpp multiplies quantized weights with activations quantized to 8 bits: a floor of error
# every quantized type pays and the source's float type does not (Q8_0 blocks alone: 1-1.5e-4).
ACTIVATION_ERROR = 1e-4
# What the relative error misses between types, from arms with all blocks, or the embedding, in
# Q5_0 or Q5_1 (ggml's reference quantizers, which do not use the imatrix; docs/allocation.md):
# in a block their error hurts 1.4-1.6x what the same error of NVFP4 searched with the imatrix
# does, in the embedding 0.4-0.55x (its damage grows faster than linearly in the error).
TYPE_WEIGHT = {(T.Q5_0, "block"): 1.47, (T.Q5_0, "embedding"): 0.45,
               (T.Q5_1, "block"): 1.51, (T.Q5_1, "embedding"): 0.47}
_EMBEDDINGS = ("token_embd", "output")
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
    """KLD per unit relative error of one tensor; unknown kinds get the mean of the block kinds."""
    k = kind(name)
    s = SENSITIVITY.get(k)
    if s is None:
        block_kinds = [v for k2, v in SENSITIVITY.items() if k2 not in _EMBEDDINGS]
        s = sum(block_kinds) / len(block_kinds)
    m = _BLOCK.match(name)
    if m is None:
        return s
    z = int(m.group(1)) / (blocks - 1) if blocks > 1 else 0.5
    return s * (1 + DEPTH * (z - 0.5)) / blocks


def estimate(name: str, blocks: int, errors: dict, source: T) -> dict:
    """Damage per type from relative errors per type; the source's own type costs nothing."""
    s = sensitivity(name, blocks)
    role = "embedding" if kind(name) in _EMBEDDINGS else "block"
    return {q: 0.0 if q == source else s * (TYPE_WEIGHT.get((q, role), 1.0) * e + ACTIVATION_ERROR)
            for q, e in errors.items()}


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
