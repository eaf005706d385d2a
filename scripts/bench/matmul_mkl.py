"""The matrix products of a SmolLM2-135M training step in PyTorch (MKL on x86) and NumPy (its bundled
OpenBLAS), 2 threads, median GFLOP/s over 10 runs: the yardstick for candle's `gemm` in
docs/BENCHMARKS.md (`cargo run --release -p prospect --example matmul_vs_mkl` times the same shapes).

    python scripts/bench/matmul_mkl.py        # torch and numpy from scripts/requirements-ref.txt
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (m, k, n), as in crates/prospect/examples/matmul_vs_mkl.rs.
SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576), (512, 576, 576),
          (512, 576, 192), (350, 576, 49152)]


def median_gflops(product, m, k, n, reps=10):
    for _ in range(3):
        product()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        product()
        times.append(time.perf_counter() - started)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2] / 1e9


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__} (MKL: {torch.backends.mkl.is_available()}), numpy {np.__version__}, 2 threads")
    # One library at a time: their thread pools, side by side, slow each other down.
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        print(f"({m}, {k}, {n}) torch {median_gflops(lambda: a @ b, m, k, n):.1f} GFLOP/s")
    for m, k, n in SHAPES:
        x, y = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        print(f"({m}, {k}, {n}) numpy {median_gflops(lambda: x @ y, m, k, n):.1f} GFLOP/s")

if __name__ == "__main__":
    main()
