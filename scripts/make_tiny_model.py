"""Write a tiny llama-architecture f16 GGUF that stock llama.cpp loads and runs.

Random weights, a small SentencePiece-style vocabulary with byte fallback, and
widths chosen so that both shape fallbacks occur: the FFN width is 32- but not
64-aligned (ffn_down -> Q8_0), and heads * head_dim is not 32-aligned
(attn_output -> F16).

    python scripts/make_tiny_model.py DIR [--embd 256 --layers 4 --vocab 512 --seed 0]
"""

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be "
         "this had not or have one their has but they all its also new first two who been after "
         "time more other when there into would over she about some only most can may people").split()


def vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    pieces = ["\u2581" + w for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
    i = 0
    while len(tokens) < size:
        tokens.append(pieces[i] if i < len(pieces) else f"\u2581w{i}")
        types.append(TokenType.NORMAL)
        i += 1
    scores = [0.0] * 259 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens, scores, [int(t) for t in types]


def make(path: Path, embd: int = 256, layers: int = 4, vocab_size: int = 512, seed: int = 0,
         heads: int = 4, kv_heads: int = 2, head_dim: int = 36) -> Path:
    rng = np.random.default_rng(seed)
    n_ff = 2 * embd + 32
    w = GGUFWriter(path, "llama")
    w.add_name("nvfp4q tiny llama")
    w.add_context_length(256)
    w.add_embedding_length(embd)
    w.add_block_count(layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # MOSTLY_F16
    tokens, scores, types = vocab(vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def weight(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        # heavy-ish tails and per-row scales, like trained weights
        x = rng.standard_t(6, (rows, cols)) * rng.uniform(0.5, 1.5, (rows, 1))
        return (x * scale / np.sqrt(cols)).astype(np.float16)

    w.add_tensor("token_embd.weight", weight(vocab_size, embd, 8.0))
    for i in range(layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(embd, np.float32))
        w.add_tensor(b + "attn_q.weight", weight(heads * head_dim, embd))
        w.add_tensor(b + "attn_k.weight", weight(kv_heads * head_dim, embd))
        w.add_tensor(b + "attn_v.weight", weight(kv_heads * head_dim, embd))
        w.add_tensor(b + "attn_output.weight", weight(embd, heads * head_dim))
        w.add_tensor(b + "ffn_norm.weight", np.ones(embd, np.float32))
        w.add_tensor(b + "ffn_gate.weight", weight(n_ff, embd))
        w.add_tensor(b + "ffn_up.weight", weight(n_ff, embd))
        w.add_tensor(b + "ffn_down.weight", weight(embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(embd, np.float32))
    w.add_tensor("output.weight", weight(vocab_size, embd, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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
