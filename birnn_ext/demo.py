"""The main job: a bidirectional LSTM classifier on Fashion-MNIST, read row by row.

Each 28x28 image is a sequence of 28 steps of 28 pixels; two bidirectional layers of
128 units; the last step's output feeds a Linear layer; batch 100, Adam at 0.003.

    python -m birnn_ext.demo --compare          # FusedBiLSTM and nn.LSTM, side by side
    python -m birnn_ext.demo --impl torch       # nn.LSTM only
    python -m birnn_ext.demo --compare --device cpu   # on the CPU where a GPU is present too
    python -m birnn_ext.demo --compile reduce-overhead   # the fused training step compiled
    torchrun --nproc-per-node=2 -m birnn_ext.demo   # DistributedDataParallel over gloo (CPU):
                                                # each process trains its share of every batch

On a GPU (--device auto picks one where there is one), --compare also trains the fused
model with its whole training step (forward, loss, backward, Adam) compiled by
torch.compile(mode="reduce-overhead"), which replays it as a CUDA graph; nn.LSTM runs
eager (torch.compile breaks the graph at nn.LSTM). Throughput is training samples per
second of wall time, the device synchronised at the end of each epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from birnn_ext import FusedBiLSTM
from birnn_ext.data import FASHION_MNIST_DIR, load_image_classification

IMPLS = {"fused": FusedBiLSTM, "torch": nn.LSTM}


class RowClassifier(nn.Module):
    """Many-to-one BiLSTM classifier. `lstm_cls` is nn.LSTM or FusedBiLSTM; the weights
    (state_dict) of one load into the other."""

    def __init__(self, lstm_cls, input_size=28, hidden_size=128, num_layers=2, num_classes=10):
        super().__init__()
        self.lstm = lstm_cls(input_size, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def evaluate(model, images, labels, batch_size=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    model.train()
    return correct / len(images)


def distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the gloo process group first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(run, data, args, out_dir, device):
    """Trains one variant, run = (implementation, torch.compile mode or None)."""
    from tqdm import tqdm

    impl, compile_mode = run
    label = variant_name(run)
    rank, world = distributed()
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = RowClassifier(IMPLS[impl], hidden_size=args.hidden_size, num_layers=args.layers).to(device)
    # Each process trains an equal share of every batch; DDP averages the gradients,
    # which is the whole batch's gradient.
    step_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # capturable: Adam's step count stays on the device, which a CUDA graph needs.
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, capturable=device.type == "cuda")

    def step_fn(x, y):
        loss = nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step_call = torch.compile(step_fn, mode=compile_mode) if compile_mode else step_fn
    x_train, y_train = (t.to(device) for t in data["train"])
    x_test, y_test = (t.to(device) for t in data["test"])
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    history = {"step": [], "loss": [], "epoch": [], "test_accuracy": []}
    seen, train_seconds, step = 0, 0.0, 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
        batches = range(0, len(order) - world + 1, args.batch_size)
        bar = tqdm(batches, desc=f"{label} epoch {epoch}/{args.epochs}", unit="batch", file=sys.stderr,
                   dynamic_ncols=True, disable=rank != 0)
        synchronize(device)
        t0 = time.perf_counter()
        for i in bar:
            batch = order[i : i + args.batch_size]
            share = len(batch) // world
            idx = batch[rank * share : (rank + 1) * share]
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            loss = step_call(x_train[idx], y_train[idx])
            seen += len(idx) * world
            step += 1
            if step % 10 == 0:
                loss_value = loss.item()
                history["step"].append(step)
                history["loss"].append(loss_value)
                bar.set_postfix(loss=f"{loss_value:.3f}")
        synchronize(device)
        train_seconds += time.perf_counter() - t0
        acc = evaluate(model, x_test, y_test) if rank == 0 else float("nan")
        history["epoch"].append(epoch)
        history["test_accuracy"].append(acc)
        if rank == 0:
            print(f"{label}: epoch {epoch} test accuracy {acc:.4f}, {seen / train_seconds:.0f} samples/s",
                  file=sys.stderr)
    weights = out_dir / f"bilstm_{impl}{'_' + compile_mode if compile_mode else ''}.pt"
    if rank == 0:
        torch.save(model.state_dict(), weights)
    return {
        "impl": impl, "compile": compile_mode, "name": label, "device": str(device),
        "test_accuracy": history["test_accuracy"][-1], "train_samples_per_s": seen / train_seconds,
        "train_seconds": train_seconds, "weights": str(weights), "history": history,
    }


def variant_name(run) -> str:
    impl, compile_mode = run
    name = {"fused": "FusedBiLSTM", "torch": "nn.LSTM"}[impl]
    return f"{name} ({compile_mode})" if compile_mode else name


def pick_device(choice: str, world: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is visible to torch (torch.cuda.is_available() is False)")
    if choice == "auto":
        # The distributed demo runs its gloo process group on the CPU.
        choice = "cuda" if torch.cuda.is_available() and world == 1 else "cpu"
    return torch.device(choice)


def variants(args, device) -> list[tuple[str, str | None]]:
    """(implementation, compile mode) of each training run."""
    if not args.compare:
        return [(args.impl, args.compile if args.impl == "fused" else None)]
    runs = [("fused", None)]
    mode = args.compile if args.compile else ("reduce-overhead" if device.type == "cuda" else None)
    if mode:
        runs.append(("fused", mode))
    return runs + [("torch", None)]


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = r["name"]
        ax_loss.plot(r["history"]["step"], r["history"]["loss"], label=label, alpha=0.8)
        ax_acc.plot(r["history"]["epoch"], r["history"]["test_accuracy"], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Fashion-MNIST, BiLSTM 2x128")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    ax_acc.set_xticks(results[0]["history"]["epoch"])
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR,
                   help="folder with the IDX files of Fashion-MNIST or MNIST (default: %(default)s)")
    p.add_argument("--impl", choices=sorted(IMPLS), default="fused")
    p.add_argument("--compare", action="store_true", help="train nn.LSTM the same way in the same run")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for weights, plot and summary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train (auto: the GPU where there is one; the CPU under torchrun)")
    p.add_argument("--compile", choices=["default", "reduce-overhead"],
                   help="compile the fused model's training step with torch.compile in this mode (with --compare: "
                        "as a run beside the eager one; on a GPU, --compare adds a reduce-overhead run by default)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    try:
        data = load_image_classification(args.data)
    except FileNotFoundError as e:
        sys.exit(f"{e}\nFashion-MNIST is missing. On Debian: apt-get install dataset-fashion-mnist "
                 f"(it installs to {FASHION_MNIST_DIR}); or point --data at a folder of MNIST-format IDX files.")
    args.out.mkdir(parents=True, exist_ok=True)
    rank, world = distributed()
    device = pick_device(args.device, world)
    runs = variants(args, device)
    if rank == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"the CPU, {world} process(es) of {torch.get_num_threads()} thread(s)"
        print(f"{len(data['train'][0])} train / {len(data['test'][0])} test images, on {where}", file=sys.stderr)
    results = [train(run, data, args, args.out, device) for run in runs]
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    plot(results, args.out / "curves.png")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'implementation':<30} {'test accuracy':>13} {'train samples/s':>16} {'train time':>11}  ({device})")
    for r in results:
        print(f"{r['name']:<30} {r['test_accuracy']:>13.4f} {r['train_samples_per_s']:>16.0f} "
              f"{r['train_seconds']:>10.1f}s")
    torch_runs = [r for r in results if r["impl"] == "torch"]
    for r in results if torch_runs else []:
        if r["impl"] == "fused":
            print(f"{r['name']} / nn.LSTM training throughput: "
                  f"{r['train_samples_per_s'] / torch_runs[0]['train_samples_per_s']:.2f}x")
    print(f"weights, curves.png and summary.json in {args.out}/")


if __name__ == "__main__":
    main()
