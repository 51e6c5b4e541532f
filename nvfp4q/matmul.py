"""Matrix products with the same bits for any thread count.

OpenBLAS's own threads change a product's summation order on some CPUs (measured on an AMD EPYC
with its Haswell kernels: one thread against two, from 96 x 96 up; earlier machines kept them),
so it runs on one thread (set here once loaded, and by cli.py before it loads, where /proc is
missing) and the products that cost split their rows here instead: chunks fixed by the shape
alone, one BLAS call each, on the kernels' pool (BLAS releases the GIL).
"""

import ctypes

import numpy as np

from nvfp4q.kernels import over_chunks

CHUNKS = 8  # per product: enough to keep a few threads busy
MIN_ROWS = 32  # per chunk: below this a call's overhead outweighs its work
# multiply-adds below which a product is one call: on two threads, 8 chunks of a 288^3 product
# took 1.3 ms against one call's 0.8, of a 576^3 one 3.9 ms against 5.8
MIN_SPLIT = 1 << 26


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, its rows in chunks that depend on a's shape only."""
    rows = a.shape[0]
    out = np.empty((rows, b.shape[1]), np.result_type(a, b))
    split = rows * a.shape[1] * b.shape[1] >= MIN_SPLIT
    step = max(MIN_ROWS, -(-rows // CHUNKS)) if split else max(rows, 1)
    over_chunks(_rows_product, rows, step, a, b, out)
    return out


def _rows_product(a, b, out, r0, r1):
    np.matmul(a[r0:r1], b, out=out[r0:r1])


def _one_blas_thread() -> None:
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1]}
    except OSError:
        return
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)


_one_blas_thread()
