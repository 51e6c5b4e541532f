import pytest
from gguf import GGMLQuantizationType as T

from nvfp4q.plan import Options, TensorInfo, file_type_of, make_plan, parse_tensor_type, parse_type, plan_tensor


def step(name, shape, opts=Options(), src=T.F16, arch="llama"):
    return plan_tensor(TensorInfo(name, shape, src), arch, opts)


def test_default_rules():
    assert step("blk.0.attn_q.weight", (256, 256)).type == T.NVFP4
    assert step("blk.0.ffn_down_exps.weight", (256, 128, 8)).type == T.NVFP4
    assert step("token_embd.weight", (256, 1000)).type == T.Q8_0
    assert step("output.weight", (256, 1000)).type == T.Q8_0
    kept = step("blk.0.attn_norm.weight", (256,), src=T.F32)
    assert kept.type == T.F32 and kept.reason == "kept: 1D"


@pytest.mark.parametrize("name", [
    "blk.0.ffn_gate_inp.weight", "blk.0.attn_norm_2d_norm.weight", "position_embd.weight",
    "token_types.weight", "blk.0.ssm_conv1d.weight", "blk.0.time_mix_w1.weight",
    "blk.0.attn_rel_b.weight", "v.patch_embd.weight", "blk.0.altup_proj.weight",
    "blk.0.attn_q.bias", "blk.0.shortconv.conv.weight",
])
def test_never_quantized_names_stay(name):
    s = step(name, (256, 64))
    assert s.type == T.F16 and s.reason == "kept: never quantized"


def test_arch_specific_exclusions():
    assert step("blk.0.hc_proj.weight", (256, 64), arch="glm5-next").type == T.F16
    assert step("blk.0.hc_proj.weight", (256, 64), arch="llama").type == T.NVFP4


def test_shape_fallbacks():
    s = step("blk.0.ffn_down.weight", (544, 256))
    assert s.type == T.Q8_0 and "544 % 64" in s.reason
    s = step("blk.0.ffn_down.weight", (528, 256))
    assert s.type == T.F16 and "528 % 32" in s.reason
    assert step("blk.0.ffn_down_exps.weight", (96, 64, 4)).type == T.Q8_0
    assert step("token_embd.weight", (200, 100)).type == T.F16  # Q8_0 default falls back too


def test_tensor_type_first_match_wins_and_falls_back():
    opts = Options(tensor_types=(parse_tensor_type("attn_.*=q8_0"), parse_tensor_type("attn_q=f32")))
    assert step("blk.0.attn_q.weight", (256, 256), opts).type == T.Q8_0
    assert step("blk.0.ffn_up.weight", (256, 256), opts).type == T.NVFP4
    opts = Options(tensor_types=(parse_tensor_type("ffn_down=q8_0"),))
    assert step("blk.0.ffn_down.weight", (80, 256), opts).type == T.F16
    opts = Options(tensor_types=(parse_tensor_type("token_embd=nvfp4"),))
    assert step("token_embd.weight", (256, 1000), opts).type == T.NVFP4


def test_explicit_embedding_and_output_types():
    opts = Options(token_embedding_type=T.F16, output_tensor_type=T.NVFP4,
                   tensor_types=(parse_tensor_type("token_embd=q8_0"),))
    assert step("token_embd.weight", (256, 1000), opts).type == T.F16
    assert step("output.weight", (256, 1000), opts).type == T.NVFP4
    with pytest.raises(ValueError, match="does not fit NVFP4"):
        step("output.weight", (96, 1000), opts)


def test_pure_and_leave_output():
    pure = Options(pure=True)
    assert step("token_embd.weight", (256, 1000), pure).type == T.NVFP4
    assert step("output.weight", (256, 1000), pure).type == T.NVFP4
    leave = Options(leave_output_tensor=True)
    s = step("output.weight", (256, 1000), leave)
    assert s.type == T.F16 and s.reason == "kept: --leave-output-tensor"


def test_sizes_and_file_type():
    plan = make_plan([TensorInfo("blk.0.attn_q.weight", (128, 4), T.F16),
                      TensorInfo("token_embd.weight", (64, 2), T.F16),
                      TensorInfo("n.weight", (8,), T.F32)], "llama", Options())
    assert [s.nbytes for s in plan] == [4 * 2 * 36, 2 * 2 * 34, 32]
    assert file_type_of(plan) == 39
    assert file_type_of(plan[1:]) == 7  # MOSTLY_Q8_0


@pytest.mark.parametrize("spec", ["attn_q", "=q8_0", "attn=q9_9", "(=nvfp4"])
def test_bad_tensor_type_specs(spec):
    with pytest.raises(ValueError):
        parse_tensor_type(spec)


def ffn_layer(arch="gemma3", mode="auto", norm_type=T.F32, drop=(), **tensor_types):
    """One layer's plan, kind -> Step."""
    ts = [TensorInfo("blk.0.ffn_norm.weight", (640,), norm_type), TensorInfo("blk.0.attn_q.weight", (640, 1024), T.F16)]
    ts += [TensorInfo(f"blk.0.{k}.weight", shape, T.F16) for k, shape in
           (("ffn_gate", (640, 2048)), ("ffn_up", (640, 2048)), ("ffn_down", (2048, 640))) if k not in drop]
    opts = Options(global_scale=mode, tensor_types=tuple((p, parse_type(t)) for p, t in tensor_types.items()))
    return {s.tensor.name.split(".")[2]: s for s in make_plan(ts, arch, opts)}


FFN_KINDS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def test_global_scale_modes():
    auto = ffn_layer()
    assert not auto["attn_q"].sidecar and not auto["attn_q"].rescale  # auto: FFN sidecars only
    assert all(auto[k].rescale and not auto[k].sidecar for k in FFN_KINDS)
    assert auto["ffn_norm"].type == T.F32 and auto["ffn_norm"].converts  # divided by a power of two
    sidecar, rescale, off = ffn_layer(mode="sidecar"), ffn_layer(mode="rescale"), ffn_layer(mode="off")
    assert sidecar["attn_q"].sidecar and not any(sidecar[k].rescale for k in FFN_KINDS)
    assert not rescale["attn_q"].sidecar and all(rescale[k].rescale for k in FFN_KINDS)
    assert not any(s.sidecar or s.rescale or (s.converts and len(s.tensor.shape) == 1) for s in off.values())
    qwen2, llama = ffn_layer("qwen2"), ffn_layer("llama")
    assert all(qwen2[k].rescale for k in FFN_KINDS)
    assert not any(s.rescale for s in llama.values()) and llama["ffn_down"].sidecar  # llama applies sidecars


def test_rescaling_takes_whole_layers_only():
    assert not any(s.rescale for s in ffn_layer(ffn_up="q8_0").values())  # a weight not NVFP4
    assert not any(s.rescale for s in ffn_layer(drop=("ffn_gate",)).values())  # a member missing
    f16_norm = ffn_layer(norm_type=T.F16)["ffn_norm"]
    assert f16_norm.rescale and f16_norm.type == T.F32 and f16_norm.nbytes == 640 * 4