"""nvfp4q calibrate: the second moments of every weight's input, collected inside stock llama.cpp.

As llama-imatrix does: the text is tokenized with the model's BOS, cut into chunks of ctx tokens
whose first token becomes BOS, each run from an empty context; the scheduler's eval callback
hands over the input of every matrix multiplication with a `blk.*` weight. Where llama-imatrix
keeps the sum of x^2 per column, this keeps the whole sum of x x^T (calibration.py), once per
distinct input: q/k/v and gate/up read the same tensor, so it is multiplied once and shared.
An input wider than the rounding would use whole keeps a low-rank sketch of it instead.
"""

import ctypes
import os
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from nvfp4q import calibration, evaluation, gguf_io, rounding, synthetic
from nvfp4q.calibration import Moments, Sketch
from nvfp4q.errors import UserError
from nvfp4q.matmul import matmul
from nvfp4q.plan import Options, nvfp4_weights
from nvfp4q.quantize import check_paths, model_plan
from nvfp4q.units import human_bytes

MIN_ROWS = 16  # llama-imatrix skips smaller batches (its `ask` test)
DEFAULT_BAND = 4096
DEFAULT_SKETCH = 256  # four times the rounding's default rank: as good as the exact directions (docs)
# wider inputs take the low-rank rounding at the default --rank, which needs no more than a sketch
SKETCH_ABOVE = rounding.WIDTH_PER_RANK * rounding.RANK
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


# The final norm, after every layer (llama.cpp's model graphs name it so): returning false when
# it is computed ends the graph there, before the output head's [vocab x width] product over
# every position (for Gemma 3 270M more work than all its layers), which llama-imatrix computes
# for its perplexity and calibrate has no use for. Its logits are then never read.
LAST_NODE = b"result_norm"


class Collector:
    """The eval callback's state: moments per source weight, diagonals per expert weight.

    During a decode the callback only copies each wanted input out (ggml's worker threads spin
    between graph splits, so a matrix product here would fight them for the cores); flush()
    multiplies them out after the decode, with every core free. Of the weights reading one input
    only the first is asked for, so the graph splits once per distinct input.
    """

    def __init__(self, ggml: ctypes.CDLL, band: int, sketch: int, sketch_above: int):
        self.g, self.band, self.sketch, self.sketch_above = ggml, band, sketch, sketch_above
        self.ops: dict[int, str] = {}
        self.moments: dict[str, Moments | _Nystrom] = {}
        self.omegas: dict[int, np.ndarray] = {}  # the sketches' test matrices, one per width
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
        if t.name == LAST_NODE:
            return True
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
        if t.name == LAST_NODE:
            return False  # the rest of the graph is the output head's: no weight input of blk.* left
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
            if self.sketch and width > self.sketch_above:
                size = min(self.sketch, width)
                omega = self.omegas.get(width)
                if omega is None:
                    omega = self.omegas[width] = np.random.default_rng(0).standard_normal((width, size), np.float32)
                m = self.moments[name] = _Nystrom(x[1:], omega)
            else:
                band = width if width <= self.band else self.band
                n_blocks = -(-width // band)
                m = self.moments[name] = Moments(width, 0.0, np.zeros((n_blocks, band, band), np.float32),
                                                 _offband(x[1:], band))
            self.first[name] = np.zeros(width)
        self.first[name] += np.square(x[0], dtype=np.float64)
        if isinstance(m, _Nystrom):
            m.add(x[1:])
        else:
            band = m.band
            for b in range(m.blocks.shape[0]):
                xb = x[1:, b * band:(b + 1) * band]
                k = xb.shape[1]
                m.blocks[b, :k, :k] += matmul(xb.T, xb)
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


class _Nystrom:
    """A streaming Nystrom sketch of X^T X (Tropp, Yurtsever, Udell and Cevher, 2017): the sum over
    the chunks of Y = S X^T X S Omega, which F F^T = Y (Omega^T Y)^+ Y^T turns into the best
    low-rank part the sketch holds. S scales each column by its first chunk's root mean square,
    so that the sketch follows the correlations, as the rounding does, rather than the few columns
    with massive activations; the diagonal is kept exactly."""

    def __init__(self, x: np.ndarray, omega: np.ndarray):
        ms = np.mean(np.square(x, dtype=np.float64), axis=0)
        live = ms > 0
        ms[~live] = ms[live].mean() if live.any() else 1.0
        self.scale = (1.0 / np.sqrt(ms)).astype(np.float32)
        self.omega = omega
        self.y = np.zeros(omega.shape, np.float32)
        self.diag = np.zeros(omega.shape[0])
        self.count = 0.0

    def add(self, x: np.ndarray) -> None:
        xs = x * self.scale
        self.y += matmul(xs.T, matmul(xs, self.omega))
        self.diag += np.square(x, dtype=np.float64).sum(axis=0)

    def diagonal(self) -> np.ndarray:
        return self.diag

    def sketch(self) -> Sketch:
        """The file's form: F unscaled, and the share of the scaled trace F F^T leaves out."""
        f = _nystrom(self.y.astype(np.float64), self.omega.astype(np.float64))
        trace = float(np.sum(self.diag * self.scale.astype(np.float64) ** 2))
        outside = max(0.0, 1.0 - float(np.sum(f * f)) / trace) if trace > 0 else 0.0
        f /= self.scale[:, None]
        return Sketch(self.omega.shape[0], self.count, f.astype(np.float32), self.diag.astype(np.float32), outside)


def _nystrom(y: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """F with F F^T = Y (Omega^T Y)^+ Y^T, computed with a small shift nu that is taken off again
    (Tropp et al.'s stable form)."""
    nu = np.finfo(np.float32).eps * np.linalg.norm(y)
    y = y + nu * omega
    m = omega.T @ y
    lam, q = np.linalg.eigh((m + m.T) / 2)
    keep = lam > 1e-10 * max(lam[-1], 0.0)
    f = np.zeros_like(y)
    if keep.any():
        b = y @ (q[:, keep] / np.sqrt(lam[keep]))  # B B^T = Y (Omega^T Y)^+ Y^T
        # with B = U S V^T, F = U (S^2 - nu)^1/2 = B V (S^2 - nu)^1/2 / S: B^T B's eigenvectors suffice
        s2, v = np.linalg.eigh(b.T @ b)
        f[:, :s2.size] = (b @ v) * np.sqrt(np.maximum(s2 - nu, 0.0) / np.maximum(s2, np.finfo(np.float64).tiny))
    return f


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
    sketched: list[str] = field(default_factory=list)
    generated: int = 0
    generation_seconds: float = 0.0


def calibrate(model: Path, text_path: Path | None, out: Path, chunks: int | None = None, ctx: int = 512,
              band: int = DEFAULT_BAND, threads: int = 2, overwrite: bool = False,
              sketch: int = DEFAULT_SKETCH, sketch_above: int = SKETCH_ABOVE,
              on_chunk: Callable[..., None] = lambda done, total, tokens, note="": None,
              generate: int = 0, seed: int = 0) -> Summary:
    """generate: chunks the model writes itself (synthetic.py), taken after the text's."""
    if ctx < MIN_ROWS:
        raise UserError(f"--ctx {ctx}: use at least {MIN_ROWS}")
    if band < 64 or band % 64:
        raise UserError(f"--band {band}: use a multiple of 64 (NVFP4's block)")
    if text_path is None and not generate:
        raise UserError("give a calibration text (--text), chunks the model writes itself (--generate), or both")
    _check_out(model, out, overwrite)
    text = None if text_path is None else evaluation.read_text(text_path)
    evaluation.model_size(model)  # a missing, truncated or non-GGUF model gets our message, not llama.cpp's
    lib = evaluation.llama_cpp_module()
    collector = Collector(_ggml(os.path.dirname(lib.__file__)), band, sketch, sketch_above)
    callback = lib.ggml_backend_sched_eval_callback(collector)
    runner = evaluation.Runner(model, ctx, threads, cb_eval=callback)
    try:
        work = [] if text is None else runner.chunks(runner.tokenize(text), chunks, text_path)  # checked first
        began = time.perf_counter()
        written = synthetic.write(model, generate, ctx, threads, seed, on_chunk) if generate else []
        generating = time.perf_counter() - began
        work += written
        n_chunks = len(work)
        started = time.perf_counter()
        for c, chunk in enumerate(work):
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
    moments = {n: m.sketch() if isinstance(m, _Nystrom) else m for n, m in ms.items()}
    datasets = ([Path(text_path).name] if text_path else []) + ([f"{synthetic.DATASET}, seed {seed}"] if generate else [])
    factors = {src: partial(_factor, moments[src]) for src in _whole(model, collector.sources, moments)}
    path = calibration.write(out, moments, collector.sources, diag, datasets, n_chunks, ctx, band,
                             factors, (rounding.DAMP, rounding.SHRINK))
    return Summary(path, n_chunks, n_chunks * ctx, seconds, _bytes(collector), len(moments), len(diag),
                   [n for n, m in moments.items() if isinstance(m, Moments) and not m.whole],
                   [n for n, m in moments.items() if isinstance(m, Sketch)], len(written), generating)


def _whole(model: Path, sources: dict[str, str], moments: dict) -> list[str]:
    """The inputs that quantize's defaults round NVFP4 weights through with their whole covariance."""
    weights = nvfp4_weights(model_plan(gguf_io.open_model(model), Options()))
    low = rounding.model_low_rank(weights, sources, moments, rounding.RANK)
    return [src for src in sorted(rounding.nvfp4_inputs(weights, sources).keys() - low)
            if isinstance(moments[src], Moments)]


def _factor(m: Moments) -> np.ndarray:
    """The rounding's U for quantize's default --damp and --shrink, stored so that quantize need not
    make it (a third of `quantize --calibration`'s extra time on the development models)."""
    try:
        return rounding.factor(m)
    except ValueError as e:
        raise UserError(f"a covariance of the model's activations: {e}") from None


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
    held = [m.blocks for m in c.moments.values() if isinstance(m, Moments)]
    held += [a for m in c.moments.values() if isinstance(m, _Nystrom) for a in (m.y, m.diag)]
    return sum(a.nbytes for a in held + list(c.omegas.values())) + sum(d.sums.nbytes for d in c.diag.values())


def document(s: Summary) -> dict:
    """The JSON-ready summary."""
    return {"schema": SCHEMA, "output": str(s.out), "chunks": s.chunks, "generated_chunks": s.generated,
            "generation_seconds": s.generation_seconds,
            "tokens": s.tokens, "seconds": s.seconds,
            "tokens_per_second": s.tokens / s.seconds if s.seconds else None, "moment_bytes": s.accumulator_bytes,
            "inputs": s.sources, "weights": s.weights, "banded_inputs": s.banded, "sketched_inputs": s.sketched}


def render(doc: dict) -> None:
    print(f"{doc['output']}: {doc['inputs']} inputs' covariances for {doc['weights']} weights, "
          f"{doc['chunks']} chunks ({doc['tokens']} tokens"
          + (f", {doc['generated_chunks']} chunks written by the model" if doc["generated_chunks"] else "")
          + f") in {doc['seconds']:.1f} s, "
          f"{human_bytes(doc['moment_bytes'])} of moments"
          + (f", {len(doc['banded_inputs'])} banded" if doc["banded_inputs"] else "")
          + (f", {len(doc['sketched_inputs'])} sketched" if doc["sketched_inputs"] else ""))


def _check_out(model: Path, out: Path, overwrite: bool) -> None:
    check_paths([model] if model.exists() else [], [out], overwrite)
