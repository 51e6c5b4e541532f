"""The quantize command: bad input, output safety, determinism, options."""

import io
import json
import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

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
    line = assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf", "-q"), tmp_path)  # -q: no progress lines
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
        assert_clean_failure(proc, tmp_path, code=2)
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


# --- --json and progress -------------------------------------------------------------------------

def quantize_json(*args) -> dict:
    """Run quantize --json: stdout must be exactly one JSON document."""
    proc = run_cli("quantize", *args, "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "nvfp4q.quantize/1"
    return doc


def type_rows(path) -> list[dict]:
    """The output's tensors per type as gguf's reader sees them, most bytes first."""
    rows = {}
    for t in GGUFReader(path).tensors:
        row = rows.setdefault(t.tensor_type.name, {"type": t.tensor_type.name, "count": 0, "bytes": 0})
        row["count"] += 1
        row["bytes"] += int(t.n_bytes)
    return sorted(rows.values(), key=lambda r: (-r["bytes"], r["type"]))


def test_json_run_document(src, tmp_path):
    from test_imatrix import dat_bytes

    source = tensors(src)
    weights = sum(int(np.prod(t.shape)) for t in source.values())
    entries = ("blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.0.attn_k.weight", "token_embd.weight")
    imat = tmp_path / "imatrix.dat"
    imat.write_bytes(dat_bytes({n: (2, [1.0] * 128) for n in entries}, (5, "calib.txt")))
    out = tmp_path / "out.gguf"
    doc = quantize_json(src, out, "-q", "--imatrix", imat, "--exclude-weights", "blk.1.",
                        "--tensor-type", "attn_v=q8_0", "--search", 3, "--threads", 1)
    assert doc["dry_run"] is False and doc["source"] == str(src) and doc["output"] == str(out)
    assert doc["outputs"] == [{"path": str(out), "bytes": out.stat().st_size}]
    assert doc["bytes_out"] == out.stat().st_size and doc["bytes_in"] == src.stat().st_size
    assert doc["weights"] == weights
    assert doc["bits_per_weight"] == pytest.approx(8 * out.stat().st_size / weights)
    assert doc["seconds"] > 0 and doc["weights_per_second"] == pytest.approx(weights / doc["seconds"])
    written = tensors(out)
    assert doc["types"] == type_rows(out)
    assert doc["tensor_bytes"] == sum(int(t.n_bytes) for t in written.values())
    assert doc["sidecars"] == [n for n in written if n.endswith(".scale")] != []
    assert doc["rescaled"] == []
    nvfp4 = [n for n, t in written.items() if t.tensor_type == T.NVFP4]
    assert doc["imatrix"] == {
        "path": str(imat), "format": "dat", "entries": len(entries), "chunk_count": 5, "datasets": ["calib.txt"],
        "with_data": [n for n in nvfp4 if n in entries and "blk.1." not in n],
        "without_data": [n for n in nvfp4 if n not in entries],
        "excluded": [n for n in nvfp4 if n in entries and "blk.1." in n],
    }
    assert doc["imatrix"]["with_data"] and doc["imatrix"]["excluded"]
    opts = doc["options"]
    assert (opts["search"], opts["weighting"], opts["global_scale"], opts["threads"]) == (3, "importance", "auto", 1)
    assert opts["imatrix"] == str(imat) and opts["exclude_weights"] == ["blk.1."] and opts["include_weights"] == []
    assert opts["calibration"] is None
    assert opts["tensor_types"] == [{"pattern": "attn_v", "type": "Q8_0"}]
    assert (opts["output_tensor_type"], opts["token_embedding_type"], opts["pure"]) == (None, None, False)


def test_json_run_records_rescaling_and_split_parts(tmp_path):
    ffn = {f"blk.0.{k}.weight": np.full(shape, v, np.float16)
           for k, shape, v in (("ffn_gate", (128, 64), 0.01), ("ffn_up", (128, 64), 0.02), ("ffn_down", (64, 128), 3.0))}
    m = write_model(tmp_path / "g.gguf", {"blk.0.ffn_norm.weight": np.ones(64, np.float32), **ffn}, arch="gemma3")
    doc = quantize_json(m, tmp_path / "out.gguf", "--split-max-tensors", 2, "--search", 0,
                        "--global-scale", "rescale", "-q")
    parts = sorted(tmp_path.glob("out-*-of-*.gguf"))
    assert len(parts) == 2 and doc["outputs"] == [{"path": str(p), "bytes": p.stat().st_size} for p in parts]
    assert doc["bytes_out"] == sum(p.stat().st_size for p in parts)
    assert doc["options"]["split_max_tensors"] == 2 and doc["options"]["global_scale"] == "rescale"
    r = GGUFReader(parts[0])
    names, factors = (r.get_field(f"nvfp4q.rescale{k}").contents() for k in ("d_tensors", "_factors"))
    assert doc["rescaled"] == [{"tensor": n, "factor": f} for n, f in zip(names, factors)]
    assert {f for f in factors} != {1.0}  # the rule moved a power of two


def test_json_dry_run_is_the_plan_of_the_real_run(src, tmp_path):
    from test_imatrix import dat_bytes

    imat = tmp_path / "imatrix.dat"
    imat.write_bytes(dat_bytes({"blk.0.attn_q.weight": (1, [1.0] * 128), "blk.1.attn_k.weight": (1, [1.0] * 128)}))
    folder = tmp_path / "out"
    folder.mkdir()
    args = ("--imatrix", imat, "--include-weights", "attn_q", "--token-embedding-type", "f16")
    plan = quantize_json(src, folder / "out.gguf", "--dry-run", *args)
    assert list(folder.iterdir()) == []
    assert plan["dry_run"] is True and "outputs" not in plan
    run_cli("quantize", src, folder / "out.gguf", "-q", *args, check=True)
    source, written = tensors(src), tensors(folder / "out.gguf")
    assert [t["name"] for t in plan["tensors"]] == list(source)
    for row in plan["tensors"]:
        s, w = source[row["name"]], written[row["name"]]
        assert row["shape"] == [int(d) for d in s.shape] and row["from"] == s.tensor_type.name
        assert row["to"] == w.tensor_type.name and row["bytes"] == int(w.n_bytes)
        sidecar = row["name"].removesuffix(".weight") + ".scale"
        assert row["sidecar"] == (sidecar if sidecar in written else None)
        expected = None if row["to"] != "NVFP4" else row["name"] == "blk.0.attn_q.weight"
        assert row["imatrix"] is expected, row
        assert row["rescale"] is False
    assert plan["types"] == type_rows(folder / "out.gguf")
    assert plan["tensor_bytes"] == sum(int(t.n_bytes) for t in written.values())
    assert plan["bits_per_weight"] == pytest.approx(8 * plan["tensor_bytes"] / plan["weights"])
    assert plan["imatrix"]["excluded"] == ["blk.1.attn_k.weight"]


@pytest.mark.parametrize("args, code", [([], 1), (["--search", "-1"], 2), (["--bogus"], 2)],
                         ids=["bad-input", "bad-value", "unknown-option"])
def test_json_errors_are_one_line_and_nothing_on_stdout(tmp_path, args, code):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    proc = run_cli("quantize", bad, tmp_path / "out.gguf", "--json", *args)
    assert proc.stdout == ""
    assert_clean_failure(proc, tmp_path, code=code)


def decile_tensors(plan: dict, every: float = 0.1) -> list[int]:
    """1-based numbers of the tensors after which another `every` of the output bytes is done."""
    total = plan["tensor_bytes"]
    done, last, marks = 0, 0, []
    for n, row in enumerate(plan["tensors"], 1):
        done += row["bytes"] + (4 * (row["shape"][2] if len(row["shape"]) > 2 else 1) if row["sidecar"] else 0)
        if int(done / total / every + 1e-9) > last:
            last = int(done / total / every + 1e-9)
            marks.append(n)
    return marks


def test_progress_lines_when_stderr_is_not_a_terminal(src, tmp_path):
    plan = quantize_json(src, tmp_path / "out.gguf", "--dry-run")
    proc = run_cli("quantize", src, tmp_path / "out.gguf", check=True)
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    n = len(plan["tensors"])
    pattern = re.compile(rf"nvfp4q: tensor (\d+)/{n}, [\d.]+ \w+ / [\d.]+ \w+ \((\d+)%\), [\d.]+ M weights/s, ETA \w+")
    matches = [pattern.fullmatch(line) for line in lines]
    assert all(matches), lines
    printed = [int(m[1]) for m in matches]
    assert set(decile_tensors(plan)) <= set(printed) and printed == sorted(printed)  # the 30 s lines may add some
    assert lines[-1].startswith(f"nvfp4q: tensor {n}/{n},") and "(100%)" in lines[-1] and lines[-1].endswith("ETA 0s")
    assert len(decile_tensors(plan)) >= 5


def test_progress_lines_every_step_or_interval(src):
    """The reporter's own rules, on a fake clock: 10 s per tensor, a line every 25 s or 50% of the bytes."""
    from nvfp4q import report
    from nvfp4q.plan import Options
    from nvfp4q.quantize import Settings, prepare

    job = prepare(src, Options(global_scale="auto"), Settings())
    now = [100.0]
    lines = io.StringIO()
    progress = report.Lines(job, every=0.5, interval=25.0, stream=lines, clock=lambda: now[0])
    done, last_line, expected = 0, 100.0, []
    for n, step in enumerate(job.plan, 1):
        now[0] += 10.0
        done += step.data_bytes
        half = int(2 * done / job.nbytes_out + 1e-9)
        if now[0] - last_line >= 25.0 or half > int(2 * (done - step.data_bytes) / job.nbytes_out + 1e-9):
            expected.append(n)
            last_line = now[0]
        progress(step)
    printed = [int(re.match(r"nvfp4q: tensor (\d+)/", line)[1]) for line in lines.getvalue().splitlines()]
    assert printed == expected and len(expected) >= len(job.plan) // 3
    first = lines.getvalue().splitlines()[0]
    weights = sum(int(np.prod(s.tensor.shape)) for s in job.plan[:expected[0]])
    assert f"{weights / (10.0 * expected[0]) / 1e6:.1f} M weights/s" in first


@pytest.mark.parametrize("ne0, value, args, to", [
    (48, 65520.0, [], "F16"),  # ne0 fits neither NVFP4 nor Q8_0 blocks: F16, whose largest value is 65504
    (96, 65520.0 * 127, [], "Q8_0"),  # a block's scale amax / 127 is stored as F16
    # a tie between bf16's largest value and inf: rounds to even, 0x7F80, inf
    (64, float(np.uint32(0x7F7F8000).view(np.float32)), ["--tensor-type", "attn_k=bf16"], "BF16"),
], ids=["f16", "q8_0", "bf16"])
def test_weight_too_large_for_the_output_type_is_named(tmp_path, ne0, value, args, to):
    """Found by the fuzzer (a type id changed to F32 reads f16 bits as huge floats): numpy warned
    "overflow encountered in cast" and inf was written. Just below the limit still converts."""
    x = np.ones((8, ne0), np.float32)
    x[3, 5] = -value
    m = write_model(tmp_path / "big.gguf", {"blk.0.attn_k.weight": x})
    line = assert_clean_failure(run_cli("quantize", m, tmp_path / "out.gguf", "-q", *args), tmp_path)
    assert f"blk.0.attn_k.weight: value {-np.float32(value)} at row 3, column 5 is too large for {to}" in line
    x[3, 5] = -np.nextafter(np.float32(value), np.float32(0))
    m = write_model(tmp_path / "fits.gguf", {"blk.0.attn_k.weight": x})
    proc = run_cli("quantize", m, tmp_path / "out.gguf", "-q", *args, check=True)
    assert proc.stderr == ""
    t = tensors(tmp_path / "out.gguf")["blk.0.attn_k.weight"]
    assert t.tensor_type.name == to
    assert np.isfinite(dequantize(np.asarray(t.data), t.tensor_type)).all()
