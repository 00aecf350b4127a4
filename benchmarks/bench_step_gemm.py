"""Times the GEMM engines on a sweep step's products, one thread: small_gemm
(csrc/cpu/small_gemm.cpp) over packed weights, oneDNN (the matmul libtorch exports),
BLAS (sgemm_), and small_gemm_in_place over the weights as they lie; and the time of
small_gemm's packing of B, which a layer call pays once before its sweep, alone and with
the read of whether B is finite (a sweep from zero state packs W_hh so). With --dtype
bf16: small_gemm_bf16 (csrc/cpu/small_gemm_bf16.cpp) over its dot-product panels (where
the processor has AVX512_BF16) and over its widened ones, against oneDNN's bfloat16
matmul; the layer ops pick one of the two per call (small_gemm_bf16_panels).

    python benchmarks/bench_step_gemm.py [--overlapped] [--dtype bf16]

A step multiplies B rows (the batch) by a weight matrix in row-major layout: h W_hh^T,
dg W_hh, and a chunk of inputs times W_ih^T in inference. The shapes are those of the
cases of bench_lstm.py's `targets` preset, and of a few small batches. Each product waits
for the one before, as a step waits for the last (--overlapped times independent calls).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cpu"

DRIVER = r"""
#include <torch/extension.h>
#include <chrono>
#include <string>
#include "blas.h"
#include "small_gemm.h"

// Seconds per call of engine 0 (small_gemm, b packed once beforehand as in a sweep),
// 1 (oneDNN), 2 (BLAS) or 3 (small_gemm_in_place, b read where it lies): c = a b. b is
// [K,N] row-major, or the transpose of a row-major [N,K] matrix (a weight as nn.LSTM
// stores it).
double time_engine(int64_t engine, at::Tensor a, at::Tensor b, at::Tensor c, int64_t iters, bool chain) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const bool ta = a.stride(0) == 1 && M > 1, tb = b.stride(0) == 1;  // transposed operands
  const int64_t a_row = a.stride(0), a_col = a.stride(1);
  at::Tensor packed = at::empty({birnn::small_gemm_packed_size(K, N)}, b.options());
  birnn::small_gemm_pack(K, N, b.data_ptr<float>(), b.stride(0), b.stride(1), packed.data_ptr<float>());
  // In a sweep each product waits for the previous step's: time that chain, not
  // independent calls that the processor could overlap. a's first element takes a
  // zero-weighted part of the last output, so each call depends on the one before.
  float* a0 = a.data_ptr<float>();
  const float* c0 = c.data_ptr<float>();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    if (chain) *a0 += *c0 * 0.f;
    if (engine == 0) {
      birnn::small_gemm(M, N, K, a.data_ptr<float>(), a_row, a_col, packed.data_ptr<float>(), 0.f, c.data_ptr<float>(),
                        N);
    } else if (engine == 1) {
      birnn::onednn_matmul()(a, b, c, 0.f, 1.f);
    } else if (engine == 2) {
      birnn::gemm<float>(ta, tb, M, N, K, 1.f, a.data_ptr<float>(), ta ? M : K, b.data_ptr<float>(), tb ? K : N, 0.f,
                         c.data_ptr<float>(), N);
    } else {
      if (!birnn::small_gemm_in_place_fits(M, K, a_col, b.stride(0), b.stride(1))) return -1;
      birnn::small_gemm_in_place(M, N, K, a.data_ptr<float>(), a_row, a_col, b.data_ptr<float>(), b.stride(0),
                                 b.stride(1), 0.f, c.data_ptr<float>(), N);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}

// The same for bfloat16: engine 0 small_gemm_bf16 over dot-product panels, 1 over
// widened ones (b packed beforehand), 2 oneDNN.
double time_engine_bf16(int64_t engine, at::Tensor a, at::Tensor b, at::Tensor c, int64_t iters, bool chain) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (engine > 2 || (engine == 0 && !birnn::small_gemm_bf16_has_dot())) return -1;
  auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
  const auto panels = engine == 0 ? birnn::Bf16Panels::dot : birnn::Bf16Panels::widened;
  at::Tensor packed = at::empty({birnn::small_gemm_bf16_packed_bytes(panels, K, N)}, b.options().dtype(at::kByte));
  birnn::small_gemm_bf16_pack(panels, K, N, bits(b), b.stride(0), b.stride(1), packed.data_ptr());
  uint16_t* a0 = bits(a);
  const uint16_t* c0 = bits(c);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    if (chain) *a0 = uint16_t(*a0 ^ (*c0 & 0));  // a read of the last output that changes nothing
    if (engine < 2) {
      birnn::small_gemm_bf16(panels, M, N, K, bits(a), a.stride(0), a.stride(1), packed.data_ptr(), 0.f, bits(c), N);
    } else {
      birnn::onednn_matmul()(a, b, c, 0.f, 1.f);
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}

std::string bf16_build() { return birnn::small_gemm_bf16_build(); }

// Seconds per small_gemm_pack of b into one buffer (as a layer call packs its weights for
// the step products of its sweep), float32; with `checked`, small_gemm_pack_checked (the
// packing that also reads whether b is finite, as a sweep from zero state packs W_hh).
double time_pack(at::Tensor b, int64_t iters, bool checked) {
  const int64_t K = b.size(0), N = b.size(1);
  at::Tensor packed = at::empty({birnn::small_gemm_packed_size(K, N)}, b.options());
  bool finite = true;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    if (checked)
      finite &= birnn::small_gemm_pack_checked(K, N, b.data_ptr<float>(), b.stride(0), b.stride(1),
                                               packed.data_ptr<float>());
    else
      birnn::small_gemm_pack(K, N, b.data_ptr<float>(), b.stride(0), b.stride(1), packed.data_ptr<float>());
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
  TORCH_CHECK(finite, "time_pack: small_gemm_pack_checked found finite values non-finite");
  return t;
}
"""

# (what, M, K, N); B is the transpose of a row-major weight in x W_ih^T and h W_hh^T, and
# A that of the gate gradients in dg^T (a weight gradient over one block of rows).
SHAPES = [
    ("latency h W_hh^T", 1, 128, 512),
    ("latency dg W_hh", 1, 512, 128),
    ("latency x W_ih^T (chunk)", 28, 28, 512),
    ("B=1 x W_ih^T (one step)", 1, 28, 512),
    ("B=2 x W_ih^T (one step)", 2, 28, 512),
    ("B=4 x W_ih^T (one step)", 4, 28, 512),
    ("B=1 I=16 H=16 x W_ih^T", 1, 16, 64),
    ("B=2 h W_hh^T", 2, 128, 512),
    ("B=2 dg W_hh", 2, 512, 128),
    ("B=4 h W_hh^T", 4, 128, 512),
    ("B=4 dg W_hh", 4, 512, 128),
    ("B=16 h W_hh^T", 16, 128, 512),
    ("B=16 dg W_hh", 16, 512, 128),
    ("classic h W_hh^T", 100, 128, 512),
    ("classic dg W_hh", 100, 512, 128),
    ("medium h W_hh^T", 64, 256, 1024),
    ("medium x W_ih^T (chunk)", 256, 128, 1024),
    ("large h W_hh^T", 16, 512, 2048),
    ("large x W_ih^T (chunk)", 256, 256, 2048),
    ("latency dW_hh: dg^T h", 512, 28, 128),
    ("latency dW_ih: dg^T x", 512, 28, 28),
]
ENGINES = ["small_gemm", "oneDNN", "BLAS", "in place"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlapped", action="store_true",
                        help="time independent calls, which the processor may overlap, instead of a chain of "
                             "dependent ones as in a sweep")
    parser.add_argument("--dtype", choices=["float32", "bf16"], default="float32")
    args = parser.parse_args()
    # One folder per torch version: a library built against another torch would crash.
    build = Path(tempfile.gettempdir()) / f"birnn_ext_bench_step_gemm-torch{torch.__version__}"
    build.mkdir(exist_ok=True)
    sources = [DRIVER] + [(CSRC / f).read_text() for f in ("small_gemm.cpp", "small_gemm_bf16.cpp")]
    ext = load_inline(
        "bench_step_gemm", cpp_sources=sources,
        functions=["time_engine", "time_engine_bf16", "bf16_build", "time_pack"],
        extra_include_paths=[str(CSRC)], extra_cflags=["-O3"], build_directory=str(build),
    )
    torch.set_num_threads(1)
    bf16 = args.dtype == "bf16"
    dtype, time_engine = (torch.bfloat16, ext.time_engine_bf16) if bf16 else (torch.float32, ext.time_engine)
    engines = ["bf16 dot", "bf16 widened", "oneDNN"] if bf16 else ENGINES
    print(f"{'product':26s} {'M':>4s} {'K':>4s} {'N':>5s}  " + "".join(f"{e:>14s}" for e in engines)
          + ("" if bf16 else f"{'pack B':>9s}{'checked':>9s}")
          + "   (us, GFLOP/s; pack B: us, once per layer call; checked: also reading whether B is finite)"
          + (f"; the layer ops' rule here: {ext.bf16_build()}" if bf16 else ""))
    for what, M, K, N in SHAPES:
        a = torch.randn(K, M).t() if "dg^T" in what else torch.randn(M, K)
        b = torch.randn(N, K).t() if "W_ih^T" in what or "W_hh^T" in what else torch.randn(K, N)
        a, b = a.to(dtype), b.to(dtype)
        want = a.float() @ b.float()
        cells = []
        for engine in range(len(engines)):
            c = torch.empty(M, N, dtype=dtype)
            if time_engine(engine, a, b, c, 3, False) < 0:  # a layout the engine does not take
                cells.append(f"{'-':>13s}")
                continue
            # bfloat16 outputs: one rounding (2^-8 relative) of sums of K products.
            torch.testing.assert_close(c.float(), want, **(dict(rtol=1e-2, atol=1e-1) if bf16 else
                                                         dict(rtol=1e-4, atol=1e-3)))
            iters = max(20, int(3e8 / (M * N * K)))
            t = min(time_engine(engine, a, b, c, iters, not args.overlapped) for _ in range(3))
            cells.append(f"{t * 1e6:8.1f} {2 * M * N * K / t / 1e9:4.0f}")
        if not bf16:  # small_gemm's packing of B, which its column pays once per layer call
            iters = max(20, int(3e7 / (N * K)))
            for checked in (False, True):
                cells.append(f"{min(ext.time_pack(b, iters, checked) for _ in range(3)) * 1e6:8.1f}")
        print(f"{what:26s} {M:4d} {K:4d} {N:5d}  " + " ".join(cells))


if __name__ == "__main__":
    main()
