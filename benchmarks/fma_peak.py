"""Measures this machine's float32 FMA peak: every thread runs a loop of independent
512-bit fused multiply-adds (12 accumulators, enough to cover the FMA latency of the
two pipes), nothing else. No GEMM can do more floating-point work per second than
this, so it bounds every time in bench_lstm.py from below: a case's FLOPs divided by
it. bench_lstm.py's own "ceiling" is what a large torch.mm reaches, lower still.

    python benchmarks/fma_peak.py [--threads N]

Needs gcc and an x86-64 processor with AVX-512 F.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long iters = 200000000L;  /* per thread; 12 FMAs of 16 lanes each */
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now();
#pragma omp parallel
    {
      long n = iters;
      __asm__ volatile(
          "vxorps %%zmm0, %%zmm0, %%zmm0\n"
          "vmovaps %%zmm0, %%zmm1\n vmovaps %%zmm0, %%zmm2\n vmovaps %%zmm0, %%zmm3\n"
          "vmovaps %%zmm0, %%zmm4\n vmovaps %%zmm0, %%zmm5\n vmovaps %%zmm0, %%zmm6\n"
          "vmovaps %%zmm0, %%zmm7\n vmovaps %%zmm0, %%zmm8\n vmovaps %%zmm0, %%zmm9\n"
          "vmovaps %%zmm0, %%zmm10\n vmovaps %%zmm0, %%zmm11\n"
          "vmovaps %%zmm0, %%zmm14\n vmovaps %%zmm0, %%zmm15\n"
          "1:\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm0\n vfmadd231ps %%zmm14, %%zmm15, %%zmm1\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm2\n vfmadd231ps %%zmm14, %%zmm15, %%zmm3\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm4\n vfmadd231ps %%zmm14, %%zmm15, %%zmm5\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm6\n vfmadd231ps %%zmm14, %%zmm15, %%zmm7\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm8\n vfmadd231ps %%zmm14, %%zmm15, %%zmm9\n"
          "vfmadd231ps %%zmm14, %%zmm15, %%zmm10\n vfmadd231ps %%zmm14, %%zmm15, %%zmm11\n"
          "dec %0\n jnz 1b\n"
          : "+r"(n)
          :
          : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
            "xmm14", "xmm15", "cc");
    }
    const double s = now() - t0;
    const double gflops = (double)iters * 12 * 16 * 2 * omp_get_max_threads() / s / 1e9;
    if (gflops > best) best = gflops;
  }
  printf("%d threads: float32 FMA peak %.0f GFLOP/s (best of 5)\n", omp_get_max_threads(), best);
  return 0;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OpenMP threads (default: every CPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "fma_peak.c", Path(tmp) / "fma_peak"
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O2", "-fopenmp", str(src), "-o", str(exe)], check=True)
        subprocess.run([str(exe)], check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


if __name__ == "__main__":
    main()
