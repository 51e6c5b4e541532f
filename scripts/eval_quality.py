"""Perplexity and KL divergence of quantized GGUFs against their f16 source, with stock llama.cpp.

    python scripts/eval_quality.py SOURCE-f16.gguf QUANT.gguf [QUANT2.gguf ...] [--text FILE] [--chunks 16]

Like llama-perplexity: the text is cut into chunks of --ctx tokens (512), each chunk is
evaluated from a fresh context, and only the second half of each chunk is scored (every
scored token has at least ctx/2 tokens of context). For each quantized model: perplexity,
mean KL(f16 || quant) over scored tokens, and the share of tokens whose top-1 prediction
equals the f16 model's. The default text is English prose and Python source found on any
machine with Python (the license text and stdlib modules), so the numbers are reproducible.
"""

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np


def default_text() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(lib / "LICENSE.txt").read_text(errors="replace")]  # prose: Python's history and license
    for name in ("textwrap.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py"):
        parts.append((lib / name).read_text(errors="replace"))
    return "\n\n".join(parts)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Model:
    def __init__(self, path: Path, ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                   verbose=False, n_threads=threads)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return log_softmax(np.array(self.llm.scores[: len(tokens)], dtype=np.float64))


def evaluate(source: Path, quants: list[Path], text: str, ctx: int, chunks: int, threads: int) -> dict:
    ref = Model(source, ctx, threads)
    bos = ref.llm.token_bos()
    tokens = ref.tokenize(text)
    n_chunks = min(chunks, len(tokens) // (ctx - 1))
    if n_chunks == 0:
        raise SystemExit(f"text too short: {len(tokens)} tokens for one chunk of {ctx}")
    models = {q: Model(q, ctx, threads) for q in quants}
    stats = {p: {"nll": [], "kld": [], "top1": []} for p in [source, *quants]}
    first = ctx // 2
    for c in range(n_chunks):
        chunk = [bos] + tokens[c * (ctx - 1):(c + 1) * (ctx - 1)]
        target = np.array(chunk[first + 1:])
        base = ref.logprobs(chunk)[first:-1]
        stats[source]["nll"].append(-base[np.arange(len(target)), target])
        for q, m in models.items():
            lp = m.logprobs(chunk)[first:-1]
            stats[q]["nll"].append(-lp[np.arange(len(target)), target])
            stats[q]["kld"].append((np.exp(base) * (base - lp)).sum(axis=1))
            stats[q]["top1"].append(base.argmax(axis=1) == lp.argmax(axis=1))
        print(f"chunk {c + 1}/{n_chunks}", file=sys.stderr, flush=True)
    result = {}
    for p, s in stats.items():
        nll = np.concatenate(s["nll"])
        row = {"ppl": float(np.exp(nll.mean())), "tokens": int(nll.size)}
        if s["kld"]:
            kld = np.concatenate(s["kld"])
            row |= {"kld_mean": float(kld.mean()), "kld_p99": float(np.percentile(kld, 99)),
                    "same_top1": float(np.concatenate(s["top1"]).mean())}
        result[str(p)] = row
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("quants", type=Path, nargs="+")
    ap.add_argument("--text", type=Path, help="text file (default: Python's license and stdlib sources)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    text = a.text.read_text(errors="replace") if a.text else default_text()
    result = evaluate(a.source, a.quants, text, a.ctx, a.chunks, a.threads)
    print(f"{'model':50} {'PPL':>9} {'mean KLD':>9} {'KLD p99':>8} {'same top1':>9}")
    for name, r in result.items():
        kld = f"{r['kld_mean']:9.4f} {r['kld_p99']:8.3f} {r['same_top1']:9.3f}" if "kld_mean" in r else ""
        print(f"{Path(name).name:50} {r['ppl']:9.3f} {kld}")


if __name__ == "__main__":
    main()
