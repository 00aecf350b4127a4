"""Times one training step of the demo's classifier (BiLSTM 2x128 on 28x28 rows, batch
100, Adam), nn.LSTM and FusedBiLSTM, each in a process of its own, forward, backward and
optimizer step apart. nn.LSTM's time depends on how glibc serves its temporaries, which
can differ from process to process; run it a few times, or with GLIBC_TUNABLES set:

    python benchmarks/bench_train_step.py [--runs 3] [--steps 60]
    python benchmarks/bench_train_step.py --device cuda --compile reduce-overhead

--device picks where (auto: the GPU where there is one). --compile MODE adds FusedBiLSTM
with its whole step (forward, loss, backward, Adam) compiled by torch.compile in that
mode, timed as a whole (its parts are one graph); on a GPU the device is synchronised
around each timed part.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_process(impl: str, steps: int, device: str, compile_mode: str | None) -> None:
    import torch
    from torch import nn

    import birnn_ext
    from birnn_ext.demo import RowClassifier

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x, y = torch.rand(100, 28, 28, device=dev), torch.randint(0, 10, (100,), device=dev)
    model = RowClassifier(nn.LSTM if impl == "nn.LSTM" else birnn_ext.FusedBiLSTM).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, capturable=dev.type == "cuda")
    name = f"{impl} ({compile_mode})" if compile_mode else impl
    if compile_mode:
        def step():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        compiled = torch.compile(step, mode=compile_mode)
        start = time.perf_counter()
        for i in range(steps + 10):
            if i == 10:  # the first calls compile (and record the CUDA graph)
                sync()
                compile_s, start = time.perf_counter() - start, time.perf_counter()
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            compiled()
        sync()
        per_step = 1e3 * (time.perf_counter() - start) / steps
        print(f"{name:28s} step {per_step:6.2f} ms  (compiling and warm-up: {compile_s:.1f} s)")
        return
    totals = [0.0, 0.0, 0.0]
    for i in range(steps + 10):
        if i == 10:
            totals = [0.0, 0.0, 0.0]
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            totals[k] += dt
    fwd, bwd, step = (1e3 * t / steps for t in totals)
    print(f"{name:28s} forward {fwd:6.2f} ms  backward {bwd:6.2f} ms  optimizer {step:5.2f} ms  "
          f"step {fwd + bwd + step:6.2f} ms")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="processes per implementation")
    p.add_argument("--steps", type=int, default=60, help="timed steps per process (after 10 warm-up)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", choices=["default", "reduce-overhead"],
                   help="also time FusedBiLSTM's whole step compiled in this mode")
    p.add_argument("--impl", choices=["nn.LSTM", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--compile-one", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.impl:
        one_process(args.impl, args.steps, args.device, args.compile_one)
        return
    runs = [("nn.LSTM", None), ("fused", None)] + ([("fused", args.compile)] if args.compile else [])
    for _ in range(args.runs):
        for impl, mode in runs:
            cmd = [sys.executable, __file__, "--impl", impl, "--steps", str(args.steps), "--device", args.device]
            subprocess.run(cmd + (["--compile-one", mode] if mode else []), check=True, cwd=ROOT,
                           env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main()
