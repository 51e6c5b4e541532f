"""Per-tensor scales for NVFP4: `.scale` sidecars, or factors the network absorbs exactly.

ggml's NVFP4 block has no per-tensor scale, so the sub-block scales of small weights fall into
UE4M3's 3-bit subnormal range. Quantizing W/g instead, with g chosen so that the largest
element reaches the top of the grid, lets the scale codes use the normal range; llama.cpp
multiplies the matmul result by g again. Only where the architecture's graph applies the
sidecar (it loads them everywhere and silently ignores most): SIDECARS, each entry proven by
tests/test_global_scale.py with stock llama.cpp.

Where no sidecar is applied, a tensor may still carry a free factor: RESCALES lists the kinds
the graph makes invariant to a positive factor, so the weights are scaled by a power of two
(exact in float32) before quantizing and nothing else changes.
"""

import numpy as np

# Tensor kinds whose `.scale` sidecar the architecture's llama.cpp graph multiplies in,
# read off src/models/<arch>.cpp and llama-graph.cpp build_qkv (llama-cpp-python 0.3.36).
_ATTN = frozenset({"attn_q", "attn_k", "attn_v", "attn_output"})
_FFN = frozenset({"ffn_gate", "ffn_up", "ffn_down"})
_EXPS = frozenset({"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"})
SIDECARS: dict[str, frozenset[str]] = {
    "llama": _ATTN | _FFN | _EXPS,
    "qwen2": _ATTN,
    "qwen3": _ATTN | _FFN,
    "qwen3moe": _ATTN | _EXPS,
    "gemma3": _ATTN,
}
# gemma3: ffn_down's output goes through post_ffw_norm (RMS norm: scale-invariant up to its
# eps of 1e-6 against the output's mean square), and ffn_up enters only through
# gelu(gate x) * (up x), linear in up, before ffn_down: a factor on either vanishes.
RESCALES: dict[str, frozenset[str]] = {
    "gemma3": frozenset({"ffn_up", "ffn_down"}),
}
MODES = ("auto", "sidecar", "rescale", "off")

# The largest element lands on the grid's top value, 12 x decode(0x7E) = 12 x 224.
GRID_MAX = np.float32(12 * 224)


def kind(name: str) -> str | None:
    """'blk.3.ffn_down.weight' -> 'ffn_down'."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        return parts[2]
    return None


def sidecar_name(name: str) -> str:
    return name.removesuffix(".weight") + ".scale"


def applies(arch: str, name: str, has_bias: bool = False) -> bool:
    """build_ffn multiplies the sidecar in after adding the bias (W x + g b, and with NVFP4
    weights it asserts), unlike attention: no FFN sidecar where the FFN has a bias."""
    k = kind(name)
    return k in SIDECARS.get(arch, frozenset()) and not (has_bias and k.startswith("ffn_"))


def rescalable(arch: str, name: str) -> bool:
    return kind(name) in RESCALES.get(arch, frozenset())


# Free factors scale the activations between the tensors too, and ggml's CPU matmul quantizes
# activations to Q8_0 with an fp16 block scale (overflows past 65504 * 127): so the largest
# |w| goes to 64, not to the grid's top. Normal scale codes cover 15 octaves below the top, so
# 64 still puts all sub-blocks with amax above 1/1000 of the tensor's in the normal range.
FREE_TARGET = 64.0


def free_factor(amax: float) -> np.float32:
    """The largest power of two that brings the tensor's largest |w| to at most FREE_TARGET."""
    return np.float32(2.0 ** np.floor(np.log2(FREE_TARGET / amax))) if amax > 0 else np.float32(1.0)


def initial(amax: float) -> np.float32:
    """g that maps the expert's largest |w| onto the top of the NVFP4 grid (1 for all-zero)."""
    return np.float32(amax / GRID_MAX) if amax > 0 else np.float32(1.0)


def refit(g: np.float32, sum_xq: float, sum_qq: float) -> np.float32:
    """Weighted least squares for the scale, given sums of w*y*q and w*q*q (y = x / g)."""
    return np.float32(g * sum_xq / sum_qq) if sum_qq > 0 else g
