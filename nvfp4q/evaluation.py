"""nvfp4q eval: how far quantized GGUFs are from their base model, run by stock llama.cpp.

As llama-perplexity --kl-divergence: the text (read as its `-f` reads it) is tokenized with BOS
where the model adds one, cut into chunks of ctx tokens, each evaluated from an empty context
with the first token replaced by that BOS, and the second half of each chunk is scored (every
scored token sees at least ctx/2 tokens). The base model's logits are computed once per chunk
and compared with each quantized model's at once, so no model's logits are ever stored beyond
the chunk at hand. llama.cpp computes logits only for the scored positions.
"""

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nvfp4q import divergence, gguf_header
from nvfp4q.divergence import Tokens
from nvfp4q.errors import UserError

SCHEMA = "nvfp4q.eval/1"
EXTRA_HINT = "nvfp4q eval needs llama-cpp-python 0.3.36 (stock llama.cpp): pip install 'nvfp4q[eval]'"


_silent_log = None  # the log callback installed, kept alive here


def llama_cpp_module():
    global _silent_log
    try:
        import llama_cpp
    except ImportError:
        raise UserError(EXTRA_HINT) from None
    if _silent_log is None:
        # llama.cpp's own log lines (warnings such as a context longer than the training one;
        # the binding's level table predates ggml's) would break the one-line error rule: what
        # goes wrong is reported by us
        _silent_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
    return llama_cpp


class Runner:
    """One GGUF loaded in stock llama.cpp, one context of ctx tokens.

    The context is made here, not by the binding, with flash attention on `auto`, as
    llama-perplexity and llama-imatrix make theirs (the binding's default is off, which gives
    other numbers than those tools and runs slower); with cb_eval (a
    ggml_backend_sched_eval_callback) it calls that for every graph node, as llama-imatrix's does.
    """

    def __init__(self, path: Path, ctx: int, threads: int, cb_eval=None, sequences: int = 1):
        self.lib = llama_cpp_module()
        rows = max(ctx, 2 * sequences)  # synthetic.write's first batch: BOS and a start per sequence
        try:
            self.llm = self.lib.Llama(model_path=str(path), n_ctx=ctx, n_batch=rows, n_ubatch=rows,
                                      n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{path}: llama.cpp cannot load it ({e})") from None
        self.path, self.chunk_size = path, ctx
        self.vocab = self.lib.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(self.lib.llama_vocab_get_add_bos(self.vocab))
        self.n_vocab = self.llm.n_vocab()
        self.batch = self.lib.llama_batch_init(rows, 0, 1)
        self.llm._ctx.close()  # the binding's own context: its compute buffers go before ours are made
        params = self.llm.context_params
        params.flash_attn_type = self.lib.LLAMA_FLASH_ATTN_TYPE_AUTO
        # one ctx-sized cache per sequence, each token attending to its own sequence only
        params.n_ctx, params.n_seq_max, params.kv_unified = ctx * sequences, sequences, False
        params.n_batch = params.n_ubatch = rows  # the binding caps them at its n_ctx
        if cb_eval is not None:
            params.cb_eval, params.cb_eval_user_data = cb_eval, None
        self.ctx = self.lib.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            self.close()
            raise UserError(f"{path}: llama.cpp cannot make a context for it")

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        self.lib.llama_batch_free(self.batch)
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        """The text's tokens as llama-perplexity and llama-imatrix take them: BOS first where the
        model adds one, so chunk c holds the text's tokens from c * ctx - 1 on (its BOS aside)."""
        return self.llm.tokenize(text.encode(), add_bos=self.add_bos, special=False)

    def chunks(self, tokens: list[int], limit: int | None, source: Path) -> list[list[int]]:
        """The first `limit` (None: all) whole chunks of ctx tokens as llama-perplexity and
        llama-imatrix evaluate them: the first token replaced by BOS where the model wants one."""
        size = self.chunk_size
        n = len(tokens) // size if limit is None else min(limit, len(tokens) // size)
        if n < 1:
            raise UserError(f"{source}: {len(tokens)} tokens, too short for one chunk of {size}")
        head = [self.llm.token_bos()] if self.add_bos else []
        return [head + tokens[c * size + len(head):(c + 1) * size] for c in range(n)]

    def logits(self, tokens: list[int], first: int) -> np.ndarray:
        """float32 [len(tokens) - 1 - first, n_vocab]: the logits predicting tokens[first + 1:]."""
        self.decode(tokens, first)
        return self.outputs(len(tokens) - 1 - first)

    def outputs(self, rows: int) -> np.ndarray:
        """float32 [rows, n_vocab]: the last decode's logits, in the order of its rows that asked."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(rows * self.n_vocab,)) \
            .reshape(rows, self.n_vocab)

    def decode(self, tokens: list[int], first: int, stop: int | None = None) -> None:
        """Run the chunk from an empty context, logits for positions [first, stop) (len - 1)."""
        stop = len(tokens) - 1 if stop is None else stop
        self.clear()
        self.submit([(tok, i, 0, first <= i < stop) for i, tok in enumerate(tokens)])

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def submit(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of rows (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise UserError(f"{self.path}: llama_decode failed ({rc})")


@dataclass
class Result:
    base: Path
    quants: list[Path]
    text: Path
    ctx: int
    n_chunks: int
    base_nll: np.ndarray
    tokens: list[Tokens]  # per quant, in order (a file may be named twice)
    seconds: float
    sizes: dict[Path, dict] = field(default_factory=dict)


def model_size(path: Path) -> dict:
    """Read before any model is loaded: a missing, truncated or non-GGUF file gets our message."""
    headers = gguf_header.read_parts(path)
    nbytes = sum(h.file_size for h in headers)
    params = sum(t.n_elements for h in headers for t in h.tensors)
    return {"bytes": nbytes, "parameters": params, "bits_per_weight": 8 * nbytes / params if params else None}


def read_text(path: Path) -> str:
    """A text file as llama.cpp's tools read `-f`: one final newline taken off."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").removesuffix("\n")
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None


def _check_same_tokenizer(base: Runner, q: Runner, tokens: list[int], text: str) -> None:
    if q.n_vocab != base.n_vocab:
        raise UserError(f"{q.path}: vocabulary of {q.n_vocab} tokens, the base has {base.n_vocab}: not the same model")
    if q.tokenize(text) != tokens:
        raise UserError(f"{q.path}: tokenizes the text differently from the base: not the same model")


def evaluate(base: Path, quants: list[Path], text_path: Path, ctx: int = 512, chunks: int | None = None,
             threads: int = 2, on_chunk: Callable[[int, int, int], None] = lambda done, total, tokens: None) -> Result:
    """Per-token NLL, KLD and top-1 agreement of each quantized model against base."""
    if ctx < 8 or ctx % 2:
        raise UserError(f"--ctx {ctx}: use an even number of at least 8")
    text = read_text(text_path)
    sizes = {p: model_size(p) for p in [base, *quants]}
    runners = []
    try:
        runners.append(Runner(base, ctx, threads))
        ref = runners[0]
        tokens = ref.tokenize(text)
        work = ref.chunks(tokens, chunks, text_path)
        n_chunks = len(work)
        for q in quants:
            runners.append(Runner(q, ctx, threads))
            _check_same_tokenizer(ref, runners[-1], tokens, text)
        first = ctx // 2
        nll_b, per = [], [([], [], []) for _ in quants]
        started = time.perf_counter()
        for c, chunk in enumerate(work):
            targets = np.array(chunk[first + 1:])
            base_logits = ref.logits(chunk, first).copy()  # the next decode of ref reuses its buffer
            fb = divergence.softmax_facts(base_logits, targets)
            nll_b.append(fb.nll)
            for (nll, kld, top1), runner in zip(per, runners[1:]):
                logits = runner.logits(chunk, first)
                fq = divergence.softmax_facts(logits, targets)
                nll.append(fq.nll)
                kld.append(divergence.kld(base_logits, fb, logits, fq))
                top1.append(fq.argmax == fb.argmax)
            on_chunk(c + 1, n_chunks, (c + 1) * ctx)
        seconds = time.perf_counter() - started
    finally:
        for r in runners:
            r.close()
    return Result(base, list(quants), Path(text_path), ctx, n_chunks, np.concatenate(nll_b),
                  [Tokens(*(np.concatenate(a) for a in p)) for p in per], seconds, sizes=sizes)


def document(r: Result, paired: bool) -> dict:
    """The JSON-ready result (schema: docs/eval-json.md)."""
    doc = {
        "schema": SCHEMA,
        "base": {"path": str(r.base), **r.sizes[r.base], "ppl": divergence.ppl(r.base_nll)},
        "text": str(r.text), "ctx": r.ctx, "chunks": r.n_chunks, "scored_tokens": int(r.base_nll.size),
        "seconds": r.seconds,
        "models": [{"path": str(q), **r.sizes[q], **divergence.summarise(r.base_nll, t)}
                   for q, t in zip(r.quants, r.tokens)],
    }
    if paired:
        doc["paired"] = [{"a": str(r.quants[0]), "b": str(b), **divergence.paired(r.tokens[0], t, r.n_chunks)}
                         for b, t in zip(r.quants[1:], r.tokens[1:])]
    return doc
