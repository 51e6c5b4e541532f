"""Seeded mutation fuzzing: damaged models and imatrix files through the CLI must fail cleanly.

Each case takes a valid file (the tiny llama model; a tiny gemma3 model quantized by nvfp4q, with
NVFP4 and Q8_0 tensors, sidecars and rescaling factors; an imatrix GGUF or a legacy .dat imatrix
for the tiny model), applies one to three mutations (bit flips, byte sets, 32/64-bit little-endian fields set to
0, 1, 2^31, 2^63-1 or 2^64-1, truncation, a splice of one region over another; about 80% of them
in the header: metadata and tensor infos, or the .dat records), and runs one command on it. Every
case must exit 0, 1 or 2; on failure stderr is exactly one line `nvfp4q: error: ...` (never a
traceback or warning text); no case may hang; nothing but a successful output stays in the output
folder.

A fresh interpreter per case costs about a second, so the cases run in one worker process (this
file run as a script) that calls the CLI's main() per case with fresh sys.argv and warning state,
stdout and stderr redirected at the file-descriptor level (what C code writes is caught too),
under a per-case timeout; test_worker_sees_what_a_process_shows checks it against a real process.

NVFP4Q_FUZZ_CASES=2000 runs more cases (seeds 0..N-1); NVFP4Q_FUZZ_SEEDS=17,204 replays those.
"""

import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("NVFP4Q_FUZZ_CASES", "500"))
CASE_TIMEOUT = 30.0  # seconds; a tiny-model case takes well under one
WARM_UP_TIMEOUT = 600.0  # the first cases compile the Numba kernels when no cache exists
HEADER_SHARE = 0.8
MEMORY_LIMIT = 6 << 30  # bytes of address space for the worker
EDGE_VALUES = (0, 1, 2**31, 2**63 - 1, 2**64 - 1)
IMATRIX_NE0 = 128  # the tiny model's NVFP4 weights have ne0 128


# --- valid files and where their fields are ----------------------------------------------------

@dataclass
class Layout:
    """A valid file, its header spans (mutated 80% of the time) and the offsets of its fields."""

    data: bytes
    header: list[tuple[int, int]]
    fields: list[int]
    path: Path | None = None  # the valid file, for where()

    @property
    def body(self) -> list[tuple[int, int]]:
        """Everything outside the header spans."""
        spans, pos = [], 0
        for start, end in sorted(self.header):
            if start > pos:
                spans.append((pos, start))
            pos = max(pos, end)
        return spans + ([(pos, len(self.data))] if pos < len(self.data) else [])


def gguf_layout(path: Path) -> Layout:
    """Header and field offsets as gguf's reader finds them (an independent parser)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    base = r.data.ctypes.data
    fields = [p.ctypes.data - base for f in r.fields.values() for p in f.parts[:6]]
    fields += [p.ctypes.data - base for t in r.tensors for p in t.field.parts]
    return Layout(path.read_bytes(), [(0, r.data_offset)], sorted(set(fields)), path)


def dat_layout(entries: dict, trailer: tuple[int, str]) -> Layout:
    """A legacy .dat imatrix; its header spans are the records, its body the float sums."""
    from test_imatrix import dat_bytes

    data = dat_bytes(entries, trailer)
    fields, spans, pos = [0], [(0, 4)], 4
    for name, (_, sums) in entries.items():
        n = len(name.encode())
        fields += [pos, pos + 4, pos + 4 + n, pos + 8 + n]  # name length, name, ncall, nval
        spans.append((pos, pos + 12 + n))
        pos += 12 + n + 4 * len(sums)
    fields += [pos, pos + 4]  # trailer: chunk count, dataset name length
    spans.append((pos, len(data)))
    return Layout(data, spans, fields)


IMATRIX_WEIGHTS = ("blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_k.weight")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    from helpers import gguf_arrays, run_cli, tiny_model, write_imatrix
    from scripts.make_synthetic_model import PRESETS, write

    folder = tmp_path_factory.mktemp("valid")
    model = tiny_model(folder / "model")
    gemma = write(folder / "gemma3-f16.gguf", PRESETS["tiny-gemma3"])[0]
    quantized = folder / "nvfp4.gguf"  # NVFP4, Q8_0 and F32 tensors, .scale sidecars, rescaling factors
    run_cli("quantize", gemma, quantized, "-q", "--search", "2", check=True)
    rng = np.random.default_rng(3)
    values = {name: rng.uniform(0.5, 4.0, IMATRIX_NE0).astype(np.float32) for name in IMATRIX_WEIGHTS}
    arrays = {k: v for n, x in values.items() for k, v in gguf_arrays(n, x * 7, [7]).items()}
    gguf = write_imatrix(folder / "imatrix.gguf", arrays)
    text = folder / "calib.txt"
    text.write_text(" ".join(f"word{i % 37} and word{i % 11}." for i in range(400)))
    calib = folder / "calibration.gguf"
    run_cli("calibrate", model, "--text", text, "-o", calib, "--ctx", "64", "--chunks", "4", "-q", check=True)
    return {
        "model.gguf": gguf_layout(model), "nvfp4.gguf": gguf_layout(quantized), "imatrix.gguf": gguf_layout(gguf),
        "imatrix.dat": dat_layout({n: (5, [float(v) for v in x * 5]) for n, x in values.items()}, (5, "calib.txt")),
        "calibration.gguf": gguf_layout(calib),
        "source": model, "gemma3": gemma,
    }


# --- mutations ---------------------------------------------------------------------------------

def _position(layout: Layout, rng: random.Random, in_header: bool) -> int:
    if in_header and rng.random() < 0.6:
        return rng.choice(layout.fields)
    start, end = rng.choice(layout.header if in_header or not layout.body else layout.body)
    return rng.randrange(start, end)


def mutations(layout: Layout, rng: random.Random) -> list[tuple]:
    """One to three mutations, each a tuple naming it and its arguments (printed on failure)."""
    ops = []
    for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1)):
        kind = rng.choices(("flip", "byte", "int", "truncate", "splice"), (3, 2, 4, 1, 1))[0]
        pos = _position(layout, rng, rng.random() < HEADER_SHARE)
        if kind == "flip":
            ops.append(("flip", pos, rng.randrange(8)))
        elif kind == "byte":
            ops.append(("byte", pos, rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))))
        elif kind == "int":
            width = rng.choice((4, 8))
            ops.append(("int", pos, width, rng.choice(EDGE_VALUES) & ((1 << 8 * width) - 1)))
        elif kind == "truncate":
            ops.append(("truncate", pos))
        else:
            length = rng.randrange(1, 64)
            ops.append(("splice", _position(layout, rng, rng.random() < HEADER_SHARE), pos, length))
    return ops


def apply(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)

    def put(pos: int, raw: bytes) -> None:
        raw = raw[:max(0, len(out) - pos)]
        out[pos:pos + len(raw)] = raw

    for op in ops:
        if op[0] == "flip":
            if op[1] < len(out):
                out[op[1]] ^= 1 << op[2]
        elif op[0] == "byte":
            put(op[1], bytes([op[2]]))
        elif op[0] == "int":
            put(op[1], op[3].to_bytes(op[2], "little"))
        elif op[0] == "truncate":
            del out[op[1]:]
        else:
            put(op[2], bytes(out[op[1]:op[1] + op[3]]))
    return bytes(out)


# --- targets -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    file: str  # which valid file is mutated
    args: tuple  # the command; "{file}", "{out}" and the valid files "{source}", "{gemma3}" are filled in
    writes: bool = False  # a success leaves out.gguf

    def argv(self, file: Path, layouts: dict, out: Path) -> list[str]:
        names = {"{file}": file, "{out}": out / "out.gguf", "{source}": layouts["source"],
                 "{gemma3}": layouts["gemma3"]}
        return [str(names.get(a, a)) for a in self.args]


TARGETS = (
    Target("inspect", "model.gguf", ("inspect", "{file}", "--meta", "--tensors", ".")),
    Target("inspect-json", "model.gguf", ("inspect", "{file}", "--json", "--meta", "--tensors", ".")),
    Target("inspect-verify", "model.gguf", ("inspect", "{file}", "--verify", "--json")),
    Target("inspect-verify-nvfp4", "nvfp4.gguf", ("inspect", "{file}", "--verify", "--json")),
    Target("inspect-against", "nvfp4.gguf", ("inspect", "{file}", "--against", "{gemma3}")),
    Target("quantize", "model.gguf", ("quantize", "{file}", "{out}", "-q", "--search", "2"), writes=True),
    Target("imatrix-gguf", "imatrix.gguf", ("quantize", "{source}", "{out}", "--imatrix", "{file}", "--dry-run", "--json")),
    Target("imatrix-dat", "imatrix.dat", ("quantize", "{source}", "{out}", "--imatrix", "{file}", "--dry-run")),
    Target("inspect-imatrix-gguf", "imatrix.gguf", ("inspect", "{file}", "--json", "--tensors", ".", "--meta")),
    Target("inspect-imatrix-dat", "imatrix.dat", ("inspect", "{file}", "--tensors", ".")),
    Target("calibration", "calibration.gguf", ("quantize", "{source}", "{out}", "--calibration", "{file}", "-q"),
           writes=True),
    Target("inspect-calibration", "calibration.gguf", ("inspect", "{file}", "--json", "--tensors", ".")),
)


def case(seed: int, layouts: dict) -> tuple[Target, list[tuple]]:
    """The target and mutations of a seed: the same on every machine."""
    target = TARGETS[seed % len(TARGETS)]
    return target, mutations(layouts[target.file], random.Random(f"nvfp4q-fuzz-{seed}"))


def problems(target: Target, result: dict) -> list[str]:
    """What is wrong with one case's outcome (empty: fine)."""
    code, err, files = result["code"], result["stderr"], result["files"]
    found = []
    if code not in (0, 1, 2):
        found.append(f"exit code {code}")
    if "Traceback" in err or "Warning" in err:
        found.append("traceback or warning text on stderr")
    lines = err.splitlines()
    verify_found = "--verify" in target.args and code == 1 and not lines and _verify_problems(result["stdout"])
    if code != 0 and not verify_found:  # inspect --verify reports what it found on stdout, exit 1
        if len(lines) != 1 or not lines[0].startswith("nvfp4q: error: "):
            found.append("stderr is not one `nvfp4q: error:` line")
        if files:
            found.append(f"left in the output folder: {files}")
    elif code == 0:
        if any(not line.startswith("nvfp4q: ") or line.startswith("nvfp4q: error") for line in lines):
            found.append("unexpected stderr on success")
        if files != (["out.gguf"] if target.writes else []):
            found.append(f"output folder holds {files}")
    return found


def _verify_problems(stdout: str) -> bool:
    try:
        return bool(json.loads(stdout)["verify"]["problems"])
    except (ValueError, KeyError, TypeError):
        return False


# --- the worker --------------------------------------------------------------------------------

def _noisy() -> None:
    """For the harness check: a numpy warning, then an uncaught exception, as a bug would give."""
    np.float32(3e38) * np.float32(10)
    raise ValueError("boom")


def run_in_process(entry, argv: list[str], out, err) -> int:
    """entry() as `nvfp4q ARGV` would run it: its exit code; its fds 1 and 2 go to out and err."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.argv = ["nvfp4q", *argv]
    try:
        with warnings.catch_warnings():  # resets "once per location": every case warns afresh
            entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return code


def worker() -> None:
    """Cases as JSON lines on stdin {"argv", "out_dir", "entry"}; one JSON line back per case."""
    import importlib
    import resource

    # a runaway allocation fails (MemoryError, a reported traceback) instead of swapping the machine
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    answers = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        module, _, name = request.get("entry", "nvfp4q.cli:main").partition(":")
        entry = getattr(importlib.import_module(module), name)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = run_in_process(entry, request["argv"], out, err)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        files = sorted(os.listdir(request["out_dir"]))
        answers.write(json.dumps({"code": code, "stdout": stdout, "stderr": stderr, "files": files}) + "\n")
        answers.flush()


class Worker:
    """The worker process; a case that times out or kills it is reported and the worker restarted."""

    def __init__(self, log: Path):
        self.log, self.proc = log, None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env)

    def run(self, argv: list[str], out_dir: Path, timeout: float, entry: str = "nvfp4q.cli:main") -> dict:
        if self.proc is None:
            self._start()
        request = {"argv": argv, "out_dir": str(out_dir), "entry": entry}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if line:
            return json.loads(line)
        self.close()
        return {"code": f"none: {'worker died' if ready else f'no answer in {timeout:.0f} s'}",
                "stdout": "", "stderr": "", "files": sorted(os.listdir(out_dir))}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker_proc(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.close()


def run_case(w: Worker, target: Target, data: bytes, layouts: dict, work: Path, timeout=CASE_TIMEOUT) -> dict:
    """Write the damaged file, run the target on it, empty the output folder again."""
    file, out = work / target.file, work / "out"
    out.mkdir(exist_ok=True)
    file.write_bytes(data)
    result = w.run(target.argv(file, layouts, out), out, timeout)
    for p in out.iterdir():
        p.unlink()
    return result


def report(failures: list[tuple]) -> str:
    lines = [f"{len(failures)} failing case(s):"]
    for seed, target, ops, found, result in failures[:20]:
        lines.append(f"  seed {seed} {target.name}: {'; '.join(found)}; exit {result['code']}; mutations {ops}")
        lines += [f"    | {line}" for line in result["stderr"].splitlines()[-6:]]
    seeds = ",".join(str(f[0]) for f in failures if isinstance(f[0], int))
    lines.append(f"replay: NVFP4Q_FUZZ_SEEDS={seeds} python -m pytest -q tests/test_fuzz.py -k cases")
    return "\n".join(lines)


# --- tests -------------------------------------------------------------------------------------

def test_valid_files_pass_every_target(worker_proc, layouts, tmp_path):
    """Unmutated, every target succeeds; this is also the warm-up (Numba's compile) of the worker."""
    for target in TARGETS:
        result = run_case(worker_proc, target, layouts[target.file].data, layouts, tmp_path, WARM_UP_TIMEOUT)
        assert result["code"] == 0 and problems(target, result) == [], (target.name, result)


def test_worker_sees_what_a_process_shows(worker_proc, tmp_path):
    """A warning and a traceback reach the worker's report as they reach a real process's stderr,
    twice in a row (a warning shown once per location would hide the second); a clean error stays
    clean."""
    code = "import sys; sys.path[:0] = ['tests', '.']; import test_fuzz; test_fuzz._noisy()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "RuntimeWarning" in proc.stderr and "Traceback" in proc.stderr
    noisy = Target("noisy", "model.gguf", ())
    for _ in range(2):
        result = worker_proc.run([], tmp_path, WARM_UP_TIMEOUT, entry="test_fuzz:_noisy")
        assert result["code"] == proc.returncode
        assert "RuntimeWarning" in result["stderr"] and "Traceback" in result["stderr"]
        assert "traceback or warning text on stderr" in problems(noisy, result)
    result = worker_proc.run(["inspect", str(tmp_path / "missing.gguf")], tmp_path, WARM_UP_TIMEOUT)
    proc = subprocess.run([sys.executable, "-m", "nvfp4q", "inspect", str(tmp_path / "missing.gguf")],
                          capture_output=True, text=True, cwd=ROOT)
    assert (result["code"], result["stderr"]) == (proc.returncode, proc.stderr) and proc.returncode == 2
    assert problems(Target("inspect", "model.gguf", ()), result) == []


def seeds() -> list[int]:
    chosen = os.environ.get("NVFP4Q_FUZZ_SEEDS")
    return [int(s) for s in chosen.split(",")] if chosen else list(range(CASES))


def test_cases(worker_proc, layouts, tmp_path):
    started = time.monotonic()
    failures = []
    for seed in seeds():
        target, ops = case(seed, layouts)
        result = run_case(worker_proc, target, apply(layouts[target.file].data, ops), layouts, tmp_path)
        found = problems(target, result)
        if found:
            failures.append((seed, target, ops, found, result))
    print(f"{len(seeds())} fuzz cases in {time.monotonic() - started:.1f} s, {len(failures)} failing")
    assert not failures, report(failures)


# --- regressions: what the fuzzer found, rebuilt by meaning rather than by seed ------------------

INFO_PARTS = {"name": 1, "n_dims": 2, "dims": 3, "type": 4, "offset": 5}  # of a tensor info in gguf's reader


def where(path: Path, name: str, part: str | int) -> int:
    """Offset of part of a tensor info (a name in INFO_PARTS), of a tensor's "data", or of part
    `part` (an index) of a key/value (key length, key, value type, then the value's parts)."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    if part == "data":
        return int(tensors[name].data_offset)
    parts = tensors[name].field.parts[INFO_PARTS[part]] if name in tensors else r.fields[name].parts[part]
    return parts.ctypes.data - r.data.ctypes.data


Q, K = "blk.0.attn_q.weight", "blk.0.attn_k.weight"  # names of equal length
F32_INF = 0x7F800000  # float32 infinity
TYPE_Q8_1 = 9  # a type gguf has no dequantizer for
REGRESSIONS = [  # target, file, mutations, exit code now, id
    # a zero dimension: quantize divided by ne0 (ZeroDivisionError), or by ne1 when ne0 was intact
    ("quantize", "model.gguf", lambda at: [("int", at(Q, "dims"), 8, 0)], 1, "zero-ne0"),
    ("quantize", "model.gguf", lambda at: [("int", at(Q, "dims") + 8, 8, 0)], 1, "zero-ne1"),
    # two tensors of one name: gguf's writer raised ValueError (found reviewing the parser, not by the fuzzer)
    ("quantize", "model.gguf", lambda at: [("splice", at(Q, "name"), at(K, "name"), len(K))], 1, "duplicate-name"),
    # a newline in a name, then an error naming it: two lines on stderr
    ("inspect", "model.gguf", lambda at: [("byte", at(Q, "name") + 5, 0x0A), ("int", at(Q, "n_dims"), 4, 5)],
     2, "newline-in-name"),
    # a type gguf cannot dequantize: NotImplementedError from inspect --verify (now a problem, exit 1)
    ("inspect-verify-nvfp4", "nvfp4.gguf", lambda at: [("int", at("token_embd.weight", "type"), 4, TYPE_Q8_1)],
     1, "verify-q8_1"),
    # a recorded rescaling factor 0: inspect --against divided by it (ZeroDivisionError; found in review)
    ("inspect-against", "nvfp4.gguf", lambda at: [("int", at("nvfp4q.rescale_factors", 5), 4, 0)], 2, "factor-0"),
    # imatrix in_sum2 with ne0 0: numpy's reshape raised ValueError
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".in_sum2", "dims"), 8, 0)], 1, "zero-ne0-imatrix"),
    # a count of 1.4e-45: numpy printed "RuntimeWarning: overflow encountered in divide" before the error
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".counts", "data"), 4, 1)], 1, "count-overflow"),
    # inf / inf: "RuntimeWarning: invalid value encountered in divide"
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".counts", "data"), 4, F32_INF),
                                                 ("int", at(Q + ".in_sum2", "data"), 4, F32_INF)], 1, "inf-over-inf"),
    # gguf's reader, used for imatrix files until then: a string value turned array (type 8 -> 9) made
    # it allocate gigabytes and hang; bad UTF-8 raised UnicodeDecodeError; a data offset near 2^64
    # printed "RuntimeWarning: overflow encountered in scalar add"; and in its replacement, a
    # tensor of 0 dimensions (no size) gave a TypeError
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("flip", at("general.type", 2), 0)], 1, "string-to-array"),
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("byte", at("imatrix.datasets", 6), 0xFF)], 0, "dataset-bad-utf8"),
    ("inspect-imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".in_sum2", "offset"), 8, 2**64 - 1)],
     2, "data-offset-2^64"),
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".counts", "n_dims"), 8, 0)], 1, "counts-0-dims"),
    # counts stored as F16 (type id 1): llama.cpp reads them as F32; now refused (hardening, not a crash)
    ("imatrix-gguf", "imatrix.gguf", lambda at: [("int", at(Q + ".counts", "type"), 4, 1)], 1, "counts-not-f32"),
]


@pytest.mark.parametrize("target_name, file, build, code", [pytest.param(*r[:4], id=r[4]) for r in REGRESSIONS])
def test_regressions(worker_proc, layouts, tmp_path, target_name, file, build, code):
    target = next(t for t in TARGETS if t.name == target_name)
    ops = build(lambda name, part: where(layouts[file].path, name, part))
    result = run_case(worker_proc, target, apply(layouts[file].data, ops), layouts, tmp_path)
    assert problems(target, result) == [], (ops, result)
    assert result["code"] == code, result


def test_signalling_nan_in_against_and_verify(tmp_path):
    """An F16 signalling NaN (0x7C01, from damaged bytes read as F16): `inspect --against` printed
    "RuntimeWarning: invalid value encountered in subtract"; now its error is null, silently."""
    from helpers import run_cli
    from test_quantize_cli import write_model

    half = np.ones((2, 64), np.float16)
    half.view(np.uint16)[1, 3] = 0x7C01
    damaged = write_model(tmp_path / "f16.gguf", {Q: half})
    source = write_model(tmp_path / "f32.gguf", {Q: np.ones((2, 64), np.float32)})
    proc = run_cli("inspect", damaged, "--against", source, "--verify", "--json")
    assert proc.returncode == 1 and proc.stderr == ""  # 1: --verify's finding
    doc = json.loads(proc.stdout)
    assert doc["verify"]["problems"] == [{"tensor": Q, "problem": "1 non-finite value(s), the first at row 1, column 3"}]
    assert doc["against"]["tensors"][0]["rel_rmse"] is None


def test_mutations_are_deterministic_and_mostly_in_the_header(layouts):
    """The same seed gives the same case; about 80% of the positions fall in the header."""
    assert [case(s, layouts)[1] for s in range(50)] == [case(s, layouts)[1] for s in range(50)]
    inside = total = 0
    for seed in range(2000):
        target, ops = case(seed, layouts)
        header = layouts[target.file].header
        for op in ops:
            pos = op[2] if op[0] == "splice" else op[1]
            inside += any(a <= pos < b for a, b in header)
            total += 1
    assert 0.75 < inside / total < 0.9, inside / total


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker()
