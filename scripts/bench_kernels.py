"""Kernel throughput, side by side with stock ggml's round-to-nearest in the same run.

    python scripts/bench_kernels.py [--repeat 3]

Prints weights/s for nvfp4q's NVFP4 encoder (S=0, S=12, S=12 with importance) on one
thread and on all threads, and for ggml_quantize_chunk (NVFP4, one thread, as
llama-quantize calls it per thread) on the same f16-rounded arrays, then the ratios.
Also times Numba's first-call compile (empty cache; the kernels a default quantize of an f16
model compiles) and a cached start, each in a fresh process, three times each (the machine is
noisy: the median is the figure).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SHAPES = [(2048, 640), (640, 2048), (1024, 4096)]
# what a default quantize of an f16 model runs first: the NaN/amax scan (numpy), NVFP4 and Q8_0 on f16 rows
STARTUP = ("import time; t = time.perf_counter(); import numpy as np; from nvfp4q import kernels as K; "
           "x = np.ones((1, 64), np.float16); K.scan(x); K.quantize_nvfp4(x, np.ones(64, np.float32), 12); "
           "K.quantize_q8_0(x); print(time.perf_counter() - t)")


def startup_seconds(cache_dir: str) -> float:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", STARTUP], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout)


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    firsts, cached = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as cache:
            firsts.append(startup_seconds(cache))
            cached.append(startup_seconds(cache))
    print(f"numba start-up: first call (compile) median {np.median(firsts):.1f} s "
          f"({', '.join(f'{t:.1f}' for t in firsts)}; target <= 5 s), cached start {np.median(cached):.2f} s")

    import numba

    import ggml_oracle as ggml
    from nvfp4q import kernels as K

    n_all = numba.config.NUMBA_NUM_THREADS
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 0.02, s).astype(np.float16).astype(np.float32) for s in SHAPES]
    imps = [rng.lognormal(0, 1, s[1]).astype(np.float32) for s in SHAPES]
    n = sum(a.size for a in arrays)

    def rate(fn) -> float:
        return n / best_time(lambda: [fn(a, i) for a, i in zip(arrays, imps)], args.repeat)

    rates = {"ggml RTN (1 thread)": rate(lambda a, i: ggml.quantize(ggml.NVFP4, a))}
    cases = {"S=0": (False, 0), "S=12": (False, 12), "S=12 + importance": (True, 12)}
    for threads in (1, n_all):
        numba.set_num_threads(threads)
        for label, (use_imp, s) in cases.items():
            K.quantize_nvfp4(arrays[0][:4], imps[0] if use_imp else None, s)  # compile outside timing
            rates[f"{label} ({threads} thread{'s' if threads > 1 else ''})"] = rate(
                lambda a, i, s=s, u=use_imp: K.quantize_nvfp4(a, i if u else None, s))
    numba.set_num_threads(n_all)

    stock = rates["ggml RTN (1 thread)"]
    print(f"{'case':34} {'Mweights/s':>11} {'vs ggml RTN':>12}")
    for label, r in rates.items():
        print(f"{label:34} {r / 1e6:11.1f} {r / stock:11.2f}x")
    for label in cases:
        one, many = rates[f"{label} (1 thread)"], rates[f"{label} ({n_all} threads)"]
        print(f"scaling {label}: {n_all} threads = {many / one:.2f}x one thread")


if __name__ == "__main__":
    main()
