"""Times one training step of the demo's classifier (BiLSTM 2x128 on 28x28 rows, batch
100, Adam), nn.LSTM and FusedBiLSTM, each in a process of its own, forward, backward and
optimizer step apart. nn.LSTM's time depends on how glibc serves its temporaries, which
can differ from process to process; run it a few times, or with GLIBC_TUNABLES set:

    python benchmarks/bench_train_step.py [--runs 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_process(impl: str, steps: int) -> None:
    import torch
    from torch import nn

    import birnn_ext
    from birnn_ext.demo import RowClassifier

    torch.manual_seed(0)
    x, y = torch.rand(100, 28, 28), torch.randint(0, 10, (100,))
    model = RowClassifier(nn.LSTM if impl == "nn.LSTM" else birnn_ext.FusedBiLSTM)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = [0.0, 0.0, 0.0]
    for i in range(steps + 10):
        if i == 10:
            totals = [0.0, 0.0, 0.0]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            totals[k] += dt
    fwd, bwd, step = (1e3 * t / steps for t in totals)
    print(f"{impl:12s} forward {fwd:6.2f} ms  backward {bwd:6.2f} ms  optimizer {step:5.2f} ms  "
          f"step {fwd + bwd + step:6.2f} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="processes per implementation")
    p.add_argument("--steps", type=int, default=60, help="timed steps per process (after 10 warm-up)")
    p.add_argument("--impl", choices=["nn.LSTM", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.impl:
        one_process(args.impl, args.steps)
        return
    for _ in range(args.runs):
        for impl in ("nn.LSTM", "fused"):
            subprocess.run([sys.executable, __file__, "--impl", impl, "--steps", str(args.steps)], check=True,
                           cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main()
