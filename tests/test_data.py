"""The IDX reader on small files written here, plain and gzipped."""

from __future__ import annotations

import gzip
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
