"""What quantize tells the user: the plan or the run as one document (docs/quantize-json.md),
shown as text (the CLI prints the JSON), and progress while it runs (a bar on a terminal, plain lines in logs)."""

import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numba
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from nvfp4q.global_scale import sidecar_name
from nvfp4q.plan import Options, Step
from nvfp4q.quantize import Job, Settings, Summary
from nvfp4q.units import bits_per_weight, human_bytes

SCHEMA = "nvfp4q.quantize/1"


def document(job: Job, opts: Options, s: Settings, src: Path, out: Path, summary: Summary | None = None) -> dict:
    """The plan (summary None: --dry-run) or the finished run, as one JSON-ready dict."""
    doc = {
        "schema": SCHEMA,
        "dry_run": summary is None,
        "source": str(src),
        "source_parts": [str(p) for p in job.model.paths],
        "output": str(out),
        "architecture": job.model.arch,
        "options": _options(opts, s),
        "weights": job.n_weights,
        "bytes_in": job.model.nbytes,
        "tensor_bytes": job.nbytes_out,
        "types": _types(job.plan),
        "sidecars": [sidecar_name(st.tensor.name) for st in job.plan if st.sidecar],
        "imatrix": _imatrix(job),
        "allocation": _allocation(job),
        "feedback": _feedback_inputs(job, s),
    }
    if summary is None:
        doc["bits_per_weight"] = _bpw(job.nbytes_out, job.n_weights)
        doc["tensors"] = [_tensor(job, st, s) for st in job.plan]
        return doc
    doc |= {
        "outputs": [{"path": str(p), "bytes": p.stat().st_size} for p in summary.outputs],
        "bytes_out": summary.bytes_out,
        "bits_per_weight": _bpw(summary.bytes_out, summary.n_weights),
        "seconds": summary.seconds,
        "weights_per_second": summary.n_weights / summary.seconds if summary.seconds > 0 else None,
        "rescaled": [{"tensor": name, "factor": float(f)} for name, f in job.factors.items()],
    }
    return doc


def _bpw(nbytes: int, n_weights: int) -> float | None:
    return bits_per_weight(nbytes, n_weights) if n_weights else None


def _type_name(qtype) -> str | None:
    return None if qtype is None else qtype.name


def _options(opts: Options, s: Settings) -> dict:
    return {
        "search": s.search, "weighting": s.weighting, "global_scale": opts.global_scale,
        "imatrix": None if s.imatrix is None else str(s.imatrix), "imatrix_strict": s.imatrix_strict,
        "calibration": None if s.calibration is None else {
            "path": str(s.calibration), "shrink": s.shrink, "damp": s.damp, "scales": s.scales,
            "error_feedback": s.feedback, "rank": s.rank, "passes": s.passes},
        "include_weights": list(s.include_weights), "exclude_weights": list(s.exclude_weights),
        "pure": opts.pure, "leave_output_tensor": opts.leave_output_tensor,
        "tensor_types": [{"pattern": p, "type": t.name} for p, t in opts.tensor_types],
        "output_tensor_type": _type_name(opts.output_tensor_type),
        "token_embedding_type": _type_name(opts.token_embedding_type),
        "allow_requantize": s.allow_requantize, "keep_split": s.keep_split,
        "split_max_size": s.split_max_size, "split_max_tensors": s.split_max_tensors,
        "threads": numba.get_num_threads(),
    }


def _types(plan: list[Step]) -> list[dict]:
    """Tensors the output holds, per type; a `.scale` sidecar counts as the F32 tensor it is."""
    rows = defaultdict(lambda: {"count": 0, "bytes": 0})
    for st in plan:
        written = [(st.type.name, st.nbytes)] + ([("F32", st.data_bytes - st.nbytes)] if st.sidecar else [])
        for name, nbytes in written:
            rows[name]["count"] += 1
            rows[name]["bytes"] += nbytes
    return sorted(({"type": k, **r} for k, r in rows.items()), key=lambda r: (-r["bytes"], r["type"]))


def _imatrix(job: Job) -> dict | None:
    imat = job.imat
    if imat is None:
        return None
    return {
        "path": str(imat.path), "format": imat.format, "entries": len(imat.entries),
        "chunk_count": imat.chunk_count, "datasets": list(imat.datasets),
        "with_data": list(job.importance), "without_data": list(job.missing_importance),
        "excluded": list(job.excluded_importance),
    }


def _allocation(job: Job) -> dict | None:
    a = job.allocation
    return None if a is None else {"target_bytes": a.target, "planned_bytes": a.planned,
                                   "estimated_kld": sum(a.damage.values())}


def _feedback_inputs(job: Job, s: Settings) -> dict | None:
    """The calibrated inputs of the NVFP4 tensors, by the covariance their errors go through."""
    names = {_source(job, st, s) for st in job.plan} - {None}
    if not names:
        return None
    return {"whole": sorted(names - job.low_rank), "low_rank": sorted(names & job.low_rank), "rank": s.rank}


def _source(job: Job, st: Step, s: Settings) -> str | None:
    src = job.calib.sources.get(st.tensor.name) if job.calib is not None and s.feedback else None
    return src if st.type.name == "NVFP4" else None


def _feedback(job: Job, st: Step, s: Settings) -> str | None:
    src = _source(job, st, s)
    return None if src is None else "low_rank" if src in job.low_rank else "whole"


def _tensor(job: Job, st: Step, s: Settings) -> dict:
    t = st.tensor
    return {
        "name": t.name, "shape": list(t.shape), "from": t.type.name, "to": st.type.name, "reason": st.reason,
        "imatrix": None if job.imat is None or st.type.name != "NVFP4" else t.name in job.importance,
        "bytes": st.nbytes, "sidecar": sidecar_name(t.name) if st.sidecar else None, "rescale": st.rescale,
        "damage": job.allocation.damage.get(t.name) if job.allocation else None,
        "feedback": _feedback(job, st, s),
    }


def render(doc: dict) -> None:
    """The plan table or the summary."""
    if doc["dry_run"]:
        _plan_table(doc)
    else:
        _summary(doc)


def _plan_table(doc: dict) -> None:
    out = Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=200, no_color=True, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    allocated = doc["allocation"] is not None
    for col in ("tensor", "shape", "from", "to", "reason", "imatrix", "size") + ("damage",) * allocated:
        table.add_column(col, justify="right" if col in ("size", "damage") else "left")
    marks = {None: "-", True: "yes", False: "no"}
    for t in doc["tensors"]:
        damage = () if not allocated else ("-" if t["damage"] is None else f"{t['damage']:.2e}",)
        table.add_row(t["name"], "x".join(map(str, t["shape"])), t["from"], t["to"], t["reason"],
                      marks[t["imatrix"]], human_bytes(t["bytes"]), *damage)
    out.print(table)
    bpw = doc["bits_per_weight"] or 0.0
    out.print(f"tensors: {len(doc['tensors'])}  weights: {doc['weights']}  size: {human_bytes(doc['bytes_in'])} -> "
              f"{human_bytes(doc['tensor_bytes'])}  bits per weight: {bpw:.3f}")
    if allocated:
        out.print(_allocation_line(doc["allocation"]))
    if doc["imatrix"] is not None:
        imat = doc["imatrix"]
        out.print(f"imatrix: {len(imat['with_data'])} tensor(s) with data, {len(imat['without_data'])} without")


def _summary(doc: dict) -> None:
    outputs, types = doc["outputs"], doc["types"]
    rate = doc["weights_per_second"] or math.nan
    sidecars = f"; {len(doc['sidecars'])} .scale sidecars" if doc["sidecars"] else ""
    lines = [
        f"output: {outputs[0]['path']}" + (f" (+{len(outputs) - 1} parts)" if len(outputs) > 1 else ""),
        f"tensors: {sum(r['count'] for r in types)} ("
        + ", ".join(f"{r['type']} {r['count']}" for r in sorted(types, key=lambda r: r["type"])) + sidecars + ")",
        f"size: {human_bytes(doc['bytes_in'])} -> {human_bytes(doc['bytes_out'])}",
        f"bits per weight: {doc['bits_per_weight'] or 0.0:.3f}",
        f"time: {doc['seconds']:.2f} s ({rate / 1e6:.1f} M weights/s)",
    ]
    if doc["allocation"] is not None:
        lines.append(_allocation_line(doc["allocation"]))
    if doc["feedback"] is not None:
        f = doc["feedback"]
        lines.append(f"error feedback: {len(f['whole'])} inputs through their whole covariance, "
                     f"{len(f['low_rank'])} through rank {f['rank']}")
    if doc["imatrix"] is not None and doc["imatrix"]["without_data"]:
        lines.append(f"without imatrix data: {len(doc['imatrix']['without_data'])} tensor(s)")
    print("\n".join(lines))


def _allocation_line(a: dict) -> str:
    return (f"target: {human_bytes(a['target_bytes'])}, planned {human_bytes(a['planned_bytes'])}; "
            f"estimated KLD {a['estimated_kld']:.4f}")


class Lines:
    """Progress for logs (stderr not a terminal): a plain line each time another `every` of the
    output bytes is done, or `interval` seconds after the last line, checked after each tensor."""

    def __init__(self, job: Job, every: float = 0.1, interval: float = 30.0, stream=None, clock=time.monotonic):
        self.tensors, self.total = len(job.plan), job.nbytes_out
        self.every, self.interval, self.stream, self.clock = every, interval, stream or sys.stderr, clock
        self.started = self.last = clock()
        self.done_tensors = self.done_bytes = self.done_weights = self.steps = 0

    def __call__(self, step: Step) -> None:
        self.done_tensors += 1
        self.done_bytes += step.data_bytes
        self.done_weights += math.prod(step.tensor.shape)
        now = self.clock()
        fraction = self.done_bytes / self.total if self.total else 1.0
        steps = int(fraction / self.every + 1e-9)
        if steps > self.steps or now - self.last >= self.interval:
            self.steps, self.last = steps, now
            elapsed = now - self.started
            rate = f"{self.done_weights / elapsed / 1e6:.1f}" if elapsed > 0 else "-"
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else math.inf
            print(f"nvfp4q: tensor {self.done_tensors}/{self.tensors}, {human_bytes(self.done_bytes)} / "
                  f"{human_bytes(self.total)} ({100 * fraction:.0f}%), {rate} M weights/s, ETA {_duration(eta)}",
                  file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextmanager
def progress(job: Job, quiet: bool):
    """Yields the per-tensor callback: nothing when quiet, a rich bar on a terminal, else Lines."""
    if quiet:
        yield lambda step: None
        return
    if not sys.stderr.isatty():
        yield Lines(job)
        return
    bar = Progress(
        TextColumn("{task.completed:.0f}/{task.total:.0f} tensors"), BarColumn(),
        TextColumn("{task.fields[bytes]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"), console=Console(stderr=True), transient=True,
    )
    done = [0]
    with bar:
        task = bar.add_task("quantize", total=len(job.plan), bytes="", current="")

        def on_tensor(step):
            done[0] += step.data_bytes
            bar.update(task, advance=1, current=step.tensor.name,
                       bytes=f"{human_bytes(done[0])} / {human_bytes(job.nbytes_out)}")

        yield on_tensor
