"""Command line: parse, call, report. Errors become one line on stderr and an exit code."""

import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfp4q.errors import UserError, VerifyFailed

# Before numpy loads: OpenBLAS on one thread, whatever the environment says, as its threads can
# change a product's bits (nvfp4q/matmul.py splits the products that cost among nvfp4q's own)
os.environ["OPENBLAS_NUM_THREADS"] = "1"

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Requantize f16/bf16/f32 GGUF models to NVFP4 for stock llama.cpp, and inspect the result.",
)

EXIT_FAILURE, EXIT_USAGE = 1, 2
# click's UsageError, from typer's own copy of click where typer vendors it
_UsageError = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "UsageError")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: unwinds through the clean-up like KeyboardInterrupt does."""

    def __init__(self, code: int):
        self.code = code


def _on_signal(signum, _frame):
    raise Interrupted(128 + signum)


def _fail(message: str, code: int) -> None:
    print(f"nvfp4q: error: {_one_line(message)}", file=sys.stderr)
    raise typer.Exit(code)


def _show(doc: dict, as_json: bool, render) -> None:
    """A command's result on stdout: one JSON document for pipelines, else render's tables."""
    if as_json:
        import json

        print(json.dumps(doc, indent=2, allow_nan=False))
    else:
        render(doc)


def _one_line(text: str) -> str:
    """Text from a file (a damaged tensor name) may hold newlines or control bytes: escaped, a
    message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except _UsageError as e:
        _fail(e.format_message(), EXIT_USAGE)


class _OneLineErrors(typer.core.TyperCommand):
    """Usage errors as one line `nvfp4q: error: ...` (exit 2) like every other error, not a
    framed box: a pipeline reading --json gets one line on stderr whatever went wrong."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def _type_option(value: Optional[str], option: str):
    from nvfp4q.plan import parse_type

    if value is None:
        return None
    try:
        return parse_type(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


@app.command(cls=_OneLineErrors)
def quantize(
    src: Annotated[Path, typer.Argument(help="Source GGUF (f16, bf16 or f32; any part of a split model).")],
    out: Annotated[Path, typer.Argument(help="Output GGUF.")],
    imatrix: Annotated[Optional[Path], typer.Option(help="Importance matrix (llama-imatrix GGUF or legacy .dat).")] = None,
    search: Annotated[int, typer.Option(min=0, max=126, help="Scale-code search window S; 0 = stock round-to-nearest.")] = 12,
    weighting: Annotated[str, typer.Option(help="Error weight with --imatrix: 'importance' (the imatrix value), 'floor' (imatrix value + 1/10 of its mean over the tensor), 'ggml' (importance * sqrt(sigma2 + x^2)).")] = "importance",
    global_scale: Annotated[str, typer.Option(help="Per-tensor scales: 'sidecar' (.scale tensors where llama.cpp's graph applies them), 'rescale' (powers of two moved between a layer's norm and weights where the network computes the same function, see docs/global-scale.md), 'auto' (FFN sidecars and rescaling where the architecture allows; off with --search 0, which stays stock ggml's bytes), 'off'.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Worker threads (default: all cores).")] = None,
    tensor_type: Annotated[Optional[list[str]], typer.Option("--tensor-type", help="REGEX=TYPE override, repeatable, first match wins.")] = None,
    output_tensor_type: Annotated[Optional[str], typer.Option(help="Type for output.weight.")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option(help="Type for token_embd.weight.")] = None,
    pure: Annotated[bool, typer.Option(help="NVFP4 for every quantizable tensor, embeddings and output included.")] = False,
    leave_output_tensor: Annotated[bool, typer.Option(help="Keep output.weight as it is.")] = False,
    include_weights: Annotated[Optional[list[str]], typer.Option("--include-weights", help="Use the imatrix only for tensors whose name contains this (repeatable).")] = None,
    exclude_weights: Annotated[Optional[list[str]], typer.Option("--exclude-weights", help="Do not use the imatrix for tensors whose name contains this (repeatable).")] = None,
    imatrix_strict: Annotated[bool, typer.Option(help="Fail if an NVFP4 tensor has no imatrix entry.")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration file from `nvfp4q calibrate`: round NVFP4 with error feedback through the inputs' covariances (GPTQ-style); its diagonal is the imatrix where it has one.")] = None,
    damp: Annotated[float, typer.Option(min=1e-6, max=10.0, help="With --calibration: added to the covariance's diagonal, as a fraction of its mean.")] = 0.01,
    shrink: Annotated[float, typer.Option(min=0.0, max=1.0, help="With --calibration: the covariance's off-diagonal is multiplied by 1 - SHRINK (1: no error feedback between columns).")] = 0.5,
    scales: Annotated[str, typer.Option(help="Sub-block scale choice: 'search' (least imatrix-weighted error in the window), 'local' (with --calibration: least error through the sub-block's 16x16 block of the input covariance).")] = "search",
    error_feedback: Annotated[bool, typer.Option(help="With --calibration: push each column's rounding error onto the columns not yet quantized.")] = True,
    passes: Annotated[int, typer.Option(min=0, max=100, help="With --calibration: passes of coordinate descent after the error feedback, each moving every weight to the grid value that most lowers the error through the covariance (0: the error feedback alone).")] = 3,
    rank: Annotated[int, typer.Option(min=0, max=1024, help="With --calibration: inputs wider than 32 x RANK, sketched ones, and the costliest others while the whole covariances would cost the model over 512 multiply-adds per weight feed their errors back through the diagonal plus RANK leading directions of their covariance, at a cost that grows with RANK, not with the width; 0: the whole covariance everywhere.")] = 64,
    allow_requantize: Annotated[bool, typer.Option(help="Accept already-quantized source tensors (quality suffers).")] = False,
    keep_split: Annotated[bool, typer.Option(help="One output part per input part (split input).")] = False,
    split_max_size: Annotated[Optional[str], typer.Option(help="Split the output into parts of at most this size (e.g. 48G, 500M).")] = None,
    split_max_tensors: Annotated[int, typer.Option(min=0, help="Split the output into parts of at most N tensors.")] = 0,
    target_size: Annotated[Optional[str], typer.Option(help="Choose each unpinned tensor's type (NVFP4, Q5_0, Q5_1, Q8_0 or F16) for the least estimated damage with the output at most this size (e.g. 230M, 18G; headers included). See docs/allocation.md.")] = None,
    target_bpw: Annotated[Optional[float], typer.Option(min=0.01, help="As --target-size, for this many bits per weight (output bytes * 8 / weights, as the summary's).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and totals, write nothing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="The summary (or the --dry-run plan) as one JSON document on stdout (schema: docs/quantize-json.md).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, only the final summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List tensors without imatrix data.")] = False,
) -> None:
    """Quantize SRC into OUT: 2D weights to NVFP4, embeddings and output to Q8_0."""
    # Before numpy loads: the --calibration kernels' OpenMP threads spun on after each one, beside
    # the products that come next (SmolLM2, medians of 4: 8.0 s, sleeping at once 6.9 s); the
    # default's kernels run on a pool of Python threads (docs/kernels.md), untouched
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nvfp4q import report
    from nvfp4q.global_scale import MODES
    from nvfp4q.plan import FLOAT_SOURCES, Options, parse_tensor_type
    from nvfp4q.convert import SCALE_CHOICES, WEIGHTINGS
    from nvfp4q.quantize import Settings, prepare, run
    from nvfp4q.units import parse_size

    try:
        patterns = tuple(parse_tensor_type(t) for t in tensor_type or ())
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--tensor-type") from None
    try:
        max_size = parse_size(split_max_size) if split_max_size else 0
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--split-max-size") from None
    try:
        budget = parse_size(target_size) if target_size else 0
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--target-size") from None
    if budget and target_bpw:
        raise typer.BadParameter("use either --target-size or --target-bpw")
    if keep_split and (max_size or split_max_tensors):
        raise typer.BadParameter("use either --keep-split or --split-max-size/--split-max-tensors")
    if global_scale not in MODES:
        raise typer.BadParameter(f"use one of {', '.join(MODES)}", param_hint="--global-scale")
    if global_scale == "auto" and search == 0:
        global_scale = "off"
    if scales not in SCALE_CHOICES:
        raise typer.BadParameter(f"use one of {', '.join(SCALE_CHOICES)}", param_hint="--scales")
    if weighting not in WEIGHTINGS:
        raise typer.BadParameter(f"use one of {', '.join(WEIGHTINGS)}", param_hint="--weighting")
    opts = Options(
        tensor_types=patterns,
        output_tensor_type=_type_option(output_tensor_type, "--output-tensor-type"),
        token_embedding_type=_type_option(token_embedding_type, "--token-embedding-type"),
        pure=pure, leave_output_tensor=leave_output_tensor, global_scale=global_scale,
    )
    settings = Settings(
        search=search, weighting=weighting,
        imatrix=imatrix, imatrix_strict=imatrix_strict, calibration=calibration, damp=damp, shrink=shrink,
        scales=scales, feedback=error_feedback, rank=rank, passes=passes,
        include_weights=tuple(include_weights or ()), exclude_weights=tuple(exclude_weights or ()),
        allow_requantize=allow_requantize, overwrite=overwrite, keep_split=keep_split,
        split_max_tensors=split_max_tensors, split_max_size=max_size,
        target_size=budget, target_bpw=target_bpw or 0.0,
    )
    if threads:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        job = prepare(src, opts, settings)
        if dry_run:
            _show(report.document(job, opts, settings, src, out), json_out, report.render)
            return
        requantized = [st for st in job.plan if st.converts and st.tensor.type not in FLOAT_SOURCES]
        if requantized:
            print(f"nvfp4q: warning: {len(requantized)} tensor(s) decoded from quantized types and "
                  "quantized again: quality suffers", file=sys.stderr)
        if verbose:
            for name in job.missing_importance:
                print(f"nvfp4q: no imatrix data for {_one_line(name)}", file=sys.stderr)
        with report.progress(job, quiet) as on_tensor:
            summary = run(job, out, settings, on_tensor)
        _show(report.document(job, opts, settings, src, out, summary), json_out, report.render)
    except UserError as e:
        _fail(str(e), EXIT_FAILURE)
    except OSError as e:
        _fail(f"{e.filename or out}: {e.strerror or e}", EXIT_FAILURE)


@app.command(cls=_OneLineErrors)
def calibrate(
    model: Annotated[Path, typer.Argument(help="The f16/bf16/f32 GGUF to calibrate on (the model you will quantize).")],
    out: Annotated[Path, typer.Option("-o", "--output", help="Calibration file to write (a GGUF, also a valid --imatrix).")],
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 calibration text (not the text you evaluate on).")] = None,
    chunks: Annotated[Optional[int], typer.Option(min=1, help="Use the first N chunks of the text (default: all).")] = None,
    generate: Annotated[int, typer.Option(min=0, help="Add N chunks the model writes itself from random first tokens: covariances that reach beyond the text's kind (docs/calibration.md).")] = 0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of --generate's sampling.")] = 0,
    ctx: Annotated[int, typer.Option(min=16, help="Tokens per chunk.")] = 512,
    band: Annotated[int, typer.Option(min=64, help="Inputs wider than this and not sketched keep band x band diagonal blocks of their covariance.")] = 4096,
    sketch: Annotated[int, typer.Option(min=0, help="Inputs wider than --sketch-above keep a rank-N sketch of their covariance instead (0: none).")] = 256,
    sketch_above: Annotated[int, typer.Option(min=64, help="See --sketch (2048: the widths quantize rounds whole at its default --rank).")] = 2048,
    threads: Annotated[Optional[int], typer.Option(min=1, help="llama.cpp threads (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="The summary as one JSON document on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
) -> None:
    """Run MODEL in stock llama.cpp over TEXT (and text it writes itself) and collect every weight input's covariance X^T X."""
    from nvfp4q import calibrate as cal, eval_view

    try:
        with eval_view.progress(sys.stderr.isatty(), quiet) as on_chunk:
            summary = cal.calibrate(model, text, out, chunks, ctx, band, threads or os.cpu_count() or 1,
                                    overwrite, sketch, sketch_above, on_chunk, generate, seed)
    except UserError as e:
        _fail(str(e), EXIT_FAILURE)
    except OSError as e:
        _fail(f"{e.filename or out}: {e.strerror or e}", EXIT_FAILURE)
    _show(cal.document(summary), json_out, cal.render)


@app.command(cls=_OneLineErrors)
def inspect(
    file: Annotated[Path, typer.Argument(help="A model GGUF (any part of a split model) or an imatrix file.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (schema: docs/inspect-json.md).")] = False,
    tensors: Annotated[Optional[str], typer.Option(help="List tensors (or imatrix entries) whose name matches this regex.")] = None,
    meta: Annotated[bool, typer.Option(help="List all metadata (long arrays summarised).")] = False,
    verify: Annotated[bool, typer.Option(help="Decode every tensor and check it; exit 1 on a problem.")] = False,
    against: Annotated[Optional[Path], typer.Option(help="Source GGUF to measure each tensor's error against.")] = None,
    imatrix: Annotated[Optional[Path], typer.Option(help="Weight the --against error by this imatrix.")] = None,
) -> None:
    """Describe a GGUF model or imatrix: types, sizes, bits per weight, metadata; optionally verify it."""
    from nvfp4q import inspect as insp

    try:
        doc = insp.describe(file, tensors_regex=tensors, meta=meta, verify=verify,
                            against=against, imatrix_path=imatrix)
    except VerifyFailed as e:
        _fail(str(e), EXIT_FAILURE)
    except UserError as e:
        _fail(str(e), EXIT_USAGE)
    _show(doc, json_out, insp.render)
    if doc.get("verify", {}).get("problems"):
        raise typer.Exit(EXIT_FAILURE)


@app.command("eval", cls=_OneLineErrors)
def eval_(
    base: Annotated[Path, typer.Argument(help="The reference GGUF (the f16 model).")],
    quants: Annotated[list[Path], typer.Argument(help="Quantized GGUFs of the same model.")],
    text: Annotated[Path, typer.Option(help="UTF-8 text to evaluate on (not the imatrix's or calibration's).")],
    chunks: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N chunks (default: all).")] = None,
    ctx: Annotated[int, typer.Option(min=8, help="Tokens per chunk; the second half of each is scored.")] = 512,
    threads: Annotated[Optional[int], typer.Option(min=1, help="llama.cpp threads (default: all cores).")] = None,
    paired: Annotated[bool, typer.Option(help="Also the paired difference of each QUANT after the first against the first.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout (schema: docs/eval-json.md).")] = False,
) -> None:
    """PPL, PPL ratio, KLD and top-1 agreement of each QUANT against BASE, run by stock llama.cpp."""
    from nvfp4q import eval_view, evaluation

    try:
        with eval_view.progress(enabled=sys.stderr.isatty()) as on_chunk:
            result = evaluation.evaluate(base, quants, text, ctx, chunks, threads or os.cpu_count() or 1,
                                         on_chunk)
    except UserError as e:
        _fail(str(e), EXIT_FAILURE)
    _show(evaluation.document(result, paired), json_out, eval_view.render)


def main() -> None:
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its warnings are not for our users
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        app()
    except Interrupted as e:
        print("nvfp4q: interrupted", file=sys.stderr)
        sys.stderr.flush()
        os._exit(e.code)
