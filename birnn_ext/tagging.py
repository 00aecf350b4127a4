"""A tagging task where the future matters: restore the spaces removed from English
text. For each character: does a space follow? Whether "the" ends a word depends on
what comes next ("theme", "there"), so a bidirectional model should do clearly better
than a unidirectional one of the same size. Both are trained here on Debian's fortunes
and their per-character F1 on held-out text printed side by side.

    python -m birnn_ext.tagging
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from birnn_ext import FusedBiLSTM, FusedLSTM
from birnn_ext.text import FORTUNES_DIR, VOCAB_SIZE, batch, build_dataset, read_fortunes


class Tagger(nn.Module):
    def __init__(self, bidirectional: bool, hidden_size: int = 64, num_layers: int = 2, embed: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, embed, padding_idx=0)
        lstm_cls = FusedBiLSTM if bidirectional else FusedLSTM
        self.lstm = lstm_cls(embed, hidden_size, num_layers, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(hidden_size * (2 if bidirectional else 1), 1)

    def forward(self, x, lengths):
        y, _ = self.lstm(self.embed(x), lengths=lengths)
        return self.out(y).squeeze(-1)


def mask_of(lengths, T):
    return torch.arange(T)[None, :] < lengths[:, None]


def f1_score(model, data, batch_size=256):
    model.eval()
    tp = fp = fn = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x, y, lengths = batch(data[i : i + batch_size])
            m = mask_of(lengths, x.size(1))
            pred = (model(x, lengths) > 0) & m
            truth = (y > 0.5) & m
            tp += (pred & truth).sum().item()
            fp += (pred & ~truth).sum().item()
            fn += (~pred & truth).sum().item()
    model.train()
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    return 2 * precision * recall / max(precision + recall, 1e-12)


def train(bidirectional, train_set, test_set, args):
    torch.manual_seed(args.seed)
    model = Tagger(bidirectional, args.hidden_size, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    name = "FusedBiLSTM" if bidirectional else "FusedLSTM (one direction)"
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train_set), (args.batch_size,), generator=g).tolist()
        x, y, lengths = batch([train_set[i] for i in idx])
        m = mask_of(lengths, x.size(1))
        loss = nn.functional.binary_cross_entropy_with_logits(model(x, lengths)[m], y[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"{name}: step {step}/{args.steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    return name, f1_score(model, test_set), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(FORTUNES_DIR), help="folder of fortune files (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--max-chars", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        entries = read_fortunes(args.data)
    except FileNotFoundError as e:
        sys.exit(f"{e}\nThe text comes from Debian's fortunes package: apt-get install fortunes "
                 f"(it installs to {FORTUNES_DIR}); or point --data at a folder of fortune files.")
    train_set, test_set = build_dataset(entries, args.max_chars)
    chars = sum(len(x) for x, _ in test_set)
    print(f"{len(entries)} fortunes: {len(train_set)} training and {len(test_set)} test sequences "
          f"({chars} test characters)", file=sys.stderr)
    results = [train(bi, train_set, test_set, args) for bi in (True, False)]
    print(f"\n{'model (same size, 2 layers)':<28} {'space-after F1':>14} {'train time':>11}")
    for name, f1, seconds in results:
        print(f"{name:<28} {f1:>14.4f} {seconds:>10.1f}s")


if __name__ == "__main__":
    main()
