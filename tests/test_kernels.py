import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import ggml_oracle as ggml
import reference as ref
from nvfp4q import kernels as K


def _bf16(x):
    return (x.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def _midpoints(rng, rows):
    """Sub-blocks whose scale is known exactly, with elements on rounding midpoints."""
    out = np.zeros((rows, 64), np.float32)
    mags = K.MAGS
    for r in range(rows):
        for s in range(4):
            code = int(rng.integers(1, 0x78))
            d = ref.SCALES[code]
            sub = out[r, 16 * s:16 * s + 16]
            sub[0] = 12 * d  # amax / 6 == 2d encodes back to code
            for j in range(1, 16):
                i = int(rng.integers(0, 7))
                sub[j] = (mags[i] + mags[i + 1]) / 2 * d * rng.choice([-1, 1])
    return out


def datasets():
    rng = np.random.default_rng(1234)
    normal = rng.normal(0, 0.02, (32, 256)).astype(np.float32)
    heavy = (rng.standard_t(2.5, (32, 256)) * 0.01).astype(np.float32)
    zeros = normal.copy()
    zeros[:, 16:48] = 0
    zeros[3] = 0
    return {
        "normal_f16": normal.astype(np.float16).astype(np.float32),
        "heavy_bf16": _bf16(heavy),
        "zero_subblocks": zeros,
        "subnormal_scales": (normal * 1e-3).astype(np.float32),
        "tiny": rng.normal(0, 1e-7, (8, 128)).astype(np.float32),
        "huge": (rng.normal(0, 1, (8, 128)) * 6 * 448 * 4).astype(np.float32),
        "midpoints": _midpoints(rng, 16),
        "row_64": rng.normal(0, 1, (4, 64)).astype(np.float32),
        "wide": rng.normal(0, 0.05, (3, 4096)).astype(np.float16).astype(np.float32),
    }


DATA = datasets()


@pytest.mark.parametrize("name", DATA)
def test_rtn_is_byte_identical_to_ggml(name):
    x = DATA[name]
    assert np.array_equal(K.quantize_nvfp4(x, search=0), ggml.quantize(ggml.NVFP4, x))


@pytest.mark.parametrize("name", DATA)
def test_rtn_ignores_importance_like_ggml(name):
    x = DATA[name]
    imp = np.random.default_rng(0).uniform(0.1, 10, x.shape[1]).astype(np.float32)
    assert np.array_equal(K.quantize_nvfp4(x, imp, search=0), ggml.quantize(ggml.NVFP4, x, imp))


@pytest.mark.parametrize("name", DATA)
def test_q8_0_is_byte_identical_to_ggml(name):
    x = DATA[name]
    ours = K.quantize_q8_0(x)
    assert np.array_equal(ours, ggml.quantize(ggml.Q8_0, x))
    assert np.array_equal(K.dequantize_q8_0(ours), ggml.dequantize(ggml.Q8_0, ours, x.shape[1]))


def test_q8_0_scales_round_to_the_nearest_half_like_numpy():
    rng = np.random.default_rng(7)
    d = np.concatenate([np.exp(rng.uniform(-40, 11.09, 20000)), [0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
                                                               65504, 65519, 1 + 2.0**-11, 1 + 3 * 2.0**-11]])
    x = np.zeros((len(d), 32), np.float32)
    x[:, 0] = (d.astype(np.float32) * np.float32(127)).astype(np.float32)
    x = x[x[:, 0] < 65520 * 127]
    got = K.quantize_q8_0(x)[:, :2].copy().view(np.float16)[:, 0]
    assert np.array_equal(got, (x[:, 0] / np.float32(127)).astype(np.float16))


def test_q8_0_rounds_half_away_from_zero():
    # d = 127/127 = 1, so elements are rounded as is: ggml's roundf, not banker's rounding
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [127, 0.5, 1.5, 2.5, -0.5, -2.5]
    assert np.array_equal(K.quantize_q8_0(x), ggml.quantize(ggml.Q8_0, x))
    q = K.quantize_q8_0(x)[0, 2:8].view(np.int8)
    assert q.tolist() == [127, 1, 2, 3, -1, -3]


@pytest.mark.parametrize("name", DATA)
@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_q5_is_byte_identical_to_ggml(name, qtype):
    x = DATA[name]
    quantize, dequantize = getattr(K, f"quantize_{qtype.lower()}"), getattr(K, f"dequantize_{qtype.lower()}")
    ours = quantize(x)
    assert np.array_equal(ours, ggml.quantize(getattr(ggml, qtype), x))
    assert np.array_equal(dequantize(ours), ggml.dequantize(getattr(ggml, qtype), ours, x.shape[1]))
    assert np.array_equal(dequantize(ours), gguf_dequantize(ours, GGMLQuantizationType[qtype]))


def test_q5_0_truncates_after_adding_16_5():
    # d = -(-16)/16 = 1 from the most negative value; x/d + 16.5 truncated: 0.4 -> 16, 0.5 -> 17,
    # -0.5 -> 16, 15.6 -> 31 (capped), and the largest positive value keeps its sign's place
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [-16, 0.4, 0.5, -0.5, 15.6, -15.5]
    assert np.array_equal(K.quantize_q5_0(x), ggml.quantize(ggml.Q5_0, x))
    assert K.dequantize_q5_0(K.quantize_q5_0(x))[0, :6].tolist() == [-16, 0, 1, 0, 15, -15]


def _every_code_and_nibble():
    """Blocks covering all 256 scale bytes with all 16 nibbles in each sub-block."""
    codes = np.arange(256, dtype=np.uint8).reshape(-1, 4)
    nib = np.arange(16, dtype=np.uint8)
    qs = np.tile(nib[:8] | (nib[8:] << 4), (len(codes), 4))
    return np.concatenate([codes, qs], axis=1).reshape(1, -1)


def test_decode_matches_ggml_and_gguf_for_every_byte_pattern():
    blocks = _every_code_and_nibble()
    cols = blocks.shape[1] // 36 * 64
    ours = K.dequantize_nvfp4(blocks)
    assert np.array_equal(ours, ggml.dequantize(ggml.NVFP4, blocks, cols))
    theirs = gguf_dequantize(blocks, GGMLQuantizationType.NVFP4).reshape(1, -1)
    assert np.array_equal(ours, theirs)


def test_scale_encode_matches_bit_transcription():
    rng = np.random.default_rng(7)
    xs = np.concatenate([
        rng.uniform(0, 1, 2000), 10.0 ** rng.uniform(-12, 4, 4000),
        [0, -1, np.nan, np.inf, 448, 449, 1e30, 0.5 / 512, 0.5 / 512 - 1e-12, 7.5 / 512, 2.0**-6],
        ref.SCALES[:0x7F] * 2, (ref.SCALES[1:0x7F] + ref.SCALES[:0x7E]),  # exact codes, midpoints
    ]).astype(np.float32)
    assert [K.scale_encode(x) for x in xs] == [ref.encode_scale(x) for x in xs]


@pytest.mark.parametrize("search", [1, 4, 12, 126])
@pytest.mark.parametrize("imp", [False, True])
@pytest.mark.parametrize("name", ["normal_f16", "heavy_bf16", "zero_subblocks", "midpoints", "huge", "subnormal_scales"])
def test_search_equals_bruteforce(name, search, imp):
    x = DATA[name]
    importance = None
    if imp:
        importance = np.random.default_rng(5).gamma(0.5, 2, x.shape[1]).astype(np.float32)
    expected = ref.quantize_nvfp4(x, importance, search)
    assert np.array_equal(K.quantize_nvfp4(x, importance, search), expected)


@pytest.mark.parametrize("search", [0, 4])
def test_values_beyond_the_midpoint_tests_are_encoded_by_ggmls_scan(search):
    """Far above 2^21 times the largest scale (only NVFP4 stores such values: Q8_0's half scale
    cannot), float32 differences tie and the nibbles must come from ggml's 16-value scan, which
    keeps the first; every third sub-block is ordinary."""
    x = (np.random.default_rng(9).normal(0, 1, (8, 8, 16)) * 1e11).astype(np.float32)
    x[:, ::3] *= 1e-6
    x = x.reshape(8, 128)
    assert np.abs(x).max() > K.SCALES[K.MAX_CODE] * K.EXACT_RATIO
    got = K.quantize_nvfp4(x, None, search)
    assert np.array_equal(got, ref.quantize_nvfp4(x, None, search))
    if search == 0:
        assert np.array_equal(got, ggml.quantize(ggml.NVFP4, x))


@pytest.mark.parametrize("search", [4, 12])
def test_search_ggml_weighting_equals_bruteforce(search):
    x = DATA["heavy_bf16"]
    importance = np.random.default_rng(6).gamma(0.5, 2, x.shape[1]).astype(np.float32)
    got = K.quantize_nvfp4(x, importance, search, weighting=K.WEIGHT_GGML)
    assert np.array_equal(got, ref.quantize_nvfp4(x, importance, search, ggml_style=True))
    assert not np.array_equal(got, K.quantize_nvfp4(x, importance, search))


@pytest.mark.parametrize("name", DATA)
def test_search_never_worse_than_rtn_per_sub_block(name):
    x = DATA[name]
    imp = np.random.default_rng(8).gamma(0.5, 2, x.shape[1]).astype(np.float32)
    w = np.broadcast_to(imp, x.shape)
    rtn = ref.sub_block_errors(x, K.quantize_nvfp4(x, search=0), w)
    for s in (1, 12):
        err = ref.sub_block_errors(x, K.quantize_nvfp4(x, imp, s), w)
        assert np.all(err <= rtn * (1 + 1e-6) + 1e-30)


def test_window_12_is_within_half_a_percent_of_full_window():
    rng = np.random.default_rng(9)
    # real-like: f16-rounded weights whose scale varies by row and column, heavy-tailed importance
    x = (rng.standard_t(5, (256, 512)) * rng.uniform(0.005, 0.05, (256, 1))).astype(np.float16)
    x = x.astype(np.float32)
    imp = rng.lognormal(0, 1.5, 512).astype(np.float32)
    w = np.broadcast_to(imp, x.shape)
    e12 = ref.sub_block_errors(x, K.quantize_nvfp4(x, imp, 12), w).sum()
    e126 = ref.sub_block_errors(x, K.quantize_nvfp4(x, imp, 126), w).sum()
    e0 = ref.sub_block_errors(x, K.quantize_nvfp4(x, imp, 0), w).sum()
    assert e126 <= e12 <= e126 * 1.005
    assert e12 < e0


def test_bytes_do_not_depend_on_thread_count():
    x = DATA["wide"].repeat(8, axis=0) * np.linspace(0.5, 2, 24, dtype=np.float32)[:, None]
    imp = np.random.default_rng(3).uniform(0.5, 2, x.shape[1]).astype(np.float32)
    results = []
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(n)
        results.append((K.quantize_nvfp4(x, imp, 12), K.quantize_q8_0(x), K.dequantize_nvfp4(K.quantize_nvfp4(x))))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_scan_finds_amax_and_the_first_nonfinite():
    x = np.zeros((4, 64), np.float32)
    x[1, 3] = -7.5
    assert K.scan(x) == (7.5, None)
    x[2, 17] = np.inf
    x[3, 1] = np.nan
    x[2, 40] = -np.inf
    assert K.scan(x) == (7.5, (2, 17))


def test_scan_reads_beyond_its_first_chunk():
    x = np.zeros((K.SCAN_CHUNK // 1024 + 80, 1024), np.float32)
    x[3, 5], x[-1, 1000] = 7.5, -9.0  # the largest in the last chunk
    assert K.scan(x) == (9.0, None)
    x[-40, 7], x[-2, 3] = np.nan, np.inf  # the first non-finite in the second chunk
    assert K.scan(x) == (9.0, (x.shape[0] - 40, 7))


def _as_bf16_bits(x):
    """float32 values exact in bfloat16 -> their bfloat16 bits."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("source", ["f16", "bf16"])
def test_scan_reads_half_and_bfloat16_bits(source):
    x = np.zeros((4, 64), np.float32)
    x[1, 3], x[0, 5] = -7.5, 2.0**-20  # subnormal in f16
    encode = (lambda v: v.astype(np.float16)) if source == "f16" else _as_bf16_bits
    assert K.scan(encode(x)) == (7.5, None)
    x[2, 17], x[3, 1], x[2, 40], x[3, 9] = np.inf, np.nan, -np.inf, 96.0
    assert K.scan(encode(x)) == (96.0, (2, 17))


@pytest.mark.parametrize("source", ["f16", "bf16"])
def test_kernels_decode_sources_exactly_and_scale_by_powers_of_two(source):
    x = DATA["heavy_bf16"] if source == "bf16" else DATA["normal_f16"]
    raw = _as_bf16_bits(x) if source == "bf16" else x.astype(np.float16)
    assert np.array_equal(K.as_float32(raw), x)
    imp = np.random.default_rng(5).uniform(0.5, 2, x.shape[1]).astype(np.float32)
    for mult in (1.0, 0.25, 8.0):
        assert np.array_equal(K.as_float32(raw, mult), x * np.float32(mult))
        assert np.array_equal(K.quantize_nvfp4(raw, imp, 12, mult=mult), K.quantize_nvfp4(x * np.float32(mult), imp, 12))
        assert np.array_equal(K.quantize_q8_0(raw, mult), K.quantize_q8_0(x * np.float32(mult)))


def test_bad_shapes_and_windows_are_rejected():
    with pytest.raises(ValueError, match="multiple of 64"):
        K.quantize_nvfp4(np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="0..126"):
        K.quantize_nvfp4(np.zeros((1, 64), np.float32), search=127)
    with pytest.raises(ValueError, match="importance"):
        K.quantize_nvfp4(np.zeros((1, 64), np.float32), np.ones(32, np.float32), 4)
