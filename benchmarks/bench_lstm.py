"""nn.LSTM against FusedBiLSTM, side by side in one run.

For each case: inference (no grad) and forward+backward, timed with
torch.utils.benchmark (warm-up, blocked_autorange) using every intra-op thread
(Timer's default of one thread would hide what threading does on both sides), the two
implementations in alternating rounds (ROUNDS): each time is the median of its rounds,
the ratio the median of the rounds' own ratios.
Prints times, the ratio nn.LSTM/fused (above 1: fused is faster), achieved GFLOP/s
and its share of this machine's large-GEMM GFLOP/s, measured in the same run. For the
`targets` preset in float32 on the CPU, also each case's target ratio and what meeting
it would take in this run: the GFLOP/s the fused path would have to sustain over the
whole layer (every product and the cell math between them) to finish in nn.LSTM's
time / target, as a share of the large-GEMM ceiling. Above 100%, the target asks the
whole LSTM to run faster than this machine runs one large square GEMM.
Writes benchmarks/results/<name>.csv and .png.

    python benchmarks/bench_lstm.py --preset targets
    python benchmarks/bench_lstm.py --case 32,28,28,128,1 --case 64,100,128,256,1
    python benchmarks/bench_lstm.py --case var:32,10-100,64,256,1   # variable length
    python benchmarks/bench_lstm.py --preset targets --autocast bf16  # both under autocast
    python benchmarks/bench_lstm.py --preset targets --device cuda --name targets-cuda

On a GPU both sides compute float32 in IEEE float32 unless --tf32 is given: the default
of torch.backends.cudnn.allow_tf32, which both follow, is TF32; the flag turns it on.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as tb
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from birnn_ext import FusedBiLSTM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    name: str
    B: int
    T: int
    I: int
    H: int
    layers: int
    min_len: int = 0  # variable length: lengths uniform in [min_len, T]
    targets: tuple[float, float] | None = None  # wanted ratios: inference, forward+backward

    @property
    def variable(self) -> bool:
        return self.min_len > 0

    def label(self) -> str:
        t = f"{self.min_len}..{self.T}" if self.variable else str(self.T)
        return f"{self.name} B{self.B} T{t} I{self.I} H{self.H} L{self.layers}"


PRESETS = {
    "targets": [
        Case("latency", 1, 28, 28, 128, 1, targets=(3.0, 3.0)),
        Case("classic", 100, 28, 28, 128, 2, targets=(1.3, 1.6)),
        Case("medium", 64, 100, 128, 256, 1, targets=(1.2, 1.5)),
        Case("large", 16, 200, 256, 512, 1, targets=(1.0, 1.3)),
        Case("variable", 32, 100, 64, 256, 1, min_len=10, targets=(2.0, 2.0)),
    ],
    "quick": [Case("small", 8, 16, 16, 32, 1), Case("small-var", 8, 16, 16, 32, 1, min_len=4)],
    # make gpu-check's spread over the sizes users train on a GPU: B 1-256, H 64-512
    # (powers of two and not), I 28-300, T 28-400, 1-3 layers, bidirectional.
    "gpu-grid": [
        Case("g1", 1, 400, 40, 64, 1),
        Case("g2", 8, 100, 28, 64, 2),
        Case("g3", 32, 50, 128, 256, 2),
        Case("g4", 256, 28, 28, 128, 2),
        Case("g5", 64, 200, 300, 96, 1),
        Case("g6", 16, 300, 80, 200, 3),
        Case("g7", 128, 100, 256, 512, 2),
        Case("g8", 4, 64, 300, 384, 1),
        Case("g9", 200, 40, 100, 160, 1),
        Case("g10", 48, 150, 64, 320, 2),
        Case("g11", 2, 28, 28, 512, 3),
        Case("g12", 96, 80, 200, 448, 1),
        Case("g13", 32, 60, 64, 256, 1, min_len=28),
        Case("g14", 128, 400, 40, 128, 1, min_len=100),
    ],
}


def parse_case(text: str) -> Case:
    var = text.startswith("var:")
    fields = text.removeprefix("var:").split(",")
    if len(fields) != 5:
        raise argparse.ArgumentTypeError(f"--case wants B,T,I,H,layers (T as lo-hi with var:), got {text!r}")
    if var:
        lo, hi = (int(v) for v in fields[1].split("-"))
        return Case("custom-var", int(fields[0]), hi, int(fields[2]), int(fields[3]), int(fields[4]), min_len=lo)
    B, T, I, H, L = (int(v) for v in fields)
    return Case("custom", B, T, I, H, L)


def lstm_flops(case: Case, steps: float) -> float:
    """Multiply-adds x 2 of the forward pass: per layer and direction, the input and
    recurrent products of every (valid) step. `steps` is T*B, or the sum of lengths."""
    total, inp = 0.0, case.I
    for _ in range(case.layers):
        total += 2 * 2 * steps * 4 * case.H * (inp + case.H)
        inp = 2 * case.H
    return total


def gemm_ceiling(threads: int) -> float:
    """The best GFLOP/s of a large float32 GEMM here: torch.mm (BLAS) or oneDNN."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    stmts = {"torch.mm(a, b)": dict(a=a, b=b)}
    if torch.backends.mkldnn.is_available():
        stmts["torch._C._nn.mkldnn_linear(am, bm, None)"] = dict(am=a.to_mkldnn(), bm=b.to_mkldnn(), torch=torch)
    for stmt, env in stmts.items():
        t = tb.Timer(stmt, globals={"torch": torch, **env}, num_threads=threads).blocked_autorange(min_run_time=1.0)
        best = max(best, 2 * n**3 / t.median / 1e9)
    return best


# Rounds per measurement: each implementation is timed ROUNDS times, alternating, for
# min_run_time / ROUNDS each, so that a change in the machine's speed during a case (on a
# shared machine, up to twofold from one second to the next) hits both sides alike.
ROUNDS = 5


def time_pair(fn_ref, fn_fused, threads, min_run_time, autocast=None):
    """(nn.LSTM seconds, fused seconds, ratio): each time the median of its rounds, the
    ratio the median of the rounds' ratios, each from the two measurements side by side."""
    timers = []
    for fn in (fn_ref, fn_fused):
        if autocast is not None:  # both implementations inside the same autocast region
            def fn(inner=fn):
                with torch.autocast(autocast[0], dtype=autocast[1]):
                    inner()

        fn()  # warm-up outside the timer too: first calls build caches (oneDNN primitives)
        timers.append(tb.Timer("fn()", globals={"fn": fn}, num_threads=threads))
    times = ([], [])
    for r in range(ROUNDS):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):  # who goes first alternates too
            times[side].append(timers[side].blocked_autorange(min_run_time=min_run_time / ROUNDS).median)
    ratios = [a / b for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def one_call(model, x, lengths, train, grad_of="all"):
    """One timed call of either side: the model over x, with lengths (nn.LSTM gets the
    batch packed, the fused module the padded batch and lengths=); in training, the
    backward of the same loss on both sides, the sum of every output and of h_n, to the
    input and every parameter (grad_of "all") or to the input alone ("input": what an
    adversarial example or a saliency map asks). Returns the input, whose .grad the
    backward filled."""
    xi = x.detach().requires_grad_(train)
    with torch.set_grad_enabled(train):
        if lengths is None:
            out, (h, c) = model(xi)
        elif isinstance(model, nn.LSTM):
            out, (h, c) = model(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        else:
            out, (h, c) = model(xi, lengths=lengths)
        if train:
            y = out.data if isinstance(out, PackedSequence) else out
            loss = y.float().sum() + h.float().sum()
            if grad_of == "input":
                (xi.grad,) = torch.autograd.grad(loss, [xi])
            else:
                loss.backward()
    return xi


def case_inputs(case: Case, device: str):
    """nn.LSTM and FusedBiLSTM with the same weights, the input, the lengths (None at
    fixed length) and the number of (sequence, step) pairs computed."""
    torch.manual_seed(0)
    ref = nn.LSTM(case.I, case.H, case.layers, bidirectional=True, device=device)
    fused = FusedBiLSTM.from_lstm(ref)
    x = torch.randn(case.T, case.B, case.I, device=device)
    if case.variable:
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(case.min_len, case.T + 1, (case.B,), generator=g)
        steps = float(lengths.sum())
    else:
        lengths, steps = None, float(case.T * case.B)
    return ref, fused, x, lengths, steps


def bench_case(case: Case, device: str, threads: int, min_run_time: float, autocast=None, with_targets=False,
               grad_of="all"):
    ref, fused, x, lengths, steps = case_inputs(case, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(model, train):
        def f():
            one_call(model, x, lengths, train, grad_of)
            sync()
        return f

    rows = []
    train_mode = "forward+backward" if grad_of == "all" else "forward+input grad"
    for k, (mode, train) in enumerate((("inference", False), (train_mode, True))):
        t_ref, t_fused, ratio = time_pair(timed(ref, train), timed(fused, train), threads, min_run_time, autocast)
        # The products a backward makes: two (dx and dh) without the weight gradients.
        flops = lstm_flops(case, steps) * (1 if not train else 3 if grad_of == "all" else 2)
        target = case.targets[k] if with_targets and case.targets else float("nan")
        rows.append(dict(case=case.name, B=case.B, T=case.T, min_len=case.min_len, I=case.I, H=case.H,
                         layers=case.layers, mode=mode, device=device, threads=threads,
                         autocast=str(autocast[1]).removeprefix("torch.") if autocast else "off",
                         nn_lstm_ms=t_ref * 1e3, fused_ms=t_fused * 1e3, ratio=ratio,
                         fused_gflops=flops / t_fused / 1e9, nn_lstm_gflops=flops / t_ref / 1e9,
                         target=target, target_gflops=flops / (t_ref / target) / 1e9))
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["case"], r["B"], r["T"], r["H"], r["layers"]) for r in rows}, key=lambda k: [
        r["case"] for r in rows].index(k[0]))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4))
    width = 0.38
    for k, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        vals = [next(r["ratio"] for r in rows if (r["case"], r["B"], r["T"], r["H"], r["layers"]) == lab
                     and r["mode"] == mode) for lab in labels]
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), [f"{c}\nB{b} T{t} H{h} L{l}" for c, b, t, h, l in labels], fontsize=8)
    ax.set_ylabel("nn.LSTM time / FusedBiLSTM time")
    dtype = "float32" if rows[0]["autocast"] == "off" else f"autocast {rows[0]['autocast']}"
    ax.set_title(f"FusedBiLSTM vs nn.LSTM, {dtype}, bidirectional ({rows[0]['device']}, {rows[0]['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--case", type=parse_case, action="append", default=[],
                   help="B,T,I,H,layers or var:B,lo-hi,I,H,layers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--name", help="results file name (default: the preset's, or 'custom')")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="time both implementations under torch.autocast")
    p.add_argument("--tf32", action="store_true", help="GPU: let both implementations use TF32 for float32 products")
    p.add_argument("--grad-of", choices=["all", "input"], default="all",
                   help="what the backward asks: the input's and every parameter's gradients (training), or the "
                        "input's alone (adversarial examples, saliency; frozen weights)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cases = (PRESETS[args.preset] if args.preset else []) + args.case
    if not cases:
        p.error("give --preset or at least one --case")
    threads = torch.get_num_threads()
    autocast = (args.device, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]) if args.autocast else None
    ceiling = gemm_ceiling(threads) if args.device == "cpu" else float("nan")
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}; "
          f"large-GEMM ceiling {ceiling:.0f} GFLOP/s (float32, best of torch.mm and oneDNN)"
          + (f"; both under autocast {args.autocast}" if autocast else "")
          + (f"; {torch.cuda.get_device_name()}, TF32 {'on' if args.tf32 else 'off'}" if args.device == "cuda" else ""))
    # The targets are float32 training ratios on the CPU.
    with_targets = args.device == "cpu" and autocast is None and args.grad_of == "all"
    has_targets = with_targets and any(c.targets for c in cases)
    header = (f"{'case':<40} {'mode':<17} {'nn.LSTM ms':>10} {'fused ms':>9} {'ratio':>6} {'GFLOP/s':>8} "
              f"{'of ceiling':>10}")
    print(header + (f" {'target':>6} {'met':>3} {'target needs':>12}" if has_targets else ""))
    rows = []
    for case in cases:
        for r in bench_case(case, args.device, threads, args.min_run_time, autocast, with_targets, args.grad_of):
            r["ceiling_gflops"] = ceiling
            r["tf32"] = args.tf32 if args.device == "cuda" else ""
            rows.append(r)
            line = (f"{case.label():<40} {r['mode']:<17} {r['nn_lstm_ms']:>10.3f} {r['fused_ms']:>9.3f} "
                    f"{r['ratio']:>6.2f} {r['fused_gflops']:>8.1f} {r['fused_gflops'] / ceiling:>10.1%}")
            if with_targets and case.targets:
                met = "yes" if r["ratio"] >= r["target"] else "no"
                line += f" {r['target']:>6.1f} {met:>3} {r['target_gflops'] / ceiling:>12.1%}"
            print(line, flush=True)
    name = args.name or ((args.preset or "custom") + (f"-{args.device}" if args.device != "cpu" else "")
                         + (f"-autocast-{args.autocast}" if args.autocast else "") + ("-tf32" if args.tf32 else "")
                         + ("-input-grad" if args.grad_of == "input" else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.csv')} and {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
