"""The IDX reader on small files written here, plain and gzipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
import struct

import numpy as np
import pytest
import torch

from birnn_ext.data import load_image_classification, read_idx


def write_idx(path, array, code=0x08, compress=False):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(header + body)


@pytest.mark.parametrize("compress", [False, True])
def test_reads_back_what_was_written(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, images, compress=compress)
    got = read_idx(path)
    assert got.shape == (5, 28, 28) and got.dtype == np.uint8
    assert np.array_equal(got, images)


def test_big_endian_types(tmp_path):
    values = np.array([[-3, 70000], [5, -1]], dtype=np.int32)
    write_idx(tmp_path / "i.idx", values, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "i.idx"), values)
    floats = np.array([1.5, -2.25], dtype=np.float32)
    write_idx(tmp_path / "f.idx", floats, code=0x0D)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), floats)


def test_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4,), np.uint8))
    data = (tmp_path / "short").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_loads_an_mnist_format_folder(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n, compress in (("train", 6, True), ("t10k", 3, False)):
        sfx = ".gz" if compress else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  compress=compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, (n,), dtype=np.uint8),
                  compress=compress)
    data = load_image_classification(tmp_path)
    x, y = data["train"]
    assert x.shape == (6, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.shape == (6,) and y.dtype == torch.int64
    assert data["test"][0].shape == (3, 28, 28)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_image_classification(tmp_path / "nowhere")


# ---------------------------------------------------------------- the tagging task's text

from birnn_ext.text import batch, build_dataset, encode, read_fortunes, segment  # noqa: E402


def test_read_fortunes_splits_entries_and_cleans_them(tmp_path):
    (tmp_path / "wisdom").write_text("Look  before\nyou LEAP.\n%\nshort\n%\nTabs\tand caf\xe9 are fine here!\n%\n",
                                     encoding="latin-1")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01")  # index files are skipped
    (tmp_path / "art").write_text("#### a picture, not prose ####\n%\n")  # skipped by name
    entries = read_fortunes(tmp_path)
    assert entries == ["look before you leap.", "tabs and caf are fine here!"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no fortune files"):
        read_fortunes(tmp_path / "empty")


def test_segment_labels_the_characters_before_a_space():
    pieces = segment("the cat sat", max_chars=80)
    assert pieces == [("thecatsat", [0, 0, 1, 0, 0, 1, 0, 0, 0])]
    # Cut at word boundaries; a piece's last character is never labelled.
    pieces = segment("aa bb cc dd", max_chars=5)
    assert [p for p, _ in pieces] == ["aabb", "ccdd"]
    assert [lab for _, lab in pieces] == [[0, 1, 0, 0], [0, 1, 0, 0]]
    # A word longer than a piece is cut to fit.
    assert segment("abcdefgh", max_chars=3) == [("abc", [0, 0, 0])]


def test_dataset_split_encoding_and_padded_batches():
    entries = [f"entry number {i} has some words in it" for i in range(20)]
    train, test = build_dataset(entries, max_chars=12, test_every=10)
    assert len(test) > 0 and len(train) > len(test)
    assert encode("a!~") == [ord("a") - 32, 1, 94]
    x, y, lengths = batch([(encode("abc"), [0, 1, 0]), (encode("de"), [1, 0])])
    assert x.tolist() == [[65, 66, 67], [68, 69, 0]]
    assert y.tolist() == [[0, 1, 0], [1, 0, 0]] and lengths.tolist() == [3, 2]


def _write_tiny_mnist(folder, n_train=120, n_test=40):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        images = (rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.slow
def test_demo_trains_under_torchrun_with_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    _write_tiny_mnist(tmp_path)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "birnn_ext.demo", "--compare", "--epochs", "1", "--batch-size", "20", "--hidden-size", "16",
           "--data", str(tmp_path), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["impl"] for r in summary] == ["fused", "torch"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in summary)
    # The weights saved by rank 0 load into the same model built on nn.LSTM.
    from birnn_ext.demo import RowClassifier

    RowClassifier(torch.nn.LSTM, hidden_size=16).load_state_dict(torch.load(tmp_path / "out" / "bilstm_fused.pt"))


@pytest.mark.slow
def test_demo_compiles_the_fused_step_and_names_the_device(tmp_path):
    """--device cpu trains there even where a GPU is; --compile adds a run of the fused
    model with its whole training step compiled (on the CPU, inductor without CUDA
    graphs), beside the eager runs; the summary says what ran where."""
    from birnn_ext import demo

    _write_tiny_mnist(tmp_path)
    demo.main(["--compare", "--epochs", "1", "--batch-size", "20", "--hidden-size", "8", "--device", "cpu",
               "--compile", "default", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["impl"], r["compile"], r["device"]) for r in summary] == [
        ("fused", None, "cpu"), ("fused", "default", "cpu"), ("torch", None, "cpu")]
    eager, compiled = summary[0], summary[1]
    # The same model, data and seed: compiled, the step computes what eager does, to rounding.
    assert compiled["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=0.05)
    torch.testing.assert_close(torch.tensor(compiled["history"]["loss"]), torch.tensor(eager["history"]["loss"]),
                               rtol=1e-3, atol=1e-4)
    assert all(r["train_samples_per_s"] > 0 for r in summary)


def test_demo_refuses_a_missing_gpu():
    from birnn_ext import demo

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    with pytest.raises(SystemExit, match="--device cuda: no GPU"):
        demo.pick_device("cuda", 1)
