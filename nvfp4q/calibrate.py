"""nvfp4q calibrate: the second moments of every weight's input, collected inside stock llama.cpp.

As llama-imatrix does: the text is tokenized with the model's BOS, cut into chunks of ctx tokens
whose first token becomes BOS, each run from an empty context; the scheduler's eval callback
hands over the input of every matrix multiplication with a `blk.*` weight. Where llama-imatrix
keeps the sum of x^2 per column, this keeps the whole sum of x x^T (calibration.py), once per
distinct input: q/k/v and gate/up read the same tensor, so it is multiplied once and shared.
"""

import ctypes
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nvfp4q import calibration, evaluation
from nvfp4q.calibration import Moments
from nvfp4q.errors import UserError
from nvfp4q.units import human_bytes

MIN_ROWS = 16  # llama-imatrix skips smaller batches (its `ask` test)
DEFAULT_BAND = 4096
SCHEMA = "nvfp4q.calibrate/1"
F32 = 0  # ggml_type id


class _Tensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), checked against ggml's own accessors on first use."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml(lib_dir: str) -> ctypes.CDLL:
    g = ctypes.CDLL(os.path.join(lib_dir, "lib", "libggml-base.so"))
    g.ggml_op_name.restype, g.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_nelements.restype, g.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    g.ggml_is_contiguous.restype, g.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return g


@dataclass
class _Diag:
    sums: np.ndarray  # float64 [n_mat, width]
    counts: np.ndarray  # float64 [n_mat]


class Collector:
    """The eval callback's state: moments per source weight, diagonals per expert weight.

    During a decode the callback only copies each wanted input out (ggml's worker threads spin
    between graph splits, so a matrix product here would fight them for the cores); flush()
    multiplies them out after the decode, with every core free. Of the weights reading one input
    only the first is asked for, so the graph splits once per distinct input.
    """

    def __init__(self, ggml: ctypes.CDLL, band: int):
        self.g, self.band = ggml, band
        self.ops: dict[int, str] = {}
        self.moments: dict[str, Moments] = {}
        self.sources: dict[str, str] = {}  # weight -> the weight whose moments it shares
        self.diag: dict[str, _Diag] = {}  # expert weights
        self.first: dict[str, np.ndarray] = {}  # per source: sum of x^2 over the chunks' first rows
        self.step: dict[int, str] = {}  # input tensor address -> source weight, within one decode
        self.pending: list[tuple[str, np.ndarray]] = []
        self.error: BaseException | None = None
        self.checked = False

    def __call__(self, ptr, ask, _user) -> bool:
        if self.error is not None:
            return False
        try:
            return self._ask(ptr) if ask else self._take(ptr)
        except BaseException as e:  # raised through ctypes it would be printed and lost
            self.error = e
            return False

    def _op(self, t: _Tensor) -> str | None:
        """MUL_MAT on a blk.* weight with at least MIN_ROWS F32 rows, or MUL_MAT_ID (any), as
        llama-imatrix asks."""
        op = self.ops.get(t.op)
        if op is None:
            op = self.ops[t.op] = self.g.ggml_op_name(t.op).decode()
        if op == "MUL_MAT_ID":
            return op
        if op != "MUL_MAT":
            return None
        x = _Tensor.from_address(t.src[1])
        if x.type != F32 or x.ne[1] * x.ne[2] * x.ne[3] < MIN_ROWS:
            return None
        return op if _Tensor.from_address(t.src[0]).name.startswith(b"blk.") else None

    def _ask(self, ptr) -> bool:
        t = _Tensor.from_address(ptr)
        op = self._op(t)
        if op != "MUL_MAT":
            return op is not None
        name = _Tensor.from_address(t.src[0]).name.decode(errors="replace")
        src = self.step.setdefault(t.src[1], name)
        if self.sources.setdefault(name, src) != src:
            raise UserError(f"{name} read the input of {src} here and of {self.sources[name]} before")
        return src == name

    def _take(self, ptr) -> bool:
        t = _Tensor.from_address(ptr)
        op = self._op(t)
        if op is None:
            return True
        w, x = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
        if not self.checked:
            self._check_layout(t.src[1], x)
        name = w.name.decode(errors="replace")
        if x.type != F32 or not self.g.ggml_is_contiguous(t.src[1]):
            raise UserError(f"the input of {name} is not contiguous F32: this llama.cpp build is not supported")
        rows = x.ne[1] * x.ne[2] * x.ne[3]
        data = self._fetch(t.src[1], (rows, x.ne[0]), np.float32)
        if op == "MUL_MAT_ID":
            ids_t = _Tensor.from_address(t.src[2])
            ids = self._fetch(t.src[2], (ids_t.ne[1], ids_t.ne[0]), np.int32)
            self._experts(name, w.ne[2], data.reshape(x.ne[2], x.ne[1], x.ne[0]), ids)
        elif self.step.get(t.src[1]) == name:
            self.pending.append((name, data))
        return True

    def _check_layout(self, ptr, x: _Tensor) -> None:
        if self.g.ggml_get_name(ptr) != x.name or self.g.ggml_nelements(ptr) != x.ne[0] * x.ne[1] * x.ne[2] * x.ne[3]:
            raise UserError("this llama.cpp's struct ggml_tensor is not the one nvfp4q knows (llama-cpp-python 0.3.36)")
        self.checked = True

    def _fetch(self, ptr, shape: tuple, dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        self.g.ggml_backend_tensor_get(ptr, out.ctypes.data, 0, out.nbytes)
        return out

    def flush(self) -> None:
        """After a decode: its inputs into the moments; the next decode starts afresh."""
        for name, x in self.pending:
            self._accumulate(name, x)
        self.pending, self.step = [], {}

    def _accumulate(self, name: str, x: np.ndarray) -> None:
        """x: one chunk's rows. Its first position (BOS: where attention sinks put activations up to
        10^5 times the others') goes into the diagonal only (docs/calibration.md)."""
        width = x.shape[1]
        m = self.moments.get(name)
        if m is None:
            band = width if width <= self.band else self.band
            n_blocks = -(-width // band)
            m = self.moments[name] = Moments(width, 0.0, np.zeros((n_blocks, band, band), np.float32),
                                             _offband(x[1:], band))
            self.first[name] = np.zeros(width)
        self.first[name] += np.square(x[0], dtype=np.float64)
        band = m.band
        for b in range(m.blocks.shape[0]):
            xb = x[1:, b * band:(b + 1) * band]
            k = xb.shape[1]
            m.blocks[b, :k, :k] += xb.T @ xb
        m.count += x.shape[0]

    def _experts(self, name: str, n_expert: int, x: np.ndarray, ids: np.ndarray) -> None:
        """x [tokens, slots (1 or n_used), width], ids [tokens, n_used]: each routed row to its expert."""
        d = self.diag.get(name)
        if d is None:
            d = self.diag[name] = _Diag(np.zeros((n_expert, x.shape[2])), np.zeros(n_expert))
        slots = np.arange(ids.shape[1]) % x.shape[1]
        rows = x[:, slots, :].reshape(-1, x.shape[2]).astype(np.float64)
        experts = ids.reshape(-1)
        if experts.size and (experts.min() < 0 or experts.max() >= n_expert):
            raise UserError(f"{name}: expert id out of range")
        np.add.at(d.sums, experts, rows * rows)
        d.counts += np.bincount(experts, minlength=n_expert)


def _offband(x: np.ndarray, band: int) -> float:
    """Share of ||X^T X||_F^2 outside the diagonal blocks, from these rows: ||X^T X||_F = ||X X^T||_F."""
    width = x.shape[1]
    if band >= width:
        return 0.0
    x64 = x.astype(np.float64)
    gram = x64 @ x64.T
    total = float(np.sum(gram * gram))
    inside = sum(float(np.sum((xb.T @ xb) ** 2)) for xb in (x64[:, i:i + band] for i in range(0, width, band)))
    return 1.0 - inside / total if total > 0 else 0.0


@dataclass
class Summary:
    out: Path
    chunks: int
    tokens: int
    seconds: float
    accumulator_bytes: int
    sources: int
    weights: int
    banded: list[str] = field(default_factory=list)


def calibrate(model: Path, text_path: Path, out: Path, chunks: int | None = None, ctx: int = 512,
              band: int = DEFAULT_BAND, threads: int = 2, overwrite: bool = False,
              on_chunk: Callable[..., None] = lambda done, total, tokens, note="": None) -> Summary:
    if ctx < MIN_ROWS:
        raise UserError(f"--ctx {ctx}: use at least {MIN_ROWS}")
    if band < 64 or band % 64:
        raise UserError(f"--band {band}: use a multiple of 64 (NVFP4's block)")
    _check_out(model, out, overwrite)
    try:
        text = Path(text_path).read_text(encoding="utf-8", errors="replace").removesuffix("\n")  # as llama-imatrix's -f
    except OSError as e:
        raise UserError(f"{text_path}: {e.strerror}") from None
    evaluation.model_size(model)  # a missing, truncated or non-GGUF model gets our message, not llama.cpp's
    lib = evaluation.llama_cpp_module()
    collector = Collector(_ggml(os.path.dirname(lib.__file__)), band)
    callback = lib.ggml_backend_sched_eval_callback(collector)
    runner = evaluation.Runner(model, ctx, threads, cb_eval=callback)
    try:
        tokens = runner.tokenize(text, add_bos=runner.add_bos)
        available = len(tokens) // ctx
        n_chunks = available if chunks is None else min(chunks, available)
        if n_chunks < 1:
            raise UserError(f"{text_path}: {len(tokens)} tokens, too short for one chunk of {ctx}")
        started = time.perf_counter()
        for c in range(n_chunks):
            chunk = runner.chunk(tokens[c * ctx:(c + 1) * ctx])
            try:
                with _signals_held():
                    runner.decode(chunk, 0, len(chunk))  # every position, as llama-imatrix: no row is pruned
            except UserError:
                if collector.error is None:
                    raise
            if collector.error is not None:  # raised in the callback (Ctrl-C too): the decode may have gone on
                raise collector.error from None
            collector.flush()
            on_chunk(c + 1, n_chunks, (c + 1) * ctx, f"{human_bytes(_bytes(collector))} of moments")
        seconds = time.perf_counter() - started
    finally:
        runner.close()
    if not collector.moments and not collector.diag:
        raise UserError(f"{model}: no matrix multiplication with a blk.* weight was seen")
    ms = collector.moments
    diag = {n: ((ms[s].diagonal() + collector.first[s])[None], np.float32([ms[s].count]))
            for n, s in collector.sources.items()}
    diag |= {n: (d.sums.astype(np.float32), d.counts.astype(np.float32)) for n, d in collector.diag.items()}
    path = calibration.write(out, collector.moments, collector.sources, diag, Path(text_path).name,
                             n_chunks, ctx, band)
    return Summary(path, n_chunks, n_chunks * ctx, seconds, _bytes(collector), len(collector.moments),
                   len(diag), [n for n, m in collector.moments.items() if not m.whole])


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM held while llama.cpp runs, then handed to the handler they would have met.

    A handler that raises (the CLI's Ctrl-C) would raise inside our eval callback, where ctypes
    prints the exception and drops it, and the run would go on; held, it raises between chunks.
    """
    held = []
    signums = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s in signums:
            signal.signal(s, before[s])
    if held:
        handler = before[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(held[0])


def _bytes(c: Collector) -> int:
    return sum(m.blocks.nbytes for m in c.moments.values()) + sum(d.sums.nbytes for d in c.diag.values())


def document(s: Summary) -> dict:
    """The JSON-ready summary."""
    return {"schema": SCHEMA, "output": str(s.out), "chunks": s.chunks, "tokens": s.tokens, "seconds": s.seconds,
            "tokens_per_second": s.tokens / s.seconds if s.seconds else None, "moment_bytes": s.accumulator_bytes,
            "inputs": s.sources, "weights": s.weights, "banded_inputs": s.banded}


def render(doc: dict) -> None:
    print(f"{doc['output']}: {doc['inputs']} inputs' covariances for {doc['weights']} weights, "
          f"{doc['chunks']} chunks ({doc['tokens']} tokens) in {doc['seconds']:.1f} s, "
          f"{human_bytes(doc['moment_bytes'])} of moments"
          + (f", {len(doc['banded_inputs'])} banded" if doc["banded_inputs"] else ""))


def _check_out(model: Path, out: Path, overwrite: bool) -> None:
    from nvfp4q.quantize import check_paths

    check_paths([model] if model.exists() else [], [out], overwrite)
