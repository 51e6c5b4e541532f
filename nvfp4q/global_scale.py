"""Per-tensor scales for NVFP4: `.scale` sidecars, or factors the network absorbs exactly.

ggml's NVFP4 block has no per-tensor scale, so the sub-block scales of small weights fall into
UE4M3's 3-bit subnormal range. Quantizing W/g instead, with g a power of two that brings the
largest element up to TARGET, lets the scale codes use the normal range; llama.cpp multiplies
the matmul result by g again. Being a power of two, g only moves the exponent: every sub-block
whose codes were normal gets the same nibbles and the same value as without it, so the result is
the single-level quantization with its subnormal sub-blocks mended, and nothing else (a g off
the powers of two, or refitted by least squares, reshuffles every block: docs/global-scale.md
measured that as noise that can go either way). Only where the architecture's graph applies
the sidecar (it loads them everywhere and silently ignores most): SIDECARS, each entry proven
by tests/test_global_scale.py with stock llama.cpp.

Where no sidecar is applied, powers of two can be moved between tensors whose product the
network computes exactly (RESCALES): the weights change, the function does not, and nothing
is added to the file.
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Rescale:
    """A layer's exact power-of-two transform: the RMS norm weight `norm` is divided by a and
    the weights reading its output (`inputs`) are multiplied by a; then `pair[0]` is divided
    by b and `pair[1]` multiplied by b, where pair[1] reads pair[0]'s output linearly."""

    norm: str
    inputs: tuple[str, ...]
    pair: tuple[str, str]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset((self.norm, *self.inputs, *self.pair))


# A gated FFN after a pre-norm: ffn_norm(x) feeds only gate and up, and ffn_down reads
# act(gate x) * (up x), linear in up. Where FFN sidecars are ignored (src/models/<arch>.cpp).
GATED_FFN = Rescale("ffn_norm", ("ffn_gate", "ffn_up"), ("ffn_up", "ffn_down"))
RESCALES: dict[str, Rescale] = {
    "gemma3": GATED_FFN,
    "qwen2": GATED_FFN,
}
MODES = ("auto", "sidecar", "rescale", "off")
# The kinds whose sidecars `auto` writes: the FFN's, where mending subnormal sub-blocks paid
# (99.5% of gemma3's ffn_down codes were subnormal under round-to-nearest). Attention sidecars
# were noise on gemma3 and llama and cost perplexity on qwen2 (docs/global-scale.md): only
# `--global-scale sidecar` writes them, and output.scale.
AUTO_SIDECARS = _FFN | _EXPS


def kind(name: str) -> str | None:
    """'blk.3.ffn_down.weight' -> 'ffn_down'."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        return parts[2]
    return None


def sidecar_name(name: str) -> str:
    return name.removesuffix(".weight") + ".scale"


def wants_sidecar(mode: str, arch: str, name: str, has_bias: bool = False) -> bool:
    """`sidecar`: wherever the graph applies one; `auto`: on the AUTO_SIDECARS kinds of those."""
    if mode == "auto" and kind(name) not in AUTO_SIDECARS:
        return False
    return mode in ("auto", "sidecar") and applies(arch, name, has_bias)


def applies(arch: str, name: str, has_bias: bool = False) -> bool:
    """build_ffn multiplies the sidecar in after adding the bias (W x + g b, and with NVFP4
    weights it asserts), unlike attention: no FFN sidecar where the FFN has a bias.
    output.scale: every graph in SIDECARS computes the logits with it (build_lora_mm), and
    llama.cpp loads it when output.weight is NVFP4, the only case this is asked for."""
    if name == "output.weight":
        return arch in SIDECARS
    k = kind(name)
    return k in SIDECARS.get(arch, frozenset()) and not (has_bias and k.startswith("ffn_"))


# A tensor's largest |w| goes to at most 2^6 (a sidecar's 1/g, a rescaled layer's a; then up
# and down meet halfway, b). 64 puts every sub-block with amax above 1/1000 of the tensor's in
# UE4M3's normal range, and stays far below the grid's top (12 x 224), so that the search window
# of the largest sub-blocks is never cut short there (which would change their codes). A
# rescaling factor a also divides the activations the inputs read, which ggml's CPU matmul
# quantizes to Q8_0 with an fp16 block scale: one more reason to stay low.
TARGET = 64.0


def _pow2(ratio: float, rounding) -> float:
    return float(2.0 ** rounding(np.log2(ratio))) if 0 < ratio < np.inf else 1.0


def layer_factors(rule: Rescale, amax: dict[str, float]) -> dict[str, float]:
    """Each kind's factor (the tensor is written as W * factor), from the weights' largest |w|."""
    top = max(amax[k] for k in rule.inputs)
    a = _pow2(TARGET / top if top > 0 else 0.0, np.floor)
    factors = {k: a for k in rule.inputs} | {rule.norm: 1.0 / a}
    first, second = rule.pair
    if amax[second] > 0:  # both end at sqrt(amax_first * factor_first * amax_second)
        b = _pow2(np.sqrt(amax[first] * factors.get(first, 1.0) / amax[second]), np.round)
        factors[first] = factors.get(first, 1.0) / b
        factors[second] = factors.get(second, 1.0) * b
    return factors


def rescaled_layers(arch: str, names: list[str]) -> dict[str, dict[str, str]]:
    """'blk.N.' -> {kind: tensor name} for each layer that has every tensor its rule touches."""
    rule = RESCALES.get(arch)
    if rule is None:
        return {}
    layers: dict[str, dict[str, str]] = {}
    for name in names:
        if kind(name) in rule.kinds:
            layers.setdefault(name[: name.index(".", 4) + 1], {})[kind(name)] = name
    return {prefix: members for prefix, members in layers.items() if len(members) == len(rule.kinds)}


def sidecar_scale(amax: float) -> np.float32:
    """g for an expert whose largest |w| is amax: W/g has its largest |w| in (TARGET/2, TARGET]
    (1 for an all-zero expert)."""
    return np.float32(1.0 / _pow2(TARGET / amax if amax > 0 else 0.0, np.floor))
