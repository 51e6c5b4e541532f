"""The damage estimate behind --target-size: what it measures and how it reads a tensor."""

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import codecs, damage


def test_kinds_name_the_tensor_role_across_architectures():
    assert damage.kind("blk.12.ffn_down.weight") == "ffn_down"
    assert damage.kind("blk.3.ffn_down_exps.weight") == "ffn_down"
    assert damage.kind("blk.3.ffn_up_shexp.weight") == "ffn_up"
    assert damage.kind("blk.0.attn_qkv.weight") == "attn_v"
    assert damage.kind("token_embd.weight") == "token_embd"
    assert damage.n_blocks(["blk.0.a.weight", "blk.1.a.weight", "blk.1.b.weight", "output.weight"]) == 2
    # a block tensor's share is its kind's divided by the blocks, later blocks more; unknown kinds get the mean
    shares = [damage.sensitivity(f"blk.{b}.ffn_down.weight", 4) for b in range(4)]
    assert np.isclose(sum(shares), damage.SENSITIVITY["ffn_down"]) and shares == sorted(shares)
    assert damage.sensitivity("output.weight", 4) == damage.SENSITIVITY["output"]
    assert min(damage.SENSITIVITY.values()) <= damage.sensitivity("blk.0.ssm_in.weight", 1) <= max(damage.SENSITIVITY.values())


def test_sample_runs_stay_inside_one_expert_and_spread_over_all():
    runs = damage.sample((64, 100, 6))
    assert len(runs) == damage.SAMPLE_RUNS
    assert all(first // 100 == (stop - 1) // 100 == mat for mat, first, stop in runs)
    assert {mat for mat, _, _ in runs} == set(range(6))
    assert len({first for _, first, _ in runs}) == len(runs)
    assert damage.sample((64, 5)) == [(0, 0, 5)]


def test_relative_error_is_the_weighted_error_of_the_whole_tensor_when_every_row_is_sampled():
    rng = np.random.default_rng(5)
    shape = (128, damage.SAMPLE_RUNS * damage.RUN_ROWS)
    x = rng.standard_normal(shape[::-1]).astype(np.float32)
    imp = rng.uniform(0.1, 5, shape[0]).astype(np.float32)
    got = damage.relative_errors(lambda a, b: x[a:b], shape, [imp], [T.NVFP4, T.Q5_0, T.Q8_0], 12, 0)
    for qtype, e in got.items():
        raw = codecs.encode(qtype, x, imp, 12).view(np.uint8).reshape(len(x), -1)
        q = codecs.decode(qtype, raw).astype(np.float64)
        want = (((q - x) ** 2) @ imp).sum() / (((x.astype(np.float64) ** 2) @ imp).sum())
        assert np.isclose(e, want, rtol=1e-9), qtype
    assert got[T.NVFP4] > got[T.Q5_0] > got[T.Q8_0] > 0
