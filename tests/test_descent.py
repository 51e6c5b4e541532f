"""Coordinate descent after the error feedback (nvfp4q/descent.py): its plain definition, and what it is for."""

import numpy as np
import pytest

import reference
from nvfp4q import descent, kernels, rounding
from test_rounding import correlated, moments, random_cases, weighted_error


def fed_back(w, m, imp, passes=0, low_rank=0):
    """quantize's call: the error feedback, then `passes` of descent, through m's covariance (or
    its rank-`low_rank` approximation, which descent leaves alone)."""
    if low_rank:
        u, *low = rounding.low_rank(m, low_rank)
        return rounding.quantize_nvfp4(w, u, imp, 12, low=low, passes=passes)
    h = rounding.covariance(m)
    return rounding.quantize_nvfp4(w, rounding.inverse_factor(h), imp, 12, h=h, passes=passes)


@pytest.mark.parametrize("band", [None, 64])
def test_kernel_equals_the_plain_definition(band):
    rng = np.random.default_rng(21 + (band or 0))
    x = correlated(rng, 800, 256)
    x[:, 7] = 0  # an input that never fires
    w = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    w[0, :40] = 0.0  # a sub-block of zeros has scale code 0: nothing to move
    w[1, 64:80] *= 40  # a loud sub-block
    m = moments(x, band)
    imp = m.diagonal() / np.float32(m.count)
    start = fed_back(w, m, imp)
    h = rounding.covariance(m)
    expected = reference.descend(w, start, h, passes=4)
    got = start.copy()
    descent.descend(w, 1.0, got, h, passes=4)
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, start)  # it moved something
    assert np.array_equal(got, fed_back(w, m, imp, passes=4))  # quantize's call is this
    codes = lambda blocks: blocks.reshape(-1, 36)[:, :4]
    assert np.array_equal(codes(got), codes(start))  # the scales stay
    # the source as quantize reads it: float16 bits, decoded and scaled in the kernel
    half = w.astype(np.float16)
    got = start.copy()
    descent.descend(half, 2.0, got, h, passes=4)
    assert np.array_equal(got, reference.descend(half.astype(np.float32) * np.float32(2.0), start, h, passes=4))


def test_low_rank_inputs_are_left_as_the_feedback_leaves_them():
    rng = np.random.default_rng(23)
    x = correlated(rng, 800, 256)
    w = (rng.standard_normal((6, 256)) * 0.05).astype(np.float32)
    m = moments(x)
    imp = m.diagonal() / np.float32(m.count)
    assert np.array_equal(fed_back(w, m, imp, passes=3, low_rank=8), fed_back(w, m, imp, low_rank=8))


def test_the_error_through_the_covariance_falls_on_every_case():
    for seed, m, w, imp in random_cases(200):
        h = rounding.covariance(m)[0].astype(np.float64)
        errors = [weighted_error(w, fed_back(w, m, imp, p), h) for p in (0, 1, 3)]
        assert errors[0] > errors[1] >= errors[2], (seed, errors)


def test_many_passes_end_where_no_single_weight_can_move():
    """Against a brute force in float64: at the end no element has another of its 16 values (at
    its sub-block's scale) that lowers the error, beyond float32's rounding of the gradient."""
    rng = np.random.default_rng(31)
    x = correlated(rng, 2000, 128)
    m = moments(x)
    h = rounding.covariance(m)[0].astype(np.float64)
    w = (rng.standard_normal((8, 128)) * 0.05).astype(np.float32)
    blocks = fed_back(w, m, m.diagonal() / np.float32(m.count), 50)
    q = kernels.dequantize_nvfp4(blocks).astype(np.float64)
    d = reference.nibbles_and_scales(blocks)[1].reshape(8, -1)
    e = q - w
    g = e @ h
    total = np.einsum("ij,jk,ik->i", e, h, e)
    for r in range(8):
        for j in range(128):
            delta = reference.KV.astype(np.float64) * d[r, j] - q[r, j]
            change = delta * (2 * g[r, j] + delta * h[j, j])
            assert change.min() > -1e-5 * total[r], (r, j, change.min(), total[r])


def test_a_diagonal_covariance_moves_nothing():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 256)) * 0.02).astype(np.float32)
    x = correlated(rng, 1000, 256)
    m = moments(x)
    imp = m.diagonal() / np.float32(m.count)
    h = rounding.covariance(m, shrink=1.0)
    start = rounding.quantize_nvfp4(w, rounding.inverse_factor(h), imp, 12)
    assert np.array_equal(start, kernels.quantize_nvfp4(w, imp, 12))
    got = start.copy()
    descent.descend(w, 1.0, got, h, passes=5)
    assert np.array_equal(got, start)
