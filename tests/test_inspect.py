"""nvfp4q inspect through the CLI, every figure checked against the file as gguf reads it."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from helpers import decoded as as_llama_sees, run_cli, tensors


def inspect_json(*args) -> dict:
    proc = run_cli("inspect", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "nvfp4q.inspect/1"
    return doc


def n_elements(t) -> int:
    return int(np.prod([int(d) for d in t.shape]))


def write_gguf(path, arch="llama", tensors_=(), keys=(), alignment=None, **writer_kw):
    """A GGUF written by gguf's own writer: keys as (key, value, type, item type or None),
    tensors as (name, array, raw type or None)."""
    w = GGUFWriter(path, arch, **writer_kw)
    if alignment is not None:
        w.data_alignment = alignment
        w.add_custom_alignment(alignment)
    for key, value, vtype, sub in keys:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, raw_type in tensors_:
        w.add_tensor(name, data, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- describe: models -----------------------------------------------------------------------------

def test_json_facts_of_an_nvfp4q_file_match_gguf_reader(tiny):
    _, outs = tiny
    path = outs[12]
    r = GGUFReader(path)
    doc = inspect_json(path, "--tensors", r"ffn_(down|up)")
    ts = r.tensors
    params = sum(n_elements(t) for t in ts)
    assert doc["kind"] == "model" and doc["parts"] == [str(path)]
    assert doc["architecture"] == r.get_field("general.architecture").contents() == "llama"
    assert doc["name"] == r.get_field("general.name").contents()
    assert doc["file_type"] == {"id": 39, "name": LlamaFileType(39).name} == {"id": 39, "name": "MOSTLY_NVFP4"}
    assert doc["quantization_version"] == r.get_field("general.quantization_version").contents() == 2
    assert doc["tensor_count"] == len(ts)
    assert doc["parameters"] == params
    assert doc["file_size"] == path.stat().st_size
    assert doc["bits_per_weight"] == pytest.approx(8 * path.stat().st_size / params)
    expected = {}
    for t in ts:
        row = expected.setdefault(T(t.tensor_type).name, {"count": 0, "parameters": 0, "bytes": 0})
        row["count"] += 1
        row["parameters"] += n_elements(t)
        row["bytes"] += int(t.n_bytes)
    total = sum(row["bytes"] for row in expected.values())
    got = {row.pop("type"): row for row in doc["types"]}
    assert {k: {**v, "share": pytest.approx(v["bytes"] / total)} for k, v in expected.items()} == got
    assert [row["bytes"] for row in doc["types"]] == sorted((row["bytes"] for row in doc["types"]), reverse=True)
    sidecars = sum(t.name.endswith(".scale") for t in ts)
    assert sidecars > 0
    assert doc["provenance"] == {"nvfp4q.search": 12, "nvfp4q.weighting": "importance",
                                 "nvfp4q.sidecar_count": sidecars}
    listed = [t for t in ts if "ffn_down" in t.name or "ffn_up" in t.name]
    assert doc["tensors"] == [
        {"name": t.name, "shape": [int(d) for d in t.shape], "type": T(t.tensor_type).name,
         "bytes": int(t.n_bytes), "offset": int(t.data_offset), "part": 0} for t in listed
    ]
    assert "metadata" not in doc and "verify" not in doc


def test_file_written_by_gguf_with_custom_alignment_and_metadata(tmp_path):
    rng = np.random.default_rng(1)
    q8 = quantize(rng.standard_normal((8, 64)).astype(np.float32), T.Q8_0)
    tokens = [f"tok{i}" for i in range(20)] + ["[bold]x[/bold]"]
    keys = [
        ("general.name", "other writer", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("example.short", [1, 2, 3], V.ARRAY, V.UINT32),
        ("example.eps", 0.5, V.FLOAT32, None),
        ("example.flag", True, V.BOOL, None),
        ("quantize.imatrix.file", "some.imatrix", V.STRING, None),
        ("quantize.imatrix.entries_count", 7, V.INT32, None),
    ]
    path = write_gguf(tmp_path / "other.gguf", "qwen2", alignment=64, keys=keys, tensors_=[
        ("a.weight", rng.standard_normal((4, 96)).astype(np.float16), None),
        ("b.weight", q8, T.Q8_0), ("c.bias", np.zeros(5, np.float32), None)])

    doc = inspect_json(path, "--meta", "--tensors", ".")
    r = GGUFReader(path)
    assert doc["architecture"] == "qwen2" and doc["name"] == "other writer"
    assert doc["file_type"] is None and doc["quantization_version"] is None
    assert doc["alignment"] == 64
    assert doc["provenance"] == {"quantize.imatrix.file": "some.imatrix", "quantize.imatrix.entries_count": 7}
    assert [(t["name"], t["type"], t["shape"], t["offset"]) for t in doc["tensors"]] == [
        (t.name, T(t.tensor_type).name, [int(d) for d in t.shape], int(t.data_offset)) for t in r.tensors]
    assert all(t["offset"] % 64 == 0 for t in doc["tensors"])
    meta = {m["key"]: m for m in doc["metadata"]}
    assert list(meta) == [f.name for f in r.fields.values() if not f.name.startswith("GGUF.")]
    assert meta["tokenizer.ggml.tokens"] == {"key": "tokenizer.ggml.tokens", "type": "ARRAY",
                                             "item_type": "STRING", "length": 21, "head": tokens[:8]}
    assert meta["example.short"] == {"key": "example.short", "type": "ARRAY", "item_type": "UINT32",
                                     "length": 3, "value": [1, 2, 3]}
    assert meta["example.eps"]["value"] == 0.5 and meta["example.flag"]["value"] is True
    assert meta["general.alignment"]["value"] == 64

    human = run_cli("inspect", path, "--meta", "--tensors", "weight", check=True).stdout
    assert "\x1b" not in human
    assert "qwen2" in human and "b.weight" in human and "c.bias" not in human
    assert "[STRING x 21]" in human


def test_split_model_is_read_whole_from_any_part(tmp_path):
    rng = np.random.default_rng(2)
    data = [(f"blk.{i}.w.weight", rng.standard_normal((3 + i, 32)).astype(np.float32), None) for i in range(5)]
    write_gguf(tmp_path / "split.gguf", tensors_=data, split_max_tensors=2)
    parts = [tmp_path / f"split-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.exists() for p in parts)

    doc = inspect_json(parts[1], "--tensors", ".", "--verify")
    assert doc["parts"] == [str(p) for p in parts]
    assert doc["tensor_count"] == 5
    assert doc["parameters"] == sum(a.size for _, a, _ in data)
    assert doc["file_size"] == sum(p.stat().st_size for p in parts)
    expected = [(t.name, i, int(t.data_offset), [int(d) for d in t.shape])
                for i, p in enumerate(parts) for t in GGUFReader(p).tensors]
    assert [(t["name"], t["part"], t["offset"], t["shape"]) for t in doc["tensors"]] == expected
    assert doc["verify"]["problems"] == [] and doc["verify"]["tensors_checked"] == 5

    parts[2].unlink()
    proc = run_cli("inspect", parts[0])
    assert proc.returncode == 2 and "split-00003-of-00003.gguf" in proc.stderr


def test_header_only_path_is_fast_and_loads_no_numba(tmp_path):
    # gguf's reader needs ~20 s for a 262k vocabulary; the header parser must not depend on it
    tokens = [f"t{i}" for i in range(200_000)]
    keys = [("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
            ("tokenizer.ggml.scores", [0.0] * len(tokens), V.ARRAY, V.FLOAT32)]
    path = write_gguf(tmp_path / "vocab.gguf", keys=keys,
                      tensors_=[("token_embd.weight", np.ones((4, 64), np.float16), None)])
    script = (
        "import sys, time\n"
        "from nvfp4q import inspect as i\n"
        "t = time.perf_counter()\n"
        f"doc = i.describe({str(path)!r}, tensors_regex='.', meta=True)\n"
        "i.render(doc)\n"
        "print('SECONDS', time.perf_counter() - t, 'numba' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, numba_loaded = proc.stdout.split("SECONDS")[1].split()
    assert numba_loaded == "False"
    assert float(seconds) < 1.0
    assert "[STRING x 200000] ['t0', 't1'" in proc.stdout


# --- describe: imatrix files ----------------------------------------------------------------------

def test_gguf_imatrix(tmp_path):
    rng = np.random.default_rng(3)
    sums = {"blk.0.ffn_up.weight": rng.uniform(0, 5, (1, 64)).astype(np.float32),
            "blk.0.ffn_up_exps.weight": rng.uniform(0, 5, (3, 32)).astype(np.float32)}
    counts = {"blk.0.ffn_up.weight": np.array([[10]], np.float32),
              "blk.0.ffn_up_exps.weight": np.array([[4], [0], [2]], np.float32)}
    keys = [("general.type", "imatrix", V.STRING, None),
            ("imatrix.datasets", ["wiki.train.raw"], V.ARRAY, V.STRING),
            ("imatrix.chunk_count", 42, V.UINT32, None), ("imatrix.chunk_size", 512, V.UINT32, None)]
    data = [(name + suffix, arrays[name], None) for name in sums
            for suffix, arrays in ((".in_sum2", sums), (".counts", counts))]
    path = write_gguf(tmp_path / "imatrix.gguf", "", keys=keys, tensors_=data)  # no architecture
    assert GGUFReader(path).get_field("general.architecture") is None

    doc = inspect_json(path, "--tensors", "exps", "--meta")
    assert (doc["kind"], doc["format"], doc["entry_count"]) == ("imatrix", "gguf", 2)
    assert (doc["chunk_count"], doc["chunk_size"], doc["datasets"]) == (42, 512, ["wiki.train.raw"])
    assert doc["file_size"] == path.stat().st_size
    s, c = sums["blk.0.ffn_up_exps.weight"], counts["blk.0.ffn_up_exps.weight"]
    values = np.where(c > 0, s / np.where(c > 0, c, 1), 1)  # an unseen expert counts as 1
    (entry,) = doc["entries"]
    assert entry == {"name": "blk.0.ffn_up_exps.weight", "length": 96, "matrices": 3, "unseen": 1,
                     "min": pytest.approx(values.min()), "max": pytest.approx(values.max())}
    assert {m["key"] for m in doc["metadata"]} >= {"general.type", "imatrix.chunk_count"}
    assert run_cli("inspect", path, "--verify").returncode == 2


def test_legacy_dat_imatrix(tmp_path):
    entries = {"blk.0.attn_q.weight": (5, [1.0, 20.0, 3.0, 0.5]), "output.weight": (2, [8.0, 2.0])}
    blob = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        blob += struct.pack(f"<{len(values)}f", *values)
    blob += struct.pack("<ii", 17, 9) + b"c4.sample"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(blob)

    doc = inspect_json(path, "--tensors", "attn")
    assert (doc["kind"], doc["format"], doc["entry_count"]) == ("imatrix", "dat", 2)
    assert (doc["chunk_count"], doc["chunk_size"], doc["datasets"]) == (17, None, ["c4.sample"])
    assert doc["entries"] == [{"name": "blk.0.attn_q.weight", "length": 4, "matrices": 1, "unseen": 0,
                               "min": pytest.approx(0.5 / 5), "max": pytest.approx(20.0 / 5)}]
    human = run_cli("inspect", path, "--tensors", ".", check=True).stdout
    assert "legacy" in human and "output.weight" in human and "c4.sample" in human


# --- unreadable input -----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"hello, this is no model\n" * 40, b"GGUF\x03\x00\x00\x00\x05"])
def test_unreadable_input_is_exit_2_with_one_line(tmp_path, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    proc = run_cli("inspect", path, "--verify")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error: ") and str(path) in lines[0]


def test_imatrix_without_against_is_a_usage_error(tiny):
    src, _ = tiny
    assert run_cli("inspect", src, "--imatrix", src).returncode == 2


# --- --verify --------------------------------------------------------------------------------------

def nvfp4_scale_codes(path) -> np.ndarray:
    codes = np.zeros(256, np.int64)
    for t in tensors(path).values():
        if t.tensor_type == T.NVFP4:
            codes += np.bincount(np.asarray(t.data).reshape(-1, 36)[:, :4].ravel(), minlength=256)
    return codes


def test_verify_clean_file_and_scale_histogram(tiny):
    _, outs = tiny
    proc = run_cli("inspect", "--json", "--verify", outs[12])
    assert proc.returncode == 0, proc.stdout
    v = json.loads(proc.stdout)["verify"]
    assert v["problems"] == [] and v["tensors_checked"] == v["tensor_count"] == len(tensors(outs[12]))
    codes = nvfp4_scale_codes(outs[12])
    total = int(codes.sum())
    expected = {"zero": int(codes[0]), "subnormal": int(codes[1:8].sum()), "normal": int(codes[8:0x7F].sum()),
                "invalid": 0}
    assert v["nvfp4_scales"] == {"codes": total, **expected,
                                 **{f"{k}_share": pytest.approx(n / total) for k, n in expected.items()}}
    assert expected["normal"] > 0


def _plant_nan_scale(path, ts):
    t = next(t for t in ts.values() if t.tensor_type == T.NVFP4)
    patch(path, int(t.data_offset) + 36 * 3 + 2, b"\x7f")
    return t.name, "0x7F"


def _plant_sign_scale(path, ts):
    t = next(t for t in ts.values() if t.tensor_type == T.NVFP4)
    patch(path, int(t.data_offset) + 36 * 5, b"\x85")
    return t.name, ">= 0x80"


def _plant_nan_f16(path, ts):
    t = next(t for t in ts.values() if t.tensor_type == T.F16)
    patch(path, int(t.data_offset) + 2 * 70, np.array([np.nan], np.float16).tobytes())
    return t.name, "non-finite"


def _plant_zero_tensor(path, ts):
    t = ts["blk.1.ffn_gate.weight"]
    patch(path, int(t.data_offset), bytes(int(t.n_bytes)))
    return t.name, "all values are zero"


def _truncate(path, ts):
    last = max(ts.values(), key=lambda t: t.data_offset)
    with open(path, "r+b") as f:
        f.truncate(int(last.data_offset) + int(last.n_bytes) // 2)
    return last.name, "past the end of the file"


def _misalign(path, ts):
    """Shift one tensor's stored offset by 16 bytes: unaligned, and overlapping the next tensor."""
    names = list(ts)
    name = next(n for n in names[1:-1] if ts[n].n_bytes >= 64)
    raw = path.read_bytes()
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    at += 4 + 8 * n_dims + 4
    patch(path, at, struct.pack("<Q", struct.unpack_from("<Q", raw, at)[0] + 16))
    return name, "not a multiple of the alignment 32"


@pytest.mark.parametrize("plant", [_plant_nan_scale, _plant_sign_scale, _plant_nan_f16, _plant_zero_tensor,
                                   _truncate, _misalign])
def test_verify_finds_planted_defect(tiny, tmp_path, plant):
    _, outs = tiny
    path = tmp_path / "bad.gguf"
    shutil.copy(outs[12], path)
    name, words = plant(path, tensors(outs[12]))
    proc = run_cli("inspect", "--json", "--verify", path)
    assert proc.returncode == 1, proc.stderr
    problems = json.loads(proc.stdout)["verify"]["problems"]
    assert any(p["tensor"] == name and words in p["problem"] for p in problems), problems
    assert run_cli("inspect", path).returncode == 0  # without --verify the header is all it reads


def test_verify_reports_overlap(tiny, tmp_path):
    _, outs = tiny
    path = tmp_path / "overlap.gguf"
    shutil.copy(outs[12], path)
    name, _ = _misalign(path, tensors(outs[12]))
    problems = inspect_json("--verify", path)["verify"]["problems"]
    names = list(tensors(outs[12]))
    following = names[names.index(name) + 1]
    assert {"tensor": following, "problem": f"overlaps tensor {name}"} in problems


def test_human_verify_output_lists_problems(tiny, tmp_path):
    _, outs = tiny
    path = tmp_path / "bad.gguf"
    shutil.copy(outs[0], path)
    name, _ = _plant_nan_scale(path, tensors(outs[0]))
    proc = run_cli("inspect", "--verify", path)
    assert proc.returncode == 1
    assert "NaN sentinel" in proc.stdout and name in proc.stdout and "\x1b" not in proc.stdout


# --- --against -------------------------------------------------------------------------------------

def rel_error(q: np.ndarray, x: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones(x.shape[-1]) if w is None else w
    return float(np.sqrt((((q - x) ** 2) * w).sum() / ((x * x) * w).sum()))


def decoded(t) -> np.ndarray:
    if t.tensor_type in (T.F32, T.F16):
        return np.asarray(t.data, np.float64).reshape(-1, int(t.shape[0]))
    return dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(-1, int(t.shape[0]))


def test_against_search_12_beats_search_0(tiny):
    src, outs = tiny
    docs = {s: inspect_json(outs[s], "--against", src)["against"] for s in (0, 12)}
    assert docs[12]["total"]["rel_rmse"] < docs[0]["total"]["rel_rmse"]
    assert docs[12]["total"]["snr_db"] > docs[0]["total"]["snr_db"]

    a = docs[12]
    source, ours = tensors(src), tensors(outs[12])
    sidecars = [n for n in ours if n.endswith(".scale")]
    assert sidecars and a["imatrix"] is None and a["compared"] == len(ours) - len(sidecars)
    assert a["skipped"] == [{"tensor": n, "reason": "not in source"} for n in sidecars]
    rels = [r["rel_rmse"] for r in a["tensors"]]
    assert rels == sorted(rels, reverse=True)
    by_name = {r["name"]: r for r in a["tensors"]}
    err = ref = 0.0
    for name, t in ours.items():
        if name in sidecars:
            continue
        x = decoded(source[name])
        q = as_llama_sees(ours, name).reshape(x.shape)  # sidecars multiplied in
        err += float(((q - x) ** 2).sum())
        ref += float((x * x).sum())
        assert by_name[name]["rel_rmse"] == pytest.approx(rel_error(q, x), rel=1e-6, abs=1e-12), name
        assert by_name[name]["type"] == T(t.tensor_type).name
    assert a["total"]["rel_rmse"] == pytest.approx(np.sqrt(err / ref), rel=1e-6)
    assert a["total"]["snr_db"] == pytest.approx(10 * np.log10(ref / err), rel=1e-6)
    assert by_name["output_norm.weight"] == {"name": "output_norm.weight", "type": "F32", "source_type": "F32",
                                             "weighted": False, "rel_rmse": 0.0, "snr_db": None}


def test_against_with_imatrix_weights_columns(tiny, tmp_path):
    src, outs = tiny
    name = "blk.0.attn_q.weight"
    source, ours = tensors(src), tensors(outs[0])
    ne0 = int(source[name].shape[0])
    importance = np.full(ne0, 0.01, np.float32)
    importance[:8] = 100  # almost all weight on 8 columns: their error alone decides
    path = tmp_path / "imatrix.dat"
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name.encode() + struct.pack("<ii", 1, ne0)
                     + importance.tobytes())
    plain = {r["name"]: r for r in inspect_json(outs[0], "--against", src)["against"]["tensors"]}
    a = inspect_json(outs[0], "--against", src, "--imatrix", path)["against"]
    rows = {r["name"]: r for r in a["tensors"]}
    assert a["imatrix"] == str(path)
    assert [n for n, r in rows.items() if r["weighted"]] == [name]
    q, x = decoded(ours[name]), decoded(source[name])
    w = importance.astype(np.float64) / importance.mean()
    assert rows[name]["rel_rmse"] == pytest.approx(rel_error(q, x, w), rel=1e-6)
    assert rows[name]["rel_rmse"] != pytest.approx(plain[name]["rel_rmse"], rel=1e-4)
    assert rows["blk.0.attn_k.weight"] == plain["blk.0.attn_k.weight"]


def test_against_finds_a_sidecar_in_another_part(tiny, tmp_path):
    src, outs = tiny
    names = list(tensors(outs[12]))
    # a split right after a weight puts its .scale sidecar first in the next part
    cut = next(i for i, n in enumerate(names) if n.endswith(".scale"))
    out = tmp_path / "split.gguf"
    run_cli("quantize", src, out, "--search", 12, "--split-max-tensors", cut, "-q", check=True)
    first = tmp_path / f"split-00001-of-{-(-len(names) // cut):05d}.gguf"
    assert list(tensors(first))[-1] == names[cut - 1] == names[cut].replace(".scale", ".weight")
    whole = inspect_json(outs[12], "--against", src)["against"]
    parts = inspect_json(first, "--against", src)["against"]
    assert parts["total"] == whole["total"]
    assert parts["tensors"] == whole["tensors"]
