"""End-to-end wall time and peak RSS, side by side with stock llama.cpp in the same run.

    python scripts/bench_e2e.py [--presets llama-1b qwen3moe-8g] [--work /tmp/nvfp4q-bench]

For each synthetic model (made by make_synthetic_model.py unless already there) it runs, each in
its own process after reading the source once (same page-cache state for both):
`nvfp4q quantize --search 12` and stock llama.cpp's llama_model_quantize to Q8_0 (through
llama-cpp-python) with the same thread count, alternately --repeat times, and prints (for the
run whose ratio is the median) wall time, weights/s,
peak RSS and the ratios the targets are stated in: wall time against llama.cpp's Q8_0, and peak
RSS against the largest tensor in float32 (it must not grow with model size).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from make_synthetic_model import PRESETS, write  # noqa: E402

from nvfp4q import gguf_header  # noqa: E402

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t
print(code, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""

LLAMA_Q8_0 = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = 7, int(sys.argv[3])  # LLAMA_FTYPE_MOSTLY_Q8_0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def measure(cmd: list[str]) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    code, wall, rss = out.stdout.split()
    if code != "0":
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return float(wall), int(rss)


def warm(path: Path) -> None:
    """Read the file once so that both tools start with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def model(work: Path, preset: str) -> Path:
    path = work / f"{preset}-f16.gguf"
    if not path.exists():
        print(f"making {path} ...", flush=True)
        tmp = path.with_suffix(".tmp")
        write(tmp, PRESETS[preset])
        tmp.rename(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["llama-1b", "qwen3moe-8g"], choices=sorted(PRESETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/nvfp4q-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--search", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool; the run of the median ratio is shown")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    gib = 1 << 30
    rows = []
    for preset in a.presets:
        src = model(a.work, preset)
        h = gguf_header.read(src)
        n = sum(t.n_elements for t in h.tensors)
        largest = max(t.n_elements for t in h.tensors) * 4
        out = a.work / f"{preset}-out.gguf"
        runs = []
        for _ in range(a.repeat):  # alternating, so that the machine's mood hits both tools alike
            warm(src)
            nv = measure([sys.executable, "-m", "nvfp4q", "quantize", str(src), str(out), "--search", str(a.search),
                          "--threads", str(a.threads), "-q", "--overwrite"])
            warm(src)
            ll = measure([sys.executable, "-c", LLAMA_Q8_0, str(src), str(out), str(a.threads)])
            out.unlink()
            runs.append((nv, ll))
        print(f"{preset}: wall nvfp4q / llama.cpp " + ", ".join(f"{nv[0]:.1f}/{ll[0]:.1f}" for nv, ll in runs),
              flush=True)
        med = sorted(runs, key=lambda r: r[0][0] / r[1][0])[len(runs) // 2]  # the run of the median ratio
        rows.append((preset, src.stat().st_size, n, largest, *med))
    print(f"\nthreads: {a.threads}, nvfp4q --search {a.search}")
    print(f"{'model':14} {'f16 GiB':>8} {'tool':18} {'wall s':>8} {'Mw/s':>7} {'peak RSS GiB':>13} "
          f"{'RSS/largest f32':>16}")
    for preset, size, n, largest, nv, ll in rows:
        for tool, (wall, rss) in (("nvfp4q NVFP4", nv), ("llama.cpp Q8_0", ll)):
            print(f"{preset:14} {size / gib:8.2f} {tool:18} {wall:8.1f} {n / wall / 1e6:7.1f} {rss / gib:13.2f} "
                  f"{rss / largest:16.2f}")
        target = 1.2 if "moe" in preset else 1.0  # issue #14's targets
        print(f"{preset:14} wall nvfp4q / llama.cpp Q8_0 = {nv[0] / ll[0]:.2f}x (target <= {target}x); "
              f"peak RSS {nv[1] / gib:.2f} GiB vs target 2 x {largest / gib:.2f} + 0.5 = "
              f"{(2 * largest + gib / 2) / gib:.2f} GiB")


if __name__ == "__main__":
    main()
