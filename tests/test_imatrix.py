"""Importance matrices: both file formats, matching entries to tensors, CLI errors, effect on quality.

Every expected value is computed here from the bytes the test wrote, never taken from our reader.
"""

import re
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType

from helpers import KEYS, decoded, gguf_arrays, logits, run_cli, tensors, tiny_model, write_imatrix
from nvfp4q import imatrix
from nvfp4q.errors import UserError

F32 = np.float32
Q = "blk.0.attn_q.weight"  # an NVFP4 tensor of the tiny model, ne0 128
NE0 = 128


# --- writing imatrix files ---------------------------------------------------------------------

def dat_bytes(entries: dict, trailer: tuple[int, str] | None = None) -> bytes:
    """Legacy .dat: entries {name: (ncall, sums)}, trailer (chunk count, dataset name) or None."""
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, sums) in entries.items():
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(sums)),
                  struct.pack(f"<{len(sums)}f", *sums)]
    if trailer is not None:
        dataset = trailer[1].encode()
        parts += [struct.pack("<ii", trailer[0], len(dataset)), dataset]
    return b"".join(parts)


def raw_file(name: str, data: bytes):
    """A builder: writes data as folder/name."""
    def build(folder):
        (folder / name).write_bytes(data)
        return folder / name
    return build


def gguf_file(arrays: dict, without: str | None = None):
    """A builder: a GGUF imatrix with these tensors, lacking the key `without`."""
    return lambda folder: write_imatrix(folder / "imatrix.gguf", arrays,
                                     {k: v for k, v in KEYS.items() if k != without})


def metadata(path) -> dict:
    """quantize.imatrix.* keys of a GGUF: {key: (value type, value)}."""
    return {f.name: (GGUFValueType(f.types[0]), f.contents())
            for f in GGUFReader(path).fields.values() if f.name.startswith("quantize.imatrix.")}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("src"))


# --- 1. legacy .dat ----------------------------------------------------------------------------

# sums / ncall, as exact binary fractions where possible (the last one is float32(1) / float32(3))
DAT_ENTRIES = {
    Q: (4, [2.0, 1.0, 0.5, 10.0]),
    "blk.3.ffn_up.weight": (3, [3.0, 0.75, 6.0, 1.5, 0.0, 12.0]),
    "output.weight": (3, [1.0]),
}
DAT_EXPECTED = {
    Q: [0.5, 0.25, 0.125, 2.5],
    "blk.3.ffn_up.weight": [1.0, 0.25, 2.0, 0.5, 0.0, 4.0],
    "output.weight": [F32(1.0) / F32(3.0)],
}


@pytest.mark.parametrize("trailer", [None, (42, "wiki.train-données.raw")])
def test_dat_entries_values_and_trailer(tmp_path, trailer):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes(DAT_ENTRIES, trailer))
    imat = imatrix.load(path)
    assert imat.format == "dat" and list(imat.entries) == list(DAT_ENTRIES)
    for name, expected in DAT_EXPECTED.items():
        e = imat.entries[name]
        assert e.values.dtype == F32 and e.values.shape == (1, len(expected))
        assert np.array_equal(e.values[0], np.array(expected, F32)), name
        assert e.seen.tolist() == [True]
    assert imat.chunk_count == (trailer[0] if trailer else 0)
    assert imat.datasets == ([trailer[1]] if trailer else [])


def test_dat_ncall_zero_keeps_sums_as_they_are(tmp_path):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes({Q: (0, [3.0, 0.5])}))
    assert np.array_equal(imatrix.load(path).entries[Q].values, np.array([[3.0, 0.5]], F32))


def test_dat_every_truncation_is_a_user_error(tmp_path):
    data = dat_bytes(DAT_ENTRIES, (42, "calib.txt"))
    valid = {len(dat_bytes(DAT_ENTRIES)), len(data)}  # trailer absent or complete
    path = tmp_path / "imatrix.dat"
    for cut in range(len(data)):
        if cut in valid:
            continue
        path.write_bytes(data[:cut])
        with pytest.raises(UserError):
            imatrix.load(path)


# --- 2. GGUF -----------------------------------------------------------------------------------

DENSE, MOE = "blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight"
GGUF_DENSE = ([2.0, 4.0, 1.0, 0.5], [2.0])
GGUF_MOE = ([[4.0, 8.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [3.0, 1.5, 6.0, 0.75]], [4.0, 0.0, 3.0])
GGUF_EXPECTED = {
    DENSE: ([[1.0, 2.0, 0.5, 0.25]], [True]),
    MOE: ([[1.0, 2.0, 0.5, 0.25], [1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 2.0, 0.25]], [True, False, True]),
}


@pytest.fixture
def gguf_imatrix(tmp_path):
    nan = np.full((3, 4), np.nan, F32)  # read as data, these would be entries with non-finite values
    extra = {f"{w}.{suffix}": nan[:n] for w, n in ((DENSE, 1), (MOE, 3)) for suffix in ("in_sum", "stats")}
    arrays = {**gguf_arrays(DENSE, *GGUF_DENSE), **gguf_arrays(MOE, *GGUF_MOE), **extra}
    return write_imatrix(tmp_path / "imatrix.gguf", arrays)


def test_gguf_entries_values_and_keys(gguf_imatrix):
    imat = imatrix.load(gguf_imatrix)
    assert imat.format == "gguf" and set(imat.entries) == {DENSE, MOE}
    for name, (values, seen) in GGUF_EXPECTED.items():
        e = imat.entries[name]
        assert e.values.dtype == F32 and np.array_equal(e.values, np.array(values, F32)), name
        assert e.seen.tolist() == seen, name
    assert imat.datasets == KEYS["imatrix.datasets"][0]
    assert (imat.chunk_count, imat.chunk_size) == (17, 512)


# --- 3. for_tensor -----------------------------------------------------------------------------

def test_for_tensor_gguf_dense_and_experts(gguf_imatrix):
    imat = imatrix.load(gguf_imatrix)
    dense = imatrix.for_tensor(imat, DENSE, (4, 10))
    assert dense.values.shape == (1, 4)
    experts = imatrix.for_tensor(imat, MOE, (4, 6, 3))
    assert experts.values.shape == (3, 4)
    assert np.array_equal(experts.values, np.array(GGUF_EXPECTED[MOE][0], F32))
    assert experts.seen.tolist() == [True, False, True]
    assert imatrix.for_tensor(imat, "blk.9.attn_q.weight", (4, 10)) is None


def test_for_tensor_splits_a_legacy_expert_vector(tmp_path):
    flat = [float(v) for v in range(1, 13)]  # 3 experts x ne0 4
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes({MOE: (2, flat)}))
    e = imatrix.for_tensor(imatrix.load(path), MOE, (4, 6, 3))
    assert e.values.shape == (3, 4)
    for k in range(3):
        assert np.array_equal(e.values[k], np.array(flat[4 * k: 4 * k + 4], F32) / F32(2)), k
    assert e.seen.tolist() == [True, True, True]


@pytest.mark.parametrize("name, shape, got, need", [
    (DENSE, (8, 10), 4, 8),
    (DENSE, (4, 10, 2), 4, 8),
    (MOE, (4, 6, 2), 12, 8),
    (MOE, (6, 6), 12, 6),
])
def test_for_tensor_size_mismatch_names_tensor_and_sizes(gguf_imatrix, name, shape, got, need):
    with pytest.raises(UserError) as info:
        imatrix.for_tensor(imatrix.load(gguf_imatrix), name, shape)
    message = str(info.value)
    assert name in message
    numbers = re.findall(r"\d+", message.replace(name, ""))
    assert str(got) in numbers and str(need) in numbers, message


# --- 4. errors through the CLI -----------------------------------------------------------------

ONES = [1.0] * NE0
GOOD_DAT = dat_bytes({Q: (1, ONES)}, (10, "calib.txt"))
ERRORS = [
    pytest.param(raw_file("i.dat", dat_bytes({Q: (1, ONES)})[:-6]), [], "truncated", id="truncated-dat"),
    pytest.param(raw_file("i.dat", dat_bytes({Q: (1, ONES)}) + struct.pack("<ii", 10, -3)), [],
                 "dataset name length", id="dat-negative-dataset-length"),
    *[pytest.param(gguf_file(gguf_arrays(Q, ONES, [1]), without=key), [], key, id=f"gguf-without-{key}")
      for key in KEYS],
    pytest.param(gguf_file({f"{Q}.counts": np.ones((1, 1), F32)}), [], ".in_sum2", id="counts-without-sums"),
    pytest.param(gguf_file({f"{Q}.in_sum2": np.ones((1, NE0), F32)}), [], "counts", id="sums-without-counts"),
    pytest.param(raw_file("i.dat", dat_bytes({Q: (1, ONES[:-1] + [np.nan])})), [], "non-finite", id="nan-dat"),
    pytest.param(gguf_file(gguf_arrays(Q, ONES[:-1] + [np.nan], [2])), [], "non-finite", id="nan-gguf"),
    pytest.param(raw_file("i.dat", dat_bytes({Q: (1, ONES[:96])})), [], Q, id="wrong-size-dat"),
    pytest.param(gguf_file(gguf_arrays(Q, ONES + ONES, [1])), [], Q, id="wrong-size-gguf"),
    pytest.param(raw_file("i.dat", GOOD_DAT), ["--include-weights", "attn", "--exclude-weights", "ffn"],
                 "cannot be used together", id="include-and-exclude"),
    pytest.param(raw_file("i.dat", GOOD_DAT), ["--imatrix-strict"], "--imatrix-strict", id="strict-partial"),
]


@pytest.mark.parametrize("build, args, message", ERRORS)
def test_cli_imatrix_errors(src, tmp_path, build, args, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("quantize", src, out_dir / "out.gguf", "--imatrix", build(tmp_path), *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error:"), proc.stderr
    assert message in lines[0], lines[0]
    assert list(out_dir.iterdir()) == []  # neither out.gguf nor .out.gguf.*.part


# --- 5. metadata -------------------------------------------------------------------------------

META_ENTRIES = {Q: ONES, "blk.1.ffn_up.weight": ONES, "blk.1.attn_v.weight": ONES}


def dat_for_meta(folder):
    path = folder / "imatrix.dat"
    path.write_bytes(dat_bytes({n: (3, v) for n, v in META_ENTRIES.items()}, (23, "calib-données.txt")))
    return path, "calib-données.txt", 23


def gguf_for_meta(folder):
    arrays = {k: v for n, sums in META_ENTRIES.items() for k, v in gguf_arrays(n, sums, [3]).items()}
    return write_imatrix(folder / "imatrix.gguf", arrays), KEYS["imatrix.datasets"][0][0], 17


@pytest.mark.parametrize("make", [dat_for_meta, gguf_for_meta], ids=["dat", "gguf"])
def test_output_records_the_imatrix(src, tmp_path, make):
    path, dataset, chunks = make(tmp_path)
    out = tmp_path / "out.gguf"
    run_cli("quantize", src, out, "--imatrix", path, "--search", 0, "-q", check=True)
    S, I32 = GGUFValueType.STRING, GGUFValueType.INT32
    assert metadata(out) == {
        "quantize.imatrix.file": (S, str(path)),
        "quantize.imatrix.dataset": (S, dataset),
        "quantize.imatrix.entries_count": (I32, len(META_ENTRIES)),
        "quantize.imatrix.chunks_count": (I32, chunks),
    }


# --- 6. --dry-run ------------------------------------------------------------------------------

DRY_ENTRIES = (Q, "blk.1.ffn_up.weight", "token_embd.weight")  # the last one is Q8_0, not NVFP4


@pytest.mark.parametrize("use_imatrix, args, wanted", [
    (False, [], None),
    (True, [], lambda name: True),
    (True, ["--include-weights", "attn_q"], lambda name: "attn_q" in name),
    (True, ["--exclude-weights", "attn_q"], lambda name: "attn_q" not in name),
], ids=["no-imatrix", "imatrix", "include", "exclude"])
def test_dry_run_imatrix_column(src, tmp_path, use_imatrix, args, wanted):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(dat_bytes({n: (1, ONES) for n in DRY_ENTRIES}))
    out = tmp_path / "out.gguf"
    extra = ["--imatrix", path] if use_imatrix else []
    proc = run_cli("quantize", src, out, "--dry-run", *extra, *args, check=True)
    assert not out.exists()
    names = set(tensors(src))
    rows = {cells[0]: cells for cells in map(str.split, proc.stdout.splitlines()) if cells and cells[0] in names}
    assert set(rows) == names
    got = {n: cells[-3] for n, cells in rows.items()}  # ... imatrix, size value, size unit
    expected = {n: "-" if wanted is None or cells[3] != "NVFP4" else
                ("yes" if n in DRY_ENTRIES and wanted(n) else "no") for n, cells in rows.items()}
    assert got == expected
    if use_imatrix:
        assert set(got.values()) == {"yes", "no", "-"}


# --- 7. end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e(src, tmp_path_factory):
    """Outputs at --search 12 without and with an imatrix that favours 10% of each tensor's columns.

    The imatrix covers every NVFP4 tensor, so --imatrix-strict must accept it.
    """
    folder = tmp_path_factory.mktemp("e2e")
    plain, weighted = folder / "plain.gguf", folder / "weighted.gguf"
    run_cli("quantize", src, plain, "--search", 12, "-q", check=True)
    rng = np.random.default_rng(7)
    importance = {}
    for name, t in tensors(plain).items():
        if t.tensor_type == T.NVFP4:
            ne0 = int(t.shape[0])
            imp = np.ones(ne0, F32)
            imp[rng.choice(ne0, ne0 // 10, replace=False)] = 1000.0
            importance[name] = imp
    arrays = {k: v for n, imp in importance.items() for k, v in gguf_arrays(n, imp * 5, [5]).items()}
    imat = write_imatrix(folder / "imatrix.gguf", arrays)
    run_cli("quantize", src, weighted, "--search", 12, "--imatrix", imat, "--imatrix-strict", "-q", check=True)
    return plain, weighted, importance


def weighted_errors(src, out, importance) -> dict[str, float]:
    source, ours = tensors(src), tensors(out)
    errors = {}
    for name, imp in importance.items():
        t = ours[name]
        assert t.tensor_type == T.NVFP4, name
        ref = np.asarray(source[name].data, np.float64).reshape(-1, imp.size)
        dec = decoded(ours, name).reshape(ref.shape)
        errors[name] = float(((dec - ref) ** 2 * imp).sum())
    return errors


def test_imatrix_lowers_the_weighted_error_of_every_nvfp4_tensor(src, e2e):
    plain, weighted, importance = e2e
    assert len(importance) >= 8
    without, with_ = weighted_errors(src, plain, importance), weighted_errors(src, weighted, importance)
    worse = {n: (with_[n], without[n]) for n in importance if not with_[n] < without[n]}
    assert worse == {}


def test_imatrix_output_runs_in_llama_cpp_and_records_the_imatrix(e2e):
    _, weighted, importance = e2e
    out = logits(weighted)
    assert out.size and np.all(np.isfinite(out))
    meta = metadata(weighted)
    assert meta["quantize.imatrix.entries_count"] == (GGUFValueType.INT32, len(importance))
    assert meta["quantize.imatrix.chunks_count"] == (GGUFValueType.INT32, 17)
    assert meta["quantize.imatrix.dataset"] == (GGUFValueType.STRING, "calib-a.txt")
    assert meta["quantize.imatrix.file"][1].endswith("imatrix.gguf")


def test_floor_weighting_is_the_importance_plus_a_tenth_of_its_mean(src, e2e, tmp_path):
    """--weighting floor on an imatrix equals the default (--weighting importance) on one whose
    values were floored here; the default on the raw imatrix gives other bytes."""
    _, weighted, importance = e2e
    floored = {n: imp + F32(0.1 * imp.mean(dtype=np.float64)) for n, imp in importance.items()}
    arrays = {k: v for n, imp in floored.items() for k, v in gguf_arrays(n, imp, [1]).items()}
    imat = write_imatrix(tmp_path / "floored-imatrix.gguf", arrays)
    outs = {}
    for tag, path, extra in (("floored", imat, ()), ("floor", e2e[0].parent / "imatrix.gguf", ("--weighting", "floor"))):
        outs[tag] = tmp_path / f"{tag}.gguf"
        run_cli("quantize", src, outs[tag], "--imatrix", path, *extra, "-q", check=True)
    floor_, floored_, raw = tensors(outs["floor"]), tensors(outs["floored"]), tensors(weighted)
    assert all(np.array_equal(np.asarray(floor_[n].data), np.asarray(floored_[n].data)) for n in importance)
    assert not all(np.array_equal(np.asarray(floor_[n].data), np.asarray(raw[n].data)) for n in importance)
    assert GGUFReader(outs["floor"]).get_field("nvfp4q.weighting").contents() == "floor"
    assert GGUFReader(weighted).get_field("nvfp4q.weighting").contents() == "importance"
