"""Human output of eval: the document() dict as tables (plain text when not a TTY)."""

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nvfp4q.inspect_view import _facts, _table
from nvfp4q.units import human_bytes


def _pm(d: dict, key: str = "value", fmt: str = "{:.4f}") -> str:
    se = "-" if d["se"] is None else fmt.format(d["se"])
    return f"{fmt.format(d[key])} ± {se}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.5f}"


def render(doc: dict) -> None:
    opts = dict(soft_wrap=True, markup=False, highlight=False)
    console = Console(**opts) if sys.stdout.isatty() else Console(width=200, no_color=True, **opts)
    base = doc["base"]
    _facts(console, [("base", base["path"]), ("base PPL", _pm(base["ppl"])),
                     ("text", f"{doc['text']}: {doc['chunks']} chunks of {doc['ctx']}, "
                              f"{doc['scored_tokens']} tokens scored")])
    _table(console, None, "model size bpw PPL PPL_ratio mean_KLD median_KLD p99_KLD same_top1", (
        (m["path"], human_bytes(m["bytes"]), f"{m['bits_per_weight']:.3f}", _pm(m["ppl"]),
         _pm(m["ppl_ratio"]), _pm(m["kld"], "mean"), f"{m['kld']['median']:.4f}", f"{m['kld']['p99']:.4f}",
         _pm(m["same_top1"], fmt="{:.3f}"))
        for m in doc["models"]), numeric="size bpw PPL PPL_ratio mean_KLD median_KLD p99_KLD same_top1")
    if doc.get("paired"):
        _table(console, "paired, B minus A (± per-token s.e. / ± s.e. of chunk means)",
               "A B KLD_diff NLL_diff", (
                   (p["a"], p["b"], *(f"{p[k]['mean']:+.5f} ± {_num(p[k]['se'])} / {_num(p[k]['se_chunks'])}"
                                      for k in ("kld", "nll")))
                   for p in doc["paired"]), numeric="KLD_diff NLL_diff")


@contextmanager
def progress(enabled: bool, quiet: bool = False):
    """Yields on_chunk(done, total, tokens, note=""): a bar on a TTY, else a plain line per chunk.

    A count that starts again (done not above the last one) is a new phase (calibrate --generate
    writes its chunks, then runs them): the clock, rate and ETA start again with it.
    """
    if quiet:
        yield lambda done, total, tokens, note="": None
        return
    phase = {"started": time.perf_counter(), "done": 0}

    def restart(done: int) -> bool:
        new = done <= phase["done"]
        if new:
            phase["started"] = time.perf_counter()
        phase["done"] = done
        return new

    if enabled:
        bar = Progress(TextColumn("{task.completed:.0f}/{task.total:.0f} chunks"), BarColumn(),
                       TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[note]}"), console=Console(stderr=True), transient=True)
        with bar:
            task = bar.add_task("chunks", total=None, rate="", note="")

            def on_chunk(done, total, tokens, note=""):
                if restart(done):
                    bar.reset(task)
                bar.update(task, completed=done, total=total, note=note,
                           rate=f"{tokens / (time.perf_counter() - phase['started']):.0f} tokens/s")

            yield on_chunk
        return

    def on_chunk(done, total, tokens, note=""):
        restart(done)
        elapsed = time.perf_counter() - phase["started"]
        print(f"nvfp4q: chunk {done}/{total}, {tokens / elapsed:.0f} tokens/s, "
              f"ETA {elapsed * (total - done) / done:.0f} s{', ' + note if note else ''}", file=sys.stderr, flush=True)

    yield on_chunk
