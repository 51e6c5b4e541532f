"""--target-size / --target-bpw: the allocator alone, then end to end with stock llama.cpp."""

import itertools
import json
import random

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import GGUFReader

from helpers import logits, rel_rmse, run_cli, tiny_model
from nvfp4q.allocate import Choice, allocate, fit, hull
from nvfp4q.plan import Options, TensorInfo, make_plan

HEADER = 4096


def _damage(choices: dict, pick: dict) -> float:
    return sum(c.damage for c in pick.values())


def test_hull_keeps_only_choices_worth_taking():
    a, b, c, d = Choice(T.NVFP4, 10, 5.0), Choice(T.Q8_0, 20, 4.9), Choice(T.F16, 40, 0.0), Choice(T.BF16, 30, 6.0)
    assert hull([c, d, b, a]) == [a, c]  # d is dominated; b saves less per byte than going on to c
    assert hull([a, Choice(T.Q8_0, 20, 1.0), c]) == [a, Choice(T.Q8_0, 20, 1.0), c]


def test_allocation_is_optimal_at_every_lagrangian_budget():
    # For a multiplier lam, taking each tensor's argmin of damage + lam * bytes is optimal for the
    # bytes it spends; the allocator given exactly those bytes must find an allocation as good,
    # as an exhaustive search confirms.
    rng = random.Random(7)
    for _ in range(40):
        choices = {}
        for i in range(5):
            sizes = sorted(rng.sample(range(5, 60), 3))
            dmg = sorted((rng.random() for _ in range(3)), reverse=True)
            choices[f"t{i}"] = [Choice(q, n, d) for q, n, d in zip((T.NVFP4, T.Q8_0, T.F16), sizes, dmg)]
        for lam in (0.001, 0.01, 0.03, 0.1, 1.0):
            lagr = {n: min(cs, key=lambda c: c.damage + lam * c.nbytes) for n, cs in choices.items()}
            budget = sum(c.nbytes for c in lagr.values())
            pick = allocate(choices, budget)
            assert sum(c.nbytes for c in pick.values()) <= budget
            best = min(sum(c.damage for c in combo) for combo in itertools.product(*choices.values())
                       if sum(c.nbytes for c in combo) <= budget)
            assert _damage(choices, pick) <= best + 1e-12


def test_budget_is_never_exceeded_and_an_impossible_one_fails():
    rng = random.Random(3)
    choices = {f"t{i}": [Choice(T.NVFP4, 10 + i, 1.0 + rng.random()), Choice(T.Q8_0, 19 + i, 0.1),
                         Choice(T.F16, 40 + i, 0.0)] for i in range(20)}
    low = sum(cs[0].nbytes for cs in choices.values())
    for budget in range(low, low + 800, 37):
        assert sum(c.nbytes for c in allocate(choices, budget).values()) <= budget
    with pytest.raises(ValueError):
        allocate(choices, low - 1)


def _llama_like() -> list[TensorInfo]:
    ts = [TensorInfo("token_embd.weight", (256, 1000), T.F16)]
    for b in range(3):
        ts += [TensorInfo(f"blk.{b}.attn_norm.weight", (256,), T.F32),
               TensorInfo(f"blk.{b}.attn_q.weight", (256, 256), T.F16),
               TensorInfo(f"blk.{b}.ffn_down.weight", (512, 256), T.F16),
               TensorInfo(f"blk.{b}.ffn_up.weight", (256, 512), T.F16)]
    return ts + [TensorInfo("output.weight", (256, 1000), T.F16)]


def _flat(info: TensorInfo, types: list[T]) -> dict[T, float]:
    """The same damage per weight in every tensor, falling by the same amount for every bit."""
    return {q: (16 - 8 * GGML_QUANT_SIZES[q][1] / GGML_QUANT_SIZES[q][0]) * int(np.prod(info.shape)) for q in types}


def _data(st):
    return st.data_bytes


def test_flat_estimate_at_todays_size_gives_todays_layout():
    ts = _llama_like()
    today = make_plan(ts, "llama", Options())
    plan, a = fit(ts, "llama", Options(), HEADER + sum(st.data_bytes for st in today), HEADER, _data, _flat)
    assert [st.type for st in plan] == [st.type for st in today]
    assert a.planned == a.target


def test_pins_are_honoured_and_only_the_rest_is_allocated():
    ts = _llama_like()
    opts = Options(tensor_types=((r"attn_q", T.Q8_0),), output_tensor_type=T.F16)
    pinned = make_plan(ts, "llama", opts)
    for extra in (0, 200_000, 2_000_000):
        target = HEADER + sum(st.data_bytes for st in pinned) + extra
        plan, a = fit(ts, "llama", opts, target, HEADER, _data, _flat)
        types = {st.tensor.name: st.type for st in plan}
        assert all(types[f"blk.{b}.attn_q.weight"] == T.Q8_0 for b in range(3))
        assert types["output.weight"] == T.F16
        assert set(a.damage) == {"token_embd.weight"} | {f"blk.{b}.{k}.weight" for b in range(3) for k in ("ffn_down", "ffn_up")}
        assert HEADER + sum(st.data_bytes for st in plan) == a.planned <= target
    with pytest.raises(ValueError, match="smallest size reachable"):
        fit(ts, "llama", Options(pure=True), HEADER, HEADER, _data, _flat)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("alloc"))


def _dry(src, *args) -> dict:
    return json.loads(run_cli("quantize", src, src.parent / "never.gguf", "--dry-run", "--json", *args, check=True).stdout)


def test_target_size_end_to_end(model, tmp_path):
    default = _dry(model)
    for extra in (0.0, 0.1, 0.25):
        target = int((default["tensor_bytes"] + 20_000) * (1 + extra))
        plan = _dry(model, "--target-size", str(target))
        out = tmp_path / f"t{extra}.gguf"
        doc = json.loads(run_cli("quantize", model, out, "--target-size", str(target), "--json", "-q", check=True).stdout)
        size = out.stat().st_size
        assert size <= target and doc["bytes_out"] == size == plan["allocation"]["planned_bytes"]
        assert plan["allocation"]["target_bytes"] == target
        assert {t["name"]: t["to"] for t in plan["tensors"]} == {
            t["name"]: t["type"] for t in _inspect(out) if not t["name"].endswith(".scale")}
        allocated = [t for t in plan["tensors"] if t["damage"] is not None]
        assert allocated and all(t["reason"].startswith("allocated") for t in allocated)
        assert GGUFReader(out).get_field("nvfp4q.allocation.target_bytes").contents() == target
        assert rel_rmse(logits(model), logits(out)) < 0.3


def test_todays_size_is_reachable_to_the_byte(model, tmp_path):
    today = tmp_path / "today.gguf"
    run_cli("quantize", model, today, "-q", check=True)
    out = tmp_path / "same.gguf"
    run_cli("quantize", model, out, "-q", "--target-size", today.stat().st_size, check=True)
    assert out.stat().st_size <= today.stat().st_size


def _inspect(path) -> list[dict]:
    return json.loads(run_cli("inspect", path, "--json", "--tensors", ".", check=True).stdout)["tensors"]


def test_pins_on_the_command_line_are_honoured(model):
    default = _dry(model)
    plan = _dry(model, "--target-size", str(int(default["tensor_bytes"] * 1.3)), "--token-embedding-type", "nvfp4",
                "--tensor-type", "ffn_gate=nvfp4")
    pinned = [t for t in plan["tensors"] if t["name"] == "token_embd.weight" or "ffn_gate" in t["name"]]
    assert pinned and all(t["to"] == "NVFP4" and t["damage"] is None for t in pinned)
    assert any(t["to"] != "NVFP4" for t in plan["tensors"] if t["damage"] is not None)


def test_target_bpw_is_the_size_it_names(model):
    default = _dry(model)
    bpw = 8 * (default["tensor_bytes"] + 50_000) / default["weights"]
    by_bpw = _dry(model, "--target-bpw", str(bpw))
    assert by_bpw["allocation"]["target_bytes"] == int(bpw * default["weights"] / 8)
    assert by_bpw["tensors"] == _dry(model, "--target-size", str(int(bpw * default["weights"] / 8)))["tensors"]


def test_bad_targets_fail_cleanly(model, tmp_path):
    out = tmp_path / "o.gguf"
    r = run_cli("quantize", model, out, "--target-size", "10K")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "reachable" in r.stderr and r.stderr.startswith("nvfp4q: error: --target-size:")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    r = run_cli("quantize", model, out, "--target-size", "1M", "--target-bpw", "5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run_cli("quantize", model, out, "--target-size", "lots")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run_cli("quantize", model, out, "--target-size", "10M", "--split-max-tensors", "5")
    assert r.returncode == 1 and "one output file" in r.stderr and not out.exists()


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-moe"])
def test_planned_size_is_the_file_size_with_rescaled_layers_and_experts(preset, tmp_path):
    # gemma3: a rescaled layer whose weights are not all NVFP4 any more is not rescaled, and
    # the header loses its factor; MoE: 3D expert tensors and their sidecars
    from scripts.make_synthetic_model import PRESETS, write

    src = write(tmp_path / f"{preset}.gguf", PRESETS[preset])[0]
    today = _dry(src)
    for extra in (0.05, 0.2):
        target = int(today["tensor_bytes"] * (1 + extra))
        out = tmp_path / f"{extra}.gguf"
        plan = _dry(src, "--target-size", str(target))
        assert {t["to"] for t in plan["tensors"]} - {"NVFP4", "F32"}, "nothing was upgraded"
        doc = json.loads(run_cli("quantize", src, out, "--target-size", str(target), "--json", "-q", check=True).stdout)
        assert out.stat().st_size == plan["allocation"]["planned_bytes"] == doc["bytes_out"] <= target
