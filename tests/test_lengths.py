"""Variable-length batches: padded + lengths, PackedSequence in sorted and unsorted
order, and nn.LSTM on the PackedSequence all agree; each sequence run alone gives the
rows and final state it has inside the batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from birnn_ext import FusedLSTM
from helpers import assert_close

LENGTHS = [3, 7, 1, 5, 7, 2]  # unsorted, with ties, with a length of 1 and of T
T, I, H = 7, 4, 6


def models(num_layers, bidirectional, proj_size, dtype=torch.float64):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=proj_size, dtype=dtype)
    return ref, FusedLSTM.from_lstm(ref)


def grads_of(out, h, c, leaves):
    g = torch.Generator().manual_seed(9)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (out, h, c))
    return torch.autograd.grad(loss, leaves)


CONFIGS = list(itertools.product([1, 2, 3], [False, True], [0, 3]))


@pytest.mark.parametrize("num_layers,bidirectional,proj_size", CONFIGS)
def test_padded_packed_and_nn_lstm_agree(num_layers, bidirectional, proj_size):
    dtype = torch.float64
    ref, fused = models(num_layers, bidirectional, proj_size)
    lengths = torch.tensor(LENGTHS)
    B = len(LENGTHS)
    x0 = torch.randn(T, B, I, dtype=dtype)
    # Padding holds garbage: nothing past a sequence's end may leak into any result.
    for b, n in enumerate(LENGTHS):
        x0[n:, b] = 1e3
    results = {}
    for name in ("nn.LSTM packed", "fused packed unsorted", "fused packed sorted", "fused padded+lengths"):
        x = x0.clone().requires_grad_()
        params = list((ref if name.startswith("nn") else fused).parameters())
        if name == "fused packed sorted":
            order = torch.argsort(lengths, descending=True)
            packed = pack_padded_sequence(x[:, order], lengths[order], enforce_sorted=True)
        else:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        if name == "fused padded+lengths":
            out, (h, c) = fused(x, lengths=lengths)
        else:
            out_p, (h, c) = (ref if name.startswith("nn") else fused)(packed)
            out, _ = pad_packed_sequence(out_p, total_length=T)
            if name == "fused packed sorted":
                inverse = torch.argsort(order)
                out, h, c = out[:, inverse], h[:, inverse], c[:, inverse]
        grads = grads_of(out, h, c, [x, *params])
        results[name] = [out, h, c, *grads]
    want = results["nn.LSTM packed"]
    for name, got in results.items():
        for k, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, dtype, f"{name}, item {k}")
    # Outputs past each sequence's end are exactly zero.
    out = results["fused padded+lengths"][0]
    for b, n in enumerate(LENGTHS):
        assert (out[n:, b] == 0).all()


@pytest.mark.parametrize("bidirectional,proj_size", [(True, 0), (False, 0), (True, 3)])
def test_each_sequence_alone_matches_the_batch(bidirectional, proj_size):
    ref, fused = models(2, bidirectional, proj_size)
    B = len(LENGTHS)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with torch.no_grad():
        out, (h, c) = fused(x, lengths=LENGTHS)
        for b, n in enumerate(LENGTHS):
            out_b, (h_b, c_b) = fused(x[:n, b : b + 1])
            assert_close(out[:n, b : b + 1], out_b, torch.float64, f"sequence {b} output")
            assert_close(h[:, b : b + 1], h_b, torch.float64, f"sequence {b} h_n")
            assert_close(c[:, b : b + 1], c_b, torch.float64, f"sequence {b} c_n")


def test_float32_batch_with_lengths_and_given_states():
    ref, fused = models(2, True, 0, torch.float32)
    B = len(LENGTHS)
    x = torch.randn(B, T, I)
    hx = (torch.randn(4, B, H), torch.randn(4, B, H))
    ref.batch_first = fused.batch_first = True
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False)
    out_r, (h_r, c_r) = ref(packed, hx)
    out_r, _ = pad_packed_sequence(out_r, batch_first=True, total_length=T)
    out_f, (h_f, c_f) = fused(x, hx, lengths=torch.tensor(LENGTHS, dtype=torch.int32))
    for a, b in ((out_f, out_r), (h_f, h_r), (c_f, c_r)):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("proj_size", [0, 3])
def test_inference_in_several_projection_chunks(with_lengths, proj_size):
    # Inference projects x in chunks of about 256 rows per direction: B=64 gives chunks
    # of 4 steps, so T=10 makes two full chunks and a shorter last one.
    ref, fused = models(2, True, proj_size, torch.float64)
    T_, B = 10, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T_, B, I, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T_ + 1, (B,), generator=g) if with_lengths else torch.full((B,), T_)
    with torch.no_grad():
        out_r, (h_r, c_r) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out_r, _ = pad_packed_sequence(out_r, total_length=T_)
        out_f, (h_f, c_f) = fused(x, lengths=lengths) if with_lengths else fused(x)
    for a, b, what in ((out_f, out_r, "output"), (h_f, h_r, "h_n"), (c_f, c_r, "c_n")):
        assert_close(a, b, torch.float64, what)
