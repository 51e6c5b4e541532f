"""Calibration chunks written by the model itself (calibrate --generate).

A covariance only knows the text it was collected on: one from legal prose rounds code poorly
(docs/calibration.md). The model's own samples cover what it was trained on, code included,
without any data: each chunk starts from BOS and one token drawn uniformly from the vocabulary's
printable normal tokens (the start is what makes the chunks differ in kind, not only in wording),
then the model samples at temperature 1 until the chunk is full. An end-of-generation token is
replaced by a fresh random start, so every chunk holds ctx tokens as a text chunk does.

Many chunks are written at once (one llama.cpp sequence each) and the sampling is done here
from the logits with a seeded generator, so the same seed gives the same chunks.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from numba import njit

from nvfp4q import evaluation

SEQUENCES = 32  # chunks written side by side: on SmolLM2-135M 4.4x the chunks per second of one at a time
DATASET = "written by the model (nvfp4q calibrate --generate)"  # its name in imatrix.datasets


def starts(runner: evaluation.Runner) -> np.ndarray:
    """Tokens a chunk may start from: normal (not control, byte or unused) and printable."""
    lib, llm = runner.lib, runner.llm
    return np.array([t for t in range(runner.n_vocab)
                     if lib.llama_vocab_get_attr(runner.vocab, t) == lib.LLAMA_TOKEN_ATTR_NORMAL
                     and llm.detokenize([t]).decode("utf-8", "ignore").strip()], np.int32)


def draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token per row of logits at temperature 1, by inverting the CDF at u (in [0, 1)).
    With a 262k vocabulary this took a third of the writing time in NumPy alone; the exp stays
    NumPy's (its own SIMD code, whose bits Numba's libm calls do not always match), so that a seed
    writes the same chunks as before."""
    p = np.empty(logits.shape, np.float64)
    _shift(np.ascontiguousarray(logits, np.float32), p)
    np.exp(p, out=p)
    picks = np.empty(len(logits), np.int64)
    _invert(p, np.asarray(u, np.float64), picks)
    return picks


@njit(cache=True)
def _shift(logits, p):
    """p = logits - their row's max, in float64."""
    for r in range(logits.shape[0]):
        top = np.float64(logits[r].max())
        for j in range(logits.shape[1]):
            p[r, j] = np.float64(logits[r, j]) - top


@njit(cache=True)
def _invert(p, u, picks):
    """Per row, the CDF (p summed in token order, in place) and the first token whose CDF exceeds
    u times the total (so that u = 0 never draws a token of probability 0). One thread:
    llama.cpp's threads are still polling when the logits come back, and two were no faster."""
    n = p.shape[1]
    for r in range(p.shape[0]):
        for j in range(1, n):
            p[r, j] += p[r, j - 1]
        picks[r] = min(np.searchsorted(p[r], u[r] * p[r, n - 1], side="right"), n - 1)


def write(model: Path, n_chunks: int, ctx: int, threads: int, seed: int = 0,
          on_chunk: Callable[..., None] = lambda done, total, tokens, note="": None) -> list[list[int]]:
    """n_chunks lists of ctx tokens each (BOS first where the model adds one)."""
    runner = evaluation.Runner(model, ctx, threads, sequences=SEQUENCES)
    try:
        rng = np.random.default_rng(seed)
        first = starts(runner)

        def start() -> int:
            return int(first[rng.integers(len(first))])

        head = [runner.llm.token_bos()] if runner.add_bos else []
        chunks: list[list[int]] = []
        while len(chunks) < n_chunks:
            m = min(SEQUENCES, n_chunks - len(chunks))
            seqs = [head + [start()] for _ in range(m)]
            runner.clear()
            runner.submit([(tok, i, k, i == len(s) - 1) for k, s in enumerate(seqs) for i, tok in enumerate(s)])
            while True:
                for s, tok in zip(seqs, draw(runner.outputs(m), rng.random(m))):
                    eog = runner.lib.llama_vocab_is_eog(runner.vocab, int(tok))
                    s.append(start() if eog else int(tok))
                if len(seqs[0]) == ctx:
                    break
                runner.submit([(s[-1], len(s) - 1, k, True) for k, s in enumerate(seqs)])
            chunks += seqs
            on_chunk(len(chunks), n_chunks, len(chunks) * ctx, "written by the model")
    finally:
        runner.close()
    return chunks
