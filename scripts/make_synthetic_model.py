"""Write a synthetic f16 GGUF with a real model's tensor shapes and metadata, streamed to disk.

Dense llama-like or Qwen3-MoE-like (3D expert tensors), weights with realistic statistics
(per-row scales, a few outliers), a small valid tokenizer, optionally split into parts the way
llama.cpp names them. Tests use tiny ones; benchmarks use large ones.

    python scripts/make_synthetic_model.py OUT.gguf --preset llama-1b
    python scripts/make_synthetic_model.py OUT.gguf --preset qwen3moe-8g --split-max-size 2G
"""

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be "
         "this had not or have one their has but they all its also new first two who been after "
         "time more other when there into would over she about some only most can may people").split()


@dataclass(frozen=True)
class Shape:
    arch: str = "llama"
    embd: int = 256
    layers: int = 4
    ff: int = 544
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 36
    experts: int = 0  # > 0: qwen3moe-style 3D expert tensors
    experts_used: int = 2
    expert_ff: int = 0


PRESETS = {
    # tensor shapes of Llama 3.2 1B (about 2.5 GB in f16)
    "llama-1b": Shape("llama", 2048, 16, 8192, 128256, 32, 8, 64),
    # Qwen3-MoE-like, about 8 GB in f16
    "qwen3moe-8g": Shape("qwen3moe", 2048, 12, 6144, 151936, 32, 4, 128, experts=64, experts_used=8,
                         expert_ff=768),
    "tiny-llama": Shape(),
    "tiny-moe": Shape("qwen3moe", 128, 2, 256, 320, 4, 2, 32, experts=4, experts_used=2, expert_ff=128),
}


def vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary with byte fallback that llama.cpp's tokenizer accepts."""
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


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, ggml shape with ne0 first, scale) in llama.cpp's order; scale 0 means a norm (ones)."""
    out = [("token_embd.weight", (s.embd, s.vocab), 8.0)]
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for i in range(s.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (s.embd,), 0), (b + "attn_q.weight", (s.embd, q), 1.0),
                (b + "attn_k.weight", (s.embd, kv), 1.0), (b + "attn_v.weight", (s.embd, kv), 1.0),
                (b + "attn_output.weight", (q, s.embd), 1.0), (b + "ffn_norm.weight", (s.embd,), 0)]
        if s.experts:
            out += [(b + "attn_q_norm.weight", (s.head_dim,), 0), (b + "attn_k_norm.weight", (s.head_dim,), 0),
                    (b + "ffn_gate_inp.weight", (s.embd, s.experts), 1.0),
                    (b + "ffn_gate_exps.weight", (s.embd, s.expert_ff, s.experts), 1.0),
                    (b + "ffn_up_exps.weight", (s.embd, s.expert_ff, s.experts), 1.0),
                    (b + "ffn_down_exps.weight", (s.expert_ff, s.embd, s.experts), 1.0)]
        else:
            out += [(b + "ffn_gate.weight", (s.embd, s.ff), 1.0), (b + "ffn_up.weight", (s.embd, s.ff), 1.0),
                    (b + "ffn_down.weight", (s.ff, s.embd), 1.0)]
    return out + [("output_norm.weight", (s.embd,), 0), ("output.weight", (s.embd, s.vocab), 4.0)]


def _metadata(w: GGUFWriter, s: Shape) -> None:
    w.add_name(f"nvfp4q synthetic {s.arch}")
    w.add_context_length(256)
    w.add_embedding_length(s.embd)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ff)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # MOSTLY_F16
    if s.experts:
        w.add_expert_count(s.experts)
        w.add_expert_used_count(s.experts_used)
        w.add_expert_feed_forward_length(s.expert_ff)
    tokens, scores, types = vocab(s.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """f16 weights, numpy order; per-row scales and rare 8x outliers, like trained weights."""
    ne0 = shape[0]
    rows = int(np.prod(shape[1:]))
    out = np.empty((rows, ne0), np.float16)
    step = max(1, (16 << 20) // ne0)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng.standard_normal((n, ne0), dtype=np.float32) * rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
        x[rng.random((n, ne0)) < 1e-3] *= 8
        out[r:r + n] = x * np.float32(scale / np.sqrt(ne0))
    return out.reshape(tuple(reversed(shape)))


def write(path: Path, s: Shape, seed: int = 0, split_max_size: int = 0) -> list[Path]:
    """Stream the model to path (or its -0000i-of-0000n parts); returns the files written."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, s.arch, split_max_size=split_max_size)
    _metadata(w, s)
    specs = tensors(s)
    for name, shape, scale in specs:
        dtype = np.float32 if scale == 0 else np.float16
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    names = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, scale in specs:
        w.write_tensor_data(np.ones(shape, np.float32) if scale == 0 else _weights(rng, shape, scale))
    w.close()
    return names


def _size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-llama")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-max-size", type=_size, default=0, help="e.g. 2G")
    a = ap.parse_args()
    shape = PRESETS[a.preset] if a.layers is None else replace(PRESETS[a.preset], layers=a.layers)
    for p in write(a.out, shape, a.seed, a.split_max_size):
        print(p)


if __name__ == "__main__":
    main()
