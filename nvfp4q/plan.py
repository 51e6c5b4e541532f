"""The type plan: which output type each tensor gets, and why.

A pure function of tensor metadata and options, so that `--dry-run` and the real
run agree by construction and every rule is testable without files.
"""

import math
import re
from dataclasses import dataclass, field, replace

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from nvfp4q import global_scale

# Output types offered on the command line (llama-quantize's spelling, lower case).
TYPE_NAMES = {"nvfp4": T.NVFP4, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0, "f16": T.F16, "bf16": T.BF16, "f32": T.F32}
FLOAT_SOURCES = (T.F32, T.F16, T.BF16)
# When a row length does not fit the block size, the next type in the chain is tried.
FALLBACK = {T.NVFP4: T.Q8_0, T.Q5_0: T.F16, T.Q5_1: T.F16, T.Q8_0: T.F16}

TOKEN_EMBD = ("token_embd.weight", "per_layer_token_embd.weight")
OUTPUT = "output.weight"

# Substrings of names llama.cpp never quantizes (src/llama-quant.cpp tensor_allows_quantization).
_NEVER = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_EXACT = ("position_embd.weight", "token_types.weight")
_NEVER_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)


@dataclass(frozen=True)
class Options:
    """The plan-relevant options, with llama-quantize's meanings."""

    tensor_types: tuple[tuple[str, T], ...] = ()  # (regex, type), first search match wins
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    pure: bool = False
    leave_output_tensor: bool = False
    global_scale: str = "off"  # one of global_scale.MODES (see global_scale.wants_sidecar)
    allocated: tuple[tuple[str, T], ...] = ()  # (tensor name, type) from the --target-size allocator


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 first
    type: T


@dataclass(frozen=True)
class Step:
    tensor: TensorInfo
    type: T
    reason: str
    nbytes: int = field(default=0)
    sidecar: bool = False  # a `.scale` tensor follows (two-level NVFP4)
    rescale: bool = False  # written times a power of two its layer's rule compensates exactly

    @property
    def sidecar_values(self) -> int:
        """One scale per expert (a 2D weight is one expert)."""
        return self.tensor.shape[2] if len(self.tensor.shape) >= 3 else 1

    @property
    def data_bytes(self) -> int:
        """What the step writes: its tensor and, with one, its `.scale` sidecar (F32)."""
        return self.nbytes + 4 * self.sidecar_values * self.sidecar

    @property
    def converts(self) -> bool:
        return self.type != self.tensor.type or self.rescale


def parse_type(name: str) -> T:
    try:
        return TYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown type '{name}' (use one of {', '.join(TYPE_NAMES)})") from None


def parse_tensor_type(spec: str) -> tuple[str, T]:
    """'REGEX=TYPE' as in llama-quantize's --tensor-type."""
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"--tensor-type expects REGEX=TYPE, got '{spec}'")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--tensor-type: bad regex '{pattern}': {e}") from None
    return pattern, parse_type(type_name)


def nbytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def allows_quantization(name: str, n_dims: int, arch: str, opts: Options) -> bool:
    """Mirror of llama.cpp's tensor_allows_quantization."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name == OUTPUT and opts.leave_output_tensor:
        return False
    if name in _NEVER_EXACT or any(s in name for s in _NEVER):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _NEVER_GLM5_NEXT))


def _fits(ne0: int, qtype: T) -> bool:
    return ne0 % GGML_QUANT_SIZES[qtype][0] == 0


# The reasons of the types chosen without a pin: what the allocator may change.
DEFAULT_REASONS = ("weight", "token embedding", "output")


def _choose(t: TensorInfo, opts: Options) -> tuple[T, str]:
    if t.name in TOKEN_EMBD and opts.token_embedding_type is not None:
        return opts.token_embedding_type, "--token-embedding-type"
    if t.name == OUTPUT and opts.output_tensor_type is not None:
        return opts.output_tensor_type, "--output-tensor-type"
    for pattern, qtype in opts.tensor_types:
        if re.search(pattern, t.name):
            return qtype, f"--tensor-type {pattern}"
    if opts.pure:
        return T.NVFP4, "--pure"
    for name, qtype in opts.allocated:
        if name == t.name:
            return qtype, "allocated"
    if t.name in TOKEN_EMBD:
        return T.Q8_0, "token embedding"
    if t.name == OUTPUT:
        return T.Q8_0, "output"
    return T.NVFP4, "weight"


def is_free(t: TensorInfo, arch: str, opts: Options) -> bool:
    """Quantizable and not pinned by an option: the allocator chooses its type."""
    return allows_quantization(t.name, len(t.shape), arch, opts) and _choose(t, opts)[1] in DEFAULT_REASONS


def candidates(t: TensorInfo) -> list[T]:
    """The allocator's types for a tensor, smallest first: those whose block fits its rows, and
    the source's own float type (F16 for F32 sources), which costs nothing in quality."""
    lossless = t.type if t.type in (T.F16, T.BF16) else T.F16
    return [q for q in (T.NVFP4, T.Q5_0, T.Q5_1, T.Q8_0) if _fits(t.shape[0], q)] + [lossless]


def plan_tensor(t: TensorInfo, arch: str, opts: Options, has_bias: bool = False) -> Step:
    """has_bias: the weight has a `.bias` tensor (see global_scale.applies)."""
    if not allows_quantization(t.name, len(t.shape), arch, opts):
        why = "1D" if len(t.shape) < 2 else "never quantized"
        if t.name == OUTPUT and opts.leave_output_tensor:
            why = "--leave-output-tensor"
        return Step(t, t.type, f"kept: {why}", nbytes(t.shape, t.type))
    qtype, reason = _choose(t, opts)
    explicit = reason in ("--token-embedding-type", "--output-tensor-type")
    if not explicit:  # llama.cpp applies no fallback to the two explicit types either
        while not _fits(t.shape[0], qtype):
            reason += f"; ne0 {t.shape[0]} % {GGML_QUANT_SIZES[qtype][0]} != 0"
            qtype = FALLBACK.get(qtype, T.F16)
    elif not _fits(t.shape[0], qtype):
        raise ValueError(
            f"{t.name}: ne0 {t.shape[0]} does not fit {qtype.name} ({reason}); choose another type"
        )
    sidecar = qtype == T.NVFP4 and global_scale.wants_sidecar(opts.global_scale, arch, t.name, has_bias)
    if sidecar:
        reason += "; + .scale sidecar"
    return Step(t, qtype, reason, nbytes(t.shape, qtype), sidecar)


def _rescale(plan: list[Step], arch: str, opts: Options) -> list[Step]:
    """Mark the layers whose rescaling rule applies whole: its weights all NVFP4 and its norm a
    float tensor, written as F32 so that dividing it by a power of two stays exact."""
    if opts.global_scale not in ("auto", "rescale"):
        return plan
    at = {s.tensor.name: i for i, s in enumerate(plan)}
    norm = global_scale.RESCALES[arch].norm if arch in global_scale.RESCALES else None
    plan = list(plan)
    for members in global_scale.rescaled_layers(arch, list(at)).values():
        steps = {k: plan[at[name]] for k, name in members.items()}
        if steps[norm].type not in FLOAT_SOURCES or any(
                s.type != T.NVFP4 or s.sidecar for k, s in steps.items() if k != norm):
            continue
        for k, s in steps.items():
            qtype = T.F32 if k == norm else s.type
            plan[at[s.tensor.name]] = replace(s, type=qtype, nbytes=nbytes(s.tensor.shape, qtype),
                                              reason=s.reason + "; rescaled", rescale=True)
    return plan


def make_plan(tensors: list[TensorInfo], arch: str, opts: Options) -> list[Step]:
    names = {t.name for t in tensors}
    plan = [plan_tensor(t, arch, opts, t.name.removesuffix(".weight") + ".bias" in names) for t in tensors]
    return _rescale(plan, arch, opts)


def nvfp4_weights(plan: list[Step]) -> list[tuple[str, int]]:
    """Each tensor's name and its number of NVFP4 weights (0 when it is not NVFP4)."""
    return [(s.tensor.name, math.prod(s.tensor.shape) if s.type == T.NVFP4 else 0) for s in plan]


def file_type_of(plan: list[Step]) -> int:
    """general.file_type: MOSTLY_NVFP4 when any tensor becomes NVFP4, as the NVFP4 ftype would."""
    from gguf import LlamaFileType

    types = {s.type for s in plan if len(s.tensor.shape) >= 2}
    if T.NVFP4 in types:
        return LlamaFileType.MOSTLY_NVFP4
    for qtype, ftype in ((T.Q5_0, LlamaFileType.MOSTLY_Q5_0), (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
                         (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
                         (T.BF16, LlamaFileType.MOSTLY_BF16),
                         (T.F16, LlamaFileType.MOSTLY_F16)):
        if qtype in types:
            return ftype
    return LlamaFileType.ALL_F32
