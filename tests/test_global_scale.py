"""global_scale.SIDECARS proven with stock llama.cpp (llama-cpp-python 0.3.36).

llama.cpp loads a `.scale` sidecar for every attention, FFN and expert weight of any
architecture (src/llama-model.cpp, the generic pass after load_arch_tensors) but multiplies it
in only where the architecture's graph hands it to build_lora_mm / build_ffn / build_moe_ffn.
For each tiny model and each such kind in it: dividing the weights by g and adding a sidecar g
must give the reference logits exactly where the table says the sidecar is applied, and
exactly the logits of the divided weights without a sidecar where it says it is ignored.
All weights are F32 and every g a power of two, so W/g and the product by g are exact.
"""

from dataclasses import replace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

import ggml_oracle as ggml
from helpers import changed_copy, logits, rel_rmse
from helpers import tensors as tensors_of
from nvfp4q.global_scale import RESCALES, SIDECARS, kind, layer_factors, sidecar_name
from scripts.make_synthetic_model import PRESETS, Shape, tensors, write

ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")
# Kinds whose `.scale` llama.cpp loads whatever the architecture (shape [1], [n_expert] for *_exps).
LOADED = frozenset(ATTN + FFN + ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
TINY = sorted(p for p in PRESETS if p.startswith("tiny-"))
G = 4.0
SEED = 5
# RMS norms make their input's scale vanish up to eps: q/k norms (qwen3, qwen3moe, gemma3)
# after attn_q/attn_k, gemma3's post-attention and post-FFN norms after attn_output and
# ffn_down (and ffn_up, linear before it). With the real eps (1e-6) dividing those weights by
# 4 moves the logits by only 1e-5..2e-4 (relative RMSE), so agreement would prove nothing; an
# eps of the order of the normed values' mean square makes every kind visible (>= 3e-2;
# test_sidecar asserts it for each case).
EPS = 0.5


def shape(preset: str) -> Shape:
    return replace(PRESETS[preset], norm_eps=EPS)


def factors(s: Shape, name: str) -> np.ndarray:
    """G, or a different power of two per expert (2, 4, 8, ...)."""
    return 2.0 ** np.arange(1, s.experts + 1) if kind(name).endswith("_exps") else np.array([G])


def divided(s: Shape, k: str) -> dict[str, np.ndarray]:
    return {name: factors(s, name) for name, _, _ in tensors(s) if kind(name) == k}


def model(path, s: Shape, divide=None, sidecars: bool = False):
    """F32 model; the weights in divide written as W/g, with a sidecar g each if sidecars."""
    extra = {sidecar_name(n): g for n, g in (divide or {}).items()} if sidecars else None
    write(path, s, SEED, dtype=np.float32, divide=divide, extra=extra)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Logits of the undivided model, one llama.cpp run per shape."""
    folder, cache = tmp_path_factory.mktemp("reference"), {}

    def get(s: Shape) -> np.ndarray:
        if s not in cache:
            cache[s] = logits(model(folder / f"{len(cache)}.gguf", s))
        return cache[s]

    return get


def cases():
    """(preset, kind, applied) for every loaded kind in every tiny model; ids arch-preset-kind."""
    for preset in TINY:
        s = shape(preset)
        for k in sorted({kind(name) for name, _, _ in tensors(s)} & LOADED):
            applied = k in SIDECARS.get(s.arch, frozenset())
            yield pytest.param(preset, k, applied, id=f"{s.arch}-{preset}-{k}-{'applied' if applied else 'ignored'}")


CASES = list(cases())


def test_every_table_entry_has_a_case():
    proven = {(shape(p).arch, k) for p, k, applied in (c.values for c in CASES) if applied}
    assert proven == {(arch, k) for arch, kinds in SIDECARS.items() for k in kinds}


@pytest.mark.parametrize("preset, k, applied", CASES)
def test_sidecar(preset, k, applied, reference, tmp_path):
    s = shape(preset)
    divide = divided(s, k)
    ref = reference(s)
    plain = logits(model(tmp_path / "divided.gguf", s, divide))
    side = logits(model(tmp_path / "sidecar.gguf", s, divide, sidecars=True))
    assert rel_rmse(ref, plain) > 1e-2  # dividing is visible, so agreement below means something
    if applied:
        assert rel_rmse(ref, side) < 1e-3
    else:
        assert rel_rmse(ref, side) > 1e-2
        assert rel_rmse(plain, side) < 1e-6  # loaded, never multiplied in


# build_qkv and build_attn multiply the sidecar in before adding the bias: (W/g x) g + b.
# build_ffn multiplies it in after: (W/g x + b) g = W x + g b (and GGML_ASSERTs when such a
# weight is NVFP4), so a dense FFN weight with a bias must not get a sidecar.
@pytest.mark.parametrize("k", ATTN + FFN)
def test_sidecar_and_bias_in_llama(k, reference, tmp_path):
    s = replace(shape("tiny-llama"), biases=(k,))
    divide = divided(s, k)
    side = logits(model(tmp_path / "sidecar.gguf", s, divide, sidecars=True))
    if k in ATTN:
        assert rel_rmse(reference(s), side) < 1e-3
    else:
        biases_times_g = {name.removesuffix(".weight") + ".bias": 1 / g for name, g in divide.items()}
        assert rel_rmse(logits(model(tmp_path / "gb.gguf", s, biases_times_g)), side) < 1e-3
        assert rel_rmse(reference(s), side) > 1e-2


def nvfp4_output(src, dst):
    """src with output.weight quantized to NVFP4 by stock ggml."""
    def change(t):
        data = np.asarray(t.data)
        return (ggml.quantize(ggml.NVFP4, data), T.NVFP4) if t.name == "output.weight" else (data, None)

    return changed_copy(src, dst, change)


# Not a blk kind, so outside SIDECARS: output.scale. Every graph here computes the logits with
# build_lora_mm(model.output, cur, model.output_s), but llama-model.cpp loads output.scale only
# when output.weight is NVFP4; next to any other type the file has a tensor llama.cpp never
# takes, and loading fails.
@pytest.mark.parametrize("preset", TINY)
def test_output_scale_only_with_nvfp4_output(preset, tmp_path):
    s = shape(preset)
    g = np.array([0.25])  # W/g = 4W: the same FP4 codes under 4x UE4M3 scales, all normal
    f32_ref, f32_side = model(tmp_path / "ref.gguf", s), tmp_path / "sidecar.gguf"
    write(f32_side, s, SEED, dtype=np.float32, divide={"output.weight": g}, extra={"output.scale": g})
    with pytest.raises(ValueError, match="Failed to load"):
        logits(f32_side)
    ref, side = (nvfp4_output(p, p.with_suffix(".nvfp4.gguf")) for p in (f32_ref, f32_side))
    w_ref, w_side = (dequantize(np.asarray(tensors_of(p)["output.weight"].data), T.NVFP4) for p in (ref, side))
    assert np.array_equal(w_side * g[0], w_ref)  # W and W/g quantize alike
    assert rel_rmse(logits(ref), logits(side)) < 1e-3


# --- exact rescaling (RESCALES) -----------------------------------------------------------
# Factors from the rule itself, for weights whose largest |w| is 1/2 (inputs) and 1/4
# (pair[1]): a = 128, b = 16, none of them 1. At EPS = 0.5, a rule that leaned on a norm's
# scale invariance (a free factor before a norm) would be off by a few percent.

def rule_factors(arch: str) -> dict[str, float]:
    rule = RESCALES[arch]
    amax = {k: 0.5 for k in rule.inputs} | {rule.pair[1]: 0.25}
    return layer_factors(rule, amax)


def test_rescaled_kinds_have_no_sidecar():
    assert all(not (RESCALES[arch].kinds & SIDECARS.get(arch, frozenset())) for arch in RESCALES)


@pytest.mark.parametrize("arch", sorted(RESCALES))
def test_rescaling_leaves_logits_unchanged(arch, reference, tmp_path):
    s = shape(f"tiny-{arch}")
    factors = rule_factors(arch)
    assert all(f != 1 for f in factors.values())

    def scaled(tag: str, kinds) -> np.ndarray:
        divide = {n: 1 / factors[kind(n)] for n, _, _ in tensors(s) if kind(n) in kinds}
        return logits(model(tmp_path / f"{tag}.gguf", s, divide))

    ref = reference(s)
    assert rel_rmse(ref, scaled("all", set(factors))) < 1e-6
    for k in factors:  # every part of the rule is needed
        assert rel_rmse(ref, scaled(f"without-{k}", set(factors) - {k})) > 1e-2, k
