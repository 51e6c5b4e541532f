"""Error-feedback rounding (nvfp4q/rounding.py) against its plain definition and its purpose."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
from nvfp4q import kernels, rounding
from nvfp4q.calibration import Moments, Sketch


def correlated(rng, tokens: int, width: int, mix: float = 0.4) -> np.ndarray:
    """Activations whose columns are correlated, with a few loud ones, as real inputs are."""
    mixing = np.eye(width) + mix * rng.standard_normal((width, width)) / np.sqrt(width) * 4
    x = rng.standard_normal((tokens, width)) @ mixing
    x[:, rng.choice(width, 3, replace=False)] *= 8
    return x.astype(np.float32)


def moments(x: np.ndarray, band: int | None = None) -> Moments:
    width = x.shape[1]
    band = band or width
    blocks = np.zeros((-(-width // band), band, band), np.float32)
    for b in range(blocks.shape[0]):
        xb = x[:, b * band:(b + 1) * band]
        blocks[b, :xb.shape[1], :xb.shape[1]] = xb.T @ xb
    return Moments(width, float(x.shape[0]), blocks)


def weighted_error(w, blocks, h) -> float:
    e = kernels.dequantize_nvfp4(blocks).astype(np.float64) - w
    return float(np.einsum("ij,jk,ik->", e, h, e))


@pytest.mark.parametrize("shrink", [0.0, 0.4])
def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(shrink):
    rng = np.random.default_rng(0)
    for width, band in ((192, None), (300, 128)):
        x = correlated(rng, 2000, width)
        m = moments(x, band)
        u = rounding.factor(m, damp=0.05, shrink=shrink).astype(np.float64)
        for b in range(u.shape[0]):
            n = min(m.band, width - b * m.band)
            h = m.blocks[b, :n, :n].astype(np.float64) / m.count
            h = (1 - shrink) * h + shrink * np.diag(np.diag(h))
            h += 0.05 * np.mean(m.diagonal() / m.count) * np.eye(n)
            ub = u[b, :n, :n]
            assert np.allclose(ub, np.triu(ub))
            assert np.allclose(ub.T @ ub, np.linalg.inv(h), rtol=1e-4, atol=1e-6 * np.abs(np.linalg.inv(h)).max())


@pytest.mark.parametrize("band", [None, 64])
@pytest.mark.parametrize("search", [0, 12])
def test_kernel_equals_the_plain_definition(band, search):
    rng = np.random.default_rng(search + (band or 0))
    x = correlated(rng, 500, 192)
    w = (rng.standard_normal((6, 192)) * 0.05).astype(np.float32)
    w[0, :80] = -0.0  # errors of zero (and signed zeros) go through the updates as any other
    w[1, 60:70] = 0.0
    m = moments(x, band)
    u = rounding.factor(m, shrink=0.0)
    imp = m.diagonal() / np.float32(m.count)
    got = rounding.quantize_nvfp4(w, u, imp, search)
    assert np.array_equal(got, reference.gptq_nvfp4(w, u, imp, search))
    stale = np.full_like(got, 0xFF)  # an output buffer's old bytes: every one is written
    assert rounding.quantize_nvfp4(w, u, imp, search, out=stale) is stale and np.array_equal(stale, got)
    # the source as quantize reads it: float16 or bfloat16 bits, decoded and scaled in the kernel
    half, bf16 = w.astype(np.float16), (w.view(np.uint32) >> 16).astype(np.uint16)
    for src, mult, decoded in ((half, 2.0, half.astype(np.float32)),
                               (bf16, 0.5, (bf16.astype(np.uint32) << 16).view(np.float32))):
        assert np.array_equal(rounding.quantize_nvfp4(src, u, imp, search, mult=mult),
                              reference.gptq_nvfp4(decoded * np.float32(mult), u, imp, search))


def test_diagonal_covariance_gives_the_search_bytes():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 256)) * 0.02).astype(np.float32)
    d = (rng.random(256) + 0.05).astype(np.float32)
    m = Moments(256, 10.0, np.diag(d * 10).astype(np.float32)[None])
    full = moments(correlated(rng, 1000, 256))  # shrunk all the way, it is its diagonal
    imp_full = full.diagonal() / np.float32(full.count)
    for search in (0, 12):
        assert np.array_equal(rounding.quantize_nvfp4(w, rounding.factor(m), d, search),
                              kernels.quantize_nvfp4(w, d, search))
        assert np.array_equal(rounding.quantize_nvfp4(w, rounding.factor(full, shrink=1.0), imp_full, search),
                              kernels.quantize_nvfp4(w, imp_full, search))


def random_cases(first_seed: int):
    """12 (seed, moments, rows, imatrix) of random widths, correlations and weight scales."""
    for seed in range(first_seed, first_seed + 12):
        rng = np.random.default_rng(seed)
        width = int(rng.choice([128, 256]))
        m = moments(correlated(rng, 3000, width, mix=float(rng.uniform(0.2, 0.8))))
        w = (rng.standard_normal((32, width)) * rng.uniform(0.005, 0.1)).astype(np.float32)
        yield seed, m, w, m.diagonal() / np.float32(m.count)


def test_error_through_the_covariance_is_lower_than_the_search_on_every_case():
    for seed, m, w, imp in random_cases(100):
        h = m.blocks[0].astype(np.float64) / m.count
        nearest = weighted_error(w, kernels.quantize_nvfp4(w), h)
        searched = weighted_error(w, kernels.quantize_nvfp4(w, imp, 12), h)
        fed_back = weighted_error(w, rounding.quantize_nvfp4(w, rounding.factor(m, shrink=0.0), imp, 12), h)
        assert fed_back < searched and fed_back < nearest, (seed, nearest, searched, fed_back)


def test_dead_inputs_and_a_zero_count_block_do_not_break_the_factor():
    rng = np.random.default_rng(5)
    x = correlated(rng, 1000, 128)
    x[:, 10] = 0  # an input that never fires
    m = moments(x)
    u = rounding.factor(m)
    assert np.all(np.isfinite(u))
    assert np.all(u[0, 10, 11:] == 0)  # its error moves nothing
    zero = Moments(128, 1.0, np.zeros((1, 128, 128), np.float32))
    w = (rng.standard_normal((4, 128)) * 0.05).astype(np.float32)
    assert np.array_equal(rounding.quantize_nvfp4(w, rounding.factor(zero)), kernels.quantize_nvfp4(w))


@pytest.mark.parametrize("band", [None, 128])
@pytest.mark.parametrize("rank", [8, 6])  # the kernel sums four ranks at a time, and the rest one by one
def test_low_rank_kernel_equals_the_plain_definition(band, rank):
    rng = np.random.default_rng(7 + (band or 0))
    x = correlated(rng, 800, 256)
    w = (rng.standard_normal((5, 256)) * 0.05).astype(np.float32)
    w[0, 100:140] = 0.0
    m = moments(x, band)
    u, vd, g = rounding.low_rank(m, rank)
    assert vd.shape[2] == rank
    imp = m.diagonal() / np.float32(m.count)
    got = rounding.quantize_nvfp4(w, u, imp, 12, low=(vd, g))
    assert np.array_equal(got, reference.gptq_nvfp4(w, u, imp, 12, low=(vd, g)))
    assert not np.array_equal(got, rounding.quantize_nvfp4(w, u, imp, 12))  # the sum does move later blocks


def low_rank_covariance(m: Moments, rank: int, shrink: float) -> np.ndarray:
    """The H that rounding.low_rank stands for, written out, damping included."""
    (v, delta), = rounding.low_rank_terms(m, rank, rounding.DAMP, shrink)
    return np.diag(delta) + v @ v.T


def test_low_rank_rounds_as_the_whole_factor_of_its_own_covariance():
    """The Woodbury form is the feedback of Delta + V V^T, not an approximation of it; at full
    rank that H is factor()'s own."""
    rng = np.random.default_rng(11)
    x = correlated(rng, 3000, 192)
    x[:, 5] = 0  # an unused input
    m = moments(x)
    w = (rng.standard_normal((64, 192)) * 0.05).astype(np.float32)
    imp = m.diagonal() / np.float32(m.count)
    for rank, shrink in ((12, 0.0), (192, 0.5)):
        u, vd, g = rounding.low_rank(m, rank, shrink=shrink)
        got = rounding.quantize_nvfp4(w, u, imp, 12, low=(vd, g))
        h = low_rank_covariance(m, rank, shrink)
        whole = rounding.quantize_nvfp4(w, rounding.factor(Moments(192, 1.0, h[None].astype(np.float32)), damp=1e-12,
                                                           shrink=0.0), imp, 12)
        same = np.all(got.reshape(-1, 36) == whole.reshape(-1, 36), axis=1).mean()
        assert same > 0.98, (rank, same)  # float32 sums in another order flip a rare rounding
        if rank == 192:
            hs = m.blocks[0].astype(np.float64) / m.count
            hs = 0.5 * hs + 0.5 * np.diag(np.diag(hs)) + rounding.DAMP * np.mean(imp[imp > 0]) * np.eye(192)
            hs[5, 5] = 1.0
            assert np.allclose(h, hs, rtol=1e-4, atol=1e-6 * np.abs(hs).max())


def test_low_rank_feedback_lowers_the_output_error_and_follows_the_rank():
    rng = np.random.default_rng(13)
    width = 256
    mixing = rng.standard_normal((6, width))  # inputs driven by a few shared directions, as real ones are
    x = (rng.standard_normal((4000, 6)) @ mixing + 0.3 * rng.standard_normal((4000, width))).astype(np.float32)
    m = moments(x)
    h = m.blocks[0].astype(np.float64) / m.count
    w = (rng.standard_normal((64, width)) * 0.05).astype(np.float32)
    imp = m.diagonal() / np.float32(m.count)
    searched = weighted_error(w, kernels.quantize_nvfp4(w, imp, 12), h)
    errors = []
    for rank in (1, 6):
        u, vd, g = rounding.low_rank(m, rank, shrink=0.0)
        errors.append(weighted_error(w, rounding.quantize_nvfp4(w, u, imp, 12, low=(vd, g)), h))
    whole = weighted_error(w, rounding.quantize_nvfp4(w, rounding.factor(m, shrink=0.0), imp, 12), h)
    assert searched > errors[0] > errors[1]
    assert errors[1] < 1.1 * whole  # six directions hold these inputs' correlations


def test_the_feedback_budget_moves_the_costliest_inputs_to_low_rank_whole_groups_at_a_time():
    """Per layer of a 1B-shaped model: q/k/v, attn_output and gate/up read 2048-wide inputs,
    ffn_down a sketched 8192-wide one. All whole would cost 1024 multiply-adds per weight on
    most weights, over the budget: gate/up (the costliest group) go low-rank in every layer,
    and attention stays whole; in a model with as many weights again that have no moments, the mean
    is lower and every input stays whole. A narrower model stays whole; rank 0 keeps every input
    whole."""
    def dense(width):
        return Moments(width, 1.0, np.zeros((1, 1, 1), np.float32).repeat(width, 1).repeat(width, 2))
    sketch = Sketch(8192, 1.0, np.zeros((8192, 16), np.float32), np.ones(8192, np.float32))
    wide, narrow = dense(2048), dense(640)
    model = {}
    for layer in range(4):
        model |= {f"{layer}.q": (wide, 6 << 20), f"{layer}.o": (wide, 4 << 20), f"{layer}.up": (wide, 32 << 20),
                  f"{layer}.down": (sketch, 16 << 20)}
    low = rounding.low_rank_inputs(model, 64)
    assert low == {f"{layer}.{k}" for layer in range(4) for k in ("up", "down")}

    def mean_cost(low):
        cost = {n: 2 * 64 + 32 if n in low else m.band / 2 for n, (m, _) in model.items()}
        return sum(cost[n] * w for n, (_, w) in model.items()) / sum(w for _, w in model.values())
    assert mean_cost(low) <= rounding.FEEDBACK_BUDGET < mean_cost(low - {"0.up", "1.up", "2.up", "3.up"})
    assert mean_cost(low - {"0.up"}) <= rounding.FEEDBACK_BUDGET  # one layer's would fit: every layer alike
    experts = 2 * sum(w for _, w in model.values())  # as many NVFP4 weights again, without moments (MoE experts)
    assert rounding.low_rank_inputs(model, 64, experts) == {f"{layer}.down" for layer in range(4)}
    small = {f"{layer}.{k}": (narrow, 2 << 20) for layer in range(4) for k in ("q", "up")}
    small |= {f"{layer}.down": (wide, 1 << 20) for layer in range(4)}  # Gemma 3 270M's proportions
    assert rounding.low_rank_inputs(small, 64) == set()
    assert rounding.low_rank_inputs(small, 32) == {f"{layer}.down" for layer in range(4)}  # wider than 32 x 32
    assert rounding.low_rank_inputs(model, 0) == set()


FACTOR_HASH = """
import hashlib, sys, numpy as np  # numpy first: OpenBLAS starts on OPENBLAS_NUM_THREADS threads
sys.path[:0] = sys.argv[1:]
from test_rounding import correlated, moments
from nvfp4q import rounding
from nvfp4q.calibration import Sketch
x = correlated(np.random.default_rng(5), 3000, 1536)
m = moments(x)
s = Sketch(1536, 3000.0, np.ascontiguousarray(x[:256].T), np.square(x).sum(axis=0))
w = (np.random.default_rng(6).standard_normal((256, 1536)) * 0.05).astype(np.float32)
h = rounding.covariance(m)
descended = rounding.quantize_nvfp4(w, rounding.inverse_factor(h), m.diagonal() / np.float32(m.count), 12, h=h,
                                    passes=3)
print(*(hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
        for arrays in ([rounding.factor(m)], rounding.low_rank(m), rounding.low_rank(s), [descended])))
"""


def test_factor_bits_do_not_depend_on_the_thread_count():
    """A factor (whole, low-rank, or low-rank from a sketch) wide enough for its products to be
    split, and a rounding that ends in descent's first gradients (products too), come out the same
    bits on 1, 2 or 3 threads, whatever OPENBLAS_NUM_THREADS says (nvfp4q.matmul sets it to 1 on
    loading: on some CPUs OpenBLAS's threads change the bits)."""
    here = Path(__file__).parent
    hashes = set()
    for n in (1, 2, 3):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(n), "NUMBA_NUM_THREADS": str(n)}
        proc = subprocess.run([sys.executable, "-c", FACTOR_HASH, str(here), str(here.parent)], env=env,
                              capture_output=True, text=True, check=True)
        hashes.add(proc.stdout.strip())
    assert len(hashes) == 1
