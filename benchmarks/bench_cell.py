"""FusedLSTMCell against nn.LSTMCell, side by side in one run: a hand-written loop over
--steps time steps, as a decoder or a custom recurrence runs a cell, in inference
(no_grad) and forward+backward (the loss on the last step's h and c, backward through
every step; with --grad-of input, to the inputs alone, as an adversarial example or a
saliency map asks: no weight gradients).

Both modules are made with the same weights, and the two implementations are timed in
alternating rounds: each time is the median of its rounds, the ratio nn.LSTMCell /
FusedLSTMCell (above 1: fused is faster) the median of the rounds' own ratios. Writes
benchmarks/results/<name>.csv.

    python benchmarks/bench_cell.py
    python benchmarks/bench_cell.py --case 32,128,256 --case 128,512,512 --steps 8
    python benchmarks/bench_cell.py --case 32,64,64 --rounds 21 --min-run-time 0.03
    python benchmarks/bench_cell.py --dtype bfloat16 --name cell-bf16
    python benchmarks/bench_cell.py --grad-of input --name cell-input-grad
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from birnn_ext import FusedLSTMCell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (B, I, H): batch 1 to 256, small and large weights.
CASES = [(1, 28, 128), (1, 128, 256), (8, 28, 128), (8, 128, 256), (16, 128, 256), (24, 300, 128), (32, 64, 64),
         (32, 128, 256), (32, 512, 512), (48, 100, 200), (64, 28, 128), (128, 128, 256), (128, 512, 512),
         (256, 64, 64)]


def parse_case(text: str) -> tuple[int, int, int]:
    B, I, H = (int(v) for v in text.split(","))
    return B, I, H


def seconds(fn, min_time: float) -> float:
    """Seconds per call of fn: calls repeated for at least min_time, after a warm-up."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time:
        fn()
        n += 1
    return elapsed / n


def loop(cell: nn.Module, xs: torch.Tensor, train: bool, grad_of: str = "all"):
    """The timed call: cell over the steps of xs [T,B,I] from zero state; with train, the
    loss on the last h and c backpropagated through every step, to the parameters
    (grad_of "all") or to xs alone ("input", returned as its .grad)."""
    B, H = xs.size(1), cell.hidden_size

    def run():
        with torch.set_grad_enabled(train):
            xi = xs.detach().requires_grad_(train and grad_of == "input")
            h = c = torch.zeros(B, H, dtype=xs.dtype)
            for x in xi:
                h, c = cell(x, (h, c))
            if train:
                loss = h.sum() + c.sum()
                if grad_of == "input":
                    (xi.grad,) = torch.autograd.grad(loss, [xi])
                else:
                    loss.backward()
            return h, c, xi
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", type=parse_case, action="append", default=[], help="B,I,H")
    p.add_argument("--steps", type=int, default=16, help="time steps per loop")
    p.add_argument("--min-run-time", type=float, default=0.05, help="seconds per implementation per round")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per mode and size")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="both cells' weights and inputs (bfloat16: nn.LSTMCell on oneDNN's bfloat16 GEMMs)")
    p.add_argument("--grad-of", choices=["all", "input"], default="all",
                   help="what the backward asks: the parameters' gradients, or the inputs' alone")
    p.add_argument("--name", default="cell", help="results file name")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    dtype = getattr(torch, args.dtype)
    print(f"FusedLSTMCell against nn.LSTMCell, {args.dtype}, {args.steps} steps a loop, "
          f"{torch.get_num_threads()} threads; "
          "ms per loop (median of rounds), ratio nn / fused")
    train_mode = "forward+backward" if args.grad_of == "all" else "forward+input grad"
    print(f"{'B':>4} {'I':>4} {'H':>4} | {'inference':^24} | {train_mode:^24}")
    for B, I, H in args.case or CASES:
        ref = nn.LSTMCell(I, H, dtype=dtype)
        fused = FusedLSTMCell.from_cell(ref)
        xs = torch.randn(args.steps, B, I, dtype=dtype)

        row = {"B": B, "I": I, "H": H, "steps": args.steps, "dtype": args.dtype}
        cells = []
        for mode, train in (("inference", False), (train_mode, True)):
            times = {"nn": [], "fused": []}
            for _ in range(args.rounds):
                for name, cell in (("nn", ref), ("fused", fused)):
                    times[name].append(seconds(loop(cell, xs, train, args.grad_of), args.min_run_time))
            ratio = statistics.median(a / b for a, b in zip(times["nn"], times["fused"]))
            nn_ms, fused_ms = (statistics.median(times[k]) * 1e3 for k in ("nn", "fused"))
            row |= {f"{mode} nn ms": round(nn_ms, 4), f"{mode} fused ms": round(fused_ms, 4),
                    f"{mode} ratio": round(ratio, 3)}
            cells.append(f"{nn_ms:8.3f} {fused_ms:8.3f} {ratio:6.2f}")
        rows.append(row)
        print(f"{B:4d} {I:4d} {H:4d} | " + " | ".join(cells), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
