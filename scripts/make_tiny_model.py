"""Write a tiny llama-architecture f16 GGUF that stock llama.cpp loads and runs.

Random weights, a small SentencePiece-style vocabulary with byte fallback, and widths
chosen so that both shape fallbacks occur: the FFN width is 32- but not 64-aligned
(ffn_down -> Q8_0), and heads * head_dim is not 32-aligned (attn_output -> F16).

    python scripts/make_tiny_model.py DIR [--embd 256 --layers 4 --vocab 512 --seed 0]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic_model import Shape, write  # noqa: E402


def make(path: Path, embd: int = 256, layers: int = 4, vocab_size: int = 512, seed: int = 0) -> Path:
    write(path, Shape("llama", embd, layers, 2 * embd + 32, vocab_size, heads=4, kv_heads=2, head_dim=36), seed)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    print(make(a.dir / "tiny-llama-f16.gguf", a.embd, a.layers, a.vocab, a.seed))


if __name__ == "__main__":
    main()
