"""The main job: a bidirectional LSTM classifier on Fashion-MNIST, read row by row.

Each 28x28 image is a sequence of 28 steps of 28 pixels; two bidirectional layers of
128 units; the last step's output feeds a Linear layer; batch 100, Adam at 0.003.

    python -m birnn_ext.demo --compare          # FusedBiLSTM and nn.LSTM, side by side
    python -m birnn_ext.demo --impl torch       # nn.LSTM only
    torchrun --nproc-per-node=2 -m birnn_ext.demo   # DistributedDataParallel over gloo:
                                                # each process trains its share of every batch
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


def train(impl, data, args, out_dir):
    from tqdm import tqdm

    rank, world = distributed()
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = RowClassifier(IMPLS[impl], hidden_size=args.hidden_size, num_layers=args.layers)
    # Each process trains an equal share of every batch; DDP averages the gradients,
    # which is the whole batch's gradient.
    step_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    history = {"step": [], "loss": [], "epoch": [], "test_accuracy": []}
    seen, train_seconds, step = 0, 0.0, 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
        bar = tqdm(range(0, len(order) - world + 1, args.batch_size), desc=f"{impl} epoch {epoch}/{args.epochs}",
                   unit="batch", file=sys.stderr, dynamic_ncols=True, disable=rank != 0)
        for i in bar:
            batch = order[i : i + args.batch_size]
            share = len(batch) // world
            idx = batch[rank * share : (rank + 1) * share]
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(step_model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_seconds += time.perf_counter() - t0
            seen += len(idx) * world
            step += 1
            if step % 10 == 0:
                history["step"].append(step)
                history["loss"].append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_per_s=f"{seen / train_seconds:.0f}")
        acc = evaluate(model, x_test, y_test) if rank == 0 else float("nan")
        history["epoch"].append(epoch)
        history["test_accuracy"].append(acc)
        if rank == 0:
            print(f"{impl}: epoch {epoch} test accuracy {acc:.4f}", file=sys.stderr)
    weights = out_dir / f"bilstm_{impl}.pt"
    if rank == 0:
        torch.save(model.state_dict(), weights)
    return {
        "impl": impl, "test_accuracy": history["test_accuracy"][-1], "train_samples_per_s": seen / train_seconds,
        "train_seconds": train_seconds, "weights": str(weights), "history": history,
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = {"fused": "FusedBiLSTM", "torch": "nn.LSTM"}[r["impl"]]
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


def main(argv=None):
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
    args = p.parse_args(argv)

    try:
        data = load_image_classification(args.data)
    except FileNotFoundError as e:
        sys.exit(f"{e}\nFashion-MNIST is missing. On Debian: apt-get install dataset-fashion-mnist "
                 f"(it installs to {FASHION_MNIST_DIR}); or point --data at a folder of MNIST-format IDX files.")
    args.out.mkdir(parents=True, exist_ok=True)
    impls = ["fused", "torch"] if args.compare else [args.impl]
    rank, world = distributed()
    if rank == 0:
        print(f"{len(data['train'][0])} train / {len(data['test'][0])} test images, {world} process(es) of "
              f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
    results = [train(impl, data, args, args.out) for impl in impls]
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    plot(results, args.out / "curves.png")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'implementation':<14} {'test accuracy':>13} {'train samples/s':>16} {'train time':>11}")
    for r in results:
        name = {"fused": "FusedBiLSTM", "torch": "nn.LSTM"}[r["impl"]]
        print(f"{name:<14} {r['test_accuracy']:>13.4f} {r['train_samples_per_s']:>16.0f} {r['train_seconds']:>10.1f}s")
    if len(results) == 2:
        print(f"FusedBiLSTM / nn.LSTM training throughput: "
              f"{results[0]['train_samples_per_s'] / results[1]['train_samples_per_s']:.2f}x")
    print(f"weights, curves.png and summary.json in {args.out}/")


if __name__ == "__main__":
    main()
