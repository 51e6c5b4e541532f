"""Issue 13's time targets, side by side in one run: `nvfp4q calibrate` against stock
llama-imatrix on the same text and chunks, and `quantize --calibration` against the default.

    python scripts/bench_calibration.py --text FILE [--model M.gguf | --preset llama-1b]
        [--chunks 2] [--repeat 3] [--llama-imatrix PATH] [--work /tmp/nvfp4q-bench]
    python scripts/bench_calibration.py --model M.gguf --calibration CAL.gguf   (quantize only)

llama-cpp-python does not ship llama-imatrix; give the path of one built from llama.cpp's
source (tools/imatrix) to get the calibrate ratio, else calibrate's time is shown alone. The
default quantize reads the calibration file as its imatrix (the same diagonal), so the two
quantize runs differ only in the error feedback. Runs alternate, each tool in its own process
after the model is read once (same page-cache state); every run is printed (the first quantize
pair includes Numba's compile when its cache is cold), then the median ratio.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

from bench_e2e import measure, model, warm
from make_synthetic_model import PRESETS


def alternate(repeat: int, src: Path, commands: dict[str, list[str]]) -> dict[str, list[tuple[float, int]]]:
    runs = {name: [] for name in commands}
    for _ in range(repeat):
        for name, cmd in commands.items():
            warm(src)
            runs[name].append(measure(cmd))
    return runs


def report(title: str, runs: dict[str, list[tuple[float, int]]], target: float) -> None:
    (a, first), (b, second) = runs.items()
    ratios = [x[0] / y[0] for x, y in zip(first, second)]
    print(title)
    for name, rs in runs.items():
        print(f"  {name:28} wall " + ", ".join(f"{w:.1f}" for w, _ in rs) + " s; peak RSS "
              + ", ".join(f"{r / 2**30:.2f}" for _, r in rs) + " GiB")
    print(f"  {a} / {b}: " + ", ".join(f"{r:.2f}" for r in ratios)
          + f"; median {statistics.median(ratios):.2f}x (target <= {target}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, help="the calibration text (needed unless --calibration)")
    ap.add_argument("--model", type=Path, help="an f16 GGUF (default: the synthetic --preset)")
    ap.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-imatrix", type=Path, help="a stock llama-imatrix binary")
    ap.add_argument("--calibration", type=Path, help="time quantize only, with this calibration file of the model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nvfp4q-bench"))
    a = ap.parse_args()
    if not (a.text or a.calibration):
        ap.error("give --text, or --calibration to time quantize only")
    a.work.mkdir(parents=True, exist_ok=True)
    src = a.model or model(a.work, a.preset)
    cal, out = a.calibration or a.work / "bench.cal.gguf", a.work / "bench-out.gguf"
    nv = [sys.executable, "-m", "nvfp4q"]
    threads = ["--threads", str(a.threads)]
    calibrate = {"nvfp4q calibrate": nv + ["calibrate", str(src), "--text", str(a.text), "-o", str(cal),
                                           "--chunks", str(a.chunks), "--overwrite", "-q", *threads]}
    if a.llama_imatrix:
        calibrate["llama-imatrix"] = [str(a.llama_imatrix), "-m", str(src), "-f", str(a.text), "-c", "512",
                                      "--chunks", str(a.chunks), "-t", str(a.threads), "-o", str(a.work / "imatrix.gguf")]
    if a.llama_imatrix and not a.calibration:
        report(f"{src.name}, {a.chunks} chunks of {a.text.name}", alternate(a.repeat, src, calibrate), 2)
    elif not a.calibration:
        walls = [w for w, _ in alternate(a.repeat, src, calibrate)["nvfp4q calibrate"]]
        print("nvfp4q calibrate: wall " + ", ".join(f"{w:.1f}" for w in walls) + " s")
    quantize = [*nv, "quantize", str(src), str(out), "--overwrite", "-q", *threads]
    runs = alternate(a.repeat, src, {"quantize --calibration": quantize + ["--calibration", str(cal)],
                                     "quantize (default)": quantize + ["--imatrix", str(cal)]})
    report(f"{src.name}: quantize", runs, 3)
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
