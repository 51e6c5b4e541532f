"""The quantize command: bad input, output safety, determinism, options."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter

from helpers import run_cli, tensors, tiny_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("src"))


def write_model(path, arrays, raw=(), arch="llama"):
    """A minimal GGUF with the given float arrays and (name, bytes, shape, type) raws."""
    w = GGUFWriter(path, arch)
    for name, a in arrays.items():
        w.add_tensor(name, a)
    for name, data, shape, qtype in raw:
        w.add_tensor(name, data, raw_shape=shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_clean_failure(proc, folder, out_name="out.gguf", code=None, match=None):
    assert proc.returncode != 0 if code is None else proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if match:
        assert match in lines[0], lines[0]
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(f".{out_name}")]
    assert leftovers == []
    return lines[0]


def test_missing_input(tmp_path):
    proc = run_cli("quantize", tmp_path / "nope.gguf", tmp_path / "out.gguf")
    assert_clean_failure(proc, tmp_path, match="no such file")
    assert not (tmp_path / "out.gguf").exists()


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model" * 10)
    assert_clean_failure(run_cli("quantize", bad, tmp_path / "out.gguf"), tmp_path, match="not a GGUF")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("keep", [0.5, 0.999, 24 + 8])
def test_truncated_gguf(src, tmp_path, keep):
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    assert_clean_failure(run_cli("quantize", cut, tmp_path / "out.gguf"), tmp_path)
    assert not (tmp_path / "out.gguf").exists()


def test_out_equals_in_is_refused(src, tmp_path):
    before = src.read_bytes()
    proc = run_cli("quantize", src, src, "--overwrite")
    assert_clean_failure(proc, src.parent, out_name=src.name, match="overwrite the input")
    assert src.read_bytes() == before


def test_existing_out_needs_overwrite(src, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    assert_clean_failure(run_cli("quantize", src, out), tmp_path, match="--overwrite")
    assert out.read_bytes() == b"keep me"
    run_cli("quantize", src, out, "--overwrite", "-q", check=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_unsupported_source_type(tmp_path):
    m = write_model(tmp_path / "i32.gguf", {"blk.0.attn_q.weight": np.ones((64, 64), np.int32)})
    assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf"), tmp_path,
                         match="blk.0.attn_q.weight: unsupported source type I32")


def test_quantized_source_needs_allow_requantize(tmp_path):
    from gguf.quants import quantize as gguf_quantize

    x = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    q = gguf_quantize(x, T.Q4_0)
    m = write_model(tmp_path / "q4.gguf", {}, [("blk.0.attn_q.weight", q, q.shape, T.Q4_0)])
    assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf"), tmp_path, match="--allow-requantize")
    proc = run_cli("quantize", m, tmp_path / "out.gguf", "--allow-requantize", "-q", check=True)
    assert proc.stderr.startswith("nvfp4q: warning: 1 tensor(s) decoded from quantized types")
    assert tensors(tmp_path / "out.gguf")["blk.0.attn_q.weight"].tensor_type == T.NVFP4


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_named(tmp_path, value):
    x = np.zeros((8, 64), np.float16)
    x[5, 7] = value
    m = write_model(tmp_path / "nan.gguf", {"blk.0.attn_q.weight": np.ones((8, 64), np.float16),
                                            "blk.0.attn_k.weight": x})
    line = assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf"), tmp_path)
    assert "blk.0.attn_k.weight" in line and "row 5, column 7" in line
    assert not (tmp_path / "out.gguf").exists()


def test_unwritable_output_folder(src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_failure(run_cli("quantize", src, blocker / "out.gguf"), tmp_path, match="no such directory")
    proc = run_cli("quantize", src, "/proc/out.gguf")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1


def test_unknown_type_is_a_usage_error(src, tmp_path):
    for args in (["--tensor-type", "attn=q9_k"], ["--output-tensor-type", "q3"], ["--search", "200"]):
        proc = run_cli("quantize", src, tmp_path / "out.gguf", *args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_same_bytes_with_one_and_two_threads(src, tmp_path):
    outs = []
    for n in (1, 2):
        outs.append(tmp_path / f"t{n}.gguf")
        run_cli("quantize", src, outs[-1], "--threads", n, "--search", 12, "-q", check=True)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_options_reach_the_file(src, tmp_path):
    out = tmp_path / "out.gguf"
    run_cli("quantize", src, out, "-q", "--tensor-type", "attn_v=q8_0", "--token-embedding-type", "f16",
            "--leave-output-tensor", check=True)
    t = tensors(out)
    assert t["blk.0.attn_v.weight"].tensor_type == T.Q8_0
    assert t["blk.0.attn_q.weight"].tensor_type == T.NVFP4
    assert t["token_embd.weight"].tensor_type == T.F16
    assert t["output.weight"].tensor_type == T.F16  # left as it is
    assert GGUFReader(out).get_field("general.file_type").contents() == 39


def test_dry_run_writes_nothing(src, tmp_path):
    proc = run_cli("quantize", src, tmp_path / "out.gguf", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "blk.0.ffn_down.weight" in proc.stdout and "bits per weight" in proc.stdout
    assert "NVFP4" in proc.stdout and "Q8_0" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_quiet_prints_only_the_summary(src, tmp_path):
    proc = run_cli("quantize", src, tmp_path / "out.gguf", "-q", check=True)
    assert proc.stderr == ""
    keys = [line.split(":")[0] for line in proc.stdout.strip().splitlines()]
    assert keys == ["output", "tensors", "size", "bits per weight", "time"]


def test_non_finite_weight_in_a_rescaled_layer_is_named(tmp_path):
    """gemma3's FFN weights are read first for their rescaling factors: the same clean failure."""
    ffn = {f"blk.0.{k}.weight": np.ones(shape, np.float16) / 8
           for k, shape in (("ffn_gate", (128, 64)), ("ffn_up", (128, 64)), ("ffn_down", (64, 128)))}
    ffn["blk.0.ffn_down.weight"][3, 9] = np.nan
    m = write_model(tmp_path / "nan.gguf", {"blk.0.ffn_norm.weight": np.ones(64, np.float32), **ffn}, arch="gemma3")
    line = assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf"), tmp_path)
    assert "blk.0.ffn_down.weight" in line and "row 3, column 9" in line
    assert not (tmp_path / "out.gguf").exists()
    plan = run_cli("quantize", m, tmp_path / "out.gguf", "--dry-run", check=True).stdout
    assert "rescaled" in plan  # the rule applies to this layer
