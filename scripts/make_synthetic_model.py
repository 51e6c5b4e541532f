"""Write a synthetic f16 (or F32) GGUF with a real model's tensor shapes and metadata, streamed to disk.

Architectures llama (dense or MoE), qwen2, qwen3, qwen3moe and gemma3, each with the tensors and
keys stock llama.cpp requires; weights with realistic statistics (per-row scales, a few
outliers), a small valid tokenizer, optionally split into parts the way llama.cpp names them.
Tests use tiny ones; benchmarks use large ones. `write` can also divide chosen weights by a
factor and append extra tensors (e.g. `.scale` sidecars), in F32 where that must be exact.

    python scripts/make_synthetic_model.py OUT.gguf --preset llama-1b
    python scripts/make_synthetic_model.py OUT.gguf --preset qwen3moe-8g --split-max-size 2G
"""

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType
from numpy.typing import ArrayLike

from nvfp4q.units import parse_size

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
    experts: int = 0  # > 0: 3D expert tensors (llama reads them with ff, so give it ff == expert_ff)
    experts_used: int = 2
    expert_ff: int = 0
    norm_eps: float = 1e-5
    biases: tuple[str, ...] = ()  # kinds that have a `.bias` too, e.g. qwen2's attn_q/k/v
    sliding_window: int = 0  # > 0: gemma3's interleaved sliding-window attention


# Per-head RMS norms of Q and K after their projections.
QK_NORM = frozenset({"qwen3", "qwen3moe", "gemma3"})
# RMS norms on the attention output and the FFN output, before the residual adds.
POST_NORMS = frozenset({"gemma3"})


PRESETS = {
    # tensor shapes of Llama 3.2 1B (about 2.5 GB in f16)
    "llama-1b": Shape("llama", 2048, 16, 8192, 128256, 32, 8, 64),
    # tensor shapes of Qwen2.5 0.5B and Gemma 3 1B, for architectures the development models lack
    "qwen2-0.5b": Shape("qwen2", 896, 24, 4864, 151936, 14, 2, 64, norm_eps=1e-6,
                        biases=("attn_q", "attn_k", "attn_v")),
    "gemma3-1b": Shape("gemma3", 1152, 26, 6912, 262144, 4, 1, 256, norm_eps=1e-6, sliding_window=512),
    # Qwen3-MoE-like, about 8 GB in f16
    "qwen3moe-8g": Shape("qwen3moe", 2048, 12, 6144, 151936, 32, 4, 128, experts=64, experts_used=8,
                         expert_ff=768),
    "tiny-llama": Shape(),
    "tiny-moe": Shape("qwen3moe", 128, 2, 256, 320, 4, 2, 32, experts=4, experts_used=2, expert_ff=128),
    "tiny-llama-moe": Shape("llama", 128, 2, 128, 320, 4, 2, 32, experts=4, experts_used=2, expert_ff=128),
    # qwen2 needs heads * head_dim == embd
    "tiny-qwen2": Shape("qwen2", 128, 2, 256, 320, 4, 2, 32, biases=("attn_q", "attn_k", "attn_v")),
    "tiny-qwen3": Shape("qwen3", 128, 2, 256, 320, 4, 2, 32, norm_eps=1e-6),
    "tiny-gemma3": Shape("gemma3", 128, 2, 256, 320, 4, 2, 32, norm_eps=1e-6, sliding_window=64),
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
    """(name, ggml shape with ne0 first, scale) in llama.cpp's order; scale 0 means a norm (ones).

    1D tensors (norms, biases) are F32, the others in write's dtype.
    """
    out = [("token_embd.weight", (s.embd, s.vocab), 8.0)]

    def add(prefix: str, shape: tuple[int, ...], scale: float = 1.0) -> None:
        out.append((prefix + ".weight", shape, scale))
        if prefix.rsplit(".", 1)[1] in s.biases:  # of the order of the projection's output
            out.append((prefix + ".bias", shape[1:2], 8.0))

    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for i in range(s.layers):
        b = f"blk.{i}."
        add(b + "attn_norm", (s.embd,), 0)
        add(b + "attn_q", (s.embd, q))
        add(b + "attn_k", (s.embd, kv))
        add(b + "attn_v", (s.embd, kv))
        add(b + "attn_output", (q, s.embd))
        if s.arch in POST_NORMS:
            add(b + "post_attention_norm", (s.embd,), 0)
        add(b + "ffn_norm", (s.embd,), 0)
        if s.arch in QK_NORM:
            add(b + "attn_q_norm", (s.head_dim,), 0)
            add(b + "attn_k_norm", (s.head_dim,), 0)
        if s.experts:
            add(b + "ffn_gate_inp", (s.embd, s.experts))
            add(b + "ffn_gate_exps", (s.embd, s.expert_ff, s.experts))
            add(b + "ffn_up_exps", (s.embd, s.expert_ff, s.experts))
            add(b + "ffn_down_exps", (s.expert_ff, s.embd, s.experts))
        else:
            add(b + "ffn_gate", (s.embd, s.ff))
            add(b + "ffn_up", (s.embd, s.ff))
            add(b + "ffn_down", (s.ff, s.embd))
        if s.arch in POST_NORMS:
            add(b + "post_ffw_norm", (s.embd,), 0)
    return out + [("output_norm.weight", (s.embd,), 0), ("output.weight", (s.embd, s.vocab), 4.0)]


def _metadata(w: GGUFWriter, s: Shape, file_type: int) -> None:
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
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_file_type(file_type)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
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


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float, dtype: type) -> np.ndarray:
    """Weights in numpy order; per-row scales and rare 8x outliers, like trained weights."""
    ne0 = shape[0]
    rows = int(np.prod(shape[1:]))
    out = np.empty((rows, ne0), dtype)
    step = max(1, (16 << 20) // ne0)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng.standard_normal((n, ne0), dtype=np.float32) * rng.uniform(0.5, 1.5, (n, 1)).astype(np.float32)
        x[rng.random((n, ne0)) < 1e-3] *= 8
        out[r:r + n] = x * np.float32(scale / np.sqrt(ne0))
    return out.reshape(tuple(reversed(shape)))


def write(path: Path, s: Shape, seed: int = 0, split_max_size: int = 0, *, dtype: type = np.float16,
          divide: Mapping[str, ArrayLike] | None = None,
          extra: Mapping[str, ArrayLike] | None = None) -> list[Path]:
    """Stream the model to path (or its -0000i-of-0000n parts); returns the files written.

    dtype: np.float16 or np.float32, for the 2D/3D weights. divide: weight name -> factor g, a
    scalar or one per expert, written as W / g (W as without divide; exact in F32 for powers of
    two). extra: F32 tensors (name -> values, numpy order) written after the model's own.
    """
    divide, extra = dict(divide or {}), {k: np.asarray(v, np.float32) for k, v in (extra or {}).items()}
    rng = np.random.default_rng(seed)
    specs = tensors(s)
    unknown = set(divide) - {name for name, _, _ in specs}
    if unknown:
        raise ValueError(f"divide: no such tensors {sorted(unknown)}")
    w = GGUFWriter(path, s.arch, split_max_size=split_max_size)
    _metadata(w, s, file_type=0 if np.dtype(dtype) == np.float32 else 1)  # ALL_F32 / MOSTLY_F16

    def type_of(shape: tuple[int, ...]) -> np.dtype:
        return np.dtype(np.float32 if len(shape) == 1 else dtype)

    for name, shape, _ in specs:
        w.add_tensor_info(name, tuple(reversed(shape)), type_of(shape), int(np.prod(shape)) * type_of(shape).itemsize)
    for name, values in extra.items():
        w.add_tensor_info(name, values.shape, values.dtype, values.nbytes)
    names = w.format_shard_names(path)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, scale in specs:
        x = np.ones(shape, np.float32) if scale == 0 else _weights(rng, shape, scale, type_of(shape))
        if name in divide:  # one factor per expert: the outermost numpy axis
            g = np.asarray(divide[name], np.float32)
            x = (x / g.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype)
        w.write_tensor_data(x)
    for values in extra.values():
        w.write_tensor_data(values)
    w.close()
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-llama")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-max-size", type=parse_size, default=0, help="e.g. 2G")
    a = ap.parse_args()
    shape = PRESETS[a.preset] if a.layers is None else replace(PRESETS[a.preset], layers=a.layers)
    for p in write(a.out, shape, a.seed, a.split_max_size):
        print(p)


if __name__ == "__main__":
    main()
