"""The fixed cost of a call: FusedBiLSTM and nn.LSTM(bidirectional=True) at a size where
the arithmetic is nothing (default B 1, T 1, I 16, H 16), so what is timed is the
module's Python, the dispatcher, argument checks, allocations and the kernels' setup.

Prints, per implementation, microseconds per call in inference (no_grad, entered once
per round of calls, so not counted) and per
forward+backward (loss = y.sum()), and for the fused side the layer op called alone
(no module) in inference. For scale, nn.Linear(I, 8H) over the same input: a graph of
one node and two parameters, about the least a module's forward+backward costs in
PyTorch (the fused layer's node has eight parameters, each accumulated on its own).
Each figure is the fastest of --rounds rounds, the rounds of all variants interleaved
so that a slow spell of the machine hits them alike.

On a GPU (--device cuda) the same loops run without synchronising inside them: while
the GPU keeps up, the time per call is the host's, which is what bounds small models
there; the table says so.

    python benchmarks/bench_call_overhead.py
    python benchmarks/bench_call_overhead.py --size 1,28,28,128   # the latency case
    python benchmarks/bench_call_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from birnn_ext import FusedBiLSTM  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1,1,16,16", help="B,T,I,H (one layer, bidirectional)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=0, help="calls per round (default: about 50 ms of them)")
    return ap


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    B, T, I, H = (int(v) for v in args.size.split(","))
    dev = torch.device(args.device)
    torch.manual_seed(0)
    fused = FusedBiLSTM(I, H).to(dev)
    ref = nn.LSTM(I, H, bidirectional=True).to(dev)
    linear = nn.Linear(I, 8 * H).to(dev)  # as wide as both directions' gates
    x = torch.randn(T, B, I, device=dev)
    op = torch.ops.birnn_ext.lstm_layer_forward
    weights = [getattr(fused, f"{kind}_l0{sfx}") if kind else None
               for sfx in ("", "_reverse") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", None)]

    def inference(m):  # timed under no_grad (entered once per round, not per call)
        def run():
            m(x)
        return run

    def training(m):
        def run():
            y = m(x)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
        return run

    def op_alone():
        op(x, None, None, None, *weights, False)

    variants = {
        ("nn.LSTM", "inference"): inference(ref),
        ("FusedBiLSTM", "inference"): inference(fused),
        ("layer op alone", "inference"): op_alone,
        ("nn.LSTM", "forward+backward"): training(ref),
        ("FusedBiLSTM", "forward+backward"): training(fused),
        ("nn.Linear", "inference"): inference(linear),
        ("nn.Linear", "forward+backward"): training(linear),
    }
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    calls = {}
    for key, fn in variants.items():  # warm up, and size the rounds
        with torch.set_grad_enabled(key[1] != "inference"):
            for _ in range(20):
                fn()
            sync()
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 0.05:
                fn()
                n += 1
            sync()
        calls[key] = args.calls or max(n, 10)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.rounds):
        for key, fn in variants.items():
            with torch.set_grad_enabled(key[1] != "inference"):
                sync()
                start = time.perf_counter()
                for _ in range(calls[key]):
                    fn()
                # On a GPU, read before the queue is drained: the host's time.
                best[key] = min(best[key], (time.perf_counter() - start) / calls[key])
                sync()
    what = "host time per call, us" if dev.type == "cuda" else "us per call"
    print(f"B {B}, T {T}, I {I}, H {H}, bidirectional, {dev.type}, {torch.get_num_threads()} threads; "
          f"fastest of {args.rounds} interleaved rounds; {what}")
    print(f"{'':<16}{'inference':>12}{'fwd+bwd':>12}")
    for name in ("nn.LSTM", "FusedBiLSTM", "layer op alone", "nn.Linear"):
        cells = [best.get((name, mode)) for mode in ("inference", "forward+backward")]
        print(f"{name:<16}" + "".join(f"{c * 1e6:>12.1f}" if c is not None else f"{'':>12}" for c in cells))
    for mode in ("inference", "forward+backward"):
        print(f"nn.LSTM / FusedBiLSTM, {mode}: {best[('nn.LSTM', mode)] / best[('FusedBiLSTM', mode)]:.2f}")


if __name__ == "__main__":
    main()
