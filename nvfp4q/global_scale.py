"""Two-level NVFP4: a per-tensor (per-expert) F32 scale written as a `.scale` sidecar.

ggml's NVFP4 block has no per-tensor scale, so the sub-block scales of small weights fall into
UE4M3's 3-bit subnormal range. Quantizing W/g instead, with g chosen so that the largest
element reaches the top of the grid, lets the scale codes use the normal range; llama.cpp
multiplies the matmul result by g again. Only where the architecture's graph applies the
sidecar (it loads them everywhere and silently ignores most): SIDECARS, each entry proven by
tests/test_global_scale.py with stock llama.cpp.
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
MODES = ("auto", "sidecar", "off")

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


def applies(arch: str, name: str) -> bool:
    return kind(name) in SIDECARS.get(arch, frozenset())


def initial(amax: float) -> np.float32:
    """g that maps the expert's largest |w| onto the top of the NVFP4 grid (1 for all-zero)."""
    return np.float32(amax / GRID_MAX) if amax > 0 else np.float32(1.0)


def refit(g: np.float32, sum_xq: float, sum_qq: float) -> np.float32:
    """Weighted least squares for the scale, given sums of w*y*q and w*q*q (y = x / g)."""
    return np.float32(g * sum_xq / sum_qq) if sum_qq > 0 else g
