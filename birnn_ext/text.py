"""Text for the tagging task: English prose from fortune files, with the spaces taken
out and a per-character label saying whether a space followed."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Debian's fortunes package puts its files here.
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Collections that are pictures rather than prose.
NOT_PROSE = {"art", "ascii-art"}

# Characters 33..126 (printable ASCII but the space) are 1..94; 0 pads.
VOCAB_SIZE = 95


def read_fortunes(folder: str | Path, skip: set[str] = NOT_PROSE) -> list[str]:
    """The entries of every fortune file in `folder` (entries are separated by lines
    holding a single %), cleaned to lowercase printable ASCII with single spaces."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.suffix and p.name not in skip)
    if not files:
        raise FileNotFoundError(f"{folder}: no fortune files")
    entries = []
    for path in files:
        text = path.read_text(encoding="latin-1")
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            clean = " ".join("".join(ch if 32 <= ord(ch) < 127 else " " for ch in entry).lower().split())
            if sum(ch.isalpha() for ch in clean) >= 10:
                entries.append(clean)
    return entries


def segment(text: str, max_chars: int) -> list[tuple[str, list[int]]]:
    """Cuts text at word boundaries into pieces of at most max_chars non-space
    characters; returns each piece without its spaces, and per character 1 if a space
    followed it, else 0. A word longer than max_chars is cut where it must be."""
    pieces, chars, labels = [], [], []
    for word in text.split(" "):
        word = word[: max_chars]
        if chars and len(chars) + len(word) > max_chars:
            labels[-1] = 0  # a piece's last character: what follows is not known
            pieces.append(("".join(chars), labels))
            chars, labels = [], []
        chars.extend(word)
        labels.extend([0] * (len(word) - 1) + [1])
    if chars:
        labels[-1] = 0
        pieces.append(("".join(chars), labels))
    return pieces


def encode(chars: str) -> list[int]:
    return [ord(ch) - 32 for ch in chars]


def build_dataset(entries: list[str], max_chars: int = 80, test_every: int = 10):
    """Train and test splits (every test_every-th entry is test), each a list of
    (character indices, labels) pairs."""
    train, test = [], []
    for i, entry in enumerate(entries):
        for chars, labels in segment(entry, max_chars):
            if len(chars) >= 2:
                (test if i % test_every == 0 else train).append((encode(chars), labels))
    return train, test


def batch(pairs: list[tuple[list[int], list[int]]]):
    """Pads a list of sequences: x [B, T] int64 (0 pads), labels [B, T] float32,
    lengths [B] int64, for a batch_first module called with lengths=."""
    lengths = torch.tensor([len(x) for x, _ in pairs], dtype=torch.int64)
    T = int(lengths.max())
    x = torch.zeros(len(pairs), T, dtype=torch.int64)
    y = torch.zeros(len(pairs), T, dtype=torch.float32)
    for b, (xs, ys) in enumerate(pairs):
        x[b, : len(xs)] = torch.tensor(xs)
        y[b, : len(ys)] = torch.tensor(ys, dtype=torch.float32)
    return x, y, lengths
