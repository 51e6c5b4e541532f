"""The quantize job: plan, then stream tensors from the source GGUF into the output GGUF."""

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from nvfp4q import allocate, calibration, convert, damage, descent, global_scale, gguf_io, imatrix, rounding
from nvfp4q.errors import UserError
from nvfp4q.plan import Options, Step, TensorInfo, file_type_of, make_plan, nvfp4_weights

QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class Settings:
    search: int = 12
    weighting: str = "importance"  # one of convert.WEIGHTINGS
    imatrix: Path | None = None
    imatrix_strict: bool = False
    calibration: Path | None = None
    damp: float = rounding.DAMP
    shrink: float = rounding.SHRINK
    scales: str = "search"  # one of convert.SCALE_CHOICES
    feedback: bool = True  # with a calibration: error feedback through its covariance
    rank: int = rounding.RANK  # of the low-rank covariances (rounding.low_rank_inputs says whose)
    passes: int = descent.PASSES  # of coordinate descent after the error feedback
    include_weights: tuple[str, ...] = ()
    exclude_weights: tuple[str, ...] = ()
    allow_requantize: bool = False
    overwrite: bool = False
    keep_split: bool = False
    split_max_tensors: int = 0
    split_max_size: int = 0
    target_size: int = 0  # --target-size in bytes (0: none)
    target_bpw: float = 0.0  # --target-bpw (0: none)


@dataclass
class Job:
    """What a run will do: the plan plus which tensors get importance data."""

    model: gguf_io.Model
    plan: list[Step]
    imat: imatrix.Imatrix | None
    importance: dict[str, imatrix.Entry]
    missing_importance: list[str]  # NVFP4 tensors the imatrix has no entry for
    excluded_importance: list[str] = field(default_factory=list)  # with an entry, left out by --include/--exclude-weights
    calib: calibration.Calibration | None = None
    allocation: allocate.Allocation | None = None  # with --target-size / --target-bpw
    low_rank: set[str] = field(default_factory=set)  # calibrated inputs rounded through a low-rank covariance
    rounding_of: dict[str, tuple] = field(default_factory=dict)  # (U, local blocks) of the latest inputs
    factors: dict[str, np.float32] = field(default_factory=dict)  # of rescaled tensors (W * factor), set by run

    @property
    def nbytes_out(self) -> int:
        return sum(st.data_bytes for st in self.plan)

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(s.tensor.shape)) for s in self.plan)


@dataclass
class Summary:
    """What a finished run measured; the rest of its report comes from the Job."""

    bytes_in: int = 0
    bytes_out: int = 0  # all output parts, headers included
    n_weights: int = 0
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


def _wants_importance(name: str, s: Settings) -> bool:
    if s.include_weights:
        return any(p in name for p in s.include_weights)
    return not any(p in name for p in s.exclude_weights)


def model_plan(model: gguf_io.Model, opts: Options) -> list[Step]:
    """make_plan for a model's tensors, an option that does not fit them as the user's error."""
    try:
        return make_plan([t.info for t in model.tensors], model.arch, opts)
    except ValueError as e:
        raise UserError(str(e)) from None


def prepare(src: Path, opts: Options, s: Settings) -> Job:
    """Open and check everything before a byte is written: a bad input fails early and clean."""
    if s.include_weights and s.exclude_weights:
        raise UserError("--include-weights and --exclude-weights cannot be used together")
    if (s.target_size or s.target_bpw) and (s.keep_split or s.split_max_size or s.split_max_tensors):
        raise UserError("--target-size and --target-bpw count one output file: not with --keep-split or --split-max-*")
    if s.calibration is None and (s.scales != "search" or not s.feedback):
        raise UserError("--scales local and --no-error-feedback need --calibration")
    model = gguf_io.open_model(src)
    plan = model_plan(model, opts)
    for step, t in zip(plan, model.tensors):
        if step.converts:
            gguf_io.check_convertible(t, s.allow_requantize)
    imat = imatrix.load(s.imatrix) if s.imatrix else None
    calib = calibration.load(s.calibration) if s.calibration else None
    allocation = None
    if s.target_size or s.target_bpw:
        plan, allocation = _allocate(model, plan, opts, s, imat, calib)
    importance, missing, excluded = {}, [], []
    for step in plan:
        if step.type != T.NVFP4:
            continue
        name = step.tensor.name
        entry = _entry(calib, imat, step.tensor, s.rank)
        if entry is None:
            if imat is not None or calib is not None:
                missing.append(name)
        elif _wants_importance(name, s):
            importance[name] = entry
        else:
            excluded.append(name)
    if missing and s.imatrix_strict:
        raise UserError(f"no imatrix data for {len(missing)} tensor(s), e.g. {missing[0]} (--imatrix-strict)")
    return Job(model, plan, imat, importance, missing, excluded, calib, allocation, _low_rank(plan, calib, s))


def _low_rank(plan: list[Step], calib: calibration.Calibration | None, s: Settings) -> set[str]:
    """The calibrated inputs whose feedback goes through a low-rank covariance, for the whole model."""
    if calib is None or not s.feedback:
        return set()
    return rounding.model_low_rank(nvfp4_weights(plan), calib.sources, calib.moments, s.rank)


def _entry(calib: calibration.Calibration | None, imat: imatrix.Imatrix | None, t: TensorInfo,
           rank: int) -> imatrix.Entry | None:
    """A weight's importance data; the calibration's diagonal is the same statistic as an
    imatrix's, and wins where it has one."""
    m = calib.for_weight(t.name) if calib is not None else None
    if m is not None and m.width != t.shape[0]:
        raise UserError(f"{calib.path}: {t.name} is {m.width} wide, the tensor has {t.shape[0]} columns")
    if isinstance(m, calibration.Sketch) and not rank:
        raise UserError(f"{calib.path}: {t.name}'s input has a rank-{m.max_rank} sketch, not a whole covariance: "
                        "--rank 0 needs a calibration made with --sketch 0")
    return next((imatrix.for_tensor(i, t.name, t.shape) for i in (calib and calib.imatrix, imat)
                 if i and t.name in i.entries), None)


def _header_bytes(model: gguf_io.Model, plan: list[Step], s: Settings, imat, calib) -> int:
    """The output's header before any sidecar's tensor info (the allocation counts those): the
    metadata as add_metadata writes it, the allocation's keys included."""
    w = gguf_io.Writer(Path("unwritten.gguf"), model.arch, model.alignment)
    job = Job(model, [replace(st, sidecar=False) for st in plan], imat, {}, [], calib=calib,
              allocation=allocate.Allocation(0, 0, {}),
              factors={st.tensor.name: np.float32(1) for st in plan if st.rescale})
    add_metadata(w, job, s)
    _plan_parts(w, job, s)
    return w.header_bytes()


def _allocate(model: gguf_io.Model, plan: list[Step], opts: Options, s: Settings, imat, calib
              ) -> tuple[list[Step], allocate.Allocation]:
    """--target-size / --target-bpw: the free tensors' types from their estimated damage."""
    infos = [t.info for t in model.tensors]
    target = s.target_size or int(s.target_bpw * sum(int(np.prod(i.shape)) for i in infos) / 8)
    tensors = {t.info.name: t for t in model.tensors}
    blocks = damage.n_blocks(list(tensors))

    def estimate(info: TensorInfo, types: list[T]) -> dict[T, float]:
        entry = _entry(calib, imat, info, s.rank) if _wants_importance(info.name, s) else None
        err = convert.tensor_errors(tensors[info.name], entry, [q for q in types if q != info.type], s)
        return damage.estimate(info.name, blocks, {q: err.get(q, 0.0) for q in types}, info.type)

    h = _header_bytes(model, plan, s, imat, calib)
    # the data and the file's end are aligned: header + costs <= the target rounded down to the
    # alignment is exactly the condition for the file to fit
    slack = target % model.alignment

    def cost(st: Step) -> int:
        side = gguf_io.padded(4 * st.sidecar_values, model.alignment) + gguf_io.tensor_info_bytes(
            global_scale.sidecar_name(st.tensor.name), 1) if st.sidecar else 0
        return gguf_io.padded(st.nbytes, model.alignment) + side

    try:
        plan, a = allocate.fit(infos, model.arch, opts, target, h + slack, cost, estimate)
    except ValueError as e:
        raise UserError(f"--target-{'size' if s.target_size else 'bpw'}: {e}") from None
    # the header of the plan chosen: fewer rescaled layers than the first plan's shorten it
    size = _header_bytes(model, plan, s, imat, calib) + sum(map(cost, plan))
    return plan, replace(a, planned=gguf_io.padded(size, model.alignment))  # the file's size


def _factors(model: gguf_io.Model, plan: list[Step], s: Settings) -> dict[str, np.float32]:
    """The power of two each rescaled tensor is multiplied by, from its layer's weights."""
    rule = global_scale.RESCALES.get(model.arch)
    tensors = {st.tensor.name: t for st, t in zip(plan, model.tensors) if st.rescale}
    factors = {}
    for members in global_scale.rescaled_layers(model.arch, list(tensors)).values():
        amax = {}
        for k, name in members.items():
            if k != rule.norm:
                t = tensors[name]
                amax[k] = convert.amax(t, 0, t.rows, s)
                t.release()
        factors |= {members[k]: np.float32(f) for k, f in global_scale.layer_factors(rule, amax).items()}
    return factors


def check_paths(sources: list[Path], outs: list[Path], overwrite: bool) -> None:
    for out in outs:
        if out.exists() and any(os.path.samefile(src, out) for src in sources):
            raise UserError(f"{out}: output would overwrite the input")
        if out.is_dir():
            raise UserError(f"{out}: is a directory")
        if out.exists() and not overwrite:
            raise UserError(f"{out}: exists (pass --overwrite to replace it)")
        if not out.parent.is_dir():
            raise UserError(f"{out.parent}: no such directory")


def add_metadata(w: gguf_io.Writer, job: Job, s: Settings) -> None:
    g = w.gguf
    gguf_io.copy_metadata(g, job.model.header)
    g.add_file_type(file_type_of(job.plan))
    g.add_quantization_version(QUANTIZATION_VERSION)
    g.add_uint32("nvfp4q.search", s.search)
    g.add_string("nvfp4q.weighting", s.weighting)
    if job.calib is not None:
        g.add_string("nvfp4q.calibration.file", str(job.calib.path))
        g.add_float32("nvfp4q.calibration.damp", s.damp)
        g.add_float32("nvfp4q.calibration.shrink", s.shrink)
        g.add_string("nvfp4q.calibration.scales", s.scales)
        g.add_bool("nvfp4q.calibration.feedback", s.feedback)
        g.add_uint32("nvfp4q.calibration.rank", s.rank)
        g.add_uint32("nvfp4q.calibration.passes", s.passes)
        g.add_uint32("nvfp4q.calibration.tensors", sum(1 for st in job.plan if st.type == T.NVFP4
                                                       and st.tensor.name in job.calib.sources))
    if job.allocation is not None:
        g.add_uint64("nvfp4q.allocation.target_bytes", job.allocation.target)
        g.add_float32("nvfp4q.allocation.estimated_kld", sum(job.allocation.damage.values()))
    sidecars = [st for st in job.plan if st.sidecar]
    g.add_uint32("nvfp4q.sidecar_count", len(sidecars))
    if job.factors:  # for the record, and for inspect --against to undo
        g.add_array("nvfp4q.rescaled_tensors", list(job.factors))
        g.add_array("nvfp4q.rescale_factors", [float(f) for f in job.factors.values()])
    if job.imat is not None:
        g.add_string("quantize.imatrix.file", str(job.imat.path))
        if job.imat.datasets:
            g.add_string("quantize.imatrix.dataset", job.imat.datasets[0])
        g.add_int32("quantize.imatrix.entries_count", len(job.imat.entries))
        g.add_int32("quantize.imatrix.chunks_count", job.imat.chunk_count)


def _plan_parts(w: gguf_io.Writer, job: Job, s: Settings) -> None:
    part = 0
    for step, t in zip(job.plan, job.model.tensors):
        if s.keep_split and t.part != part:
            w.new_part()
            part = t.part
        w.add_tensor_info(step.tensor.name, step.tensor.shape, step.type, step.nbytes)
        if step.sidecar:
            n = step.sidecar_values
            w.add_tensor_info(global_scale.sidecar_name(step.tensor.name), (n,), T.F32, 4 * n)


def _write(w: gguf_io.Writer, t: gguf_io.SourceTensor, data: np.ndarray, scales: np.ndarray | None) -> None:
    w.write_tensor(data)
    if scales is not None:
        w.write_tensor(scales)
    t.release()  # after the write: an unconverted tensor's data is the source's pages


def run(job: Job, out: Path, s: Settings, on_tensor: Callable[[Step], None] = lambda step: None) -> Summary:
    """Write each output part beside its final name under a temporary name; rename when complete."""
    started = time.perf_counter()
    check_paths(job.model.paths, [out], s.overwrite)
    job.factors = _factors(job.model, job.plan, s)  # reads the rescaled weights: not for --dry-run
    summary = Summary(bytes_in=job.model.nbytes, n_weights=job.n_weights)
    w = gguf_io.Writer(out, job.model.arch, job.model.alignment, s.split_max_tensors, s.split_max_size)
    try:
        add_metadata(w, job, s)
        _plan_parts(w, job, s)
        check_paths(job.model.paths, w.part_names(), s.overwrite)
        free = shutil.disk_usage(out.parent).free
        if free < job.nbytes_out:
            raise UserError(f"{out.parent}: {free / 1e9:.2f} GB free, the output needs {job.nbytes_out / 1e9:.2f} GB")
        w.begin_data()
        # one tensor is written while the next is converted (the kernels and the write release
        # the GIL); leaving the block waits for the write in flight, also on an error
        with ThreadPoolExecutor(1, thread_name_prefix="nvfp4q-write") as writer:
            pending = None
            for i, step in enumerate(job.plan):
                if i + 1 < len(job.plan):
                    job.model.tensors[i + 1].prefetch()
                data, scales = convert.convert_tensor(job, i, s)
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write, w, job.model.tensors[i], data, scales)
                on_tensor(step)
            if pending is not None:
                pending.result()
        summary.outputs = w.commit()
    except BaseException:
        w.abort()
        raise
    summary.bytes_out = sum(p.stat().st_size for p in summary.outputs)
    summary.seconds = time.perf_counter() - started
    return summary
