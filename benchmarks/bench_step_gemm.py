"""Times the GEMM engines on a sweep step's products, one thread: small_gemm
(csrc/cpu/small_gemm.cpp), oneDNN (the matmul libtorch exports) and BLAS (sgemm_).

    python benchmarks/bench_step_gemm.py

A step multiplies B rows (the batch) by a weight matrix in row-major layout: h W_hh^T,
dg W_hh, and a chunk of inputs times W_ih^T in inference. The shapes are those of the
cases of bench_lstm.py's `targets` preset.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cpu"

DRIVER = r"""
#include <torch/extension.h>
#include <chrono>
#include "blas.h"
#include "small_gemm.h"

// Seconds per call of engine 0 (small_gemm, b packed once beforehand as in a sweep),
// 1 (oneDNN) or 2 (BLAS): c = a b.
double time_engine(int64_t engine, at::Tensor a, at::Tensor b, at::Tensor c, int64_t iters) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor packed = at::empty({birnn::small_gemm_packed_size(K, N)}, b.options());
  birnn::small_gemm_pack(K, N, b.data_ptr<float>(), N, 1, packed.data_ptr<float>());
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    if (engine == 0) {
      birnn::small_gemm(M, N, K, a.data_ptr<float>(), K, 1, packed.data_ptr<float>(), 0.f, c.data_ptr<float>(), N);
    } else if (engine == 1) {
      birnn::onednn_matmul()(a, b, c, 0.f, 1.f);
    } else {
      birnn::gemm<float>(false, false, M, N, K, 1.f, a.data_ptr<float>(), K, b.data_ptr<float>(), N, 0.f,
                         c.data_ptr<float>(), N);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}
"""

# (what, M, K, N)
SHAPES = [
    ("latency h W_hh^T", 1, 128, 512),
    ("classic h W_hh^T", 100, 128, 512),
    ("classic dg W_hh", 100, 512, 128),
    ("medium h W_hh^T", 64, 256, 1024),
    ("medium x W_ih^T (chunk)", 256, 128, 1024),
    ("large h W_hh^T", 16, 512, 2048),
    ("large x W_ih^T (chunk)", 256, 256, 2048),
]


def main():
    build = Path(tempfile.gettempdir()) / "birnn_ext_bench_step_gemm"
    build.mkdir(exist_ok=True)
    ext = load_inline(
        "bench_step_gemm", cpp_sources=[DRIVER, (CSRC / "small_gemm.cpp").read_text()], functions=["time_engine"],
        extra_include_paths=[str(CSRC)], extra_cflags=["-O3"], build_directory=str(build),
    )
    torch.set_num_threads(1)
    print(f"{'product':26s} {'M':>4s} {'K':>4s} {'N':>5s}   small_gemm      oneDNN        BLAS   (us, GFLOP/s)")
    for what, M, K, N in SHAPES:
        a, b = torch.randn(M, K), torch.randn(K, N)
        want = a @ b
        cells = []
        for engine in range(3):
            c = torch.empty(M, N)
            ext.time_engine(engine, a, b, c, 3)
            torch.testing.assert_close(c, want, rtol=1e-4, atol=1e-3)
            iters = max(20, int(3e8 / (M * N * K)))
            t = min(ext.time_engine(engine, a, b, c, iters) for _ in range(3))
            cells.append(f"{t * 1e6:7.1f} {2 * M * N * K / t / 1e9:4.0f}")
        print(f"{what:26s} {M:4d} {K:4d} {N:5d}   " + "   ".join(cells))


if __name__ == "__main__":
    main()
