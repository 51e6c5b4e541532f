"""What quantize tells the user: the plan table, progress on a TTY, the final summary."""

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from nvfp4q.quantize import Job, Summary
from nvfp4q.units import bits_per_weight, human_bytes


def plan_table(job: Job) -> None:
    out = Console(soft_wrap=True) if sys.stdout.isatty() else Console(width=200, no_color=True, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    for col in ("tensor", "shape", "from", "to", "reason", "imatrix", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for step in job.plan:
        t = step.tensor
        has = "-" if job.imat is None or step.type.name != "NVFP4" else (
            "yes" if t.name in job.importance else "no")
        table.add_row(t.name, "x".join(map(str, t.shape)), t.type.name, step.type.name, step.reason, has,
                      human_bytes(step.nbytes))
    out.print(table)
    n = job.n_weights
    out.print(f"tensors: {len(job.plan)}  weights: {n}  size: {human_bytes(job.model.nbytes)} -> "
              f"{human_bytes(job.nbytes_out)}  bits per weight: {bits_per_weight(job.nbytes_out, n):.3f}")
    if job.imat is not None:
        out.print(f"imatrix: {len(job.importance)} tensor(s) with data, {len(job.missing_importance)} without")


@contextmanager
def progress(job: Job, enabled: bool):
    """Yields the per-tensor callback; a rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda step: None
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
            done[0] += step.nbytes
            bar.update(task, advance=1, current=step.tensor.name,
                       bytes=f"{human_bytes(done[0])} / {human_bytes(job.nbytes_out)}")

        yield on_tensor


def summary(s: Summary) -> None:
    types = ", ".join(f"{k} {v}" for k, v in sorted(s.types.items()))
    rate = s.n_weights / s.seconds if s.seconds else float("nan")
    lines = [
        f"output: {s.outputs[0]}" + (f" (+{len(s.outputs) - 1} parts)" if len(s.outputs) > 1 else ""),
        f"tensors: {sum(s.types.values())} ({types})",
        f"size: {human_bytes(s.bytes_in)} -> {human_bytes(s.bytes_out)}",
        f"bits per weight: {bits_per_weight(s.bytes_out, s.n_weights):.3f}",
        f"time: {s.seconds:.2f} s ({rate / 1e6:.1f} M weights/s)",
    ]
    if s.missing_importance:
        lines.append(f"without imatrix data: {s.missing_importance} tensor(s)")
    print("\n".join(lines))
