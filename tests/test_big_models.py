"""Big-model features on tiny models: split files, MoE experts, interruption and full disk.

Expected values come from gguf's own reader and dequantizer or from stock llama.cpp, never
from nvfp4q's reader.
"""

import errno
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from helpers import dequantized_copy, gguf_arrays, logits, rel_rmse, run_cli, write_imatrix
from nvfp4q import cli, gguf_io, quantize
from nvfp4q.global_scale import sidecar_scale
from scripts.make_synthetic_model import PRESETS, Shape, write

SPLIT_INPUT_SIZE = 2_000_000  # tiny-llama (4.8 MB in f16) in 3 parts
MOE_SEED = 1


# --- helpers -----------------------------------------------------------------------------------

def synth(folder: Path, shape: Shape, seed: int = 0, split_max_size: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return write(folder / "model.gguf", shape, seed, split_max_size)


def quant(src: Path, out: Path, *args) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_cli("quantize", src, out, "-q", *args, check=True)
    return out


def listing(path: Path) -> list[tuple[str, int, tuple[int, ...], bytes]]:
    """(name, type, shape, data bytes) of every tensor, in file order."""
    return [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
            for t in GGUFReader(path).tensors]


def metadata(path: Path, skip=("GGUF.", "split.")) -> dict:
    """{key: (value types, value)} of a GGUF, without the header and split keys."""
    r = GGUFReader(path)
    return {f.name: (tuple(f.types), f.contents()) for f in r.fields.values() if not f.name.startswith(skip)}


def split_names(out: Path, n: int) -> list[Path]:
    return [out.with_name(f"{out.stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def weight_of(name: str) -> str:
    """The weight a tensor belongs to: a `.scale` sidecar belongs to its `.weight`."""
    return name.removesuffix(".scale") + ".weight" if name.endswith(".scale") else name


def assert_split_keys(parts: list[Path]) -> None:
    total = sum(len(GGUFReader(p).tensors) for p in parts)
    for i, p in enumerate(parts):
        fields = GGUFReader(p).fields
        expect = {"split.no": (GGUFValueType.UINT16, i), "split.count": (GGUFValueType.UINT16, len(parts)),
                  "split.tensors.count": (GGUFValueType.INT32, total)}
        got = {k: (fields[k].types[0], fields[k].contents()) for k in expect if k in fields}
        assert got == expect, p.name


def assert_same_model(parts: list[Path], single: Path) -> None:
    """The parts, concatenated, hold exactly the single file's tensors and its metadata."""
    assert [t for p in parts for t in listing(p)] == listing(single)
    assert metadata(parts[0]) == metadata(single)


def assert_one_error_line(code: int, stderr: str | list[str], *match: str) -> None:
    lines = stderr.splitlines() if isinstance(stderr, str) else stderr
    assert code == 1, lines
    assert len(lines) == 1 and lines[0].startswith("nvfp4q: error:"), lines
    assert all(m in lines[0] for m in match), lines[0]


# --- models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("whole"), PRESETS["tiny-llama"])[0]


@pytest.fixture(scope="module")
def split_src(tmp_path_factory) -> list[Path]:
    parts = synth(tmp_path_factory.mktemp("split"), PRESETS["tiny-llama"], split_max_size=SPLIT_INPUT_SIZE)
    assert [p.name for p in parts] == [p.name for p in split_names(parts[0].parent / "model.gguf", 3)]
    return parts


@pytest.fixture(scope="module")
def single(whole, tmp_path_factory) -> Path:
    """The reference output: the unsplit model quantized into one file."""
    return quant(whole, tmp_path_factory.mktemp("single") / "out.gguf")


# --- 1. split input, one output ----------------------------------------------------------------

@pytest.mark.parametrize("named", [0, 1, 2], ids=["first-part", "middle-part", "last-part"])
def test_split_input_gives_the_same_single_file(split_src, single, tmp_path, named):
    out = quant(split_src[named], tmp_path / "out.gguf")
    assert out.read_bytes() == single.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_split_input_with_a_missing_part_fails_cleanly(split_src, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in split_src[:2]:
        shutil.copy(p, folder / p.name)
    proc = run_cli("quantize", folder / split_src[0].name, tmp_path / "out.gguf")
    assert_one_error_line(proc.returncode, proc.stderr, "missing", split_src[2].name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --- 2. one input, split output ----------------------------------------------------------------

# tiny-llama's output: 59 tensors, 1.97 MB of data. 19 tensors a part puts blk.1.attn_k.weight
# and its .scale sidecar in different parts.
MAX_TENSORS, MAX_SIZE = 19, 800_000


@pytest.fixture(scope="module")
def split_out(whole, tmp_path_factory):
    """Split outputs of the unsplit model, one folder per way of splitting."""
    made = {}

    def get(option: str, value: int) -> list[Path]:
        if option not in made:
            folder = tmp_path_factory.mktemp(option.strip("-"))
            quant(whole, folder / "out.gguf", option, value)
            made[option] = sorted(folder.iterdir())
        return made[option]
    return get


def check_by_tensors(counts: list[int], sizes: list[list[int]]) -> None:
    assert all(c == MAX_TENSORS for c in counts[:-1]) and 0 < counts[-1] <= MAX_TENSORS, counts


def check_by_size(counts: list[int], sizes: list[list[int]]) -> None:
    assert all(sum(s) <= MAX_SIZE for s in sizes), sizes
    # each part is full: it could not have taken the next part's first tensor
    assert all(sum(a) + b[0] > MAX_SIZE for a, b in zip(sizes, sizes[1:])), sizes


@pytest.mark.parametrize("option, value, check", [
    ("--split-max-tensors", MAX_TENSORS, check_by_tensors),
    ("--split-max-size", MAX_SIZE, check_by_size),
], ids=["by-tensors", "by-size"])
def test_split_output(split_out, single, option, value, check):
    parts = split_out(option, value)
    n = len(parts)
    assert 2 <= n <= 4
    assert parts == split_names(parts[0].parent / "out.gguf", n)  # and nothing else in the folder
    assert_split_keys(parts)
    readers = [GGUFReader(p) for p in parts]
    check([len(r.tensors) for r in readers], [[int(t.n_bytes) for t in r.tensors] for r in readers])
    assert_same_model(parts, single)


def test_split_output_size_counts_powers_of_1000(whole, split_out, tmp_path):
    """'0.8M' is 800,000 bytes: the same parts as --split-max-size 800000."""
    quant(whole, tmp_path / "out.gguf", "--split-max-size", "0.8M")
    ref = split_out("--split-max-size", MAX_SIZE)
    assert [p.name for p in sorted(tmp_path.iterdir())] == [p.name for p in ref]
    assert all((tmp_path / p.name).read_bytes() == p.read_bytes() for p in ref)


# --- 3. --keep-split ---------------------------------------------------------------------------

def test_keep_split_keeps_the_tensor_to_part_assignment(split_src, single, tmp_path):
    quant(split_src[1], tmp_path / "out.gguf", "--keep-split")
    parts = sorted(tmp_path.iterdir())
    assert parts == split_names(tmp_path / "out.gguf", 3)
    assert_split_keys(parts)
    for src_part, out_part in zip(split_src, parts):
        src_names = [t.name for t in GGUFReader(src_part).tensors]
        out_weights = [weight_of(t.name) for t in GGUFReader(out_part).tensors]
        assert list(dict.fromkeys(out_weights)) == src_names, out_part.name
    assert_same_model(parts, single)


# --- 4. a split output runs in stock llama.cpp -------------------------------------------------

@pytest.mark.parametrize("option, value", [("--split-max-tensors", MAX_TENSORS), ("--split-max-size", MAX_SIZE)],
                         ids=["by-tensors", "by-size"])
def test_split_output_loads_in_llama_cpp_by_its_first_part(split_out, single, option, value):
    ref, got = logits(single), logits(split_out(option, value)[0])
    assert ref.size and np.all(np.isfinite(ref))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# --- 5. MoE experts ----------------------------------------------------------------------------

N_EXPERT = PRESETS["tiny-moe"].experts
FAVOURED = 100.0
# This expert was never routed to in calibration: its count is 0. Its sums are left non-zero
# (llama-imatrix writes zeros) so that only the count can tell it apart.
ZERO_COUNT = ("blk.0.ffn_up_exps.weight", 2)


@dataclass
class Moe:
    src: Path
    plain: Path  # quantized without the imatrix
    weighted: Path  # with it
    importance: dict[str, np.ndarray]  # weight name -> [n_expert, ne0]
    sidecars: bool


def expert_importance(ne0: int) -> np.ndarray:
    """[n_expert, ne0]: expert k favours columns c with c % n_expert == k, inside every block."""
    imp = np.ones((N_EXPERT, ne0), np.float32)
    for k in range(N_EXPERT):
        imp[k, k::N_EXPERT] = FAVOURED
    return imp


def write_imatrix_of(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> Path:
    """llama-imatrix's GGUF format: per weight, sums [n_expert, ne0] and counts [n_expert, 1]."""
    return write_imatrix(path, {k: v for name, s in sums.items() for k, v in gguf_arrays(name, s, counts[name]).items()})


def experts(path: Path, name: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A 3D weight as ([n_expert, ne1, ne0] float64 values, its .scale sidecar or None, raw bytes)."""
    ts = {t.name: t for t in GGUFReader(path).tensors}
    t = ts[name]
    raw = np.asarray(t.data)
    ne0, ne1, ne2 = (int(d) for d in t.shape)
    values = (np.asarray(raw, np.float64) if t.tensor_type in (T.F16, T.F32)
              else dequantize(raw, t.tensor_type).astype(np.float64)).reshape(ne2, ne1, ne0)
    sidecar = ts.get(name.removesuffix(".weight") + ".scale")
    scale = None if sidecar is None else np.asarray(sidecar.data, np.float64).reshape(ne2)
    if scale is not None:
        values = values * scale[:, None, None]
    return values, scale, raw.reshape(ne2, -1)


@pytest.fixture(scope="module", params=["auto", "off"], ids=["sidecars", "no-sidecars"])
def moe(request, tmp_path_factory):
    """The tiny MoE model, its imatrix, and outputs at --search 12 without and with it.

    With and without .scale sidecars: without them only the kernel's search sees the importance.
    """
    folder = tmp_path_factory.mktemp("moe")
    src = synth(folder, PRESETS["tiny-moe"], seed=MOE_SEED)[0]
    importance = {t.name: expert_importance(int(t.shape[0])) for t in GGUFReader(src).tensors if "_exps." in t.name}
    assert len(importance) == 3 * PRESETS["tiny-moe"].layers
    counts = {n: np.full(N_EXPERT, 7.0) for n in importance}
    counts[ZERO_COUNT[0]][ZERO_COUNT[1]] = 0
    imat = write_imatrix_of(folder / "imatrix.gguf", {n: imp * 7 for n, imp in importance.items()}, counts)
    args = ("--search", 12, "--global-scale", request.param)
    plain = quant(src, folder / "plain.gguf", *args)
    weighted = quant(src, folder / "weighted.gguf", *args, "--imatrix", imat)
    return Moe(src, plain, weighted, importance, sidecars=request.param != "off")


def test_moe_experts_are_nvfp4_with_a_scale_per_expert(moe):
    types = {t.name: t.tensor_type for t in GGUFReader(moe.plain).tensors}
    for name in moe.importance:
        _, scale, raw = experts(moe.plain, name)
        assert types[name] == T.NVFP4 and raw.shape[0] == N_EXPERT
        if moe.sidecars:  # each expert's own power of two, from its own largest |w|
            amax = np.abs(experts(moe.src, name)[0]).reshape(N_EXPERT, -1).max(axis=1)
            assert list(scale) == [sidecar_scale(a) for a in amax]
        else:
            assert scale is None


def test_each_expert_uses_its_own_imatrix_slice(moe):
    """Quantized with its own importance, each expert's importance-weighted error drops.

    The experts favour different columns, so quantizing all of them with expert 0's slice would
    raise the other experts' weighted errors instead.
    """
    checked, worse = 0, {}
    for name, imp in moe.importance.items():
        ref = experts(moe.src, name)[0]
        err = {which: (((experts(path, name)[0] - ref) ** 2).sum(axis=1) * imp).sum(axis=1)
               for which, path in (("plain", moe.plain), ("weighted", moe.weighted))}
        for k in range(N_EXPERT):
            if (name, k) == ZERO_COUNT:
                continue
            checked += 1
            if not err["weighted"][k] < err["plain"][k]:
                worse[(name, k)] = (err["weighted"][k], err["plain"][k])
    assert checked == len(moe.importance) * N_EXPERT - 1
    assert worse == {}


def test_zero_count_expert_is_quantized_without_importance(moe):
    name, k = ZERO_COUNT
    _, scale_plain, raw_plain = experts(moe.plain, name)
    _, scale_weighted, raw_weighted = experts(moe.weighted, name)
    assert raw_weighted[k].tobytes() == raw_plain[k].tobytes()
    assert scale_plain is None or scale_weighted[k] == scale_plain[k]
    others = [j for j in range(N_EXPERT) if j != k]
    assert all(raw_weighted[j].tobytes() != raw_plain[j].tobytes() for j in others)


def test_moe_output_runs_in_llama_cpp(moe, tmp_path):
    """llama-cpp-python 0.3.36 loads the tiny qwen3moe model (checked by hand, then asserted)."""
    ref, got = logits(moe.src), logits(moe.weighted)
    assert got.size and np.all(np.isfinite(got))
    assert rel_rmse(ref, got) < 0.3  # random weights at 4 bits: about 0.2
    # llama.cpp reads the NVFP4 experts and their sidecars as gguf decodes them
    assert rel_rmse(logits(dequantized_copy(moe.weighted, tmp_path / "deq.gguf")), got) < 0.05


# --- 6. interruption ---------------------------------------------------------------------------

SLOW = Shape("llama", 1024, 4, 2816, 2048, 16, 4, 64)  # 100 MB f16; about 7 s at --search 126


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("slow"), SLOW)[0]


def wait_for_a_part_file(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until quantize has begun writing its output under a temporary `.part` name."""
    deadline = time.monotonic() + timeout
    while not any(p.name.endswith(".part") for p in folder.iterdir()):
        assert proc.poll() is None, f"quantize ended early ({proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no temporary output part appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("signum, code, args", [
    (signal.SIGINT, 130, []),
    (signal.SIGTERM, 143, []),
    (signal.SIGTERM, 143, ["--split-max-tensors", 8]),
], ids=["sigint", "sigterm", "sigterm-split"])
def test_signal_cleans_up(slow_src, tmp_path, signum, code, args):
    out = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "nvfp4q", "quantize", slow_src, out, "-q", "--search", "126",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_a_part_file(tmp_path, proc)
        time.sleep(0.3)  # into the conversion, with data written
        assert proc.poll() is None, "quantize finished before the signal: use a bigger model"
        sent = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == code, stderr
    assert elapsed < 3, elapsed
    assert stderr.strip() == "nvfp4q: interrupted"
    assert list(tmp_path.iterdir()) == []


# --- 7. full disk ------------------------------------------------------------------------------

def cli_in_process(capsys, *args) -> tuple[int, list[str]]:
    """Run the CLI in this process (so monkeypatches apply): exit code and stderr lines."""
    with pytest.raises(SystemExit) as info:
        cli.app(args=[str(a) for a in args], prog_name="nvfp4q")
    return info.value.code, capsys.readouterr().err.splitlines()


def test_disk_full_while_writing(whole, tmp_path, monkeypatch, capsys):
    """ENOSPC after the first tensor (simulated): one error line, the temporary file removed."""
    real = gguf_io._TempShardWriter.write_tensor_data
    written = []

    def fill_up(self, tensor, *a, **kw):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor.nbytes)
        real(self, tensor, *a, **kw)

    monkeypatch.setattr(gguf_io._TempShardWriter, "write_tensor_data", fill_up)
    code, lines = cli_in_process(capsys, "quantize", whole, tmp_path / "out.gguf", "-q")
    assert_one_error_line(code, lines, "No space left on device")
    assert written and list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_up_front(whole, single, tmp_path, monkeypatch, capsys):
    needed = sum(int(t.n_bytes) for t in GGUFReader(single).tensors)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(quantize.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - needed + 1, needed - 1))
    code, lines = cli_in_process(capsys, "quantize", whole, tmp_path / "out.gguf", "-q")
    assert_one_error_line(code, lines, f"{tmp_path}: ", "GB free, the output needs")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", disk], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


def fill(disk: Path, leave: int) -> None:
    """Leave exactly `leave` bytes free (a whole number of pages)."""
    (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    assert shutil.disk_usage(disk).free == leave


@pytest.mark.parametrize("spare, match", [
    (-4096, "GB free, the output needs"),  # refused by the up-front check
    (+4096, "No space left on device"),  # passes the check (data only), the header overflows it
], ids=["up-front", "while-writing"])
def test_real_full_disk(whole, single, small_disk, spare, match):
    needed = sum(int(t.n_bytes) for t in GGUFReader(single).tensors)
    assert single.stat().st_size > needed + 3 * 4096  # the header alone is more than the spare
    fill(small_disk, (needed + 4095) // 4096 * 4096 + spare)
    proc = run_cli("quantize", whole, small_disk / "out.gguf", "-q")
    assert_one_error_line(proc.returncode, proc.stderr, match)
    assert [p.name for p in small_disk.iterdir()] == ["filler"]
