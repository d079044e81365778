"""Time the matrix products of the demo model's MLP in NumPy and in PyTorch, single-threaded.

The products are those of one ``up_proj`` layer over a batch of 32 x 32
tokens: the forward ``x W^T`` (1024 x 64 by 64 x 256), the weight gradient
``g^T x`` and the input gradient ``g W``. Run it with and without
``OPENBLAS_CORETYPE`` to see which OpenBLAS kernel NumPy uses:

    python benchmarks/matmul.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/matmul.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_step import blas_description, limit_threads, torch  # noqa: E402


def median_microseconds(function, repeats=300):
    """Return the median CPU time of ``function()`` in microseconds."""
    times = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        times.append(time.process_time() - started)
    return 1e6 * float(np.median(times))


def main():
    limit_threads(1)
    print(f"NumPy BLAS: {blas_description()}")
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        x, W, g = (rng.standard_normal(shape).astype(dtype) for shape in ((1024, 64), (256, 64), (1024, 256)))
        products = {"x W^T": (x, W.T), "g^T x": (g.T, x), "g W": (g, W)}
        cells = [f"{name} {median_microseconds(lambda: a @ b):.0f} us" for name, (a, b) in products.items()]
        line = f"{dtype}: NumPy " + ", ".join(cells)
        if torch is not None:
            tensors = {name: (torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b)))
                       for name, (a, b) in products.items()}
            cells = [f"{name} {median_microseconds(lambda: a @ b):.0f} us" for name, (a, b) in tensors.items()]
            line += " | PyTorch " + ", ".join(cells)
        print(line)


if __name__ == "__main__":
    main()
