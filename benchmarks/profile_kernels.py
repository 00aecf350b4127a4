"""Per-kernel GPU time of one forward+backward, FusedBiLSTM against nn.LSTM (cuDNN), from
torch.profiler: which kernels take the time, per call.

    python benchmarks/profile_kernels.py [--case B,T,I,H,layers ...] [--top 8]

Default cases: the targets preset's classic (100,28,28,128,2) and a large one
(128,100,256,512,2). float32, TF32 off on both sides unless --tf32. Writes
benchmarks/results/profile-cuda.csv (case, implementation, kernel, calls, us per
forward+backward) and prints the top kernels of each side.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from birnn_ext import FusedBiLSTM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CASES = ["100,28,28,128,2", "128,100,256,512,2"]


def kernel_times(step, iters: int) -> tuple[list[tuple[str, int, float]], float]:
    """[(kernel, calls per iteration, us per iteration)] of the CUDA kernels step() runs,
    and their total."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            rows.append((e.key, e.count // iters, us / iters))
    rows.sort(key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="B,T,I,H,layers (bidirectional); repeatable")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--tf32", action="store_true", help="TF32 on both sides (cuDNN's default)")
    p.add_argument("--name", default="profile-cuda", help="results file name (default: profile-cuda)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_kernels.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    out_rows = []
    for spec in args.case or DEFAULT_CASES:
        B, T, I, H, L = (int(v) for v in spec.split(","))
        torch.manual_seed(0)
        ref = nn.LSTM(I, H, L, bidirectional=True, device="cuda")
        fused = FusedBiLSTM.from_lstm(ref)
        x = torch.randn(T, B, I, device="cuda", requires_grad=True)
        print(f"\nB {B}, T {T}, I {I}, H {H}, {L} layer(s), forward+backward, us of GPU time per call")
        for name, model in (("nn.LSTM", ref), ("FusedBiLSTM", fused)):
            def step(model=model):
                out, (h, c) = model(x)
                (out.sum() + h.sum()).backward()

            rows, total = kernel_times(step, args.iters)
            print(f"  {name}: {total:9.1f} us in all")
            for kernel, calls, us in rows[: args.top]:
                print(f"    {us:9.1f} us {calls:5d} x  {kernel[:90]}")
            out_rows += [dict(case=spec, implementation=name, kernel=k, calls=c, us=round(us, 2)) for k, c, us in rows]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "implementation", "kernel", "calls", "us"])
        w.writeheader()
        w.writerows(out_rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
